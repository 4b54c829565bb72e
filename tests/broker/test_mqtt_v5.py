"""MQTT 5.0 features: topic aliases, flow control (Receive Maximum), Maximum Packet Size,
message properties passed through, payload format, request/response and problem information,
AUTH, DISCONNECT reason codes in both directions.
"""

from __future__ import annotations

from support.helpers import assert_serves, connected, raw, unique
from support.mqttraw import (
    AUTH,
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    Will,
    auth,
)

# --------------------------------------------------------------------------- topic aliases


def test_inbound_topic_alias_resolved(broker):
    """5.0 §3.3.2.3.4: a PUBLISH with an alias and an empty topic uses the alias' topic."""
    topic = unique("ta/")
    with connected(broker, version=5) as sub, raw(broker, 5) as pub:
        ack = pub.connect(unique("p"))
        assert ack.props.get("topic_alias_maximum", 0) >= 1
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b"first", qos=1, pid=1, props={"topic_alias": 1})
        pub.expect(PUBACK)
        pub.publish("", b"second", qos=1, pid=2, props={"topic_alias": 1})
        pub.expect(PUBACK)
        got = sub.drain_publishes()
        assert [(p.topic, p.payload) for p in got] == [(topic, b"first"), (topic, b"second")]


def test_inbound_topic_alias_can_be_remapped(broker):
    a, b = unique("ta/"), unique("ta/")
    with connected(broker, version=5) as sub, connected(broker, version=5) as pub:
        sub.subscribe(1, [(a, 0), (b, 0)])
        pub.publish(a, b"1", props={"topic_alias": 2})
        pub.publish(b, b"2", props={"topic_alias": 2})
        pub.publish("", b"3", props={"topic_alias": 2})
        got = sub.drain_publishes()
        assert [(p.topic, p.payload) for p in got] == [(a, b"1"), (b, b"2"), (b, b"3")]


def test_topic_alias_above_maximum_disconnects_0x94(broker):
    """[MQTT-3.3.2-10]: an alias greater than the server's Topic Alias Maximum -> 0x94."""
    with raw(broker, 5) as c:
        maximum = c.connect(unique("c")).props.get("topic_alias_maximum", 0)
        c.publish(unique("ta/"), b"x", props={"topic_alias": maximum + 1})
        got = c.wait_closed()
        assert [(p.type, p.reason) for p in got] == [(DISCONNECT, 0x94)]
    assert_serves(broker)


def test_topic_alias_zero_disconnects(broker):
    """[MQTT-3.3.2-8]: alias 0 is not permitted.  The standard names no reason code for it
    (0x94 is defined for "greater than the maximum"): Mosquitto sends 0x81; 0x82 and 0x94 also fit."""
    with connected(broker, version=5) as c:
        c.publish(unique("ta/"), b"x", props={"topic_alias": 0})
        got = c.wait_closed()
        assert len(got) == 1 and got[0].type == DISCONNECT and got[0].reason in (0x81, 0x82, 0x94), got


def test_unknown_topic_alias_is_protocol_error(broker):
    """5.0 §3.3.4: an empty topic with an alias that has no mapping -> protocol error 0x82."""
    with connected(broker, version=5) as c:
        c.publish("", b"x", props={"topic_alias": 3})
        got = c.wait_closed()
        assert [(p.type, p.reason) for p in got] == [(DISCONNECT, 0x82)]


def test_outbound_topic_alias_respects_client_maximum(broker):
    """[MQTT-3.3.2-9]: the server never sends an alias above the client's Topic Alias Maximum;
    the raw client resolves any alias it gets, so every message must arrive with its topic."""
    base = unique("ta/")
    for client_max in (0, 2):
        props = {"topic_alias_maximum": client_max} if client_max else None
        with connected(broker, version=5, props=props) as sub, connected(broker) as pub:
            sub.subscribe(1, [(base + "/#", 0)])
            sent = [(f"{base}/{i % 5}", str(i).encode()) for i in range(25)]
            for t, payload in sent:
                pub.publish(t, payload)
            got = sub.drain_publishes()
            assert [(p.topic, p.payload) for p in got] == sent
            for p in got:
                assert p.props.get("topic_alias", 0) <= client_max


# --------------------------------------------------------------------------- receive maximum


def _fill_inbound_quota(c, n: int) -> None:
    """Send ``n`` QoS 2 PUBLISHes without PUBREL: each stays in flight [MQTT-3.3.4-9]."""
    for i in range(n):
        c.publish(unique("rm/"), b"x", qos=2, pid=i + 1)
        assert c.expect(PUBREC).reason == 0


