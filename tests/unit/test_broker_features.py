"""Broker features on the wire, one test per rule (in-process broker, raw clients)."""

from __future__ import annotations

import asyncio

from broker_harness import RawClient, run_with_broker
from raftmq._codec import (
    Connect,
    Disconnect,
    Puback,
    Publish,
    Pubrec,
    Suback,
    Subscribe,
    Unsubscribe,
)

from raftmq.state.entries import Message


def sub(client, pid, *filters, qos=0, props=None, nl=False, rap=False, rh=0):
    client.send(Subscribe(pid, [(f, qos, nl, rap, rh) for f in filters], props))


async def subscriber(port, cid, *filters, version=5, qos=0, **kw):
    c = RawClient(version)
    await c.connect(port, cid, **kw)
    sub(c, 1, *filters, qos=qos)
    await c.recv_type(Suback)
    return c


def test_connack_codes_v311_v31_zero_length_ids():
    async def scenario(broker, port):
        c = RawClient(4)
        assert (await c.connect(port, "", clean=False)).reason_code == 2  # [MQTT-3.1.3-8]
        assert await c.closed_within() == []
        c = RawClient(4)
        ack = await c.connect(port, "", clean=True)
        assert ack.reason_code == 0
        c = RawClient(3)
        assert (await c.connect(port, "")).reason_code == 2
        c = RawClient(5)
        ack = await c.connect(port, "", clean=False)
        assert ack.reason_code == 0 and ack.properties["assigned_client_identifier"]

    run_with_broker(scenario)


def test_zero_length_id_refused_when_disallowed():
    async def scenario(broker, port):
        c = RawClient(4)
        assert (await c.connect(port, "")).reason_code == 2
        c = RawClient(5)
        assert (await c.connect(port, "")).reason_code == 0x85

    run_with_broker(scenario, allow_zero_length_clientid=False)


def test_anonymous_refused_v311_and_v5():
    async def scenario(broker, port):
        c = RawClient(4)
        assert (await c.connect(port, "a")).reason_code == 5
        c = RawClient(5)
        assert (await c.connect(port, "b")).reason_code == 0x87
        assert await c.closed_within() == []

    run_with_broker(scenario, allow_anonymous=False)


def test_unsupported_protocol_version_and_auth_method():
    async def scenario(broker, port):
        c = RawClient(4)
        await c.open(port)
        data = bytearray(Connect(protocol_version=4, client_id="x").encode(4))
        data[8] = 7  # protocol level 7
        c.send_raw(bytes(data))
        ack = await c.recv()
        assert ack.reason_code == 1  # unacceptable protocol version
        c = RawClient(5)
        ack = await c.connect(port, "m", properties={"authentication_method": "SCRAM-SHA-1"})
        assert ack.reason_code == 0x8C

    run_with_broker(scenario)


def test_server_keep_alive_when_above_max_keepalive():
    async def scenario(broker, port):
        c = RawClient(5)
        ack = await c.connect(port, "k", keepalive=300)
        assert ack.properties["server_keep_alive"] == 100

    run_with_broker(scenario, max_keepalive=100)


def test_second_connect_is_protocol_error():
    async def scenario(broker, port):
        c = RawClient(5)
        await c.connect(port, "c")
        c.send(Connect(protocol_version=5, client_id="c"))
        got = await c.closed_within()
        assert got and got[0].reason_code == 0x82

    run_with_broker(scenario)


def test_silent_connection_closed_after_connect_timeout():
    async def scenario(broker, port):
        broker.connect_timeout = 1.0
        c = RawClient(4)
        await c.open(port)
        c.send_raw(b"\x10\x20\x00")  # half a CONNECT, then nothing
        assert await c.closed_within(5) == []
        other = RawClient(4)
        assert (await other.connect(port, "fine")).reason_code == 0

    run_with_broker(scenario)


def test_malformed_packet_disconnect_0x81_others_unaffected():
    async def scenario(broker, port):
        s = await subscriber(port, "s", "x")
        c = RawClient(5)
        await c.connect(port, "bad")
        c.send_raw(b"\x30\x03\x00\x05a")  # topic length beyond the packet
        got = await c.closed_within()
        assert got and got[0].reason_code == 0x81
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("x", b"ok", 0, False, False, 0, None))
        assert (await s.recv_type(Publish)).payload == b"ok"

    run_with_broker(scenario)


def test_packet_too_large_0x95():
    async def scenario(broker, port):
        c = RawClient(5)
        ack = await c.connect(port, "c")
        assert ack.properties["maximum_packet_size"] == 200
        c.send(Publish("t", b"x" * 300, 0, False, False, 0, None))
        got = await c.closed_within()
        assert got and got[0].reason_code == 0x95

    run_with_broker(scenario, max_packet_size=200)


