"""The broker's store ops, applied by the real state machine (LMDB), rebuild
the same sessions after a restart: subscriptions, queued and in-flight QoS 1/2
messages, QoS 2 receive state, retained messages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import lmdb
from broker_harness import RawClient, run_with_broker
from raftmq._codec import Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe

from raftmq.state.entries import encode_ops
from raftmq.state.machine import StateMachine


@dataclass
class _Entry:
    term: int
    index: int
    data: bytes
    kind: int = 0


class MachineStore:
    """A Store that applies each batch to the LMDB state machine at once."""

    def __init__(self, path: str) -> None:
        self.env = lmdb.open(path, max_dbs=16, map_size=1 << 26)
        self.machine = StateMachine(self.env)
        self.index = self.machine.applied_index()
        self.batches: list = []

    def load(self):
        return self.machine.load()

    def submit(self, ops, done=None):
        self.batches.append(ops)
        self.index += 1
        self.machine.apply([_Entry(1, self.index, encode_ops(ops))])
        if done is not None:
            done()

    def set_remote_listener(self, listener):
        pass

    async def close(self):
        self.env.close()


def test_persistent_state_survives_restart(tmp_path):
    path = str(tmp_path / "db")

    async def first(broker, port):
        s = RawClient(5)
        await s.connect(port, "ps", clean=False, properties={"session_expiry_interval": 3600})
        s.send(Subscribe(1, [("q/#", 2, False, False, 0)], None))
        await s.recv_type(Suback)
        p = RawClient(5)
        await p.connect(port, "pub", clean=False, properties={"session_expiry_interval": 3600})
        p.send(Publish("q/1", b"inflight", 1, False, False, 1, None))
        await p.recv_type(Puback)
        m = await s.recv_type(Publish)
        assert m.payload == b"inflight"
        s.close()
        await asyncio.sleep(0.2)
        p.send(Publish("q/2", b"queued", 2, False, False, 2, None))
        await p.recv_type(Pubrec)  # PUBREL not sent: QoS 2 receive state stays
        p.send(Publish("r", b"retained", 1, True, False, 3, None))
        await p.recv_type(Puback)
        return m.packet_id

    store = MachineStore(path)
    first_pid = run_with_broker(first, store=store)
    store.env.close()

    async def second(broker, port):
        assert "ps" in broker.sessions and "q/#" in broker.sessions["ps"].subscriptions
        assert 2 in broker.sessions["pub"].qos2_in
        s = RawClient(5)
        ack = await s.connect(port, "ps", clean=False, properties={"session_expiry_interval": 3600})
        assert ack.session_present
        r1 = await s.recv_type(Publish)
        assert r1.dup and r1.packet_id == first_pid and r1.payload == b"inflight"
        r2 = await s.recv_type(Publish)
        assert r2.payload == b"queued" and r2.qos == 2
        s.send(Puback(r1.packet_id, 0, None))
        s.send(Pubrec(r2.packet_id, 0, None))
        await s.recv_type(Pubrel)
        s.send(Pubcomp(r2.packet_id, 0, None))
        p = RawClient(5)
        await p.connect(port, "pub", clean=False, properties={"session_expiry_interval": 3600})
        # the QoS 2 message is not routed twice: a resent PUBLISH only gets PUBREC
        p.send(Publish("q/2", b"queued", 2, False, True, 2, None))
        await p.recv_type(Pubrec)
        p.send(Pubrel(2, 0, None))
        await p.recv_type(Pubcomp)
        await s.no_packet()
        c = RawClient(5)
        await c.connect(port, "fresh")
        c.send(Subscribe(1, [("r", 0, False, False, 0)], None))
        await c.recv_type(Suback)
        m = await c.recv_type(Publish)
        assert m.payload == b"retained" and m.retain
        await asyncio.sleep(0.1)
        return broker.sessions["ps"].inflight, broker.sessions["ps"].queue

    store2 = MachineStore(path)
    inflight, queue = run_with_broker(second, store=store2)
    assert not inflight and not queue
    assert store2.load().sessions["ps"].queue == []


class SlowStore:
    """Commits each batch 50 ms after it is submitted, in order (like a Raft store)."""

    def __init__(self) -> None:
        self.committed: list = []

    def load(self):
        from raftmq.state.entries import LoadedState

        return LoadedState()

    def submit(self, ops, done=None):
        def commit():
            self.committed.extend(ops)
            if done is not None:
                done()

        asyncio.get_running_loop().call_later(0.05, commit)

    def set_remote_listener(self, listener):
        pass

    async def close(self):
        pass


def test_acks_wait_for_the_store_and_connack_comes_first():
    from raftmq._codec import Connack, Connect

    from raftmq.state.entries import QueueAdd, SessionPut, SubAdd

    store = SlowStore()

    async def scenario(broker, port):
        s = RawClient(5)
        await s.connect(port, "ps", clean=False, properties={"session_expiry_interval": 60})
        assert any(isinstance(op, SessionPut) for op in store.committed)
        s.send(Subscribe(1, [("t", 1, False, False, 0)], None))
        await s.recv_type(Suback)
        assert any(isinstance(op, SubAdd) for op in store.committed)
        s.close()
        await asyncio.sleep(0.1)
        p = RawClient(5)
        await p.connect(port, "p")
        # The subscriber comes back; messages published while its CONNACK waits
        # for the store must not overtake the CONNACK [MQTT-3.2.0-1].
        s = RawClient(5)
        await s.open(port)
        s.send(Connect(protocol_version=5, clean_start=False, client_id="ps",
                       properties={"session_expiry_interval": 60}))
        await asyncio.sleep(0.01)
        p.send(Publish("t", b"during", 1, False, False, 1, None))
        first = await s.recv()
        assert isinstance(first, Connack) and first.session_present
        await p.recv_type(Puback)
        assert any(isinstance(op, QueueAdd) for op in store.committed)
        m = await s.recv_type(Publish)
        assert m.payload == b"during"

    run_with_broker(scenario, store=store)
