"""SUBSCRIBE / UNSUBSCRIBE with options, subscription identifiers, shared subscriptions, the
$-topic rule, offline queues (max_queued_messages) and message expiry.

MQTT 3.1.1 §3.8-3.11, §4.7; 5.0 §3.8-3.11, §4.7-4.8, §3.3.2.3.3.
"""

from __future__ import annotations

import time

import pytest

from support.helpers import connected, raw, unique
from support.mqttraw import (
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
    Closed,
    sub_options,
    unsubscribe,
)


def _pub(broker, topic: str, payload: bytes, qos: int = 1, version: int = 4, **kw) -> None:
    with connected(broker, version=version) as p:
        p.publish(topic, payload, qos=qos, pid=1, **kw)
        if qos == 1:
            p.expect(PUBACK)
        elif qos == 2:
            p.expect(PUBREC)


# --------------------------------------------------------------------------- SUBACK / UNSUBACK


def test_suback_grants_requested_qos_per_filter(broker):
    """[MQTT-3.8.4-5]/[MQTT-3.9.3-1]: one return code per filter, in order."""
    base = unique("sa/")
    with connected(broker) as c:
        ack = c.subscribe(3, [(base + "/0", 0), (base + "/1", 1), (base + "/2", 2)])
        assert (ack.pid, ack.codes) == (3, [0, 1, 2])


def test_subscription_replaced_not_duplicated(broker):
    """[MQTT-3.8.4-3]: a second SUBSCRIBE with the same filter replaces the first."""
    topic = unique("sa/")
    with connected(broker) as c:
        c.subscribe(1, [(topic, 0)])
        c.subscribe(2, [(topic, 1)])
        _pub(broker, topic, b"one")
        got = c.drain_publishes()
        assert [(p.payload, p.qos) for p in got] == [(b"one", 1)]


def test_unsubscribe_stops_delivery(broker):
    topic = unique("us/")
    with connected(broker) as c:
        c.subscribe(1, [(topic, 1)])
        c.send(unsubscribe(2, [topic]))
        assert c.expect(UNSUBACK).pid == 2
        _pub(broker, topic, b"gone")
        assert c.no_publish_pending()


def test_v5_unsuback_reason_codes(broker):
    """5.0 §3.11.3: 0x00 Success for an existing subscription, 0x11 No subscription existed."""
    topic = unique("us/")
    with connected(broker, version=5) as c:
        c.subscribe(1, [(topic, 1)])
        c.send(unsubscribe(2, [topic, topic + "/other"], version=5))
        ack = c.expect(UNSUBACK)
        assert (ack.pid, ack.codes) == (2, [0x00, 0x11])


def test_invalid_topic_filter_refused(broker):
    """4.7.1: '#' not last -> invalid filter: SUBACK failure (0x80/0x8F) or disconnect."""
    with connected(broker, version=5) as c:
        from support.mqttraw import subscribe

        c.send(subscribe(1, [("a/#/b", 0)], version=5))
        try:
            p = c.recv()
        except Closed:  # closing without a packet is an accepted reaction (3.1.1)
            return
        assert (p.type == SUBACK and p.codes[0] in (0x80, 0x8F)) or (
            p.type == DISCONNECT and p.reason in (0x81, 0x82, 0x8F)), p


def test_multi_level_and_single_level_wildcards(broker):
    base = unique("wc/")
    with connected(broker) as c:
        c.subscribe(1, [(base + "/+/x", 0), (base + "/y/#", 0)])
        for t in ("a/x", "a/b/x", "y", "y/z/w", "b/x/c"):
            _pub(broker, f"{base}/{t}", t.encode(), qos=0)
        got = sorted(p.topic[len(base) + 1:] for p in c.drain_publishes())
        assert got == ["a/x", "y", "y/z/w"]  # [MQTT-4.7.1-2]: '#' also matches the parent


def test_dollar_topics_not_matched_by_leading_wildcards(make_broker):
    """[MQTT-4.7.2-1]: '#' and '+' at the start do not match topics beginning with '$'.

    A broker of its own: '#' would also get other tests' retained messages.
    """
    broker = make_broker()
    t = unique("$x")
    with connected(broker) as c:
        c.subscribe(1, [("#", 0), ("+/y", 0)])
        _pub(broker, t + "/y", b"dollar", qos=1)
        assert c.no_publish_pending()
        c.subscribe(2, [(t + "/#", 0)])
        _pub(broker, t + "/y", b"explicit", qos=0)
        assert c.recv_publish().payload == b"explicit"


# --------------------------------------------------------------------------- v5 options