def test_client_maximum_packet_size_respected():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s", properties={"maximum_packet_size": 100})
        sub(s, 1, "big", qos=1)
        await s.recv_type(Suback)
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("big", b"x" * 200, 1, False, False, 1, None))
        p.send(Publish("big", b"small", 1, False, False, 2, None))
        m = await s.recv_type(Publish)
        assert m.payload == b"small"  # [MQTT-3.1.2-25]: the big one is not sent

    run_with_broker(scenario)


def test_message_size_limit_puback_0x95():
    async def scenario(broker, port):
        s = await subscriber(port, "s", "t")
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("t", b"x" * 50, 1, False, False, 1, None))
        ack = await p.recv_type(Puback)
        assert ack.reason_code == 0x95
        await s.no_packet()

    run_with_broker(scenario, message_size_limit=10)


def test_retain_not_available_0x9a():
    async def scenario(broker, port):
        c = RawClient(5)
        ack = await c.connect(port, "c")
        assert ack.properties["retain_available"] == 0
        c.send(Publish("t", b"x", 0, True, False, 0, None))
        got = await c.closed_within()
        assert got and got[0].reason_code == 0x9A

    run_with_broker(scenario, retain_available=False)


def test_payload_format_invalid_0x99():
    async def scenario(broker, port):
        s = await subscriber(port, "s", "t")
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("t", b"\xff\xfe", 1, False, False, 1, {"payload_format_indicator": 1}))
        assert (await p.recv_type(Puback)).reason_code == 0x99
        await s.no_packet()

    run_with_broker(scenario)


def test_properties_passed_through():
    async def scenario(broker, port):
        s = await subscriber(port, "s", "t")
        p = RawClient(5)
        await p.connect(port, "p")
        props = {"payload_format_indicator": 1, "content_type": "text/plain",
                 "response_topic": "reply/1", "correlation_data": b"\x01\x02",
                 "user_property": [("a", "1"), ("a", "2")]}
        p.send(Publish("t", b"hi", 0, False, False, 0, props))
        m = await s.recv_type(Publish)
        for k, v in props.items():
            assert m.properties[k] == v

    run_with_broker(scenario)


def test_message_expiry_drops_queued_and_sends_remaining_interval():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s", clean=False, properties={"session_expiry_interval": 60})
        sub(s, 1, "e/#", qos=1)
        await s.recv_type(Suback)
        s.send(Disconnect(0, None))
        await s.closed_within()
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("e/short", b"1", 1, False, False, 1, {"message_expiry_interval": 1}))
        p.send(Publish("e/long", b"2", 1, False, False, 2, {"message_expiry_interval": 100}))
        await p.recv_type(Puback)
        await p.recv_type(Puback)
        await asyncio.sleep(1.6)
        s = RawClient(5)
        ack = await s.connect(port, "s", clean=False, properties={"session_expiry_interval": 60})
        assert ack.session_present
        m = await s.recv_type(Publish)
        assert m.topic == "e/long" and 95 <= m.properties["message_expiry_interval"] <= 100
        await s.no_packet()

    run_with_broker(scenario)


