"""A small, independent MQTT 3.1 / 3.1.1 / 5.0 packet encoder/decoder and a raw socket client.

Written for the tests only, from the OASIS standards, so that protocol tests check
the broker on the wire independently of raftmq's own Cython codec.  It encodes
what a client sends and decodes what a server sends; it is deliberately
permissive on encode (tests build broken packets on purpose) and strict enough on
decode to notice a broker that sends garbage.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

# MQTT 5.0 §2.2.2.2: identifier -> (name, type)
PROPS: dict[int, tuple[str, str]] = {
    0x01: ("payload_format_indicator", "byte"),
    0x02: ("message_expiry_interval", "u32"),
    0x03: ("content_type", "str"),
    0x08: ("response_topic", "str"),
    0x09: ("correlation_data", "bin"),
    0x0B: ("subscription_identifier", "varint"),
    0x11: ("session_expiry_interval", "u32"),
    0x12: ("assigned_client_identifier", "str"),
    0x13: ("server_keep_alive", "u16"),
    0x15: ("authentication_method", "str"),
    0x16: ("authentication_data", "bin"),
    0x17: ("request_problem_information", "byte"),
    0x18: ("will_delay_interval", "u32"),
    0x19: ("request_response_information", "byte"),
    0x1A: ("response_information", "str"),
    0x1C: ("server_reference", "str"),
    0x1F: ("reason_string", "str"),
    0x21: ("receive_maximum", "u16"),
    0x22: ("topic_alias_maximum", "u16"),
    0x23: ("topic_alias", "u16"),
    0x24: ("maximum_qos", "byte"),
    0x25: ("retain_available", "byte"),
    0x26: ("user_property", "pair"),
    0x27: ("maximum_packet_size", "u32"),
    0x28: ("wildcard_subscription_available", "byte"),
    0x29: ("subscription_identifier_available", "byte"),
    0x2A: ("shared_subscription_available", "byte"),
}
PROP_IDS = {name: (pid, kind) for pid, (name, kind) in PROPS.items()}
MULTI = {"user_property", "subscription_identifier"}


class ProtocolViolation(Exception):
    """The server sent something this decoder cannot accept."""


# ---------------------------------------------------------------------------
# primitives


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def binary(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def encode_props(props: dict[str, Any] | None) -> bytes:
    body = bytearray()
    for name, value in (props or {}).items():
        pid, kind = PROP_IDS[name]
        values = value if name in MULTI and isinstance(value, list) else [value]
        for v in values:
            body.append(pid)
            if kind == "byte":
                body.append(v)
            elif kind == "u16":
                body += struct.pack("!H", v)
            elif kind == "u32":
                body += struct.pack("!I", v)
            elif kind == "varint":
                body += varint(v)
            elif kind == "str":
                body += utf8(v)
            elif kind == "bin":
                body += binary(v)
            elif kind == "pair":
                body += utf8(v[0]) + utf8(v[1])
    return varint(len(body)) + bytes(body)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


# ---------------------------------------------------------------------------
# client -> server encoders


@dataclass
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    props: dict[str, Any] | None = None


def connect(
    client_id: str | bytes = "",
    version: int = 4,
    clean: bool = True,
    keepalive: int = 60,
    username: str | None = None,
    password: bytes | None = None,
    will: Will | None = None,
    props: dict[str, Any] | None = None,
    protocol_name: str | None = None,
) -> bytes:
    name = protocol_name or ("MQIsdp" if version == 3 else "MQTT")
    flags = 0x02 if clean else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = utf8(name) + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        body += encode_props(props)
    body += utf8(client_id)
    if will is not None:
        if version == 5:
            body += encode_props(will.props)
        body += utf8(will.topic) + binary(will.payload)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += binary(password)
    return packet(CONNECT, 0, body)


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    pid: int | None = None,
    props: dict[str, Any] | None = None,
    version: int = 4,
) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = utf8(topic)
    if qos:
        body += struct.pack("!H", pid if pid is not None else 1)
    if version == 5:
        body += encode_props(props)
    return packet(PUBLISH, flags, body + payload)


def ack(ptype: int, pid: int, reason: int = 0, props: dict[str, Any] | None = None,
        version: int = 4) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP."""
    body = struct.pack("!H", pid)
    if version == 5 and (reason or props):
        body += bytes([reason]) + (encode_props(props) if props else b"")
    return packet(ptype, 0x02 if ptype == PUBREL else 0, body)


def subscribe(pid: int, filters: list[tuple[str, int]], props: dict[str, Any] | None = None,
              version: int = 4) -> bytes:
    """``filters``: (topic filter, options byte) -- the QoS for 3.1.1."""
    body = struct.pack("!H", pid)
    if version == 5:
        body += encode_props(props)
    for topic, options in filters:
        body += utf8(topic) + bytes([options])
    return packet(SUBSCRIBE, 0x02, body)


def sub_options(qos: int = 0, no_local: bool = False, rap: bool = False, rh: int = 0) -> int:
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (rh << 4)


