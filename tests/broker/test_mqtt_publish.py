"""PUBLISH QoS 0/1/2 in both directions, DUP, redelivery, ordering, overlapping subscriptions.

MQTT 3.1.1 §3.3-3.7 and §4.3-4.6; 5.0 §3.3-3.7 and §4.3-4.6.
"""

from __future__ import annotations

import pytest

from support.helpers import connected, raw, unique
from support.mqttraw import PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL


def _publish_flow(pub, topic: str, payload: bytes, qos: int, pid: int, **kw) -> None:
    """Publish and complete the publisher side of the QoS flow, checking each ack."""
    pub.publish(topic, payload, qos=qos, pid=pid, **kw)
    if qos == 1:
        assert pub.expect(PUBACK).pid == pid
    elif qos == 2:
        assert pub.expect(PUBREC).pid == pid
        pub.ack(PUBREL, pid)
        assert pub.expect(PUBCOMP).pid == pid


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_delivery_qos_is_min_of_publish_and_subscription(broker, version, pub_qos, sub_qos):
    """[MQTT-3.8.4-6]: delivered QoS = min(published QoS, granted QoS)."""
    topic = unique("q/")
    with connected(broker, version=version) as sub, connected(broker, version=version) as pub:
        assert sub.subscribe(1, [(topic, sub_qos)]).codes == [sub_qos]
        _publish_flow(pub, topic, b"m", pub_qos, pid=10)
        got = sub.recv_publish(auto_ack=False)
        assert (got.topic, got.payload, got.qos) == (topic, b"m", min(pub_qos, sub_qos))
        assert not got.dup
        if got.qos:
            assert got.pid and got.pid > 0
        if got.qos == 1:
            sub.ack(PUBACK, got.pid)
        elif got.qos == 2:
            sub.ack(PUBREC, got.pid)
            assert sub.expect(PUBREL).pid == got.pid  # [MQTT-4.3.3-?] the server's PUBREL
            sub.ack(PUBCOMP, got.pid)
        assert sub.no_publish_pending()


def test_qos2_duplicate_publish_delivered_once(broker):
    """4.3.3: a QoS 2 PUBLISH resent (DUP=1) before PUBREL is not delivered again."""
    topic = unique("q2/")
    with connected(broker) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 2)])
        pub.publish(topic, b"once", qos=2, pid=5)
        assert pub.expect(PUBREC).pid == 5
        pub.publish(topic, b"once", qos=2, pid=5, dup=True)
        assert pub.expect(PUBREC).pid == 5
        pub.ack(PUBREL, 5)
        assert pub.expect(PUBCOMP).pid == 5
        assert [p.payload for p in sub.drain_publishes()] == [b"once"]


def test_qos2_packet_id_reusable_after_pubcomp(broker):
    topic = unique("q2/")
    with connected(broker) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 2)])
        _publish_flow(pub, topic, b"first", 2, pid=9)
        _publish_flow(pub, topic, b"second", 2, pid=9)
        assert [p.payload for p in sub.drain_publishes()] == [b"first", b"second"]


def test_qos2_pubrel_for_unknown_id_gets_pubcomp(broker):
    """4.3.3: PUBREL is answered with PUBCOMP even if the id is unknown (e.g. after a restart)."""
    with connected(broker) as c:
        c.ack(PUBREL, 77)
        assert c.expect(PUBCOMP).pid == 77


def test_qos1_dup_flag_not_propagated(broker):
    """[MQTT-3.3.1-3]: the DUP flag of an incoming PUBLISH is not propagated to subscribers."""
    topic = unique("dup/")
    with connected(broker) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b"d", qos=1, pid=3, dup=True)
        assert pub.expect(PUBACK).pid == 3
        got = sub.recv_publish()
        assert got.payload == b"d" and not got.dup


def test_qos0_with_dup_flag_is_malformed(raftmq):
    """[MQTT-3.3.1-2]: DUP must be 0 for QoS 0 -> the server closes the connection.

    raftmq only: Mosquitto 2.0.11 accepts it.
    """
    with connected(raftmq) as c:
        c.publish(unique("dup/"), b"x", qos=0, dup=True)
        c.wait_closed()


