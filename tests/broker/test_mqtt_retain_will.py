"""Retained messages (3.3.1.3, 5.0 §3.3.1.3, §3.8.3.1 retain handling / RAP) and will messages
(3.1.2.5, 5.0 §3.1.2.5, will delay interval §3.1.3.2.2)."""

from __future__ import annotations

import time

import pytest

from support.helpers import connected, raw, unique
from support.mqttraw import PUBACK, Will, sub_options

# --------------------------------------------------------------------------- retained


def _retain(broker, topic: str, payload: bytes, qos: int = 1, version: int = 4, **kw) -> None:
    with connected(broker, version=version) as p:
        p.publish(topic, payload, qos=qos, retain=True, pid=1, **kw)
        if qos:
            p.expect(PUBACK)


@pytest.mark.parametrize("version", [4, 5])
def test_retained_message_sent_to_new_subscriber(broker, version):
    """[MQTT-3.3.1-6]: a new subscription gets the retained message, with RETAIN=1."""
    topic = unique("ret/")
    _retain(broker, topic, b"kept", version=version)
    with connected(broker, version=version) as s:
        s.subscribe(1, [(topic, 1)])
        got = s.recv_publish()
        assert (got.topic, got.payload, got.retain, got.qos) == (topic, b"kept", True, 1)


def test_retained_replaced_by_newer(broker):
    topic = unique("ret/")
    _retain(broker, topic, b"old")
    _retain(broker, topic, b"new")
    with connected(broker) as s:
        s.subscribe(1, [(topic, 1)])
        assert [p.payload for p in s.drain_publishes()] == [b"new"]


def test_retained_cleared_by_empty_payload(broker):
    """[MQTT-3.3.1-10]/[MQTT-3.3.1-11]: a retained zero-length payload removes the retained
    message and is not itself retained."""
    topic = unique("ret/")
    _retain(broker, topic, b"kept")
    _retain(broker, topic, b"")
    with connected(broker) as s:
        s.subscribe(1, [(topic, 1)])
        assert s.no_publish_pending()


def test_retained_matched_by_wildcards(broker):
    base = unique("ret/")
    for leaf in ("a", "b", "c/d"):
        _retain(broker, f"{base}/{leaf}", leaf.encode())
    with connected(broker) as s:
        s.subscribe(1, [(base + "/+", 0)])
        assert sorted(p.payload for p in s.drain_publishes()) == [b"a", b"b"]
        s.subscribe(2, [(base + "/#", 0)])
        assert sorted(p.payload for p in s.drain_publishes()) == [b"a", b"b", b"c/d"]


def test_retain_flag_cleared_for_existing_subscribers_311(broker):
    """[MQTT-3.3.1-9] (3.1.1): a message forwarded to an existing subscription has RETAIN=0."""
    topic = unique("ret/")
    with connected(broker) as s:
        s.subscribe(1, [(topic, 1)])
        _retain(broker, topic, b"live")
        got = s.recv_publish()
        assert got.payload == b"live" and not got.retain


def test_qos0_retained_message_kept(broker):
    topic = unique("ret/")
    _retain(broker, topic, b"q0", qos=0)
    time.sleep(0.2)
    with connected(broker) as s:
        s.subscribe(1, [(topic, 1)])
        got = s.recv_publish()
        assert (got.payload, got.qos, got.retain) == (b"q0", 0, True)


@pytest.mark.parametrize("rap", [False, True])
def test_v5_retain_as_published(broker, rap):
    """5.0 §3.8.3.1: RAP=1 keeps RETAIN as published on forwarded messages, RAP=0 clears it."""
    topic = unique("rap/")
    with connected(broker, version=5) as s:
        s.subscribe(1, [(topic, sub_options(1, rap=rap))])
        _retain(broker, topic, b"x", version=5)
        got = s.recv_publish()
        assert got.retain is rap