def test_v5_no_local(broker):
    """5.0 §3.8.3.1: No Local = 1 -> a client's own messages are not sent back to it."""
    topic = unique("nl/")
    with connected(broker, version=5) as c, connected(broker, version=5) as other:
        c.subscribe(1, [(topic, sub_options(1, no_local=True))])
        c.publish(topic, b"mine", qos=1, pid=1)
        c.expect(PUBACK)
        assert c.no_publish_pending()
        other.publish(topic, b"theirs", qos=1, pid=1)
        other.expect(PUBACK)
        assert c.recv_publish().payload == b"theirs"


def test_v5_subscription_identifier_delivered(broker):
    """5.0 §3.8.2.1.2/§3.3.4: the Subscription Identifier comes back on matching PUBLISHes."""
    topic = unique("sid/")
    with connected(broker, version=5) as c:
        c.subscribe(1, [(topic, 1)], {"subscription_identifier": 42})
        _pub(broker, topic, b"x", version=5)
        got = c.recv_publish()
        assert got.props.get("subscription_identifier") == [42]


def test_v5_subscription_without_identifier_gets_none(broker):
    topic = unique("sid/")
    with connected(broker, version=5) as c:
        c.subscribe(1, [(topic, 1)])
        _pub(broker, topic, b"x", version=5)
        assert "subscription_identifier" not in c.recv_publish().props


def test_v5_subscription_identifier_advertised(broker):
    with raw(broker, 5) as c:
        ack = c.connect(unique("c"))
        # absent means available (5.0 §3.2.2.3.12); 0 would mean not supported
        assert ack.props.get("subscription_identifier_available", 1) == 1
        assert ack.props.get("shared_subscription_available", 1) == 1
        assert ack.props.get("wildcard_subscription_available", 1) == 1


# --------------------------------------------------------------------------- shared subscriptions


def test_shared_subscription_spreads_messages(broker):
    """5.0 §4.8.2: each message of a shared subscription goes to exactly one member."""
    group, topic = unique("g"), unique("sh/")
    members = [connected(broker, version=v) for v in (5, 5, 4)]
    try:
        for m in members:
            assert m.subscribe(1, [(f"$share/{group}/{topic}", 1)]).codes == [1]
        with connected(broker) as p:
            for i in range(30):
                p.publish(topic, str(i).encode(), qos=1, pid=i + 1)
                p.expect(PUBACK)
        per_member = [[int(x.payload) for x in m.drain_publishes(first=1.0)] for m in members]
        everything = sorted(x for got in per_member for x in got)
        assert everything == list(range(30))  # each exactly once
        assert sum(1 for got in per_member if got) >= 2  # spread, not all to one
    finally:
        for m in members:
            m.close()


def test_shared_and_normal_subscription_both_get_message(broker):
    group, topic = unique("g"), unique("sh/")
    with connected(broker) as shared, connected(broker) as normal:
        shared.subscribe(1, [(f"$share/{group}/{topic}", 0)])
        normal.subscribe(1, [(topic, 0)])
        _pub(broker, topic, b"both", qos=0)
        assert shared.recv_publish().payload == b"both"
        assert normal.recv_publish().payload == b"both"


def test_shared_subscription_no_retained_on_subscribe(raftmq):
    """5.0 §3.3.1.3: retained messages are sent when a new *non-shared* subscription is made,
    not for a shared one.

    raftmq only: Mosquitto 2.0.11 sends them (fixed in a later 2.0.x: "Don't send retained
    messages when a shared subscription is made").
    """
    group, topic = unique("g"), unique("sh/")
    _pub(raftmq, topic, b"kept", retain=True)
    with connected(raftmq, version=5) as c:
        c.subscribe(1, [(f"$share/{group}/{topic}", 1)])
        assert c.no_publish_pending()


def test_shared_subscription_inflight_goes_to_other_member_when_member_leaves(raftmq):
    """Issue 2: QoS 1/2 messages in flight to a member that leaves go to another member.

    raftmq only: Mosquitto 2.0.11 drops them with the leaving clean session.
    """
    group, topic = unique("g"), unique("sh/")
    leaving = connected(raftmq, version=5)
    leaving.subscribe(1, [(f"$share/{group}/{topic}", 1)])
    with connected(raftmq) as p:
        for i in range(4):
            p.publish(topic, str(i).encode(), qos=1, pid=i + 1)
            p.expect(PUBACK)
    unacked = leaving.drain_publishes(auto_ack=False)
    assert sorted(int(x.payload) for x in unacked) == [0, 1, 2, 3]
    with connected(raftmq, version=5) as staying:
        staying.subscribe(1, [(f"$share/{group}/{topic}", 1)])
        leaving.close()  # never acknowledged
        got = sorted(int(x.payload) for x in staying.drain_publishes(1.0))
        assert got == [0, 1, 2, 3]


# --------------------------------------------------------------------------- offline queues