def test_max_queued_messages_drops_beyond():
    async def scenario(broker, port):
        s = RawClient(4)
        await s.connect(port, "s", clean=False)
        sub(s, 1, "mq", qos=1)
        await s.recv_type(Suback)
        s.close()
        await asyncio.sleep(0.2)
        p = RawClient(4)
        await p.connect(port, "p")
        for i in range(5):
            p.send(Publish("mq", str(i).encode(), 1, False, False, i + 1, None))
        for _ in range(5):
            await p.recv_type(Puback)
        s = RawClient(4)
        await s.connect(port, "s", clean=False)
        got = [(await s.recv_type(Publish)).payload for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
        await s.no_packet()
        assert broker.stats.publish_dropped == 2

    run_with_broker(scenario, max_queued_messages=3)


def test_client_receive_maximum_and_inflight_window():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s", properties={"receive_maximum": 2})
        sub(s, 1, "w", qos=1)
        await s.recv_type(Suback)
        p = RawClient(5)
        await p.connect(port, "p")
        for i in range(4):
            p.send(Publish("w", str(i).encode(), 1, False, False, i + 1, None))
        a = await s.recv_type(Publish)
        b = await s.recv_type(Publish)
        await s.no_packet()  # window of 2 full [MQTT-3.3.4-7]
        s.send(Puback(a.packet_id, 0, None))
        c = await s.recv_type(Publish)
        s.send(Puback(b.packet_id, 0, None))
        d = await s.recv_type(Publish)
        assert [x.payload for x in (a, b, c, d)] == [b"0", b"1", b"2", b"3"]

    run_with_broker(scenario)


def test_will_delay_and_cancel_on_reconnect():
    async def scenario(broker, port):
        s = await subscriber(port, "s", "w/#")
        props = {"session_expiry_interval": 60}
        a = RawClient(5)
        await a.connect(port, "a", clean=False, properties=props, will_topic="w/a",
                        will_payload=b"late", will_properties={"will_delay_interval": 1})
        a.close()
        await s.no_packet(0.5)
        m = await s.recv_type(Publish, timeout=3)
        assert m.payload == b"late"
        b = RawClient(5)
        await b.connect(port, "b", clean=False, properties=props, will_topic="w/b",
                        will_payload=b"never", will_properties={"will_delay_interval": 2})
        b.close()
        await asyncio.sleep(0.3)
        b = RawClient(5)
        await b.connect(port, "b", clean=False, properties=props)
        await s.no_packet(2.5)  # reconnected within the delay [MQTT-3.1.3-9]

    run_with_broker(scenario)


def test_session_expiry_deletes_session():
    async def scenario(broker, port):
        c = RawClient(5)
        await c.connect(port, "gone", clean=False, properties={"session_expiry_interval": 1})
        sub(c, 1, "x", qos=1)
        await c.recv_type(Suback)
        c.close()
        await asyncio.sleep(0.3)
        assert "gone" in broker.sessions
        await asyncio.sleep(1.8)
        assert "gone" not in broker.sessions
        c = RawClient(5)
        ack = await c.connect(port, "gone", clean=False, properties={"session_expiry_interval": 1})
        assert not ack.session_present

    run_with_broker(scenario)


def test_disconnect_session_expiry_from_zero_is_protocol_error():
    async def scenario(broker, port):
        c = RawClient(5)
        await c.connect(port, "c")
        c.send(Disconnect(0, {"session_expiry_interval": 30}))
        got = await c.closed_within()
        assert got and got[0].reason_code == 0x82

    run_with_broker(scenario)


def test_shared_no_local_is_protocol_error():
    async def scenario(broker, port):
        c = RawClient(5)
        await c.connect(port, "c")
        sub(c, 1, "$share/g/t", nl=True)
        got = await c.closed_within()
        assert got and got[0].reason_code == 0x82

    run_with_broker(scenario)


def test_shared_member_leaving_hands_inflight_to_another():
    async def scenario(broker, port):
        a = await subscriber(port, "a", "$share/g/j", qos=1)
        b = await subscriber(port, "b", "$share/g/j", qos=1)
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("j", b"1", 1, False, False, 1, None))
        p.send(Publish("j", b"2", 1, False, False, 2, None))
        ma = await a.recv_type(Publish)
        mb = await b.recv_type(Publish)
        assert {ma.payload, mb.payload} == {b"1", b"2"}
        a.close()  # unacknowledged: goes to b
        again = await b.recv_type(Publish)
        assert again.payload == ma.payload
        assert not (await a.recv() if not a.closed else None)

    run_with_broker(scenario)


def test_retain_as_published_and_retained_not_sent_to_shared():
    async def scenario(broker, port):
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("r", b"old", 1, True, False, 1, None))
        await p.recv_type(Puback)
        s = RawClient(5)
        await s.connect(port, "s")
        sub(s, 1, "r", rap=True)
        sub(s, 2, "$share/g/r")
        await s.recv_type(Suback)
        m = await s.recv_type(Publish)
        assert m.retain and m.payload == b"old"
        await s.recv_type(Suback)
        await s.no_packet()
        p.send(Publish("r", b"new", 0, True, False, 0, None))
        got = [await s.recv_type(Publish), await s.recv_type(Publish)]
        assert sorted(x.retain for x in got) == [False, True]  # RAP keeps it, shared clears it

    run_with_broker(scenario)


def test_v311_overlapping_subscriptions_one_copy_max_qos():
    async def scenario(broker, port):
        s = RawClient(4)
        await s.connect(port, "s")
        sub(s, 1, "o/#", qos=1)
        sub(s, 2, "o/+", qos=0)
        await s.recv_type(Suback)
        await s.recv_type(Suback)
        p = RawClient(4)
        await p.connect(port, "p")
        p.send(Publish("o/x", b"1", 1, False, False, 1, None))
        m = await s.recv_type(Publish)
        assert m.qos == 1
        await s.no_packet()

    run_with_broker(scenario)