def test_v5_retain_handling_0_sends_on_every_subscribe(broker):
    topic = unique("rh/")
    _retain(broker, topic, b"r", version=5)
    with connected(broker, version=5) as s:
        s.subscribe(1, [(topic, sub_options(1, rh=0))])
        assert [p.payload for p in s.drain_publishes()] == [b"r"]
        s.subscribe(2, [(topic, sub_options(1, rh=0))])
        assert [p.payload for p in s.drain_publishes()] == [b"r"]


def test_v5_retain_handling_1_only_for_new_subscription(broker):
    topic = unique("rh/")
    _retain(broker, topic, b"r", version=5)
    with connected(broker, version=5) as s:
        s.subscribe(1, [(topic, sub_options(1, rh=1))])
        assert [p.payload for p in s.drain_publishes()] == [b"r"]
        s.subscribe(2, [(topic, sub_options(1, rh=1))])
        assert s.no_publish_pending()


def test_v5_retain_handling_2_never(broker):
    topic = unique("rh/")
    _retain(broker, topic, b"r", version=5)
    with connected(broker, version=5) as s:
        s.subscribe(1, [(topic, sub_options(1, rh=2))])
        assert s.no_publish_pending()
        _retain(broker, topic, b"live", version=5)  # live messages still arrive
        assert s.recv_publish().payload == b"live"


def test_retained_not_available_when_disabled(make_broker):
    """retain_available false: 5.0 CONNACK says Retain Available 0; a retained PUBLISH is refused
    (Mosquitto: DISCONNECT 0x9A Retain not supported)."""
    b = make_broker(retain_available=False)
    with raw(b, 5) as c:
        ack = c.connect(unique("r"))
        assert ack.props.get("retain_available") == 0
        c.publish(unique("ret/"), b"x", qos=1, retain=True, pid=1)
        got = c.wait_closed()
        assert [(p.name, p.reason) for p in got] == [("DISCONNECT", 0x9A)]


# --------------------------------------------------------------------------- wills


def _watch(broker, topic: str):
    w = connected(broker)
    w.subscribe(1, [(topic, 1)])
    return w


@pytest.mark.parametrize("version", [4, 5])
def test_will_published_on_abnormal_close(broker, version):
    """[MQTT-3.1.2-8]: the will is published when the connection closes without DISCONNECT."""
    topic = unique("will/")
    with _watch(broker, topic) as w:
        c = connected(broker, version=version, will=Will(topic, b"bye", qos=1))
        c.close()
        got = w.recv_publish()
        assert (got.topic, got.payload) == (topic, b"bye")


@pytest.mark.parametrize("version", [4, 5])
def test_will_not_published_on_normal_disconnect(broker, version):
    """[MQTT-3.1.2-10]: DISCONNECT (reason 0x00) deletes the will."""
    topic = unique("will/")
    with _watch(broker, topic) as w:
        c = connected(broker, version=version, will=Will(topic, b"bye"))
        c.disconnect()
        c.wait_closed()  # the server has handled the DISCONNECT and closed
        c.close()
        assert w.no_publish_pending(0.3)


def test_v5_disconnect_with_will_message_reason_sends_will(broker):
    """5.0 §3.14.2.1: DISCONNECT 0x04 Disconnect with Will Message -> the will is published."""
    topic = unique("will/")
    with _watch(broker, topic) as w:
        c = connected(broker, version=5, will=Will(topic, b"asked"))
        c.disconnect(0x04)
        c.close()
        assert w.recv_publish().payload == b"asked"


def test_will_retained_flag(broker):
    topic = unique("will/")
    c = connected(broker, will=Will(topic, b"last", qos=1, retain=True))
    c.close()
    time.sleep(0.3)
    with connected(broker) as s:
        s.subscribe(1, [(topic, 1)])
        got = s.recv_publish()
        assert (got.payload, got.retain) == (b"last", True)


