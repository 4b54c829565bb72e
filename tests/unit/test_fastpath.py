"""The compiled PUBLISH fast path (ext/connection.pyx handle_packets): which
packets it takes, that everything else falls back to the Python handlers in
the order of the read, and that it applies the same checks (topic name, ACLs).

Each read is fed to ``Connection.data_received`` directly (a fake transport
collects what the broker writes), so "one read" is exact; the spy on
``dispatch.HANDLERS[Publish]`` (the dict the core dispatches through) tells
which PUBLISHes reached the Python handler."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
import uvloop
from raftmq._codec import (
    Connack,
    Connect,
    Disconnect,
    Parser,
    Puback,
    Publish,
    Suback,
    Subscribe,
)

from raftmq.broker import dispatch
from raftmq.broker.handlers.publish import handle_publish
from raftmq.broker.protocol import Connection
from raftmq.broker.server import Broker
from raftmq.config import Config
from raftmq.state.store import MemoryStore


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Client:
    """One in-process connection and the packets the broker wrote to it."""

    def __init__(self, broker: Broker, version: int) -> None:
        self.version = version
        self.conn = Connection(broker)
        self.transport = FakeTransport()
        self.conn.connection_made(self.transport)
        self.parser = Parser(268435455, False)
        self.parser.protocol_version = version
        self.seen = 0

    def read(self, *packets: Any) -> None:
        """All ``packets`` as ONE read of the broker."""
        self.conn.data_received(b"".join(p.encode(self.version) for p in packets))

    def received(self) -> list:
        new = bytes(self.transport.data[self.seen:])
        self.seen = len(self.transport.data)
        return self.parser.feed(new)


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def connect(broker: Broker, client_id: str, version: int = 4,
                  subscribe: list | None = None) -> Client:
    c = Client(broker, version)
    c.read(Connect(protocol_version=version, clean_start=True, keepalive=60, client_id=client_id))
    await turns()
    assert isinstance(c.received()[0], Connack)
    if subscribe:
        c.read(Subscribe(1, subscribe, None))
        await turns()
        assert isinstance(c.received()[-1], Suback)
    return c


def run(scenario, auth: Any = None, **config: Any) -> Any:
    async def main() -> Any:
        broker = Broker(dataclasses.replace(Config(), allow_anonymous=True, **config),
                        MemoryStore(), auth)
        broker.loop = asyncio.get_running_loop()
        return await asyncio.wait_for(scenario(broker), 10)

    return uvloop.run(main())


@pytest.fixture
def handled(monkeypatch) -> list:
    """The PUBLISHes that reached the Python handler (topic, qos), in order."""
    seen: list = []

    def spy(broker, conn, p):
        seen.append((p.topic, p.qos))
        handle_publish(broker, conn, p)

    monkeypatch.setitem(dispatch.HANDLERS, Publish, spy)
    return seen


def pub(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False,
        properties: dict | None = None) -> Publish:
    return Publish(topic, payload, qos, retain, False, packet_id, properties)


def topics(packets: list) -> list:
    return [(p.topic, p.payload) for p in packets if isinstance(p, Publish)]


def test_plain_qos0_takes_the_fast_path(handled):
    async def scenario(broker):
        s = await connect(broker, "s", 4, [("t/#", 0)])
        s5 = await connect(broker, "s5", 5, [("t/#", 0, False, False, 0)])
        p = await connect(broker, "p", 4)
        p5 = await connect(broker, "p5", 5)
        p.read(pub("t/1", b"a"), pub("t/2", b"b"))
        p5.read(pub("t/3", b"c"))
        await turns()
        assert handled == []
        assert topics(s.received()) == [("t/1", b"a"), ("t/2", b"b"), ("t/3", b"c")]
        assert topics(s5.received()) == [("t/1", b"a"), ("t/2", b"b"), ("t/3", b"c")]
        assert broker.stats.publish_received == 3
        assert broker.stats.publish_sent == 6

    run(scenario)


def test_a_read_mixing_qos0_qos1_and_subscribe_is_handled_in_order(handled):
    """QoS 0 (fast path), SUBSCRIBE and QoS 1 (Python handlers) of one read,
    in the order they came: the SUBSCRIBE applies to what follows it only, and
    the subscriber gets every message in the publisher's order."""
    async def scenario(broker):
        s = await connect(broker, "s", 4, [("m/#", 1)])
        p = await connect(broker, "p", 4)
        p.read(pub("m/1", b"1"),
               Subscribe(9, [("m/#", 0)], None),
               pub("m/2", b"2"),
               pub("m/3", b"3", qos=1, packet_id=5),
               pub("m/4", b"4"),
               pub("m/5", b"5", qos=1, packet_id=6),
               pub("m/6", b"6"))
        await turns()
        assert handled == [("m/3", 1), ("m/5", 1)]
        want = [(f"m/{i}", b"%d" % i) for i in range(1, 7)]
        assert topics(s.received()) == want
        got = p.received()
        # The SUBSCRIBE came after m/1: p gets m/2.. only, in order.
        assert topics(got) == want[1:]
        assert [a.packet_id for a in got if isinstance(a, Puback)] == [5, 6]
        assert [x.packet_id for x in got if isinstance(x, Suback)] == [9]

    run(scenario)


