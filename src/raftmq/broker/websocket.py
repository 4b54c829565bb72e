"""MQTT over WebSockets (RFC 6455, server side): the HTTP Upgrade and the frames.

``Handshake`` reads the client's HTTP/1.1 Upgrade request and builds the
answer; ``FrameReader`` turns the bytes of the connection into MQTT bytes and
control frames; ``frame`` builds an outgoing (unmasked) frame.  The stream
layer (broker/streams.py) uses them between the TCP/TLS transport and the MQTT
``Connection``, which never knows it is spoken to over a WebSocket.

What a client gets:

- **Handshake**: a GET with ``Upgrade: websocket``, ``Connection: Upgrade``,
  a ``Sec-WebSocket-Key`` of 16 base64 bytes and ``Sec-WebSocket-Version: 13``
  is answered ``101 Switching Protocols`` with the ``Sec-WebSocket-Accept``.
  Subprotocols: the first of the client's ``Sec-WebSocket-Protocol`` list that
  is ``mqtt`` or ``mqttv3.1`` is chosen and echoed (as Mosquitto); a request
  without the header is accepted without one (as Mosquitto; browsers' MQTT
  libraries always send it).  Any path is accepted.  A bad request is answered
  with its HTTP status and closed: 405 (not GET), 505 (not HTTP/1.1), 400
  (no Upgrade, no or bad key, only unknown subprotocols, a malformed request),
  426 with ``Sec-WebSocket-Version: 13`` (another version), 431 (headers over
  8 KB).  (Mosquitto 2.0.11's libwebsockets closes without an answer, or
  accepts a bad key or version: tests/broker/test_websocket.py records both.)
- **Frames**: binary frames carry MQTT bytes in any split -- an MQTT packet
  may span frames, a frame may hold several packets; the payload is passed on
  as it arrives, so a frame never has to fit in memory (``max_packet_size``
  is enforced by the MQTT parser on the packets themselves).  Fragmented
  messages (continuation frames) are MQTT bytes like any other.  Client frames
  must be masked, RSV bits zero, control frames short and unfragmented, no
  text frames (MQTT is binary): a violation is answered with a Close frame,
  1002 (protocol error) or 1003 (text), and the connection closed.  Ping gets
  a Pong with its payload; a Close gets a Close with the same code; the broker
  closing an MQTT connection sends Close 1000 first.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOLS = ("mqtt", "mqttv3.1")
MAX_REQUEST = 8192  # bytes of request line and headers

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_TOO_BIG = 1009

_REASONS = {400: "Bad Request", 405: "Method Not Allowed", 426: "Upgrade Required",
            431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}


class HandshakeError(Exception):
    def __init__(self, status: int, why: str, extra: str = "") -> None:
        super().__init__(why)
        self.status = status
        self.extra = extra

    def response(self) -> bytes:
        body = f"{self.status} {_REASONS[self.status]}: {self}\n".encode()
        return (f"HTTP/1.1 {self.status} {_REASONS[self.status]}\r\n{self.extra}"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode() + body


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode()


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def parse_request(head: bytes) -> bytes:
    """The 101 answer to a complete request head (up to and without the blank
    line), or HandshakeError with the status to answer."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # (latin-1 decodes anything; kept for clarity)
        raise HandshakeError(400, "undecodable request") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HandshakeError(400, "malformed request line")
    method, _target, version = parts
    if version != "HTTP/1.1":
        raise HandshakeError(505, "WebSocket needs HTTP/1.1")
    if method != "GET":
        raise HandshakeError(405, "only GET can upgrade", "Allow: GET\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HandshakeError(400, "malformed header line")
        name = name.lower()
        value = value.strip()
        # Repeated headers combine into one list (RFC 9110 §5.3).
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        raise HandshakeError(400, "not a WebSocket upgrade (Upgrade: websocket missing)")
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise HandshakeError(400, "Connection: Upgrade missing")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise HandshakeError(426, "unsupported WebSocket version", "Sec-WebSocket-Version: 13\r\n")
    key = headers.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error) as exc:
        raise HandshakeError(400, "Sec-WebSocket-Key is not 16 bytes in base64") from exc
    chosen = None
    if "sec-websocket-protocol" in headers:
        offered = _tokens(headers["sec-websocket-protocol"])
        chosen = next((p for p in offered if p in SUBPROTOCOLS), None)
        if chosen is None:
            raise HandshakeError(400, "no supported subprotocol (mqtt, mqttv3.1) offered")
    answer = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Accept: {accept_key(key)}\r\n")
    if chosen is not None:
        answer += f"Sec-WebSocket-Protocol: {chosen}\r\n"
    return (answer + "\r\n").encode("ascii")


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (the server never masks, RFC 6455 §5.1)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:123])


def unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` starting at mask byte ``offset``:
    one big-integer XOR, no Python loop per byte."""
    n = len(data)
    if not n:
        return b""
    if offset:
        mask = mask[offset:] + mask[:offset]
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class ProtocolViolation(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.events: list = []  # what the same read held before the violation


class FrameReader:
    """Incremental parser of client frames.  ``feed(data)`` returns a list of
    events: ``(OP_BINARY, payload bytes)`` for MQTT bytes (any split),
    ``(OP_PING, payload)``, ``(OP_PONG, payload)``, ``(OP_CLOSE, (code, reason))``;
    ProtocolViolation for a frame the RFC forbids."""

    __slots__ = ("buf", "remaining", "mask", "offset", "opcode", "fragmented", "control",
                 "closed")

    def __init__(self) -> None:
        self.buf = b""
        self.remaining = 0  # payload bytes still to come of the current data frame
        self.mask = b""
        self.offset = 0  # position in the mask of the next payload byte
        self.opcode = 0
        self.fragmented = False  # a data message was started and not finished
        self.control: tuple[int, int, bytes] | None = None
        self.closed = False

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        events: list[tuple[int, object]] = []
        try:
            return self._feed(data, events)
        except ProtocolViolation as exc:
            exc.events = events
            self.closed = True
            raise

    def _feed(self, data: bytes, events: list[tuple[int, object]]) -> list[tuple[int, object]]:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        end = len(buf)
        while pos < end and not self.closed:
            if self.remaining:
                # Streamed payload of a data frame: pass it on as it arrives.
                take = min(self.remaining, end - pos)
                chunk = unmask(buf[pos:pos + take], self.mask, self.offset)
                self.offset = (self.offset + take) & 3
                self.remaining -= take
                pos += take
                events.append((OP_BINARY, chunk))
                continue
            if end - pos < 2:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            need = 2 + (2 if length == 126 else 8 if length == 127 else 0) + 4
            if end - pos < need:
                if not b1 & 0x80:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "unmasked frame from a client")
                break
            fin = b0 & 0x80
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if not b1 & 0x80:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "unmasked frame from a client")
            if length == 126:
                length = struct.unpack_from("!H", buf, pos + 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                if length >> 63:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "frame length out of range")
            mask = buf[pos + need - 4:pos + need]
            if opcode >= 0x8:
                if not fin or length > 125:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "bad control frame")
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                if end - pos < need + length:
                    break  # control frames are read whole
                payload = unmask(buf[pos + need:pos + need + length], mask, 0)
                pos += need + length
                if opcode == OP_CLOSE:
                    events.append((OP_CLOSE, _close_payload(payload)))
                    self.closed = True
                else:
                    events.append((opcode, payload))
                continue
            if opcode == OP_TEXT:
                raise ProtocolViolation(CLOSE_UNSUPPORTED, "text frame (MQTT needs binary frames)")
            if opcode == OP_BINARY:
                if self.fragmented:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            elif opcode == OP_CONTINUATION:
                if not self.fragmented:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            else:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            self.fragmented = not fin
            self.mask = mask
            self.offset = 0
            self.remaining = length
            pos += need
        if pos < end:
            self.buf = buf[pos:]
        return events


def _close_payload(payload: bytes) -> tuple[int, str]:
    if not payload:
        return CLOSE_NORMAL, ""  # no status code (1005): answered with 1000
    if len(payload) == 1:
        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "one-byte close payload")
    code = struct.unpack_from("!H", payload)[0]
    if code < 1000 or code in (1004, 1005, 1006, 1015) or 1015 < code < 3000 or code >= 5000:
        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "close reason is not UTF-8") from exc
    return code, reason