def test_will_qos_honoured(broker):
    topic = unique("will/")
    with connected(broker) as w:
        w.subscribe(1, [(topic, 2)])
        c = connected(broker, will=Will(topic, b"q2", qos=2))
        c.close()
        got = w.recv_publish()
        assert (got.payload, got.qos) == (b"q2", 2)


def test_v5_will_properties_passed_through(broker):
    topic = unique("will/")
    props = {"content_type": "text/plain", "user_property": [("k", "v")],
             "response_topic": "resp/x", "correlation_data": b"\x01\x02"}
    with connected(broker, version=5) as w:
        w.subscribe(1, [(topic, 1)])
        c = connected(broker, version=5, will=Will(topic, b"p", qos=1, props=props))
        c.close()
        got = w.recv_publish()
        assert {k: got.props.get(k) for k in props} == props


@pytest.mark.waits
def test_v5_will_delay_interval_delays_will(broker):
    """5.0 §3.1.3.2.2: the will goes out Will Delay Interval seconds after the connection ends."""
    topic = unique("will/")
    with connected(broker, version=5) as w:
        w.subscribe(1, [(topic, 1)])
        c = connected(broker, version=5, clean=True, props={"session_expiry_interval": 30},
                      will=Will(topic, b"late", props={"will_delay_interval": 2}))
        c.close()
        assert w.nothing_for(1.0)
        assert w.recv_publish(timeout=5).payload == b"late"


@pytest.mark.waits
def test_v5_will_cancelled_by_reconnect_within_delay(broker):
    """5.0 §3.1.3.2.2: a reconnect of the session before the delay ends cancels the will."""
    topic, cid = unique("will/"), unique("wd")
    with connected(broker, version=5) as w:
        w.subscribe(1, [(topic, 1)])
        c = connected(broker, cid, version=5, clean=False, props={"session_expiry_interval": 30},
                      will=Will(topic, b"cancelled", props={"will_delay_interval": 2}))
        c.close()
        time.sleep(0.5)
        with raw(broker, 5) as again:
            assert again.connect(cid, clean=False, props={"session_expiry_interval": 30}).session_present
            assert w.nothing_for(3.0)
            again.disconnect()


@pytest.mark.waits
def test_v5_will_sent_when_session_ends_before_delay(broker):
    """5.0 §3.1.2.5: the will is sent at the earlier of will delay and session end."""
    topic = unique("will/")
    with connected(broker, version=5) as w:
        w.subscribe(1, [(topic, 1)])
        c = connected(broker, version=5, clean=True, props={"session_expiry_interval": 1},
                      will=Will(topic, b"session over", props={"will_delay_interval": 60}))
        c.close()
        assert w.recv_publish(timeout=4).payload == b"session over"


def test_will_published_when_taken_over_v5_with_expiry_zero(broker):
    """Takeover ends the old network connection: its will is published (5.0 §3.1.4, will delay 0)."""
    topic, cid = unique("will/"), unique("tw")
    with connected(broker, version=5) as w:
        w.subscribe(1, [(topic, 1)])
        old = connected(broker, cid, version=5, will=Will(topic, b"taken"))
        with connected(broker, cid, version=5):
            assert w.recv_publish().payload == b"taken"
        old.close()


def test_retained_message_delivered_at_subscription_qos(broker):
    """[MQTT-3.3.1-5]/3.8.4: a retained QoS 2 message goes to a QoS 0 subscriber at QoS 0."""
    topic = unique("ret/")
    with connected(broker) as p:
        p.publish(topic, b"q2", qos=2, retain=True, pid=1)
        from support.mqttraw import PUBCOMP, PUBREC, PUBREL

        p.expect(PUBREC)
        p.ack(PUBREL, 1)
        p.expect(PUBCOMP)
    with connected(broker) as s0, connected(broker) as s2:
        s0.subscribe(1, [(topic, 0)])
        s2.subscribe(1, [(topic, 2)])
        assert (s0.recv_publish().qos, s2.recv_publish().qos) == (0, 2)