def test_connack_receive_maximum_from_max_inflight_messages(make_broker):
    b = make_broker(max_inflight_messages=5)
    with raw(b, 5) as c:
        assert c.connect(unique("c")).props.get("receive_maximum") == 5


def test_within_receive_maximum_accepted(make_broker):
    b = make_broker(max_inflight_messages=5)
    with connected(b, version=5) as c:
        _fill_inbound_quota(c, 5)
        for pid in range(1, 6):
            c.ack(PUBREL, pid)
            assert c.expect(PUBCOMP).pid == pid
        _fill_inbound_quota(c, 5)  # quota given back by PUBCOMP


def test_client_exceeding_receive_maximum_disconnected_0x93(raftmq_factory):
    """[MQTT-3.3.4-9]/5.0 §4.9: more unacknowledged QoS>0 PUBLISHes than Receive Maximum ->
    DISCONNECT 0x93.

    raftmq only: Mosquitto 2.0.11 answers the excess PUBLISH with PUBREC 0x97 (quota exceeded)
    and keeps the connection.
    """
    b = raftmq_factory(max_inflight_messages=5)
    with connected(b, version=5) as c:
        _fill_inbound_quota(c, 5)
        c.publish(unique("rm/"), b"one too many", qos=2, pid=6)
        got = c.wait_closed()
        assert [(p.type, p.reason) for p in got] == [(DISCONNECT, 0x93)]
    assert_serves(b)


def test_broker_limits_first_burst_to_client_receive_maximum(broker):
    """[MQTT-3.3.4-7]: the server sends no more than the client's Receive Maximum unacknowledged
    QoS 1/2 PUBLISHes; once they are acknowledged the rest follows, in order."""
    topic = unique("rm/")
    with connected(broker, version=5, props={"receive_maximum": 2}) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 1)])
        for i in range(5):
            pub.publish(topic, str(i).encode(), qos=1, pid=i + 1)
            pub.expect(PUBACK)
        first = sub.drain_publishes(auto_ack=False)
        assert [p.payload for p in first] == [b"0", b"1"]
        for p in first:
            sub.ack(PUBACK, p.pid)
        assert [p.payload for p in sub.drain_publishes()] == [b"2", b"3", b"4"]


def test_broker_honours_client_receive_maximum_per_ack(raftmq):
    """[MQTT-3.3.4-7]: each acknowledgement frees exactly one slot.

    raftmq only: Mosquitto 2.0.11 lets two through after one ack (its inflight quota
    accounting was fixed in later 2.0.x releases).
    """
    topic = unique("rm/")
    with connected(raftmq, version=5, props={"receive_maximum": 2}) as sub, \
            connected(raftmq) as pub:
        sub.subscribe(1, [(topic, 1)])
        for i in range(5):
            pub.publish(topic, str(i).encode(), qos=1, pid=i + 1)
            pub.expect(PUBACK)
        first = sub.drain_publishes(auto_ack=False)
        assert [p.payload for p in first] == [b"0", b"1"]
        sub.ack(PUBACK, first[0].pid)
        assert [p.payload for p in sub.drain_publishes(auto_ack=False)] == [b"2"]
        sub.ack(PUBACK, first[1].pid)
        nxt = sub.drain_publishes(auto_ack=True)
        assert [p.payload for p in nxt] == [b"3", b"4"]


# --------------------------------------------------------------------------- maximum packet size


def test_server_maximum_packet_size_advertised_and_enforced(make_broker):
    """5.0 §3.2.2.3.6 / [MQTT-3.2.2-15]: a packet larger than the server's Maximum Packet Size ->
    DISCONNECT 0x95."""
    b = make_broker(max_packet_size=200)
    with raw(b, 5) as c:
        assert c.connect(unique("c")).props.get("maximum_packet_size") == 200
        c.publish(unique("mps/"), b"x" * 300)
        got = c.wait_closed()
        assert [(p.type, p.reason) for p in got] == [(DISCONNECT, 0x95)]
    assert_serves(b)


def test_client_maximum_packet_size_respected(broker):
    """[MQTT-3.1.2-25]: the server does not send a packet larger than the client's Maximum
    Packet Size; it drops that message and goes on with the next."""
    topic = unique("mps/")
    with connected(broker, version=5, props={"maximum_packet_size": 100}) as sub, \
            connected(broker) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b"x" * 200, qos=1, pid=1)
        pub.expect(PUBACK)
        pub.publish(topic, b"small", qos=1, pid=2)
        pub.expect(PUBACK)
        got = sub.drain_publishes()
        assert [p.payload for p in got] == [b"small"]


