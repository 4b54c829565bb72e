"""The compiled CONNECT / DISCONNECT / close path (ext/connection.pyx
handle_connect, attach_session, handle_disconnect, on_connection_lost): the
cheap common case (clean 3.1.1 client, default auth, no will) and every case
that takes the longer way through the same code -- MQTT 5 properties, a will,
an auth hook, a persistent session, a takeover -- without sockets (the fake
transport of test_fastpath collects what the broker writes)."""

from __future__ import annotations

from typing import Any

from raftmq._codec import Connack, Connect, Disconnect
from test_fastpath import Client, connect, run, topics, turns

from raftmq.broker.protocol import CLOSING, CONNECTED


def _connect(broker, client_id: str, version: int = 4, **fields: Any) -> Client:
    c = Client(broker, version)
    c.read(Connect(protocol_version=version, keepalive=fields.pop("keepalive", 60),
                   client_id=client_id, **fields))
    return c


def _connack(c: Client) -> Connack:
    packets = c.received()
    assert isinstance(packets[0], Connack), packets
    return packets[0]


async def _accepted(broker, client_id: str, version: int = 4, **fields: Any) -> Client:
    c = _connect(broker, client_id, version, **fields)
    await turns()
    assert _connack(c).reason_code == 0
    return c


def test_clean_311_client_connects_and_its_session_ends_with_it():
    async def scenario(broker):
        c = _connect(broker, "a", 4, clean_start=True)
        await turns()
        assert bytes(c.transport.data) == b"\x20\x02\x00\x00"  # the cached CONNACK
        assert c.conn.state == CONNECTED and c.conn.online
        session = broker.sessions["a"]
        assert session.conn is c.conn and not session.persistent and not session.durable
        assert broker.connected_count == 1 and broker.stats.clients_maximum == 1
        assert broker.pending_ops == []  # nothing for the store
        c.read(Disconnect(0, None))
        assert c.conn.graceful and c.transport.closed and c.conn.state == CLOSING
        c.conn.connection_lost(None)
        assert "a" not in broker.sessions and broker.connected_count == 0
        assert c.conn not in broker.connections

    run(scenario)


def test_v31_and_zero_length_ids():
    async def scenario(broker):
        c3 = _connect(broker, "old", 3, protocol_name="MQIsdp", clean_start=True)
        await turns()
        assert _connack(c3).reason_code == 0
        empty3 = _connect(broker, "", 3, protocol_name="MQIsdp", clean_start=True)
        await turns()
        assert _connack(empty3).reason_code == 2 and empty3.transport.closed
        keep = _connect(broker, "", 4, clean_start=False)
        await turns()
        assert _connack(keep).reason_code == 2  # [MQTT-3.1.3-8]
        auto = _connect(broker, "", 5, clean_start=True)
        await turns()
        assigned = _connack(auto).properties["assigned_client_identifier"]
        assert assigned.startswith("auto-") and broker.sessions[assigned].conn is auto.conn

    run(scenario)


def test_v5_properties_take_effect_and_connack_announces_the_broker():
    async def scenario(broker):
        c = _connect(broker, "v5", 5, clean_start=True, keepalive=0,
                     properties={"receive_maximum": 7, "maximum_packet_size": 1000,
                                 "topic_alias_maximum": 3, "request_problem_information": 0,
                                 "session_expiry_interval": 30})
        await turns()
        ack = _connack(c)
        assert ack.properties["topic_alias_maximum"] == 10
        assert ack.properties["server_keep_alive"] == 60  # max_keepalive imposed
        conn = c.conn
        assert (conn.client_receive_max, conn.client_max_packet, conn.client_alias_max) == \
            (7, 1000, 3)
        assert not conn.problem_info and conn.keepalive == 60
        assert broker.sessions["v5"].persistent and broker.sessions["v5"].durable
        bad = _connect(broker, "x", 5, clean_start=True,
                       properties={"authentication_method": "SCRAM"})
        await turns()
        assert _connack(bad).reason_code == 0x8C and bad.transport.closed

    run(scenario, max_keepalive=60)


def test_will_is_kept_published_on_a_network_close_and_dropped_on_disconnect():
    async def scenario(broker):
        s = await connect(broker, "s", 4, [("w/#", 0)])
        c = _connect(broker, "w1", 4, clean_start=True, will_topic="w/1", will_payload=b"gone")
        await turns()
        assert c.conn.will[1].topic == "w/1"
        c.conn.connection_lost(None)  # no DISCONNECT: the will goes out
        await turns()
        assert topics(s.received()) == [("w/1", b"gone")]
        d = _connect(broker, "w2", 4, clean_start=True, will_topic="w/2", will_payload=b"x")
        await turns()
        d.read(Disconnect(0, None))
        d.conn.connection_lost(None)
        await turns()
        assert topics(s.received()) == []
        bad = _connect(broker, "w3", 5, clean_start=True, will_topic="w/+", will_payload=b"")
        await turns()
        assert _connack(bad).reason_code == 0x90

    run(scenario)