def test_publish_to_sys_is_refused_and_sys_topics_published():
    async def scenario(broker, port):
        await asyncio.sleep(0.8)  # first $SYS publication at the first tick
        s = await subscriber(port, "s", "$SYS/broker/version", "$SYS/broker/uptime")
        m = await s.recv_type(Publish)
        assert m.retain and m.topic.startswith("$SYS/broker/")
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("$SYS/broker/version", b"fake", 1, False, False, 1, None))
        assert (await p.recv_type(Puback)).reason_code == 0x87

    run_with_broker(scenario, sys_interval=1)


def test_control_handler_and_publish_message_hooks():
    async def scenario(broker, port):
        seen = []

        def handler(conn, message):
            seen.append((conn.client_id, message.payload))
            broker.publish_message(Message("$CONTROL/x/response", b"done", 0))

        broker.control_handlers["$CONTROL/x/v1"] = handler
        s = await subscriber(port, "s", "$CONTROL/#")
        s.send(Publish("$CONTROL/x/v1", b"cmd", 0, False, False, 0, None))
        m = await s.recv_type(Publish)
        assert m.topic == "$CONTROL/x/response" and seen == [("s", b"cmd")]

    run_with_broker(scenario)


def test_disconnect_clients_hook():
    async def scenario(broker, port):
        a = RawClient(5)
        await a.connect(port, "kick-me", username="u")
        b = RawClient(4)
        await b.connect(port, "kick-me-too")
        c = RawClient(5)
        await c.connect(port, "stay")
        n = broker.disconnect_clients(lambda conn: conn.client_id.startswith("kick"), 0x98)
        assert n == 2
        got = await a.closed_within()
        assert got[0].reason_code == 0x98
        assert await b.closed_within() == []
        c.send(Unsubscribe(1, ["none"], None))
        assert (await c.recv()).reason_codes == [0x11]

    run_with_broker(scenario)


def test_qos2_pubrec_failure_ends_exchange_and_unknown_ids():
    async def scenario(broker, port):
        s = await subscriber(port, "s", "q2", qos=2)
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("q2", b"x", 2, False, False, 1, None))
        m = await s.recv_type(Publish)
        s.send(Pubrec(m.packet_id, 0x80, None))
        await s.no_packet()
        assert not broker.sessions["s"].inflight

    run_with_broker(scenario)


class _Hook:
    """A toy auth hook: user "bad" has a wrong password; nobody may touch "secret/#"
    except receiving "secret/open"."""

    def __init__(self):
        self.calls = []

    def authenticate(self, client_id, username, password):
        return 0x86 if username == "bad" else 0

    def acl_check(self, client, access, topic, qos, retain):
        self.calls.append((client.client_id, access, topic))
        if access == "publish_client_receive":
            return topic != "secret/closed"
        return not topic.startswith("secret/") or access == "subscribe" or topic == "secret/open"


def test_auth_hook_and_acl_checks():
    async def scenario(broker, port):
        hook = _Hook()
        broker.auth = hook
        c = RawClient(4)
        assert (await c.connect(port, "x", username="bad", password=b"pw")).reason_code == 4
        c = RawClient(5)
        assert (await c.connect(port, "x", username="bad", password=b"pw")).reason_code == 0x86
        s = await subscriber(port, "s", "secret/#")
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("secret/x", b"no", 1, False, False, 1, None))
        assert (await p.recv_type(Puback)).reason_code == 0x87
        p.send(Publish("secret/open", b"yes", 1, False, False, 2, None))
        await p.recv_type(Puback)
        assert (await s.recv_type(Publish)).payload == b"yes"
        assert ("s", "publish_client_receive", "secret/open") in hook.calls
        assert ("p", "publish_client_send", "secret/x") in hook.calls

    run_with_broker(scenario)


def test_topic_alias_outbound():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s", properties={"topic_alias_maximum": 1})
        sub(s, 1, "ta/#", qos=1)
        await s.recv_type(Suback)
        p = RawClient(5)
        await p.connect(port, "p")
        for topic in ("ta/a", "ta/a", "ta/b"):
            p.send(Publish(topic, b"x", 0, False, False, 0, None))
        m1, m2, m3 = [await s.recv_type(Publish) for _ in range(3)]
        assert (m1.topic, m1.properties["topic_alias"]) == ("ta/a", 1)
        assert (m2.topic, m2.properties["topic_alias"]) == ("", 1)
        assert m3.topic == "ta/b" and "topic_alias" not in (m3.properties or {})

    run_with_broker(scenario)