def test_offline_queue_for_persistent_session_in_order(broker):
    cid, topic = unique("q"), unique("q/")
    with connected(broker, cid, clean=False) as s:
        s.subscribe(1, [(topic, 2)])
    with connected(broker) as p:
        for i in range(10):
            p.publish(topic, str(i).encode(), qos=1 + i % 2, pid=i + 1)
            ack = p.recv()
            if ack.type == PUBREC:
                p.ack(PUBREL, ack.pid)
                assert p.expect(PUBCOMP).pid == ack.pid
            else:
                assert ack.type == PUBACK
    with raw(broker) as s:
        assert s.connect(cid, clean=False).session_present
        got = [int(x.payload) for x in s.drain_publishes()]
        assert got == list(range(10))


def test_qos0_not_queued_for_offline_session(broker):
    """Mosquitto's default (queue_qos0_messages false): QoS 0 messages for an offline client are
    dropped."""
    cid, topic = unique("q"), unique("q/")
    with connected(broker, cid, clean=False) as s:
        s.subscribe(1, [(topic, 1)])
    _pub(broker, topic, b"q0", qos=0)
    _pub(broker, topic, b"q1", qos=1)
    with raw(broker) as s:
        s.connect(cid, clean=False)
        assert [x.payload for x in s.drain_publishes()] == [b"q1"]


def test_max_queued_messages_limits_offline_queue(make_broker):
    """max_queued_messages: once the queue is full, newer messages are dropped (Mosquitto)."""
    b = make_broker(max_queued_messages=5)
    cid, topic = unique("q"), unique("q/")
    with connected(b, cid, clean=False) as s:
        s.subscribe(1, [(topic, 1)])
    with connected(b) as p:
        for i in range(12):
            p.publish(topic, str(i).encode(), qos=1, pid=i + 1)
            p.expect(PUBACK)
    with raw(b) as s:
        s.connect(cid, clean=False)
        got = [int(x.payload) for x in s.drain_publishes()]
        assert got == [0, 1, 2, 3, 4]


def test_offline_session_survives_many_messages(broker):
    cid, topic = unique("q"), unique("q/")
    with connected(broker, cid, clean=False) as s:
        s.subscribe(1, [(topic, 1)])
    with connected(broker) as p:
        for i in range(200):
            p.publish(topic, str(i).encode(), qos=1, pid=i % 60000 + 1)
            p.expect(PUBACK)
    with raw(broker) as s:
        s.connect(cid, clean=False)
        got = [int(x.payload) for x in s.drain_publishes(0.7)]
        assert got == list(range(200))


# --------------------------------------------------------------------------- message expiry


@pytest.mark.waits
def test_v5_expired_queued_message_not_delivered(broker):
    """5.0 §3.3.2.3.3: a message whose expiry interval passed is not sent to the subscriber."""
    cid, topic = unique("me"), unique("me/")
    kw = {"clean": False, "props": {"session_expiry_interval": 60}}
    with connected(broker, cid, 5, **kw) as s:
        s.subscribe(1, [(topic, 1)])
        s.disconnect()
    _pub(broker, topic, b"short", version=5, props={"message_expiry_interval": 1})
    _pub(broker, topic, b"long", version=5, props={"message_expiry_interval": 60})
    time.sleep(2.2)
    with raw(broker, 5) as s:
        assert s.connect(cid, **kw).session_present
        got = s.drain_publishes()
        assert [x.payload for x in got] == [b"long"]
        # [MQTT-3.3.2-6]: the interval sent on is reduced by the time spent waiting
        assert got[0].props["message_expiry_interval"] < 60


@pytest.mark.waits
def test_v5_expired_retained_message_not_delivered(broker):
    topic = unique("me/")
    _pub(broker, topic, b"fleeting", version=5, retain=True, props={"message_expiry_interval": 1})
    time.sleep(2.2)
    with connected(broker, version=5) as s:
        s.subscribe(1, [(topic, 1)])
        assert s.no_publish_pending()


def test_v5_message_expiry_interval_forwarded(broker):
    topic = unique("me/")
    with connected(broker, version=5) as s:
        s.subscribe(1, [(topic, 1)])
        _pub(broker, topic, b"x", version=5, props={"message_expiry_interval": 100})
        got = s.recv_publish()
        assert 98 <= got.props["message_expiry_interval"] <= 100


@pytest.mark.parametrize("version", [4, 5])
def test_subscribe_before_connect_closes(broker, version):
    """[MQTT-3.1.0-1]: the first packet must be CONNECT."""
    from support.mqttraw import subscribe

    with raw(broker, version) as c:
        c.send(subscribe(1, [("a", 0)], version=version))
        assert c.wait_closed() == []


def test_v5_subscription_identifier_on_retained_delivery(broker):
    topic = unique("sid/")
    _pub(broker, topic, b"kept", version=5, retain=True)
    with connected(broker, version=5) as c:
        c.subscribe(1, [(topic, 1)], {"subscription_identifier": 9})
        got = c.recv_publish()
        assert (got.payload, got.retain, got.props.get("subscription_identifier")) == (
            b"kept", True, [9])
