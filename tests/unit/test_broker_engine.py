"""Broker engine behaviour on the wire (in-process broker, raw codec clients)."""

from __future__ import annotations

import asyncio

from broker_harness import RawClient, run_with_broker
from raftmq._codec import (
    Disconnect,
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


def sub(client: RawClient, pid: int, *filters, qos=0, props=None, **opts):
    subs = [(f, qos, opts.get("nl", False), opts.get("rap", False), opts.get("rh", 0)) for f in filters]
    client.send(Subscribe(pid, subs, props))


def test_qos0_routing_v5_and_v311():
    async def scenario(broker, port):
        s5 = RawClient(5)
        s3 = RawClient(4)
        assert (await s5.connect(port, "s5")).reason_code == 0
        assert (await s3.connect(port, "s3")).reason_code == 0
        sub(s5, 1, "a/+")
        sub(s3, 1, "a/#")
        assert (await s5.recv_type(Suback)).reason_codes == [0]
        assert (await s3.recv_type(Suback)).reason_codes == [0]
        p = RawClient(4)
        await p.connect(port, "p")
        p.send(Publish("a/b", b"hello", 0, False, False, 0, None))
        m5 = await s5.recv_type(Publish)
        m3 = await s3.recv_type(Publish)
        assert (m5.topic, m5.payload, m3.topic, m3.payload) == ("a/b", b"hello", "a/b", b"hello")

    run_with_broker(scenario)


def test_qos1_and_qos2_both_directions():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s")
        sub(s, 1, "t", qos=2)
        assert (await s.recv_type(Suback)).reason_codes == [2]
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("t", b"one", 1, False, False, 10, None))
        assert (await p.recv_type(Puback)).packet_id == 10
        m = await s.recv_type(Publish)
        assert m.qos == 1 and m.payload == b"one"
        s.send(Puback(m.packet_id, 0, None))
        p.send(Publish("t", b"two", 2, False, False, 11, None))
        assert (await p.recv_type(Pubrec)).packet_id == 11
        # duplicate before PUBREL: acknowledged, not delivered twice (§4.3.3)
        p.send(Publish("t", b"two", 2, False, True, 11, None))
        assert (await p.recv_type(Pubrec)).packet_id == 11
        p.send(Pubrel(11, 0, None))
        assert (await p.recv_type(Pubcomp)).packet_id == 11
        m = await s.recv_type(Publish)
        assert m.qos == 2 and m.payload == b"two"
        s.send(Pubrec(m.packet_id, 0, None))
        assert (await s.recv_type(Pubrel)).packet_id == m.packet_id
        s.send(Pubcomp(m.packet_id, 0, None))
        await s.no_packet()
        assert not broker.sessions["s"].inflight

    run_with_broker(scenario)


def test_persistent_session_queues_and_redelivers():
    async def scenario(broker, port):
        s = RawClient(4)
        await s.connect(port, "ps", clean=False)
        sub(s, 1, "q", qos=1)
        await s.recv_type(Suback)
        p = RawClient(4)
        await p.connect(port, "p")
        p.send(Publish("q", b"m1", 1, False, False, 1, None))
        await p.recv_type(Puback)
        m1 = await s.recv_type(Publish)
        s.close()  # no PUBACK: m1 stays in flight
        await asyncio.sleep(0.2)
        p.send(Publish("q", b"m2", 1, False, False, 2, None))
        p.send(Publish("q", b"m0", 0, False, False, 0, None))  # QoS 0: not queued offline
        await p.recv_type(Puback)
        s2 = RawClient(4)
        ack = await s2.connect(port, "ps", clean=False)
        assert ack.session_present
        r1 = await s2.recv_type(Publish)
        assert r1.dup and r1.packet_id == m1.packet_id and r1.payload == b"m1"
        r2 = await s2.recv_type(Publish)
        assert r2.payload == b"m2" and not r2.dup
        await s2.no_packet()

    run_with_broker(scenario)


def test_retained_set_clear_and_retain_handling():
    async def scenario(broker, port):
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("r/1", b"keep", 1, True, False, 1, None))
        await p.recv_type(Puback)
        s = RawClient(5)
        await s.connect(port, "s")
        sub(s, 1, "r/#", qos=1)
        await s.recv_type(Suback)
        m = await s.recv_type(Publish)
        assert m.retain and m.payload == b"keep"
        s.send(Puback(m.packet_id, 0, None))
        sub(s, 2, "r/#", qos=1, rh=1)  # existing subscription: not sent again
        await s.recv_type(Suback)
        await s.no_packet()
        sub(s, 3, "r/+", qos=1, rh=2)
        await s.recv_type(Suback)
        await s.no_packet()
        p.send(Publish("r/1", b"", 0, True, False, 0, None))  # clears
        got = await s.recv_type(Publish)  # live delivery: retain flag off without RAP
        assert not got.retain
        await asyncio.sleep(0.1)
        assert broker.retained.trie.get("r/1") is None

    run_with_broker(scenario)