@pytest.mark.parametrize("properties", [
    {"message_expiry_interval": 60},
    {"user_property": [("k", "v")]},
    {"payload_format_indicator": 1},
    {"content_type": "text/plain"},
    {"topic_alias": 1},
])
def test_v5_properties_do_not_take_the_fast_path(handled, properties):
    async def scenario(broker):
        s = await connect(broker, "s", 5, [("v/#", 0, False, False, 0)])
        p = await connect(broker, "p", 5)
        p.read(pub("v/1", b"x", properties=properties), pub("v/2", b"y"))
        await turns()
        assert handled == [("v/1", 0)]  # v/2 (no properties): the fast path
        got = [x for x in s.received() if isinstance(x, Publish)]
        assert [(x.topic, x.payload) for x in got] == [("v/1", b"x"), ("v/2", b"y")]
        props = got[0].properties or {}
        for name, value in properties.items():
            if name == "message_expiry_interval":
                assert 0 < props[name] <= value
            elif name != "topic_alias":
                assert props[name] == value
        assert not got[1].properties

    run(scenario)


def test_topic_alias_use_goes_to_the_handler(handled):
    async def scenario(broker):
        s = await connect(broker, "s", 5, [("a/#", 0, False, False, 0)])
        p = await connect(broker, "p", 5)
        p.read(pub("a/x", b"1", properties={"topic_alias": 2}),
               pub("", b"2", properties={"topic_alias": 2}),
               pub("a/x", b"3"))
        await turns()
        assert handled == [("a/x", 0), ("", 0)]
        assert topics(s.received()) == [("a/x", b"1"), ("a/x", b"2"), ("a/x", b"3")]

    run(scenario)


def test_retain_dollar_and_before_connect_are_not_fast(handled):
    async def scenario(broker):
        s = await connect(broker, "s", 4, [("r/#", 0)])
        p = await connect(broker, "p", 4)
        p.read(pub("r/1", b"kept", retain=True), pub("$SYS/x", b"no"), pub("r/2", b"fast"))
        await turns()
        assert handled == [("r/1", 0), ("$SYS/x", 0)]
        assert topics(s.received()) == [("r/1", b"kept"), ("r/2", b"fast")]
        assert [m.payload for m in broker.retained.match("r/#")] == [b"kept"]
        # A PUBLISH before CONNECT closes the connection [MQTT-3.1.0-1].
        x = Client(broker, 4)
        x.read(pub("r/3", b"early"))
        await turns()
        assert x.transport.closed and handled == [("r/1", 0), ("$SYS/x", 0)]
        assert s.received() == []

    run(scenario)


def test_wildcard_and_empty_topic_are_protocol_errors_in_the_fast_path(handled):
    async def scenario(broker):
        s = await connect(broker, "s", 4, [("#", 0)])
        p = await connect(broker, "p", 5)
        p.read(pub("w/1", b"ok"), pub("w/+", b"bad"), pub("w/2", b"after"))
        await turns()
        assert handled == []
        got = p.received()
        assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x90
        assert p.transport.closed
        assert topics(s.received()) == [("w/1", b"ok")]  # nothing after the bad one

        q = await connect(broker, "q", 4)
        q.read(pub("w/3", b"ok"), pub("", b"empty"))
        await turns()
        assert q.transport.closed  # 3.1.1: closed, no DISCONNECT
        assert topics(s.received()) == [("w/3", b"ok")]

    run(scenario)


class _Hook:
    """Denies publishing to 'deny/...' and receiving for client 'blind'; no
    ``acl_generation``: nothing may be cached, the hook is asked every time."""

    def __init__(self) -> None:
        self.calls: list = []

    def authenticate(self, client_id, username, password) -> int:
        return 0

    def acl_check(self, client, access, topic, qos, retain) -> bool:
        self.calls.append((client.client_id, access, topic))
        if access == "publish_client_send":
            return not topic.startswith("deny/")
        if access == "publish_client_receive":
            return client.client_id != "blind"
        return True


class _GenerationHook(_Hook):
    """The same, with a generation (like dynsec): decisions are cached."""

    acl_generation = 0


@pytest.mark.parametrize("cacheable", [True, False])
def test_acl_refused_topics_via_the_fast_path(handled, cacheable):
    hook = _GenerationHook() if cacheable else _Hook()

    async def scenario(broker):
        assert broker.acl_enabled
        s = await connect(broker, "s", 4, [("#", 0)])
        blind = await connect(broker, "blind", 4, [("#", 0)])
        p = await connect(broker, "p", 5)
        for _ in range(3):
            p.read(pub("deny/a", b"no"), pub("ok/a", b"yes"))
        await turns()
        assert handled == []
        assert topics(s.received()) == [("ok/a", b"yes")] * 3
        assert topics(blind.received()) == []
        assert p.received() == []  # QoS 0 refused: dropped, no answer
        sends = [c for c in hook.calls if c[1] == "publish_client_send"]
        if cacheable:
            # Asked once per (publisher, topic); then the caches answer.
            assert sorted(sends) == [("p", "publish_client_send", "deny/a"),
                                     ("p", "publish_client_send", "ok/a")]
        else:
            assert len(sends) == 6  # no generation: asked every time

    run(scenario, auth=hook)
