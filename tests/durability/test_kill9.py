"""Broker durability (issue 3): kill -9 a standalone node, restart it on the same data dir.

The node is the real thing: ``python -m raftmq.supervisor`` with its raft
process (LMDB, durability = "sync") and a broker worker using RaftStore.  A
QoS 1/2 PUBLISH is acknowledged only once its entry is fsynced, so everything
acknowledged before the kill must be there after the restart.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest
from durable_node import PUBCOMP, PUBLISH, PUBREC, PUBREL, RawClient, wait_for

pytestmark = pytest.mark.timeout(180)


class Subscriber:
    """A persistent MQTT 3.1.1 session (clean session off) collecting payloads."""

    def __init__(self, port: int, client_id: str, topic: str | None = None, qos: int = 1) -> None:
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(10)
        if topic is not None:
            self.client.subscribe(topic, qos)
            assert self.subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.received.append(msg.payload)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_every_puback_survives_kill9_during_qos1_stream(node_factory) -> None:
    node = node_factory()
    sub = Subscriber(node.port, "durable-sub", "stream/#", qos=1)
    sub.close()  # offline: messages queue in its persistent session

    # MQTTMessageInfo.is_published() turns true when the PUBACK arrives.
    sent: list[tuple[bytes, mqtt.MQTTMessageInfo]] = []

    def acked() -> set[bytes]:
        return {payload for payload, info in list(sent) if info.is_published()}

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stream-pub", protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(50)
    pub.connect("127.0.0.1", node.port, keepalive=60)
    pub.loop_start()
    try:
        for i in range(5000):
            payload = str(i).encode()
            sent.append((payload, pub.publish("stream/data", payload, qos=1)))
        wait_for(lambda: len(acked()) >= 300, 30, "300 PUBACKs", interval=0.005)
        node.kill9()  # mid-stream: paho still has messages in flight and queued
        acked_before_kill = acked()
    finally:
        pub.loop_stop()
    assert len(acked_before_kill) >= 300
    assert len(acked_before_kill) < len(sent), "the kill must interrupt the stream"

    node.start()
    sub = Subscriber(node.port, "durable-sub")
    try:
        wait_for(lambda: acked_before_kill <= set(sub.payloads()), 60,
                 "every PUBACKed message to reach the persistent subscriber")
    finally:
        sub.close()


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_retained_message_survives_kill9(node_factory, durability) -> None:
    """With "async" the OS page cache still holds the commit: a process kill loses nothing
    (only a machine crash may lose the last second)."""
    node = node_factory(durability=durability)
    pub = RawClient(node.port, "retainer", clean=True)
    pub.publish("config/mode", b"eco", qos=1, packet_id=1, retain=True)
    ptype, _, body = pub.read()
    assert ptype == 4 and body[:2] == b"\x00\x01"  # PUBACK: committed, so durable
    node.kill9()
    node.start()
    got: list[tuple[str, bytes, bool]] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reader", protocol=mqtt.MQTTv311)

    def on_message(client, userdata, msg) -> None:
        got.append((msg.topic, msg.payload, msg.retain))
        done.set()

    c.on_message = on_message
    c.connect("127.0.0.1", node.port)
    c.subscribe("config/#", 1)
    c.loop_start()
    try:
        assert done.wait(15), "retained message missing after kill -9"
    finally:
        c.disconnect()
        c.loop_stop()
    assert got[0] == ("config/mode", b"eco", True)


def test_qos2_flow_interrupted_by_kill9_completes_exactly_once(node_factory) -> None:
    node = node_factory()
    sub = Subscriber(node.port, "q2-sub", "q2/#", qos=2)
    sub.close()

    pub = RawClient(node.port, "q2-pub", clean=False)
    pub.publish("q2/x", b"exactly-once", qos=2, packet_id=7)
    ptype, _, body = pub.read()
    assert ptype == PUBREC and body[:2] == b"\x00\x07"
    # The node dies between PUBREC and PUBREL.
    node.kill9()
    node.start()

    pub = RawClient(node.port, "q2-pub", clean=False)
    assert pub.session_present, "the publisher's persistent session was lost"
    # [MQTT-4.4.0-1]: on reconnect the sender resends the PUBREL.
    pub.pubrel(7)
    ptype, _, body = pub.read()
    assert ptype == PUBCOMP and body[:2] == b"\x00\x07"
    pub.close()

    reader = RawClient(node.port, "q2-sub", clean=False)
    assert reader.session_present
    first = reader.read()
    assert first[0] == PUBLISH
    ptype, flags, body = first
    tlen = int.from_bytes(body[:2], "big")
    assert body[2 : 2 + tlen] == b"q2/x"
    assert body[2 + tlen + 2 :] == b"exactly-once"
    packet_id = body[2 + tlen : 2 + tlen + 2]
    reader.sock.sendall(b"\x50\x02" + packet_id)  # PUBREC
    assert reader.read()[0] == PUBREL
    reader.sock.sendall(b"\x70\x02" + packet_id)  # PUBCOMP
    # No second copy arrives.
    reader.sock.settimeout(1.5)
    with pytest.raises(TimeoutError):
        reader.read()
    reader.close()