@pytest.mark.parametrize("version", [4, 5])
def test_unacked_qos1_redelivered_with_dup_on_reconnect(broker, version):
    """[MQTT-4.4.0-1]: on reconnect of a persistent session, unacknowledged PUBLISH packets
    are re-sent with DUP=1 and the same packet id."""
    cid, topic = unique("rd"), unique("rd/")
    kw = {"clean": False} if version == 4 else {"clean": False, "props": {"session_expiry_interval": 60}}
    sub = connected(broker, cid, version, **kw)
    sub.subscribe(1, [(topic, 1)])
    with connected(broker) as pub:
        _publish_flow(pub, topic, b"r1", 1, pid=1)
    first = sub.recv_publish(auto_ack=False)
    assert first.qos == 1 and not first.dup
    sub.close()  # no PUBACK
    with raw(broker, version) as again:
        assert again.connect(cid, **kw).session_present
        re = again.recv_publish(auto_ack=False)
        assert (re.pid, re.payload, re.dup, re.qos) == (first.pid, b"r1", True, 1)
        again.ack(PUBACK, re.pid)
        assert again.no_publish_pending()


def test_unacked_qos2_publish_redelivered_on_reconnect(broker):
    cid, topic = unique("rd"), unique("rd/")
    sub = connected(broker, cid, 4, clean=False)
    sub.subscribe(1, [(topic, 2)])
    with connected(broker) as pub:
        _publish_flow(pub, topic, b"r2", 2, pid=1)
    first = sub.recv_publish(auto_ack=False)
    sub.close()  # no PUBREC
    with raw(broker, 4) as again:
        assert again.connect(cid, clean=False).session_present
        re = again.recv_publish(auto_ack=False)
        assert (re.pid, re.payload, re.dup, re.qos) == (first.pid, b"r2", True, 2)
        again.ack(PUBREC, re.pid)
        assert again.expect(PUBREL).pid == re.pid
        again.ack(PUBCOMP, re.pid)


def test_pubrel_resent_on_reconnect_after_pubrec(broker):
    """4.4: after PUBREC the server's next step is PUBREL; on reconnect it re-sends PUBREL
    (not the PUBLISH)."""
    cid, topic = unique("rd"), unique("rd/")
    sub = connected(broker, cid, 4, clean=False)
    sub.subscribe(1, [(topic, 2)])
    with connected(broker) as pub:
        _publish_flow(pub, topic, b"r3", 2, pid=1)
    first = sub.recv_publish(auto_ack=False)
    sub.ack(PUBREC, first.pid)
    assert sub.expect(PUBREL).pid == first.pid
    sub.close()  # no PUBCOMP
    with raw(broker, 4) as again:
        assert again.connect(cid, clean=False).session_present
        rel = again.recv()
        assert (rel.type, rel.pid) == (PUBREL, first.pid)
        again.ack(PUBCOMP, rel.pid)
        assert again.no_publish_pending()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_ordering_per_topic(broker, qos):
    """4.6: messages of one publisher on one topic arrive in the order published.

    Published in windows of 10 so the publisher stays within the server's Receive Maximum.
    """
    topic = unique("ord/")
    n, window = 60, 10
    with connected(broker) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, qos)])
        for start in range(0, n, window):
            for i in range(start, start + window):
                pub.publish(topic, str(i).encode(), qos=qos, pid=i + 1)
            pending = window if qos else 0
            while pending:
                ack = pub.recv()
                if ack.type == PUBREC:
                    pub.ack(PUBREL, ack.pid)
                else:
                    pending -= 1
        received = []
        while len(received) < n:
            received.append(int(sub.recv_publish(timeout=5).payload))
        assert received == list(range(n))


def test_ordering_across_topics_of_one_publisher(broker):
    """4.6: an ordered topic's order holds even interleaved with another topic (wildcard sub)."""
    base = unique("ord/")
    with connected(broker) as sub, connected(broker) as pub:
        sub.subscribe(1, [(base + "/#", 1)])
        for i in range(40):
            pub.publish(f"{base}/{i % 2}", str(i).encode(), qos=1, pid=i + 1)
        got = [int(sub.recv_publish(timeout=5).payload) for _ in range(40)]
        assert got == list(range(40))


