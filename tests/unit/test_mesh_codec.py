"""ext/mesh.pyx: the frames between the workers of a node (raftmq.workers.mesh)."""

from __future__ import annotations

import pytest
from raftmq._mesh import fwd_frame, split_frames

from raftmq.state.entries import Message, decode_message, decode_properties, encode_properties
from raftmq.workers.mesh import FWD, FWD_SHARED

PROPS = {"content_type": "text/plain", "correlation_data": b"\x00\xffid",
         "user_property": [("k", "v"), ("k", "w")], "response_topic": "r/t",
         "payload_format_indicator": 1}


def frame(**kw: object) -> bytes:
    args = dict(kind=FWD, seq=7, sender=b"pub-1", assign=b"", topic="a/b/\u00e9".encode(),
                payload=b"\x00payload", qos=1, retain=True, props=b"", expiry_at=1234567890123)
    args.update(kw)
    return fwd_frame(args["kind"], args["seq"], args["sender"], args["assign"], args["topic"],
                     args["payload"], args["qos"], args["retain"], args["props"],
                     args["expiry_at"])


def test_round_trip_keeps_every_field() -> None:
    blob = encode_properties(PROPS)
    frames, used = split_frames(bytearray(frame(props=blob, assign=b'[["g","t/#"]]')), FWD,
                                FWD_SHARED)
    assert used == len(frame(props=blob, assign=b'[["g","t/#"]]'))
    (kind, seq, sender, assign, topic, payload, qos, retain, props, expiry), = frames
    assert (kind, seq, sender, assign) == (FWD, 7, "pub-1", b'[["g","t/#"]]')
    assert (topic, payload, qos, retain, expiry) == ("a/b/\u00e9", b"\x00payload", 1, True,
                                                     1234567890123)
    assert decode_properties(props) == PROPS


def test_message_part_is_entries_layout() -> None:
    """The frame's tail is exactly encode_message's layout (one format, two readers)."""
    raw = frame(sender=b"", props=encode_properties(PROPS))
    body = raw[5 + 12:]
    assert decode_message(body) == Message("a/b/\u00e9", b"\x00payload", 1, True, PROPS,
                                           1234567890123)


def test_partial_frames_wait_for_the_rest() -> None:
    one, two = frame(seq=1), frame(seq=2, kind=FWD_SHARED, sender=b"")
    data = one + two
    for cut in range(len(data)):
        frames, used = split_frames(bytearray(data[:cut]), FWD, FWD_SHARED)
        expected = 0 if cut < len(one) else 1
        assert len(frames) == expected
        assert used == (0 if expected == 0 else len(one))
    frames, used = split_frames(bytearray(data), FWD, FWD_SHARED)
    assert [f[1] for f in frames] == [1, 2] and frames[1][2] is None and used == len(data)


def test_other_frames_come_as_kind_and_body() -> None:
    raw = (1 + 3).to_bytes(4, "little") + bytes([9]) + b"abc"
    assert split_frames(bytearray(raw), FWD, FWD_SHARED) == ([(9, b"abc")], len(raw))


@pytest.mark.parametrize("corrupt", ["sender", "topic", "props", "empty"])
def test_lying_lengths_are_refused(corrupt: str) -> None:
    raw = bytearray(frame())
    if corrupt == "sender":
        raw[5 + 8:5 + 10] = (60000).to_bytes(2, "little")
    elif corrupt == "topic":
        raw[5 + 12 + 5:5 + 12 + 7] = (60000).to_bytes(2, "little")
    elif corrupt == "props":
        at = 5 + 12 + 5 + 2 + len("a/b/\u00e9".encode()) + 9
        raw[at:at + 4] = (10**6).to_bytes(4, "little")
    else:
        raw = bytearray(b"\x00\x00\x00\x00\x02")
    with pytest.raises(ValueError):
        split_frames(raw, FWD, FWD_SHARED)