class _Hook:
    checks_acl = False

    def __init__(self) -> None:
        self.calls: list = []

    def authenticate(self, client_id, username, password) -> int:
        self.calls.append((client_id, username, password))
        return 0 if password == b"ok" else 0x86

    def acl_check(self, client, access, topic, qos, retain) -> bool:
        return True


def test_auth_hook_decides_and_refusals_use_each_versions_code():
    hook = _Hook()

    async def scenario(broker):
        ok = _connect(broker, "u1", 4, clean_start=True, username="alice", password=b"ok")
        await turns()
        assert _connack(ok).reason_code == 0 and ok.conn.username == "alice"
        no4 = _connect(broker, "u2", 4, clean_start=True, username="bob", password=b"no")
        await turns()
        assert _connack(no4).reason_code == 4 and no4.transport.closed  # 0x86 in 3.1.1
        no5 = _connect(broker, "u3", 5, clean_start=True, username="bob", password=b"no")
        await turns()
        assert _connack(no5).reason_code == 0x86
        assert "u2" not in broker.sessions and "u3" not in broker.sessions
        assert hook.calls[0] == ("u1", "alice", b"ok")

    run(scenario, auth=hook)


def test_anonymous_refused_without_allow_anonymous():
    async def scenario(broker):
        broker.auth.allow_anonymous = False
        c = _connect(broker, "anon", 4, clean_start=True)
        await turns()
        assert _connack(c).reason_code == 5

    run(scenario)


def test_persistent_session_is_stored_resumed_and_kept_offline():
    async def scenario(broker):
        c = _connect(broker, "p", 4, clean_start=False)
        await turns()
        assert _connack(c).session_present is False
        session = broker.sessions["p"]
        assert session.durable and session.persistent
        c.read(Disconnect(0, None))
        c.conn.connection_lost(None)
        assert broker.sessions["p"] is session and session.conn is None
        assert session.expire_at == 0.0  # never expires (persistent_client_expiration unset)
        again = _connect(broker, "p", 4, clean_start=False)
        await turns()
        assert _connack(again).session_present is True
        assert broker.sessions["p"] is session and session.conn is again.conn
        clean = _connect(broker, "p", 4, clean_start=True)  # takes over, starts clean
        await turns()
        assert _connack(clean).session_present is False
        assert broker.sessions["p"] is not session and not broker.sessions["p"].durable

    run(scenario)


def test_takeover_closes_the_old_connection_and_publishes_its_will():
    async def scenario(broker):
        s = await connect(broker, "s", 4, [("w/#", 0)])
        old = _connect(broker, "dup", 5, clean_start=True, will_topic="w/old", will_payload=b"o")
        await turns()
        _connack(old)
        new = _connect(broker, "dup", 5, clean_start=True)
        await turns()
        assert _connack(new).reason_code == 0
        assert isinstance(old.received()[0], Disconnect)  # 0x8E Session taken over
        assert old.transport.closed and old.conn.session is None
        assert broker.sessions["dup"].conn is new.conn and broker.connected_count == 2
        assert topics(s.received()) == [("w/old", b"o")]
        old.conn.connection_lost(None)  # the old connection's close changes nothing now
        assert broker.sessions["dup"].conn is new.conn and broker.connected_count == 2

    run(scenario)


def test_second_connect_is_a_protocol_error():
    async def scenario(broker):
        c = await _accepted(broker, "twice", 5, clean_start=True)
        c.read(Connect(protocol_version=5, client_id="twice"))
        await turns()
        assert isinstance(c.received()[0], Disconnect) and c.transport.closed

    run(scenario)


def test_disconnect_session_expiry_rules():
    async def scenario(broker):
        c = await _accepted(broker, "e", 5, clean_start=True)
        c.read(Disconnect(0, {"session_expiry_interval": 10}))  # 0 at CONNECT: error
        await turns()
        assert c.transport.closed and not c.conn.graceful
        d = _connect(broker, "e2", 5, clean_start=True,
                     properties={"session_expiry_interval": 5})
        await turns()
        d.read(Disconnect(0, {"session_expiry_interval": 0}))
        assert broker.sessions["e2"].expiry_interval == 0
        d.conn.connection_lost(None)
        assert "e2" not in broker.sessions

    run(scenario)