def test_message_size_limit_rejects_big_payload(make_broker):
    """message_size_limit: 5.0 PUBACK 0x95 (packet too large), 3.1.1 acked and dropped."""
    b = make_broker(message_size_limit=100)
    topic = unique("msl/")
    with connected(b) as sub:
        sub.subscribe(1, [(topic, 1)])
        with connected(b, version=5) as p5:
            p5.publish(topic, b"x" * 150, qos=1, pid=1)
            assert p5.expect(PUBACK).reason == 0x95
        with connected(b, version=4) as p4:
            p4.publish(topic, b"y" * 150, qos=1, pid=1)
            p4.expect(PUBACK)
            p4.publish(topic, b"fits", qos=1, pid=2)
            p4.expect(PUBACK)
        assert [p.payload for p in sub.drain_publishes()] == [b"fits"]


# --------------------------------------------------------------------------- properties


PASS_THROUGH = {
    "payload_format_indicator": 1,
    "content_type": "application/json",
    "response_topic": "reply/here",
    "correlation_data": b"\x00\x01corr",
    "user_property": [("b", "2"), ("a", "1"), ("a", "3")],
}


def test_publish_properties_passed_through_unchanged(broker):
    """[MQTT-3.3.2-4]/[MQTT-3.3.2-15..20]: payload format, content type, response topic,
    correlation data and user properties (order kept) reach the subscriber unchanged."""
    topic = unique("pp/")
    with connected(broker, version=5) as sub, connected(broker, version=5) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b'{"k": 1}', qos=1, pid=1, props=PASS_THROUGH)
        pub.expect(PUBACK)
        got = sub.recv_publish()
        assert {k: got.props.get(k) for k in PASS_THROUGH} == PASS_THROUGH


def test_properties_on_retained_message_kept(broker):
    topic = unique("pp/")
    with connected(broker, version=5) as pub:
        pub.publish(topic, b"{}", qos=1, pid=1, retain=True, props=PASS_THROUGH)
        pub.expect(PUBACK)
    with connected(broker, version=5) as sub:
        sub.subscribe(1, [(topic, 1)])
        got = sub.recv_publish()
        assert {k: got.props.get(k) for k in PASS_THROUGH} == PASS_THROUGH


def test_v311_subscriber_gets_payload_of_v5_publish(broker):
    topic = unique("pp/")
    with connected(broker, version=4) as sub, connected(broker, version=5) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b"plain", qos=1, pid=1, props=PASS_THROUGH)
        pub.expect(PUBACK)
        assert sub.recv_publish().payload == b"plain"


def test_request_response_pattern(broker):
    """5.0 §4.10: a responder uses Response Topic and Correlation Data of the request."""
    req_topic, resp_topic = unique("req/"), unique("resp/")
    with connected(broker, version=5) as requester, connected(broker, version=5) as responder:
        requester.subscribe(1, [(resp_topic, 1)])
        responder.subscribe(1, [(req_topic, 1)])
        requester.publish(req_topic, b"ping", qos=1, pid=1,
                          props={"response_topic": resp_topic, "correlation_data": b"42"})
        requester.expect(PUBACK)
        req = responder.recv_publish()
        responder.publish(req.props["response_topic"], b"pong", qos=1, pid=1,
                          props={"correlation_data": req.props["correlation_data"]})
        responder.expect(PUBACK)
        resp = requester.recv_publish()
        assert (resp.payload, resp.props.get("correlation_data")) == (b"pong", b"42")


def test_invalid_utf8_payload_with_format_indicator_refused_0x99(raftmq):
    """5.0 §3.3.2.3.2: Payload Format Indicator 1 with a payload that is not UTF-8 -> reason
    0x99 Payload format invalid (in PUBACK, or DISCONNECT), and not delivered.

    raftmq only: Mosquitto 2.0.11 does not check the payload.
    """
    topic = unique("pf/")
    with connected(raftmq, version=5) as sub, connected(raftmq, version=5) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b"\xff\xfe not utf-8", qos=1, pid=1,
                    props={"payload_format_indicator": 1})
        p = pub.recv()
        assert p.type in (PUBACK, DISCONNECT) and p.reason == 0x99, p
        assert sub.no_publish_pending()
    assert_serves(raftmq)


def test_valid_utf8_payload_with_format_indicator_accepted(broker):
    topic = unique("pf/")
    with connected(broker, version=5) as sub, connected(broker, version=5) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, "héllo ✓".encode(), qos=1, pid=1, props={"payload_format_indicator": 1})
        assert pub.expect(PUBACK).reason in (0x00, 0x10)
        assert sub.recv_publish().payload == "héllo ✓".encode()


