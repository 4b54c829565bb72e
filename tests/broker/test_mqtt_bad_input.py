"""Bad input: malformed and oversized packets, protocol violations, invalid UTF-8, wildcards in
PUBLISH topics, a second CONNECT, packets before CONNECT, slow and half-sent packets.

Each gets the standard's reaction (close, or DISCONNECT with a reason code then close) and
never disturbs other clients: every test ends with ``assert_serves`` on the same broker.
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from support.helpers import assert_serves, connected, raw, unique
from support.mqttraw import (
    CONNACK,
    DISCONNECT,
    PINGRESP,
    Closed,
    ProtocolViolation,
    connect,
    packet,
    pingreq,
    publish,
    subscribe,
    utf8,
    varint,
)

# How long raftmq may leave a connection that has not completed CONNECT (Mosquitto 2.0.11
# keeps such connections far longer, so the test for it is raftmq only).
CONNECT_TIMEOUT_BOUND = 12.0


def _closed_only_with(got, reasons: tuple[int, ...] = ()) -> bool:
    """The server closed, having sent nothing or only a DISCONNECT with one of ``reasons``."""
    return got == [] or (len(got) == 1 and got[0].type == DISCONNECT and got[0].reason in reasons)


@pytest.mark.parametrize("version", [4, 5])
def test_publish_before_connect_closes(broker, version):
    """[MQTT-3.1.0-1]: the first packet from a client must be CONNECT."""
    with raw(broker, version) as c:
        c.send(publish("a/b", b"x", version=version))
        assert c.wait_closed() == []
    assert_serves(broker)


@pytest.mark.parametrize("version", [4, 5])
def test_second_connect_closes(broker, version):
    """[MQTT-3.1.0-2]: a second CONNECT is a protocol violation -> close (5.0: may send 0x82)."""
    with connected(broker, version=version) as c:
        c.send(connect(unique("again"), version=version))
        got = c.wait_closed()
        assert all(p.type != CONNACK for p in got)
        assert _closed_only_with(got, (0x82,)), got
    assert_serves(broker)


def test_malformed_remaining_length_closes(broker):
    """2.2.3: a Remaining Length of more than 4 bytes is malformed."""
    with connected(broker) as c:
        c.send(b"\x30\xff\xff\xff\xff\x7f")
        assert _closed_only_with(c.wait_closed(), (0x81,))
    assert_serves(broker)


@pytest.mark.parametrize("first_byte", [0x00, 0xF0])
def test_reserved_or_invalid_packet_type_closes(broker, first_byte):
    """Packet type 0 is reserved; 15 (AUTH) does not exist in 3.1.1."""
    with connected(broker, version=4) as c:
        c.send(bytes([first_byte, 0]))
        assert c.wait_closed() == []
    assert_serves(broker)


def test_wrong_fixed_header_flags_close(broker):
    """[MQTT-3.8.1-1]: SUBSCRIBE flags must be 0010; anything else is malformed."""
    with connected(broker) as c:
        body = b"\x00\x01" + utf8("a/b") + b"\x00"
        c.send(packet(8, 0x00, body))
        assert c.wait_closed() == []
    assert_serves(broker)


def test_qos_3_publish_closes(broker):
    """[MQTT-3.3.1-4]: a PUBLISH with both QoS bits set is malformed."""
    with connected(broker) as c:
        c.send(packet(3, 0x06, utf8("a/b") + b"\x00\x01x"))
        assert c.wait_closed() == []
    assert_serves(broker)


@pytest.mark.parametrize("version", [4, 5])
def test_invalid_utf8_topic_closes(broker, version):
    """[MQTT-1.5.3-1]: ill-formed UTF-8 in a topic -> close (5.0: DISCONNECT 0x81 first)."""
    with connected(broker, version=version) as c:
        c.send(publish(b"bad/\xc3\x28", b"x", version=version))
        assert _closed_only_with(c.wait_closed(), (0x81,))
    assert_serves(broker)


def test_null_character_in_topic_closes(broker):
    """[MQTT-1.5.3-2]: a UTF-8 string must not include U+0000."""
    with connected(broker) as c:
        c.send(publish(b"bad/\x00/t", b"x"))
        assert c.wait_closed() == []
    assert_serves(broker)


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", "+"])
def test_wildcard_in_publish_topic_closes_311(broker, topic):
    """[MQTT-3.3.2-2]: the Topic Name in a PUBLISH must not contain wildcards."""
    with connected(broker) as c:
        c.publish(topic, b"x")
        assert c.wait_closed() == []
    assert_serves(broker)


def test_subscribe_without_filters_closes(broker):
    """[MQTT-3.8.3-3]: a SUBSCRIBE must contain at least one filter."""
    with connected(broker) as c:
        c.send(subscribe(1, []))
        assert c.wait_closed() == []
    assert_serves(broker)


def test_oversized_packet_closed_from_its_header(make_broker):
    """max_packet_size: a packet that announces more than the limit is refused before its body
    arrives (the server does not buffer it)."""
    b = make_broker(max_packet_size=1000)
    with connected(b) as c:
        c.send(b"\x30" + varint(10_000_000) + utf8("a/b"))
        assert _closed_only_with(c.wait_closed(), (0x95,))
    assert_serves(b)


def test_inner_length_beyond_packet_is_malformed(broker):
    """A string length running past the end of the packet -> malformed -> close."""
    with connected(broker) as c:
        c.send(packet(3, 0, b"\x00\x50ab"))  # topic length 80, 2 bytes present
        assert _closed_only_with(c.wait_closed(), (0x81,))
    assert_serves(broker)


def test_garbage_connect_closes(broker):
    """A complete CONNECT packet whose body is random bytes."""
    rng = random.Random(1234)
    with raw(broker) as c:
        c.send(bytes([0x10, 62]) + bytes(rng.randrange(256) for _ in range(62)))
        got = c.wait_closed()
        assert all(p.type in (CONNACK, DISCONNECT) and p.reason for p in got), got
    assert_serves(broker)


def test_random_bytes_never_hurt_other_clients(broker):
    """Several connections of random bytes (after a valid CONNECT), then a normal client."""
    rng = random.Random(int.from_bytes(os.urandom(2), "big"))
    for _ in range(5):
        with connected(broker) as c:
            try:
                c.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
            except OSError:
                pass
    assert_serves(broker)


def test_slow_packet_byte_by_byte_accepted(broker):
    """A CONNECT that trickles in one byte at a time is a valid packet."""
    with raw(broker) as c:
        for byte in connect(unique("slow"), keepalive=10):
            c.send(bytes([byte]))
            time.sleep(0.005)
        assert c.expect(CONNACK).reason == 0
        for byte in pingreq():
            c.send(bytes([byte]))
            time.sleep(0.05)
        assert c.expect(PINGRESP).type == PINGRESP


@pytest.mark.waits
def test_half_sent_packet_then_silence_closed_by_keepalive(broker):
    """A packet that never completes does not keep a connection alive beyond 1.5x keep alive."""
    with connected(broker, keepalive=1) as c:
        c.send(b"\x30\x20" + utf8("half"))  # 32 bytes announced, 6 sent
        c.wait_closed(timeout=9.0)
    assert_serves(broker)


@pytest.mark.waits
def test_connection_without_connect_closed(raftmq):
    """[MQTT-3.1.4-?] 5.0 §4.2/3.1.1 §3.1.4: a server SHOULD close a connection that sends no
    CONNECT within a reasonable time.  raftmq only (Mosquitto 2.0.11 waits much longer)."""
    with raw(raftmq) as idle, raw(raftmq) as half:
        half.send(connect(unique("h"))[:5])
        idle.wait_closed(timeout=CONNECT_TIMEOUT_BOUND)
        half.wait_closed(timeout=2.0)
    assert_serves(raftmq)


def test_many_abandoned_connections_do_not_block_service(broker):
    socks = []
    try:
        for _ in range(50):
            s = socket.create_connection((broker.host, broker.port), timeout=5)
            s.sendall(b"\x10")
            socks.append(s)
        assert_serves(broker)
    finally:
        for s in socks:
            s.close()
    assert_serves(broker)


def test_packet_id_zero_in_qos1_publish_closes(broker):
    """[MQTT-2.3.1-1]: QoS > 0 PUBLISH needs a non-zero packet identifier."""
    with connected(broker) as c:
        c.publish(unique("pid/"), b"x", qos=1, pid=0)
        assert _closed_only_with(c.wait_closed(), (0x81, 0x82))
    assert_serves(broker)


def test_mutated_packets_never_hurt_the_broker(broker):
    """Valid client sessions with a few random bytes flipped, truncated or duplicated, over many
    connections: whatever the server answers, it stays up and serves others.  The seed is in
    the assertion message to reproduce a failure."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    for n in range(40):
        version = rng.choice([3, 4, 5])
        topic = unique("fz/")
        stream = bytearray(
            connect(unique("fz"), version=version, keepalive=5)
            + subscribe(1, [(topic + "/#", rng.randrange(3))], version=version)
            + publish(topic + "/a", os.urandom(rng.randrange(40)), qos=rng.randrange(3), pid=2,
                      version=version)
            + pingreq()
        )
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(stream))
            action = rng.randrange(3)
            if action == 0:
                stream[i] = rng.randrange(256)
            elif action == 1:
                del stream[i:]
                if not stream:
                    stream = bytearray(b"\x10")
            else:
                stream[i:i] = stream[i:i + rng.randrange(1, 8)]
        with raw(broker, version) as c:
            try:
                c.send(bytes(stream))
                deadline = time.monotonic() + 0.05
                while time.monotonic() < deadline:
                    c.recv(0.05)
            # any reaction is fine here (answers in another protocol version than we
            # decode with included); what matters is below
            except (OSError, Closed, ProtocolViolation):
                pass
        assert broker.alive(), f"broker died on mutation {n}, seed {seed}:\n{broker.log_tail()}"
    assert_serves(broker)