def unsubscribe(pid: int, filters: list[str], props: dict[str, Any] | None = None,
                version: int = 4) -> bytes:
    body = struct.pack("!H", pid)
    if version == 5:
        body += encode_props(props)
    for topic in filters:
        body += utf8(topic)
    return packet(UNSUBSCRIBE, 0x02, body)


def pingreq() -> bytes:
    return b"\xc0\x00"


def disconnect(reason: int = 0, props: dict[str, Any] | None = None, version: int = 4) -> bytes:
    if version == 5 and (reason or props):
        return packet(DISCONNECT, 0, bytes([reason]) + encode_props(props))
    return b"\xe0\x00"


def auth(reason: int = 0, props: dict[str, Any] | None = None) -> bytes:
    return packet(AUTH, 0, bytes([reason]) + encode_props(props))


# ---------------------------------------------------------------------------
# server -> client decoder


@dataclass
class Packet:
    type: int
    flags: int = 0
    pid: int | None = None
    reason: int | None = None  # CONNACK return/reason code, PUBACK.. reason, DISCONNECT reason
    session_present: bool = False
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    codes: list[int] = field(default_factory=list)  # SUBACK / UNSUBACK
    props: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type{self.type}")

    def __repr__(self) -> str:
        parts = [self.name]
        for attr in ("pid", "reason", "topic", "payload", "qos", "retain", "dup", "codes", "props"):
            value = getattr(self, attr)
            if value not in (None, "", b"", 0, False, [], {}):
                parts.append(f"{attr}={value!r}")
        return "<" + " ".join(parts) + ">"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.left() < n:
            raise ProtocolViolation(f"truncated packet: need {n} bytes, have {self.left()}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("!I", self.take(4))[0]

    def varint(self) -> int:
        value, mult = 0, 1
        for _ in range(4):
            b = self.byte()
            value += (b & 0x7F) * mult
            if not b & 0x80:
                return value
            mult *= 128
        raise ProtocolViolation("malformed variable byte integer")

    def string(self) -> str:
        raw = self.take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(f"server sent invalid UTF-8 {raw!r}") from exc

    def props(self) -> dict[str, Any]:
        end = self.varint()
        sub = _Reader(self.take(end))
        out: dict[str, Any] = {}
        while sub.left():
            pid = sub.varint()
            if pid not in PROPS:
                raise ProtocolViolation(f"unknown property 0x{pid:02x}")
            name, kind = PROPS[pid]
            if kind == "byte":
                v: Any = sub.byte()
            elif kind == "u16":
                v = sub.u16()
            elif kind == "u32":
                v = sub.u32()
            elif kind == "varint":
                v = sub.varint()
            elif kind == "str":
                v = sub.string()
            elif kind == "bin":
                v = sub.take(sub.u16())
            else:
                v = (sub.string(), sub.string())
            if name in MULTI:
                out.setdefault(name, []).append(v)
            elif name in out:
                raise ProtocolViolation(f"property {name} twice")
            else:
                out[name] = v
        return out


def decode(first: int, body: bytes, version: int) -> Packet:
    ptype, flags = first >> 4, first & 0x0F
    r = _Reader(body)
    p = Packet(type=ptype, flags=flags, raw=bytes([first]) + varint(len(body)) + body)
    v5 = version == 5
    if ptype == CONNACK:
        p.session_present = bool(r.byte() & 1)
        p.reason = r.byte()
        if v5 and r.left():
            p.props = r.props()
    elif ptype == PUBLISH:
        p.dup, p.qos, p.retain = bool(flags & 8), (flags >> 1) & 3, bool(flags & 1)
        if p.qos == 3:
            raise ProtocolViolation("server sent QoS 3")
        p.topic = r.string()
        if p.qos:
            p.pid = r.u16()
        if v5:
            p.props = r.props()
        p.payload = r.take(r.left())
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        p.pid = r.u16()
        p.reason = 0
        if v5 and r.left():
            p.reason = r.byte()
            if r.left():
                p.props = r.props()
    elif ptype in (SUBACK, UNSUBACK):
        p.pid = r.u16()
        if v5:
            p.props = r.props()
        p.codes = list(r.take(r.left()))
    elif ptype == DISCONNECT or ptype == AUTH:
        p.reason = 0
        if r.left():
            p.reason = r.byte()
            if r.left():
                p.props = r.props()
    elif ptype == PINGRESP:
        pass
    else:
        raise ProtocolViolation(f"server sent a {p.name} packet")
    if r.left():
        raise ProtocolViolation(f"{r.left()} trailing bytes in {p.name}")
    return p


# ---------------------------------------------------------------------------
# raw socket client


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """A blocking MQTT client over a plain socket that sends exactly what it is told.

    ``recv()`` returns the next server packet or raises ``TimeoutError`` /
    ``Closed``.  Topic aliases sent by the server are resolved into ``topic``.
    """

    def __init__(self, host: str, port: int, version: int = 4, timeout: float = 5.0) -> None:
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.aliases: dict[int, str] = {}
        self.eof = False

    # -- sending
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, client_id: str | bytes = "", **kw: Any) -> Packet:
        """Send CONNECT and return the CONNACK (raises if something else comes)."""
        kw.setdefault("version", self.version)
        self.send(connect(client_id, **kw))
        p = self.recv()
        if p.type != CONNACK:
            raise AssertionError(f"expected CONNACK, got {p}")
        return p

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, **kw: Any) -> None:
        self.send(publish(topic, payload, qos, version=self.version, **kw))

    def subscribe(self, pid: int, filters: list[tuple[str, int]], props: dict | None = None) -> Packet:
        self.send(subscribe(pid, filters, props, version=self.version))
        return self.expect(SUBACK)

    def ack(self, ptype: int, pid: int, reason: int = 0, props: dict | None = None) -> None:
        self.send(ack(ptype, pid, reason, props, version=self.version))

    def disconnect(self, reason: int = 0, props: dict | None = None) -> None:
        self.send(disconnect(reason, props, version=self.version))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- receiving
    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet from the server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise
        except ConnectionError as exc:
            self.eof = True
            raise Closed(str(exc)) from exc
        if not chunk:
            self.eof = True
            raise Closed("connection closed by the server")
        self.buf += chunk

    def recv(self, timeout: float = 3.0) -> Packet:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                length, mult, i = 0, 1, 1
                complete = False
                while i < len(self.buf) and i <= 4:
                    b = self.buf[i]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        complete = True
                        break
                if not complete and i > 4:
                    raise ProtocolViolation("malformed remaining length from the server")
                if complete and len(self.buf) >= i + length:
                    first = self.buf[0]
                    body = bytes(self.buf[i:i + length])
                    del self.buf[:i + length]
                    p = decode(first, body, self.version)
                    self._resolve_alias(p)
                    return p
            if self.eof:
                raise Closed("connection closed by the server")
            self._fill(deadline)

    def _resolve_alias(self, p: Packet) -> None:
        if p.type != PUBLISH or "topic_alias" not in p.props:
            return
        alias = p.props["topic_alias"]
        if p.topic:
            self.aliases[alias] = p.topic
        elif alias in self.aliases:
            p.topic = self.aliases[alias]
        else:
            raise ProtocolViolation(f"server used unknown topic alias {alias}")

    def expect(self, ptype: int, timeout: float = 3.0) -> Packet:
        """The next packet, which must be of type ``ptype``."""
        p = self.recv(timeout)
        if p.type != ptype:
            raise AssertionError(f"expected {NAMES[ptype]}, got {p}")
        return p

    def recv_publish(self, timeout: float = 3.0, auto_ack: bool = True) -> Packet:
        """The next PUBLISH; PINGRESP skipped.  With ``auto_ack`` QoS 1 gets PUBACK, QoS 2
        PUBREC, and any PUBREL that arrives meanwhile gets its PUBCOMP."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.recv(max(0.0, deadline - time.monotonic()))
            if p.type == PINGRESP:
                continue
            if auto_ack and p.type == PUBREL:
                self.ack(PUBCOMP, p.pid)
                continue
            if p.type != PUBLISH:
                raise AssertionError(f"expected PUBLISH, got {p}")
            if auto_ack and p.qos == 1:
                self.ack(PUBACK, p.pid)
            elif auto_ack and p.qos == 2:
                self.ack(PUBREC, p.pid)
            return p

    def drain_publishes(self, quiet: float = 0.3, auto_ack: bool = True,
                        first: float = 3.0) -> list[Packet]:
        """Every PUBLISH until ``quiet`` seconds pass without one.

        The first one may take up to ``first`` seconds (a loaded machine must not make a
        test see "nothing"); use ``nothing_for`` to check that nothing comes.
        """
        out = []
        wait = max(first, quiet)
        while True:
            try:
                out.append(self.recv_publish(wait, auto_ack))
            except TimeoutError:
                return out
            wait = quiet

    def collect(self, seconds: float, auto_ack: bool = True) -> list[Packet]:
        """Every PUBLISH that arrives within the next ``seconds``."""
        deadline = time.monotonic() + seconds
        out = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            try:
                out.append(self.recv_publish(remaining, auto_ack))
            except TimeoutError:
                return out

    def no_publish_pending(self, extra: float = 0.1) -> bool:
        """True if no PUBLISH is queued for this client: a PINGREQ round trip is a barrier
        (the server answers it after what it already sent to us), then ``extra`` seconds."""
        self.send(b"\xc0\x00")
        while True:
            p = self.recv(3.0)
            if p.type == PINGRESP:
                break
            raise AssertionError(f"expected silence, got {p}")
        return self.nothing_for(extra)

    def nothing_for(self, seconds: float) -> bool:
        """True if no packet (other than PINGRESP) arrives for ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            try:
                p = self.recv(remaining)
            except TimeoutError:
                return True
            if p.type != PINGRESP:
                raise AssertionError(f"expected silence, got {p}")

    def wait_closed(self, timeout: float = 3.0) -> list[Packet]:
        """Wait until the server closes the connection; return what it sent before."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"server did not close the connection; got {got}")
            try:
                got.append(self.recv(remaining))
            except Closed:
                return got
            except TimeoutError as exc:
                raise AssertionError(f"server did not close the connection; got {got}") from exc

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
