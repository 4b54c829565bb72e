"""raftmq._codec: table-driven encode/parse tests (h11 test_io style).

Every row is (version, direction, wire bytes, packet). Each row is parsed whole,
byte by byte, and followed by the first bytes of the next packet; the packet
must also encode back to exactly the same bytes. Expected bytes are spelled
out with the tiny independent helpers below (not with the codec under test).
A second table lists invalid packets with the exact MQTT 5 reason code the
parser must raise, and a few packets captured from mosquitto_pub and paho-mqtt
cross-check the codec against real clients.
"""

import shutil
import socket
import subprocess
import time

import pytest
from raftmq._codec import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTError,
    Parser,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

from raftmq import _codec as c

# ---------------------------------------------------------------------------
# Independent wire helpers


def vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def props(*parts: bytes) -> bytes:
    body = b"".join(parts)
    return vbi(len(body)) + body


def pkt(first: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes([first]) + vbi(len(body)) + body


CONNECT_BYTES = {
    3: pkt(0x10, s("MQIsdp"), b"\x03\x02", u16(60), s("c")),
    4: pkt(0x10, s("MQTT"), b"\x04\x02", u16(60), s("c")),
    5: pkt(0x10, s("MQTT"), b"\x05\x02", u16(60), b"\x00", s("c")),
}


def make_parser(version: int, direction: str, **kw) -> Parser:
    """A parser past its CONNECT: ``c2s`` parses client packets, ``s2c`` server packets."""
    if direction == "c2s":
        p = Parser(**kw)
        assert p.protocol_version == 0
        assert len(p.feed(CONNECT_BYTES[version])) == 1
        assert p.protocol_version == version
        return p
    p = Parser(is_server=False, **kw)
    p.protocol_version = version
    return p


# ---------------------------------------------------------------------------
# Valid packets: (version, direction, bytes, packet)

ALL_PUBLISH_PROPS = {
    "payload_format_indicator": 1,
    "message_expiry_interval": 3600,
    "content_type": "text/plain",
    "response_topic": "reply/here",
    "correlation_data": b"\x00\x01",
    "topic_alias": 7,
    "user_property": [("a", "1"), ("b", "2"), ("a", "3")],
}
ALL_PUBLISH_PROPS_BYTES = props(
    b"\x01\x01", b"\x02" + u32(3600), b"\x03" + s("text/plain"), b"\x08" + s("reply/here"),
    b"\x09" + s(b"\x00\x01"), b"\x23" + u16(7),
    b"\x26" + s("a") + s("1"), b"\x26" + s("b") + s("2"), b"\x26" + s("a") + s("3"))

ALL_CONNECT_PROPS = {
    "session_expiry_interval": 0xFFFFFFFF,
    "receive_maximum": 100,
    "maximum_packet_size": 1048576,
    "topic_alias_maximum": 10,
    "request_response_information": 1,
    "request_problem_information": 0,
    "authentication_method": "SCRAM-SHA-1",
    "authentication_data": b"xyz",
    "user_property": [("k", "v")],
}
ALL_CONNECT_PROPS_BYTES = props(
    b"\x11" + u32(0xFFFFFFFF), b"\x21" + u16(100), b"\x27" + u32(1048576), b"\x22" + u16(10),
    b"\x19\x01", b"\x17\x00", b"\x15" + s("SCRAM-SHA-1"), b"\x16" + s(b"xyz"),
    b"\x26" + s("k") + s("v"))

ALL_WILL_PROPS = {
    "will_delay_interval": 30,
    "payload_format_indicator": 0,
    "message_expiry_interval": 10,
    "content_type": "ct",
    "response_topic": "rt",
    "correlation_data": b"cd",
    "user_property": [("w", "x")],
}
ALL_WILL_PROPS_BYTES = props(
    b"\x18" + u32(30), b"\x01\x00", b"\x02" + u32(10), b"\x03" + s("ct"), b"\x08" + s("rt"),
    b"\x09" + s(b"cd"), b"\x26" + s("w") + s("x"))

ALL_CONNACK_PROPS = {
    "session_expiry_interval": 120,
    "receive_maximum": 20,
    "maximum_qos": 1,
    "retain_available": 0,
    "maximum_packet_size": 65536,
    "assigned_client_identifier": "auto-1",
    "topic_alias_maximum": 5,
    "reason_string": "ok",
    "user_property": [("s", "t")],
    "wildcard_subscription_available": 1,
    "subscription_identifier_available": 1,
    "shared_subscription_available": 0,
    "server_keep_alive": 30,
    "response_information": "resp/",
    "server_reference": "other:1883",
    "authentication_method": "m",
    "authentication_data": b"d",
}
ALL_CONNACK_PROPS_BYTES = props(
    b"\x11" + u32(120), b"\x21" + u16(20), b"\x24\x01", b"\x25\x00", b"\x27" + u32(65536),
    b"\x12" + s("auto-1"), b"\x22" + u16(5), b"\x1f" + s("ok"), b"\x26" + s("s") + s("t"),
    b"\x28\x01", b"\x29\x01", b"\x2a\x00", b"\x13" + u16(30), b"\x1a" + s("resp/"),
    b"\x1c" + s("other:1883"), b"\x15" + s("m"), b"\x16" + s(b"d"))

ROWS = [
    # CONNECT
    (4, "c2s", pkt(0x10, s("MQTT"), b"\x04\x02", u16(60), s("dev1")),
     Connect(client_id="dev1")),
    (3, "c2s", pkt(0x10, s("MQIsdp"), b"\x03\x00", u16(10), s("old")),
     Connect(protocol_name="MQIsdp", protocol_version=3, clean_start=False, keepalive=10,
             client_id="old")),
    (4, "c2s", pkt(0x10, s("MQTT"), b"\x04\xf6", u16(0), s(""), s("will/t"), s(b"gone"),
                   s("user"), s(b"\x00pw")),
     Connect(keepalive=0, client_id="", will_topic="will/t", will_payload=b"gone", will_qos=2,
             will_retain=True, username="user", password=b"\x00pw")),
    (4, "c2s", pkt(0x10, s("MQTT"), b"\x04\x82", u16(60), s("u"), s("only-user")),
     Connect(client_id="u", username="only-user")),
    (5, "c2s", pkt(0x10, s("MQTT"), b"\x05\x02", u16(60), b"\x00", s("v5")),
     Connect(protocol_version=5, client_id="v5")),
    # A Mosquitto bridge (try_private) sets the top bit of the protocol level.
    (4, "c2s", pkt(0x10, s("MQTT"), b"\x84\x02", u16(60), s("br")),
     Connect(client_id="br", bridge=True)),
    (5, "c2s", pkt(0x10, s("MQTT"), b"\x05\x4e", u16(5), ALL_CONNECT_PROPS_BYTES, s("ü-client"),
                   ALL_WILL_PROPS_BYTES, s("w"), s(b""), s(b"secret")),
     # 5.0 allows a password without a user name (3.1.2.9).
     Connect(protocol_version=5, keepalive=5, client_id="ü-client", will_topic="w",
             will_payload=b"", will_qos=1, will_properties=ALL_WILL_PROPS, password=b"secret",
             properties=ALL_CONNECT_PROPS)),
    # CONNACK
    (4, "s2c", b"\x20\x02\x00\x00", Connack()),
    (4, "s2c", b"\x20\x02\x01\x05", Connack(session_present=True, reason_code=5)),
    (3, "s2c", b"\x20\x02\x00\x02", Connack(reason_code=2)),
    (5, "s2c", b"\x20\x03\x00\x00\x00", Connack()),
    (5, "s2c", pkt(0x20, b"\x01\x00", ALL_CONNACK_PROPS_BYTES),
     Connack(session_present=True, properties=ALL_CONNACK_PROPS)),
    (5, "s2c", pkt(0x20, b"\x00\x9c", props(b"\x1c" + s("leader:1883"))),
     Connack(reason_code=0x9C, properties={"server_reference": "leader:1883"})),
    # PUBLISH, both directions
    (4, "c2s", pkt(0x30, s("a/b"), b"hello"), Publish(topic="a/b", payload=b"hello")),
    (4, "s2c", pkt(0x30, s("a/b"), b"hello"), Publish(topic="a/b", payload=b"hello")),
    (3, "c2s", pkt(0x33, s("a"), u16(1)), Publish(topic="a", qos=1, retain=True, packet_id=1)),
    (4, "c2s", pkt(0x3D, s("x/y"), u16(65535), b"\x00" * 300),
     Publish(topic="x/y", payload=b"\x00" * 300, qos=2, retain=True, dup=True,
             packet_id=65535)),
    (5, "c2s", pkt(0x30, s("t"), b"\x00", b"p"), Publish(topic="t", payload=b"p")),
    (5, "c2s", pkt(0x32, s(""), u16(9), props(b"\x23" + u16(3)), b"aliased"),
     Publish(topic="", payload=b"aliased", qos=1, packet_id=9, properties={"topic_alias": 3})),
    (5, "c2s", pkt(0x34, s("t/€"), u16(2), ALL_PUBLISH_PROPS_BYTES, b"{}"),
     Publish(topic="t/€", payload=b"{}", qos=2, packet_id=2, properties=ALL_PUBLISH_PROPS)),
    (5, "s2c", pkt(0x30, s("t"), props(b"\x0b\x01", b"\x0b" + vbi(268435455)), b""),
     Publish(topic="t", properties={"subscription_identifier": [1, 268435455]})),
    # PUBACK / PUBREC / PUBREL / PUBCOMP
    (4, "c2s", b"\x40\x02\x00\x07", Puback(packet_id=7)),
    (4, "s2c", b"\x50\x02\x01\x00", Pubrec(packet_id=256)),
    (4, "c2s", b"\x62\x02\x00\x01", Pubrel(packet_id=1)),
    (3, "s2c", b"\x70\x02\xff\xff", Pubcomp(packet_id=65535)),
    (5, "c2s", b"\x40\x02\x00\x07", Puback(packet_id=7)),
    (5, "c2s", b"\x40\x03\x00\x07\x10", Puback(packet_id=7, reason_code=0x10)),
    (5, "s2c", b"\x50\x03\x00\x07\x80", Pubrec(packet_id=7, reason_code=0x80)),
    (5, "c2s", b"\x62\x03\x00\x07\x92", Pubrel(packet_id=7, reason_code=0x92)),
    (5, "s2c", pkt(0x70, u16(8), b"\x00", props(b"\x1f" + s("why"), b"\x26" + s("a") + s("b"))),
     Pubcomp(packet_id=8, properties={"reason_string": "why", "user_property": [("a", "b")]})),
    (5, "c2s", pkt(0x40, u16(8), b"\x97", props(b"\x1f" + s("quota"))),
     Puback(packet_id=8, reason_code=0x97, properties={"reason_string": "quota"})),
    # SUBSCRIBE / SUBACK
    (4, "c2s", pkt(0x82, u16(1), s("a/+"), b"\x01", s("#"), b"\x02"),
     Subscribe(packet_id=1, subscriptions=[("a/+", 1, False, False, 0), ("#", 2, False, False, 0)])),
    (3, "c2s", pkt(0x82, u16(2), s("x"), b"\x00"),
     Subscribe(packet_id=2, subscriptions=[("x", 0, False, False, 0)])),
    (5, "c2s", pkt(0x82, u16(3), props(b"\x0b" + vbi(1000), b"\x26" + s("k") + s("v")),
                   s("a/#"), b"\x2e", s("$share/g/b"), b"\x21"),
     Subscribe(packet_id=3, subscriptions=[("a/#", 2, True, True, 2), ("$share/g/b", 1, False,
                                                                          False, 2)],
               properties={"subscription_identifier": 1000, "user_property": [("k", "v")]})),
    (4, "s2c", pkt(0x90, u16(1), b"\x01\x80"), Suback(packet_id=1, reason_codes=[1, 0x80])),
    (5, "s2c", pkt(0x90, u16(3), props(b"\x1f" + s("r")), b"\x02\x97"),
     Suback(packet_id=3, reason_codes=[2, 0x97], properties={"reason_string": "r"})),
    # UNSUBSCRIBE / UNSUBACK
    (4, "c2s", pkt(0xA2, u16(4), s("a/+"), s("b")), Unsubscribe(packet_id=4,
                                                               topic_filters=["a/+", "b"])),
    (5, "c2s", pkt(0xA2, u16(4), props(b"\x26" + s("k") + s("v")), s("a")),
     Unsubscribe(packet_id=4, topic_filters=["a"], properties={"user_property": [("k", "v")]})),
    (4, "s2c", b"\xb0\x02\x00\x04", Unsuback(packet_id=4)),
    (5, "s2c", pkt(0xB0, u16(4), b"\x00", b"\x00\x11"), Unsuback(packet_id=4,
                                                               reason_codes=[0, 0x11])),
    (5, "s2c", pkt(0xB0, u16(5), props(b"\x1f" + s("no")), b"\x87"),
     Unsuback(packet_id=5, reason_codes=[0x87], properties={"reason_string": "no"})),
    # PINGREQ / PINGRESP
    (4, "c2s", b"\xc0\x00", Pingreq()),
    (5, "s2c", b"\xd0\x00", Pingresp()),
    # DISCONNECT
    (4, "c2s", b"\xe0\x00", Disconnect()),
    (5, "c2s", b"\xe0\x00", Disconnect()),
    (5, "c2s", b"\xe0\x01\x04", Disconnect(reason_code=4)),
    (5, "s2c", pkt(0xE0, b"\x9c", props(b"\x1c" + s("b:1883"), b"\x1f" + s("moved"),
                                        b"\x26" + s("a") + s("b"))),
     Disconnect(reason_code=0x9C, properties={"server_reference": "b:1883",
                                              "reason_string": "moved",
                                              "user_property": [("a", "b")]})),
    (5, "c2s", pkt(0xE0, b"\x00", props(b"\x11" + u32(0))),
     Disconnect(properties={"session_expiry_interval": 0})),
    # AUTH (5.0 only)
    (5, "c2s", b"\xf0\x00", Auth()),
    (5, "s2c", pkt(0xF0, b"\x18", props(b"\x15" + s("SCRAM"), b"\x16" + s(b"\x01\x02"),
                                        b"\x1f" + s("cont"))),
     Auth(reason_code=0x18, properties={"authentication_method": "SCRAM",
                                        "authentication_data": b"\x01\x02",
                                        "reason_string": "cont"})),
]

ROW_IDS = [f"v{v}-{d}-{type(p).__name__}-{i}" for i, (v, d, _b, p) in enumerate(ROWS)]


def next_packet(version: int, direction: str) -> tuple[bytes, object]:
    if direction == "c2s":
        return b"\xc0\x00", Pingreq()
    return b"\xd0\x00", Pingresp()


def fresh_parser(version, direction, packet):
    if isinstance(packet, Connect):
        return Parser()
    return make_parser(version, direction)


@pytest.mark.parametrize(("version", "direction", "data", "packet"), ROWS, ids=ROW_IDS)
def test_parse_whole(version, direction, data, packet):
    p = fresh_parser(version, direction, packet)
    assert p.feed(data) == [packet]
    assert p.buffered == 0


@pytest.mark.parametrize(("version", "direction", "data", "packet"), ROWS, ids=ROW_IDS)
def test_parse_byte_by_byte(version, direction, data, packet):
    p = fresh_parser(version, direction, packet)
    got = []
    for i in range(len(data)):
        got += p.feed(data[i:i + 1])
        if i < len(data) - 1:
            assert got == []
    assert got == [packet]
    assert p.buffered == 0


@pytest.mark.parametrize(("version", "direction", "data", "packet"), ROWS, ids=ROW_IDS)
def test_parse_with_trailing_data(version, direction, data, packet):
    follow, follow_pkt = next_packet(version, direction)
    p = fresh_parser(version, direction, packet)
    # The packet plus the first byte of the next one, then the rest: the partial
    # packet must be kept across calls.
    assert p.feed(bytearray(data + follow[:1])) == [packet]
    assert p.buffered == 1
    assert p.feed(memoryview(follow[1:])) == [follow_pkt]


@pytest.mark.parametrize(("version", "direction", "data", "packet"), ROWS, ids=ROW_IDS)
def test_encode(version, direction, data, packet):
    assert packet.encode(version) == data


@pytest.mark.parametrize(("version", "direction", "data", "packet"), ROWS, ids=ROW_IDS)
def test_packet_type_constant(version, direction, data, packet):
    assert packet.type == data[0] >> 4
    assert type(packet).type == packet.type


def test_many_packets_in_one_feed():
    p = make_parser(4, "c2s")
    data = b"".join(Publish(topic=f"t/{i}", payload=bytes([i])).encode(4) for i in range(200))
    got = p.feed(data)
    assert [x.topic for x in got] == [f"t/{i}" for i in range(200)]
    assert [x.payload for x in got] == [bytes([i]) for i in range(200)]


def test_large_packet_in_chunks():
    p = make_parser(5, "c2s")
    big = Publish(topic="big", payload=bytes(range(256)) * 4000, qos=1, packet_id=3)
    data = big.encode(5)
    assert len(data) > 1_000_000
    got = []
    for i in range(0, len(data), 1000):
        got += p.feed(data[i:i + 1000])
    assert got == [big]


# ---------------------------------------------------------------------------
# Encoding: 3.x drops what 5.0 alone has; fast paths equal the objects


def test_v311_encode_omits_properties_and_reason_codes():
    assert Puback(packet_id=1, reason_code=0x10,
                  properties={"reason_string": "x"}).encode(4) == b"\x40\x02\x00\x01"
    assert Disconnect(reason_code=0x8E).encode(4) == b"\xe0\x00"
    assert Unsuback(packet_id=2, reason_codes=[0, 0x11]).encode(4) == b"\xb0\x02\x00\x02"
    assert Publish(topic="t", payload=b"x", properties={"topic_alias": 1}).encode(4) == \
        pkt(0x30, s("t"), b"x")
    assert Subscribe(packet_id=1, subscriptions=[("a", 1, True, True, 2)]).encode(4) == \
        pkt(0x82, u16(1), s("a"), b"\x01")
    with pytest.raises(ValueError):
        Auth().encode(4)


def test_encode_publish_fast_path_equals_object():
    for version in (3, 4, 5):
        for qos, pid in ((0, 0), (1, 17), (2, 65535)):
            for properties in (None, {"message_expiry_interval": 5,
                                      "subscription_identifier": [3, 4]}):
                obj = Publish(topic="f/a/s/t", payload=b"x" * 64, qos=qos, retain=True,
                              dup=qos > 0, packet_id=pid, properties=properties)
                fast = c.encode_publish("f/a/s/t", b"x" * 64, qos, True, qos > 0, pid,
                                        properties, version)
                assert fast == obj.encode(version)
                assert c.encode_publish(b"f/a/s/t", bytearray(b"x" * 64), qos, True, qos > 0,
                                        pid, properties, version) == fast


def test_encode_ack_fast_paths():
    assert c.encode_puback(5, 0, 5) == b"\x40\x02\x00\x05"
    assert c.encode_pubrec(5, 0x10, 5) == b"\x50\x03\x00\x05\x10"
    assert c.encode_pubrel(5, 0x92, 4) == b"\x62\x02\x00\x05"
    assert c.encode_pubcomp(5, 0, 5, {"reason_string": "r"}) == \
        Pubcomp(packet_id=5, properties={"reason_string": "r"}).encode(5)
    assert c.encode_ack(c.PUBACK, 9, 0x80, 5) == Puback(packet_id=9, reason_code=0x80).encode(5)
    assert c.PINGRESP_BYTES == Pingresp().encode(4)
    with pytest.raises(ValueError):
        c.encode_ack(c.CONNECT, 1)


@pytest.mark.parametrize("bad", [
    dict(qos=3, packet_id=1), dict(qos=1, packet_id=0), dict(qos=1, packet_id=65536),
])
def test_encode_publish_rejects_bad_fields(bad):
    with pytest.raises(ValueError):
        Publish(topic="t", **bad).encode(4)


def test_encode_rejects_unknown_property_and_out_of_range_values():
    with pytest.raises(ValueError):
        Publish(topic="t", properties={"no_such_property": 1}).encode(5)
    with pytest.raises(ValueError):
        Puback(packet_id=1, properties={"receive_maximum": 70000}).encode(5)
    with pytest.raises(ValueError):
        Publish(topic="t").encode(6)


def test_packet_equality_and_repr():
    a = Publish(topic="t", payload=b"x", properties={})
    b = Publish(topic="t", payload=b"x", properties=None)
    assert a == b  # empty properties are the same as none
    assert a != Publish(topic="t", payload=b"y")
    assert a != Puback()
    assert repr(Puback(packet_id=3)) == "Puback(packet_id=3, reason_code=0, properties=None)"
    a.qos = 1
    a.packet_id = 2
    assert a.encode(4) == pkt(0x32, s("t"), u16(2), b"x")


def test_mutable_defaults_are_not_shared():
    a, b = Subscribe(), Subscribe()
    a.subscriptions.append(("x", 0, False, False, 0))
    assert b.subscriptions == []


def test_valid_utf8_helper():
    assert c.valid_utf8(b"h\xc3\xa9")
    assert not c.valid_utf8(b"\xff")
    assert not c.valid_utf8(b"\xed\xa0\x80")


# ---------------------------------------------------------------------------
# Invalid packets: (name, version, direction, bytes, reason code)

C5 = CONNECT_BYTES[5]


def connect5(flags: int, *rest: bytes, props_: bytes = b"\x00") -> bytes:
    return pkt(0x10, s("MQTT"), b"\x05", bytes([flags]), u16(60), props_, *rest)


def connect4(flags: int, *rest: bytes) -> bytes:
    return pkt(0x10, s("MQTT"), b"\x04", bytes([flags]), u16(60), *rest)


def pub5(properties: bytes) -> bytes:
    return pkt(0x32, s("t"), u16(1), properties, b"x")


ERRORS = [
    # Framing
    ("reserved type 0", 4, "c2s", b"\x00\x00", 0x81),
    ("remaining length of 5 bytes", 4, "c2s", b"\x30\xff\xff\xff\xff\x7f", 0x81),
    ("AUTH in 3.1.1", 4, "c2s", b"\xf0\x00", 0x81),
    # Fixed header flags [MQTT-2.1.3-1]
    ("PUBLISH QoS 3", 4, "c2s", pkt(0x36, s("t"), u16(1)), 0x81),
    ("PUBLISH DUP with QoS 0", 5, "c2s", pkt(0x38, s("t"), b"\x00"), 0x81),
    ("PUBREL flags 0000", 4, "c2s", b"\x60\x02\x00\x01", 0x81),
    ("SUBSCRIBE flags 0000", 4, "c2s", pkt(0x80, u16(1), s("a"), b"\x00"), 0x81),
    ("UNSUBSCRIBE flags 0011", 4, "c2s", pkt(0xA3, u16(1), s("a")), 0x81),
    ("PUBACK flags 0001", 4, "c2s", b"\x41\x02\x00\x01", 0x81),
    ("PINGREQ flags 1000", 4, "c2s", b"\xc8\x00", 0x81),
    ("CONNACK flags", 5, "s2c", b"\x20\x03\x02\x00\x00", 0x81),
    # Packet identifiers [MQTT-2.2.1-3]
    ("PUBLISH QoS 1 packet id 0", 4, "c2s", pkt(0x32, s("t"), u16(0)), 0x82),
    ("PUBACK packet id 0", 4, "c2s", b"\x40\x02\x00\x00", 0x82),
    ("PUBREL packet id 0", 5, "c2s", b"\x62\x02\x00\x00", 0x82),
    ("SUBSCRIBE packet id 0", 4, "c2s", pkt(0x82, u16(0), s("a"), b"\x00"), 0x82),
    ("UNSUBSCRIBE packet id 0", 5, "c2s", pkt(0xA2, u16(0), b"\x00", s("a")), 0x82),
    ("SUBACK packet id 0", 4, "s2c", pkt(0x90, u16(0), b"\x00"), 0x82),
    # UTF-8 strings [MQTT-1.5.4-1], [MQTT-1.5.4-2]
    ("topic invalid UTF-8", 4, "c2s", pkt(0x30, s(b"a\xff"), b""), 0x81),
    ("topic contains U+0000", 4, "c2s", pkt(0x30, s(b"a\x00b"), b""), 0x81),
    ("topic encodes a surrogate", 5, "c2s", pkt(0x30, s(b"\xed\xa0\x80"), b"\x00"), 0x81),
    ("topic overlong encoding", 4, "c2s", pkt(0x30, s(b"\xc0\xaf"), b""), 0x81),
    ("truncated multibyte", 4, "c2s", pkt(0x30, s(b"\xe2\x82"), b""), 0x81),
    ("client id invalid UTF-8", 4, "c2s-connect", connect4(0x02, s(b"\xfe")), 0x81),
    ("filter invalid UTF-8", 4, "c2s", pkt(0x82, u16(1), s(b"\xc3"), b"\x00"), 0x81),
    ("user property invalid UTF-8", 5, "c2s",
     pub5(props(b"\x26" + s(b"\x80") + s("v"))), 0x81),
    # Lengths inside the packet
    ("string longer than packet", 4, "c2s", b"\x30\x03\x00\x05a", 0x81),
    ("PUBACK 3.1.1 with extra byte", 4, "c2s", b"\x40\x03\x00\x01\x00", 0x81),
    ("PINGREQ with a body", 4, "c2s", b"\xc0\x01\x00", 0x81),
    ("DISCONNECT 3.1.1 with a body", 4, "c2s", b"\xe0\x01\x00", 0x81),
    ("CONNECT with trailing garbage", 4, "c2s-connect", connect4(0x02, s("c"), b"!"), 0x81),
    ("PUBACK 5 trailing after properties", 5, "c2s",
     pkt(0x40, u16(1), b"\x00", props(b"\x1f" + s("x")), b"!"), 0x81),
    ("UNSUBACK 3.1.1 with payload", 4, "s2c", b"\xb0\x03\x00\x01\x00", 0x81),
    ("short packet id", 4, "c2s", b"\x40\x01\x00", 0x81),
    # CONNECT
    ("protocol name Foo", 4, "c2s-connect", pkt(0x10, s("Foo"), b"\x04\x02", u16(60), s("c")),
     0x84),
    ("protocol level 6", 4, "c2s-connect", pkt(0x10, s("MQTT"), b"\x06\x02", u16(60), s("c")),
     0x84),
    ("MQIsdp with level 4", 4, "c2s-connect",
     pkt(0x10, s("MQIsdp"), b"\x04\x02", u16(60), s("c")), 0x84),
    ("MQTT with level 3", 4, "c2s-connect", pkt(0x10, s("MQTT"), b"\x03\x02", u16(60), s("c")),
     0x84),
    ("CONNECT reserved flag", 4, "c2s-connect", connect4(0x03, s("c")), 0x81),
    ("will QoS without will flag", 4, "c2s-connect", connect4(0x0A, s("c")), 0x81),
    ("will retain without will flag", 5, "c2s-connect", connect5(0x22, s("c")), 0x81),
    ("will QoS 3", 4, "c2s-connect", connect4(0x1E, s("c"), s("w"), s(b"p")), 0x81),
    ("password without user name 3.1.1", 4, "c2s-connect", connect4(0x42, s("c"), s(b"pw")),
     0x81),
    ("password without user name 3.1", 3, "c2s-connect",
     pkt(0x10, s("MQIsdp"), b"\x03\x42", u16(60), s("c"), s(b"pw")), 0x81),
    ("will flag but no will topic", 4, "c2s-connect", connect4(0x06, s("c")), 0x81),
    ("CONNECT truncated keepalive", 4, "c2s-connect", pkt(0x10, s("MQTT"), b"\x04\x02\x00"),
     0x81),
    # Properties
    ("unknown property id", 5, "c2s", pub5(props(b"\x04\x00")), 0x81),
    ("property id 0x7f", 5, "c2s", pub5(props(b"\x7f\x00")), 0x81),
    ("property not allowed in packet", 5, "c2s-connect",
     connect5(0x02, s("c"), props_=props(b"\x23" + u16(1))), 0x81),
    ("will property not allowed in will", 5, "c2s-connect",
     connect5(0x06, s("c"), props(b"\x11" + u32(1)), s("w"), s(b"")), 0x81),
    ("server-only property in CONNECT", 5, "c2s-connect",
     connect5(0x02, s("c"), props_=props(b"\x12" + s("x"))), 0x81),
    ("duplicate property", 5, "c2s-connect",
     connect5(0x02, s("c"), props_=props(b"\x11" + u32(1), b"\x11" + u32(2))), 0x82),
    ("duplicate topic alias", 5, "c2s", pub5(props(b"\x23" + u16(1), b"\x23" + u16(2))), 0x82),
    ("property length beyond packet", 5, "c2s", pkt(0x30, s("t"), b"\x05\x01"), 0x81),
    ("property value beyond property length", 5, "c2s",
     pkt(0x30, s("t"), b"\x02\x02\x00\x00\x00\x00"), 0x81),
    ("receive maximum 0", 5, "c2s-connect",
     connect5(0x02, s("c"), props_=props(b"\x21" + u16(0))), 0x82),
    ("maximum packet size 0", 5, "c2s-connect",
     connect5(0x02, s("c"), props_=props(b"\x27" + u32(0))), 0x82),
    ("topic alias 0", 5, "c2s", pub5(props(b"\x23" + u16(0))), 0x82),
    ("payload format indicator 2", 5, "c2s", pub5(props(b"\x01\x02")), 0x82),
    ("request problem information 2", 5, "c2s-connect",
     connect5(0x02, s("c"), props_=props(b"\x17\x02")), 0x82),
    ("authentication data without method", 5, "c2s-connect",
     connect5(0x02, s("c"), props_=props(b"\x16" + s(b"d"))), 0x82),
    ("maximum QoS 2 in CONNACK", 5, "s2c", pkt(0x20, b"\x00\x00", props(b"\x24\x02")), 0x82),
    ("subscription identifier from a client", 5, "c2s", pub5(props(b"\x0b\x01")), 0x82),
    ("subscription identifier 0", 5, "c2s",
     pkt(0x82, u16(1), props(b"\x0b\x00"), s("a"), b"\x00"), 0x82),
    ("two subscription identifiers in SUBSCRIBE", 5, "c2s",
     pkt(0x82, u16(1), props(b"\x0b\x01", b"\x0b\x02"), s("a"), b"\x00"), 0x82),
    ("subscription identifier of 5 bytes", 5, "c2s",
     pkt(0x82, u16(1), props(b"\x0b\xff\xff\xff\xff\x01"), s("a"), b"\x00"), 0x81),
    # SUBSCRIBE / UNSUBSCRIBE payloads
    ("SUBSCRIBE without filters 3.1.1", 4, "c2s", pkt(0x82, u16(1)), 0x82),
    ("SUBSCRIBE without filters 5", 5, "c2s", pkt(0x82, u16(1), b"\x00"), 0x82),
    ("SUBSCRIBE filter without options", 4, "c2s", pkt(0x82, u16(1), s("a")), 0x81),
    ("subscription reserved bits 3.1.1", 4, "c2s", pkt(0x82, u16(1), s("a"), b"\x04"), 0x81),
    ("subscription reserved bits 5", 5, "c2s", pkt(0x82, u16(1), b"\x00", s("a"), b"\x40"),
     0x81),
    ("subscription QoS 3", 5, "c2s", pkt(0x82, u16(1), b"\x00", s("a"), b"\x03"), 0x82),
    ("subscription QoS 3 3.1.1", 4, "c2s", pkt(0x82, u16(1), s("a"), b"\x03"), 0x81),
    ("retain handling 3", 5, "c2s", pkt(0x82, u16(1), b"\x00", s("a"), b"\x30"), 0x82),
    ("no local on shared subscription", 5, "c2s",
     pkt(0x82, u16(1), b"\x00", s("$share/g/a"), b"\x04"), 0x82),
    ("UNSUBSCRIBE without filters", 4, "c2s", pkt(0xA2, u16(1)), 0x82),
    ("UNSUBSCRIBE without filters 5", 5, "c2s", pkt(0xA2, u16(1), b"\x00"), 0x82),
    # Direction and order
    ("PUBLISH before CONNECT", 4, "fresh-server", pkt(0x30, s("t"), b"x"), 0x82),
    ("PINGREQ before CONNECT", 4, "fresh-server", b"\xc0\x00", 0x82),
    ("second CONNECT", 4, "c2s", CONNECT_BYTES[4], 0x82),
    ("CONNACK sent to a server", 4, "c2s", b"\x20\x02\x00\x00", 0x82),
    ("SUBACK sent to a server", 5, "c2s", pkt(0x90, u16(1), b"\x00", b"\x00"), 0x82),
    ("UNSUBACK sent to a server", 5, "c2s", pkt(0xB0, u16(1), b"\x00", b"\x00"), 0x82),
    ("PINGRESP sent to a server", 4, "c2s", b"\xd0\x00", 0x82),
    ("CONNECT sent to a client", 4, "s2c", CONNECT_BYTES[4], 0x82),
    ("SUBSCRIBE sent to a client", 4, "s2c", pkt(0x82, u16(1), s("a"), b"\x00"), 0x82),
    ("PINGREQ sent to a client", 4, "s2c", b"\xc0\x00", 0x82),
]


@pytest.mark.parametrize(("name", "version", "direction", "data", "code"), ERRORS,
                         ids=[e[0] for e in ERRORS])
def test_invalid_packet(name, version, direction, data, code):
    if direction in ("c2s-connect", "fresh-server"):
        p = Parser()
    else:
        p = make_parser(version, direction)
    with pytest.raises(MQTTError) as info:
        p.feed(data)
    assert info.value.reason_code == code, str(info.value)
    assert str(info.value)
    # The stream is broken for good: the same error again, whatever comes next.
    with pytest.raises(MQTTError) as again:
        p.feed(b"\xc0\x00")
    assert again.value is info.value


@pytest.mark.parametrize(("name", "version", "direction", "data", "code"), ERRORS,
                         ids=[e[0] for e in ERRORS])
def test_invalid_packet_byte_by_byte(name, version, direction, data, code):
    p = Parser() if direction in ("c2s-connect", "fresh-server") else make_parser(version,
                                                                                   direction)
    with pytest.raises(MQTTError) as info:
        for i in range(len(data)):
            p.feed(data[i:i + 1])
    assert info.value.reason_code == code


def test_packets_before_the_error_are_attached():
    p = make_parser(4, "c2s")
    good = Publish(topic="ok", payload=b"1")
    with pytest.raises(MQTTError) as info:
        p.feed(good.encode(4) + b"\xc0\x00" + b"\x00\x00")
    assert info.value.packets == [good, Pingreq()]
    assert p.error is info.value


def test_repeated_topic_is_reused_and_a_changed_one_decoded():
    """The parser keeps the previous PUBLISH's topic: the same bytes give the same
    str object; other bytes of the same length, or bad UTF-8 after a good
    topic, are decoded and checked as ever."""
    p = make_parser(4, "c2s")
    a1, a2, b, a3 = p.feed(b"".join(Publish(topic=t, payload=b"x").encode(4)
                                    for t in ("room/1", "room/1", "room/2", "room/1")))
    assert [x.topic for x in (a1, a2, b, a3)] == ["room/1", "room/1", "room/2", "room/1"]
    assert a2.topic is a1.topic
    with pytest.raises(MQTTError) as info:
        p.feed(pkt(0x30, s(b"room/\xff"), b""))  # same length as "room/1"
    assert info.value.reason_code == 0x81


def test_too_large_is_refused_from_the_header_alone():
    p = make_parser(4, "c2s", max_packet_size=100)
    ok = Publish(topic="t", payload=b"x" * 95)  # 1 + 1 + 2 + 1 + 95 = 100 bytes in all
    assert len(ok.encode(4)) == 100
    assert p.feed(ok.encode(4)) == [ok]
    with pytest.raises(MQTTError) as info:
        p.feed(b"\x30\x63")  # header of a 101-byte packet, no body yet
    assert info.value.reason_code == 0x95
    assert p.buffered == 0


def test_too_large_multibyte_length():
    p = make_parser(5, "c2s", max_packet_size=1 << 20)
    with pytest.raises(MQTTError) as info:
        p.feed(b"\x30" + vbi(268435455))
    assert info.value.reason_code == 0x95


def test_protocol_version_is_known_when_the_rest_of_connect_is_malformed():
    # The broker needs the version to answer with a CONNACK of the right format.
    p = Parser()
    with pytest.raises(MQTTError) as info:
        p.feed(connect5(0x03, s("c")))
    assert info.value.reason_code == 0x81
    assert p.protocol_version == 5


def test_unsupported_version_leaves_protocol_version_unset():
    p = Parser()
    with pytest.raises(MQTTError) as info:
        p.feed(pkt(0x10, s("MQTT"), b"\x07\x02", u16(60), s("c")))
    assert info.value.reason_code == 0x84
    assert p.protocol_version == 0


def test_client_parser_needs_a_version():
    p = Parser(is_server=False)
    with pytest.raises(MQTTError):
        p.feed(b"\x20\x02\x00\x00")


def test_mqtt_error_shape():
    e = MQTTError(0x82, "boom")
    assert e.reason_code == 0x82
    assert str(e) == "boom"
    assert isinstance(e, Exception)
    assert c.MALFORMED_PACKET == 0x81 and c.PROTOCOL_ERROR == 0x82
    assert c.PACKET_TOO_LARGE == 0x95 and c.UNSUPPORTED_PROTOCOL_VERSION == 0x84
    assert [c.CONNECT, c.PUBLISH, c.SUBSCRIBE, c.AUTH] == [1, 3, 8, 15]


# ---------------------------------------------------------------------------
# Real clients: bytes captured from mosquitto_pub 2.0 and paho-mqtt 2.x

MOSQUITTO_PUB_311 = (b"\x10\x12\x00\x04MQTT\x04\x02\x00<\x00\x06cap311"
                     b"0\n\x00\x03a/bhello\xe0\x00")
MOSQUITTO_PUB_5 = (b"\x10.\x00\x04MQTT\x05\xce\x00<\x08\x11\x00\x00\x00\x1e!\x00\x14\x00\x04cap5"
                   b"\x00\x00\x03w/t\x00\x03bye\x00\x04user\x00\x02pw"
                   b"1\x12\x00\x03a/b\x07&\x00\x01k\x00\x01vhello\xe0\x00")
MOSQUITTO_PUB_31 = b"\x10\x13\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x05cap31" b"0\x05\x00\x01x31\xe0\x00"
PAHO_5 = (b"\x10\x12\x00\x04MQTT\x05\x02\x00<\x00\x00\x05paho5"
          b"\x82\x1c\x00\x01\x02\x0b*\x00\x05s/+/x\x1e\x00\x0c$share/g/t/#\x01"
          b"2+\x00\x03p/q\x00\x02\x1f\x01\x01\x02\x00\x00\x00<\x03\x00\ntext/plain\x08\x00\x03r/t"
          b"\t\x00\x02\x01\x02data"
          b"\xa2\r\x00\x03\x00\x00\x05s/+/x\x00\x01u\xe0\x00")


def test_captured_mosquitto_pub_311():
    got = Parser().feed(MOSQUITTO_PUB_311)
    assert got == [Connect(client_id="cap311"), Publish(topic="a/b", payload=b"hello"),
                   Disconnect()]
    assert b"".join(x.encode(4) for x in got) == MOSQUITTO_PUB_311


def test_captured_mosquitto_pub_5():
    got = Parser().feed(MOSQUITTO_PUB_5)
    assert got == [
        Connect(protocol_version=5, client_id="cap5", will_topic="w/t", will_payload=b"bye",
                will_qos=1, username="user", password=b"pw",
                properties={"session_expiry_interval": 30, "receive_maximum": 20}),
        Publish(topic="a/b", payload=b"hello", retain=True,
                properties={"user_property": [("k", "v")]}),
        Disconnect(),
    ]
    assert b"".join(x.encode(5) for x in got) == MOSQUITTO_PUB_5


def test_captured_mosquitto_pub_31():
    got = Parser().feed(MOSQUITTO_PUB_31)
    assert got == [Connect(protocol_name="MQIsdp", protocol_version=3, keepalive=30,
                           client_id="cap31"),
                   Publish(topic="x", payload=b"31"), Disconnect()]
    assert b"".join(x.encode(3) for x in got) == MOSQUITTO_PUB_31


def test_captured_paho_5():
    got = Parser().feed(PAHO_5)
    assert got == [
        Connect(protocol_version=5, client_id="paho5"),
        Subscribe(packet_id=1, subscriptions=[("s/+/x", 2, True, True, 1),
                                              ("$share/g/t/#", 1, False, False, 0)],
                  properties={"subscription_identifier": 42}),
        Publish(topic="p/q", payload=b"data", qos=1, packet_id=2,
                properties={"payload_format_indicator": 1, "message_expiry_interval": 60,
                            "content_type": "text/plain", "response_topic": "r/t",
                            "correlation_data": b"\x01\x02"}),
        Unsubscribe(packet_id=3, topic_filters=["s/+/x", "u"]),
        Disconnect(),
    ]
    assert b"".join(x.encode(5) for x in got) == PAHO_5


def _capture_mosquitto_pub(args: list[str], version: int) -> bytes:
    """Run mosquitto_pub against a one-shot socket server that answers CONNECT and
    PUBLISH like a broker; return every byte the client sent."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)
    port = srv.getsockname()[1]
    proc = subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = b""
    parser = Parser()
    try:
        conn, _ = srv.accept()
        conn.settimeout(0.2)
        deadline = time.monotonic() + 10
        with conn:
            while time.monotonic() < deadline and not data.endswith(b"\xe0\x00"):
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                data += chunk
                for packet in parser.feed(chunk):
                    if isinstance(packet, Connect):
                        conn.sendall(Connack().encode(version))
                    elif isinstance(packet, Publish) and packet.qos == 1:
                        conn.sendall(Puback(packet_id=packet.packet_id).encode(version))
    finally:
        proc.kill()
        proc.wait()
        srv.close()
    return data


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto_pub")
@pytest.mark.parametrize(("version", "flag"), [(4, "mqttv311"), (5, "mqttv5"), (3, "mqttv31")])
def test_live_mosquitto_pub(version, flag):
    data = _capture_mosquitto_pub(
        ["-V", flag, "-i", "live", "-t", "live/t", "-m", "payload", "-q", "1", "-r"], version)
    p = Parser()
    got = p.feed(data)
    assert p.protocol_version == version
    assert isinstance(got[0], Connect) and got[0].client_id == "live"
    pub = got[1]
    assert (pub.topic, pub.payload, pub.qos, pub.retain) == ("live/t", b"payload", 1, True)
    assert pub.packet_id > 0
    assert b"".join(x.encode(version) for x in got) == data