def _overlap_observations(b, version: int) -> list[tuple]:
    topic = unique("ov/")
    props = (lambda i: {"subscription_identifier": i}) if version == 5 else (lambda i: None)
    with connected(b, version=version) as sub, connected(b, version=version) as pub:
        sub.subscribe(1, [(topic + "/#", 1)], props(5))
        sub.subscribe(2, [(topic + "/+", 2)], props(7))
        _publish_flow(pub, topic + "/x", b"o", 2, pid=1)
        got = sub.drain_publishes(0.7)
    return sorted((p.payload, p.qos, tuple(p.props.get("subscription_identifier", ()))) for p in got)


@pytest.mark.parametrize("version", [4, 5])
def test_overlapping_subscriptions_same_as_mosquitto(raftmq, mosquitto, version):
    """3.3.5: with overlapping subscriptions the server delivers at the highest QoS (3.1.1:
    once; 5.0: Mosquitto sends one copy per subscription with its identifier).  Compared
    with Mosquitto."""
    assert _overlap_observations(raftmq, version) == _overlap_observations(mosquitto, version)


def test_overlapping_subscriptions_311_delivers_once_at_max_qos(broker):
    assert [(p[0], p[1]) for p in _overlap_observations(broker, 4)] == [(b"o", 2)]


def test_publish_to_no_subscriber_is_acked(broker):
    with connected(broker) as pub:
        _publish_flow(pub, unique("none/"), b"x", 1, pid=4)
        _publish_flow(pub, unique("none/"), b"x", 2, pid=5)


def test_large_payload_delivered_intact(broker):
    topic = unique("big/")
    payload = bytes(range(256)) * 1024  # 256 KiB
    with connected(broker) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 1)])
        _publish_flow(pub, topic, payload, 1, pid=1)
        got = sub.recv_publish(timeout=5)
        assert got.payload == payload


def test_subscriber_receives_from_many_publishers(broker):
    topic = unique("fanin/")
    with connected(broker) as sub:
        sub.subscribe(1, [(topic, 1)])
        pubs = [connected(broker) for _ in range(5)]
        for i, p in enumerate(pubs):
            _publish_flow(p, topic, str(i).encode(), 1, pid=1)
        got = sorted(int(sub.recv_publish().payload) for _ in range(5))
        assert got == list(range(5))
        for p in pubs:
            p.close()


def test_client_receives_its_own_publish_without_no_local(broker):
    """3.1.1 has no No Local: a subscriber that publishes to its own filter gets the message."""
    topic = unique("s/")
    with connected(broker) as c:
        c.subscribe(1, [(topic, 0)])
        c.publish(topic, b"self")
        assert c.recv().type == PUBLISH


@pytest.mark.waits
def test_unacked_message_not_resent_while_connected(broker):
    """[MQTT-4.4.0-1] (5.0): the server re-sends unacknowledged PUBLISHes only on reconnect,
    never on a timer while the connection is up."""
    topic = unique("nr/")
    with connected(broker, version=5) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 1)])
        _publish_flow(pub, topic, b"once", 1, pid=1)
        got = sub.recv_publish(auto_ack=False)
        assert got.payload == b"once"
        assert sub.nothing_for(1.5)


def test_max_inflight_messages_limits_outgoing_311(make_broker):
    """max_inflight_messages: at most that many unacknowledged QoS 1 messages go to a client;
    the rest wait (queued) until acks arrive."""
    b = make_broker(max_inflight_messages=2)
    topic = unique("mi/")
    with connected(b) as sub, connected(b) as pub:
        sub.subscribe(1, [(topic, 1)])
        for i in range(5):
            _publish_flow(pub, topic, str(i).encode(), 1, pid=i + 1)
        first = sub.drain_publishes(auto_ack=False)
        assert [p.payload for p in first] == [b"0", b"1"]
        for p in first:
            sub.ack(PUBACK, p.pid)
        assert [p.payload for p in sub.drain_publishes()] == [b"2", b"3", b"4"]