def test_will_sent_on_abnormal_close_not_on_disconnect():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s")
        sub(s, 1, "will/#")
        await s.recv_type(Suback)
        a = RawClient(5)
        await a.connect(port, "a", will_topic="will/a", will_payload=b"gone")
        a.close()
        m = await s.recv_type(Publish)
        assert m.topic == "will/a" and m.payload == b"gone"
        b = RawClient(5)
        await b.connect(port, "b", will_topic="will/b", will_payload=b"gone")
        b.send(Disconnect(0, None))
        await s.no_packet()
        c = RawClient(5)
        await c.connect(port, "c", will_topic="will/c", will_payload=b"w4")
        c.send(Disconnect(4, None))
        m = await s.recv_type(Publish)
        assert m.topic == "will/c"

    run_with_broker(scenario)


def test_session_takeover_v5_disconnect_0x8e():
    async def scenario(broker, port):
        a = RawClient(5)
        await a.connect(port, "same")
        b = RawClient(5)
        await b.connect(port, "same")
        got = await a.closed_within()
        assert [type(x) for x in got] == [Disconnect] and got[0].reason_code == 0x8E
        b.send(Pingreq())
        await b.recv_type(Pingresp)

    run_with_broker(scenario)


def test_shared_subscription_round_robin():
    async def scenario(broker, port):
        members = []
        for i in range(2):
            c = RawClient(5)
            await c.connect(port, f"m{i}")
            sub(c, 1, "$share/g/job")
            await c.recv_type(Suback)
            members.append(c)
        p = RawClient(5)
        await p.connect(port, "p")
        for i in range(4):
            p.send(Publish("job", str(i).encode(), 0, False, False, 0, None))
        got0 = [(await members[0].recv_type(Publish)).payload for _ in range(2)]
        got1 = [(await members[1].recv_type(Publish)).payload for _ in range(2)]
        assert sorted(got0 + got1) == [b"0", b"1", b"2", b"3"]

    run_with_broker(scenario)


def test_unsubscribe_reason_codes():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s")
        sub(s, 1, "x")
        await s.recv_type(Suback)
        s.send(Unsubscribe(2, ["x", "y"], None))
        assert (await s.recv_type(Unsuback)).reason_codes == [0, 0x11]

    run_with_broker(scenario)


def test_wildcard_in_publish_topic_disconnect_0x90():
    async def scenario(broker, port):
        c = RawClient(5)
        await c.connect(port, "c")
        c.send(Publish("a/+", b"x", 0, False, False, 0, None))
        got = await c.closed_within()
        assert got and got[0].reason_code == 0x90

    run_with_broker(scenario)


def test_topic_alias_inbound():
    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "s")
        sub(s, 1, "al/#")
        await s.recv_type(Suback)
        p = RawClient(5)
        await p.connect(port, "p")
        p.send(Publish("al/x", b"1", 0, False, False, 0, {"topic_alias": 3}))
        p.send(Publish("", b"2", 0, False, False, 0, {"topic_alias": 3}))
        assert (await s.recv_type(Publish)).topic == "al/x"
        assert (await s.recv_type(Publish)).topic == "al/x"
        p.send(Publish("al/y", b"3", 0, False, False, 0, {"topic_alias": 11}))
        got = await p.closed_within()
        assert got and got[0].reason_code == 0x94

    run_with_broker(scenario)


def test_no_local_and_subscription_identifier():
    async def scenario(broker, port):
        c = RawClient(5)
        await c.connect(port, "c")
        sub(c, 1, "nl", nl=True)
        sub(c, 2, "sid/#", props={"subscription_identifier": 7})
        await c.recv_type(Suback)
        await c.recv_type(Suback)
        c.send(Publish("nl", b"x", 0, False, False, 0, None))
        await c.no_packet()
        c.send(Publish("sid/a", b"y", 0, False, False, 0, None))
        m = await c.recv_type(Publish)
        assert m.properties["subscription_identifier"] == [7]

    run_with_broker(scenario)


def test_keepalive_timeout_closes_and_sends_will():
    async def scenario(broker, port):
        s = RawClient(4)
        await s.connect(port, "s")
        sub(s, 1, "ka")
        await s.recv_type(Suback)
        c = RawClient(4)
        await c.connect(port, "idle", keepalive=1, will_topic="ka", will_payload=b"dead")
        m = await s.recv_type(Publish, timeout=5)
        assert m.payload == b"dead"
        assert await c.closed_within(5) == []

    run_with_broker(scenario)


def test_packet_before_connect_closes():
    async def scenario(broker, port):
        c = RawClient(4)
        await c.open(port)
        c.send(Pingreq())
        assert await c.closed_within() == []

    run_with_broker(scenario)


def test_receive_maximum_exceeded_0x93():
    async def scenario(broker, port):
        c = RawClient(5)
        ack = await c.connect(port, "c")
        assert ack.properties["receive_maximum"] == 2
        for pid in (1, 2, 3):
            c.send(Publish("rm", b"x", 2, False, False, pid, None))
        got = await c.closed_within()
        assert [type(x).__name__ for x in got] == ["Pubrec", "Pubrec", "Disconnect"]
        assert got[-1].reason_code == 0x93

    run_with_broker(scenario, max_inflight_messages=2)
