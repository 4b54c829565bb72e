"""broker/websocket.py's frame reader and handshake parser, in-process (the
real-broker tests are tests/broker/test_websocket.py)."""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from raftmq.broker.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    FrameReader,
    HandshakeError,
    ProtocolViolation,
    accept_key,
    parse_request,
    unmask,
)


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0xFE, n)
    else:
        head = struct.pack("!BBQ", b0, 0xFF, n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6), st.data())
def test_any_split_gives_the_same_bytes(payloads, data):
    stream = b""
    for i, p in enumerate(payloads):
        last = i == len(payloads) - 1
        stream += _frame(OP_BINARY if i == 0 else 0, p, fin=last)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = FrameReader()
    got = b""
    prev = 0
    for cut in [*cuts, len(stream)]:
        for op, chunk in reader.feed(stream[prev:cut]):
            assert op == OP_BINARY
            got += chunk
        prev = cut
    assert got == b"".join(payloads)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data):
    reader = FrameReader()
    try:
        reader.feed(data)
    except ProtocolViolation as exc:
        assert exc.code in (1002, 1003)


def test_control_frames_and_close_codes():
    reader = FrameReader()
    events = reader.feed(_frame(OP_PING, b"hi") + _frame(OP_CLOSE, struct.pack("!H", 1001) + b"x"))
    assert events == [(OP_PING, b"hi"), (OP_CLOSE, (1001, "x"))]
    for code in (999, 1005, 1006, 1015, 2000, 5000):
        try:
            FrameReader().feed(_frame(OP_CLOSE, struct.pack("!H", code)))
        except ProtocolViolation as exc:
            assert exc.code == 1002
        else:
            raise AssertionError(code)


def test_unmask_offsets():
    key = b"\x01\x02\x03\x04"
    data = bytes(range(10))
    whole = unmask(data, key, 0)
    assert unmask(data[3:], key, 3) == whole[3:]


def test_handshake_rfc_example_and_errors():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    good = ("GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: mqtt")
    answer = parse_request(good.encode())
    assert b"101 Switching Protocols" in answer and b"Sec-WebSocket-Protocol: mqtt\r\n" in answer
    for bad, status in [(good.replace("GET", "PUT"), 405), (good.replace("13", "12"), 426),
                        (good.replace("Upgrade: WebSocket", "Upgrade: h2c"), 400),
                        (good.replace("mqtt", "wamp"), 400),
                        (good.replace("HTTP/1.1", "HTTP/1.0"), 505)]:
        try:
            parse_request(bad.encode())
        except HandshakeError as exc:
            assert exc.status == status, (bad, exc.status)
        else:
            raise AssertionError(bad)