def test_request_problem_and_response_information_accepted(broker):
    """5.0 §3.1.2.11.6-7: the properties are accepted; with Request Problem Information 0 the
    server sends no Reason String / User Property on a PUBACK ([MQTT-3.1.2-29])."""
    with raw(broker, 5) as c:
        ack = c.connect(unique("c"), props={"request_problem_information": 0,
                                            "request_response_information": 1})
        assert ack.reason == 0
        if "response_information" in ack.props:
            assert isinstance(ack.props["response_information"], str)
        c.publish(unique("nobody/"), b"x", qos=1, pid=1)
        puback = c.expect(PUBACK)
        assert "reason_string" not in puback.props and "user_property" not in puback.props


# --------------------------------------------------------------------------- AUTH and DISCONNECT


def test_auth_packet_without_auth_method_is_protocol_error(broker):
    """5.0 §4.12: AUTH when no authentication method was set in CONNECT -> protocol error:
    the connection is closed (DISCONNECT 0x82 first, or just closed as Mosquitto does)."""
    with connected(broker, version=5) as c:
        c.send(auth(0x19, {"authentication_method": "X"}))
        got = c.wait_closed()
        assert all(p.type == DISCONNECT and p.reason == 0x82 for p in got), got
        assert all(p.type != AUTH for p in got)


def test_client_disconnect_normal_no_will(broker):
    topic = unique("dc/")
    with connected(broker) as w:
        w.subscribe(1, [(topic, 0)])
        c = connected(broker, version=5, will=Will(topic, b"w"))
        c.disconnect(0x00)
        assert c.wait_closed() == []  # [MQTT-3.14.4-1]: the server closes after DISCONNECT
        assert w.no_publish_pending(0.3)


def test_client_disconnect_0x04_sends_will(broker):
    topic = unique("dc/")
    with connected(broker) as w:
        w.subscribe(1, [(topic, 0)])
        c = connected(broker, version=5, will=Will(topic, b"w"))
        c.disconnect(0x04)
        c.wait_closed()
        assert w.recv_publish().payload == b"w"


def test_client_disconnect_with_error_reason_sends_will(raftmq):
    """5.0 §3.1.2.5: only DISCONNECT 0x00 deletes the will; after 0x80 it is published.

    raftmq only: Mosquitto 2.0.11 drops the will on any client DISCONNECT but 0x04.
    """
    topic = unique("dc/")
    with connected(raftmq) as w:
        w.subscribe(1, [(topic, 0)])
        c = connected(raftmq, version=5, will=Will(topic, b"err"))
        c.disconnect(0x80)
        c.wait_closed()
        assert w.recv_publish().payload == b"err"


def test_server_disconnect_reason_for_protocol_error(broker):
    """5.0 §4.13: a server that closes for a protocol error first sends DISCONNECT with the
    reason (here: wildcard in a PUBLISH topic; 0x90 Topic Name invalid per 3.3.2.1, Mosquitto
    sends 0x82)."""
    with connected(broker, version=5) as c:
        c.publish("a/+/b", b"x")
        got = c.wait_closed()
        assert len(got) == 1 and got[0].type == DISCONNECT and got[0].reason in (0x82, 0x90), got
    assert_serves(broker)


def test_pubrec_error_reason_ends_qos2_flow(broker):
    """5.0 §4.3.3: a PUBREC with reason >= 0x80 ends the flow: no PUBREL follows."""
    topic = unique("rc/")
    with connected(broker, version=5) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 2)])
        pub.publish(topic, b"x", qos=2, pid=1)
        pub.expect(PUBREC)
        pub.ack(PUBREL, 1)
        pub.expect(PUBCOMP)
        got = sub.recv_publish(auto_ack=False)
        sub.ack(PUBREC, got.pid, reason=0x80)
        assert sub.no_publish_pending()


def test_outbound_topic_aliases_used_when_client_allows(raftmq):
    """5.0 §3.3.2.3.4: the server may replace a repeated topic by an alias the client allowed.

    raftmq only: Mosquitto 2.0.11 never sends aliases.  The first use of an alias carries the
    topic, later ones an empty topic; the raw client checks both.
    """
    topic = unique("ta/")
    with connected(raftmq, version=5, props={"topic_alias_maximum": 4}) as sub, \
            connected(raftmq) as pub:
        sub.subscribe(1, [(topic, 0)])
        for i in range(3):
            pub.publish(topic, str(i).encode())
        got = sub.drain_publishes()
        assert [(p.topic, p.payload) for p in got] == [(topic, b"0"), (topic, b"1"), (topic, b"2")]
        aliases = [p.props.get("topic_alias") for p in got]
        assert aliases[0] is not None and 1 <= aliases[0] <= 4
        assert b"\x00\x00" in got[2].raw[2:4]  # later uses: zero-length topic on the wire