def test_v31_empty_client_id_rejected(broker):
    """MQTT 3.1: the Client Identifier must be 1 to 23 characters -> CONNACK 2."""
    with raw(broker, 3) as c:
        assert c.connect("", clean=True).reason == 2


@pytest.mark.parametrize("ptype", [6, 10])
def test_pubrel_or_unsubscribe_with_wrong_flags_closes(broker, ptype):
    """[MQTT-3.6.1-1]/[MQTT-3.10.1-1]: PUBREL and UNSUBSCRIBE fixed-header flags must be 0010."""
    body = b"\x00\x01" + (utf8("a") if ptype == 10 else b"")
    with connected(broker) as c:
        c.send(packet(ptype, 0x00, body))
        assert c.wait_closed() == []
    assert_serves(broker)


def test_subscription_identifier_zero_is_an_error(broker):
    """5.0 §3.8.2.1.2: a Subscription Identifier of 0 is a Protocol Error (Mosquitto: 0x81)."""
    with connected(broker, version=5) as c:
        c.send(subscribe(1, [(unique("sid/"), 0)], {"subscription_identifier": 0}, version=5))
        assert _closed_only_with(c.wait_closed(), (0x81, 0x82))
    assert_serves(broker)


def test_no_local_on_shared_subscription_is_protocol_error(raftmq):
    """[MQTT-3.8.3-4]: No Local = 1 on a Shared Subscription is a Protocol Error -> DISCONNECT
    0x82.  raftmq only: Mosquitto 2.0.11 grants it."""
    from support.mqttraw import sub_options

    with connected(raftmq, version=5) as c:
        c.send(subscribe(1, [(f"$share/g/{unique('t')}", sub_options(0, no_local=True))],
                         version=5))
        assert [(p.type, p.reason) for p in c.wait_closed()] == [(DISCONNECT, 0x82)]
    assert_serves(raftmq)
