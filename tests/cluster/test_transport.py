"""Peer transport (raft/transport.py) and channel framing (raft/channel.py), in one process.

Real TCP on loopback between PeerTransport instances: the HMAC challenge-
response admits a peer with the secret and refuses (and logs) one without;
frames are authenticated after the handshake; the secret file must be private.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct

import pytest

from raftmq.raft import channel as ch
from raftmq.raft.transport import PeerTransport, SecretFileError, read_secret_file

pytestmark = pytest.mark.timeout(30)

SECRET = b"s" * 32


async def _pair(secret_a: bytes, secret_b: bytes, got: list) -> tuple[PeerTransport, PeerTransport]:
    a = PeerTransport(1, secret_a, ("127.0.0.1", 0), lambda src, msgs: got.append(("a", src, msgs)))
    b = PeerTransport(2, secret_b, ("127.0.0.1", 0), lambda src, msgs: got.append(("b", src, msgs)))
    await a.start()
    await b.start()
    a.set_peer(2, *b.sockname)
    b.set_peer(1, *a.sockname)
    return a, b


async def _until(cond, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_peers_with_the_secret_exchange_batched_messages() -> None:
    async def main() -> list:
        got: list = []
        a, b = await _pair(SECRET, SECRET, got)
        try:
            assert await _until(lambda: a.connected(2) and b.connected(1))
            assert a.send(2, b"one") and a.send(2, b"two")
            a.flush()  # one frame for both
            assert b.send(1, b"back")
            b.flush()
            assert await _until(lambda: len(got) == 2)
        finally:
            await a.close()
            await b.close()
        return got

    got = asyncio.run(main())
    assert ("b", 1, [b"one", b"two"]) in got
    assert ("a", 2, [b"back"]) in got


def test_peer_without_the_secret_is_refused_and_logged(caplog) -> None:
    caplog.set_level(logging.INFO, logger="raftmq.raft.transport")

    async def main() -> list:
        got: list = []
        a, b = await _pair(SECRET, b"w" * 32, got)
        try:
            await asyncio.sleep(0.5)
            assert not a.connected(2) and not b.connected(1)
            assert not b.send(1, b"inject")
            b.flush()
            await asyncio.sleep(0.1)
        finally:
            await a.close()
            await b.close()
        return got

    assert asyncio.run(main()) == []
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Refused raft peer 127.0.0.1:")]
    assert refusals and all(m.endswith(": bad authentication") for m in refusals)


def test_tampered_frame_is_rejected_and_the_connection_closed(caplog) -> None:
    """Frames after the handshake carry an HMAC: flipping one byte on the wire is detected."""
    caplog.set_level(logging.INFO, logger="raftmq.raft.transport")

    async def main() -> list:
        got: list = []
        a, b = await _pair(SECRET, SECRET, got)
        try:
            assert await _until(lambda: a.connected(2))
            w = a.peers[2].writer
            assert w is not None
            from raftmq.raft.transport import encode_frame

            frame = bytearray(encode_frame(a.peers[2].mac, [b"payload"]))
            frame[10] ^= 0xFF
            w.write(bytes(frame))
            await asyncio.sleep(0.3)
        finally:
            await a.close()
            await b.close()
        return got

    assert asyncio.run(main()) == []
    assert any("frame failed authentication" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660])
def test_secret_file_accessible_to_others_is_refused(tmp_path, mode) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    os.chmod(path, mode)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_secret_file(str(path))


def test_secret_file_private_and_long_enough(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    os.chmod(path, 0o600)
    assert read_secret_file(str(path)) == SECRET
    path.write_bytes(b"short")
    with pytest.raises(SecretFileError, match="fewer than 16"):
        read_secret_file(str(path))


def test_channel_frames_split_whole_bytewise_and_with_trailing_data() -> None:
    stream = b"".join([
        ch.request_frame(ch.PROPOSE, 7, b"ops"),
        ch.frame(ch.COMMITTED, ch.ids_body([1, 2, 3])),
        ch.frame(ch.LOAD),
    ])
    expected = [(ch.PROPOSE, struct.pack("<Q", 7) + b"ops"), (ch.COMMITTED, ch.ids_body([1, 2, 3])), (ch.LOAD, b"")]
    assert ch.FrameReader().feed(stream) == expected
    r = ch.FrameReader()
    out = []
    for i in range(len(stream)):
        out += r.feed(stream[i : i + 1])
    assert out == expected
    r = ch.FrameReader()
    assert r.feed(stream + b"\x09\x00") == expected  # half a header waits for the rest
    assert ch.parse_ids(out[1][1]) == [1, 2, 3]


def test_large_message_is_chunked_and_small_ones_keep_flowing() -> None:
    """A snapshot-sized message goes out one chunk per flush; heartbeat-sized
    messages sent meanwhile are not stuck behind it, and it arrives intact."""
    from raftmq.raft.transport import CHUNK_SIZE

    big = os.urandom(3 * CHUNK_SIZE + 12345)

    async def main() -> list:
        got: list = []
        a, b = await _pair(SECRET, SECRET, got)
        try:
            assert await _until(lambda: a.connected(2))
            assert a.send(2, big)
            a.send(2, b"beat-1")
            a.flush()
            a.send(2, b"beat-2")
            a.flush()
            assert await _until(lambda: any(big in msgs for _, _, msgs in got), 10)
        finally:
            await a.close()
            await b.close()
        return got

    got = asyncio.run(main())
    order = [m for _, _, msgs in got for m in msgs]
    assert order.count(big) == 1
    assert order.index(b"beat-2") < order.index(big)  # not stuck behind the big one
