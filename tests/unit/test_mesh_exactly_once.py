"""QoS 2 exactly once across a worker's kill -9 (workers/mesh.py, "Exactly once"),
in one process: the MeshMark through the state machine, a receiving worker that
skips what a sibling sends again, and a publishing worker whose QoS 2 forwards
leave only after the store's channel wrote their batch.

The whole-node version, with real processes and kill -9, is
tests/workers/test_worker_supervision.py::test_kill9_under_qos2_load_exactly_once.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from raftmq._codec import Publish
from raftmq._mesh import fwd_frame, split_frames

from raftmq.broker.handlers.publish import handle_publish, on_accepted_publish
from raftmq.broker.server import Broker
from raftmq.broker.session import Session, Subscription
from raftmq.config import Config
from raftmq.raft.types import Entry
from raftmq.state import tables as T
from raftmq.state.entries import (
    MeshMark,
    Message,
    Qos2InAdd,
    QueueAdd,
    QueueRemove,
    SessionPut,
    decode_ops,
    encode_ops,
)
from raftmq.state.machine import StateMachine
from raftmq.workers import mesh as M

# -- the MeshMark in the state machine -------------------------------------------------


@pytest.fixture(params=[0, 8], ids=["direct", "deferred"])
def machine(request, tmp_path: Path):
    env = T.open_environment(str(tmp_path / "db"))
    m = StateMachine(env, defer_queue_ops=request.param)
    yield m
    env.close()


def _apply(m: StateMachine, index: int, *ops: Any) -> None:
    m.apply([Entry(1, index, encode_ops(list(ops)))])


def test_mesh_mark_round_trips_as_an_op() -> None:
    op = MeshMark(1, 0, (1 << 62) - 5, 123456)
    assert decode_ops(encode_ops([op])) == [op]


def test_mesh_mark_is_loaded_per_receiver_and_sender_last_one_wins(machine) -> None:
    m = machine
    msg = Message("t", b"p", 1)
    _apply(m, 1, SessionPut("s", 4, 60, False))
    _apply(m, 2, QueueAdd([["s", 1, 0, 1, []]], msg), MeshMark(0, 1, 77, 5))
    _apply(m, 3, QueueAdd([["s", 2, 0, 1, []]], msg), MeshMark(0, 1, 77, 9))
    _apply(m, 4, QueueAdd([["s", 3, 0, 1, []]], msg), MeshMark(1, 0, 55, 4))
    st = m.load()
    assert st.mesh_marks == {(0, 1): (77, 9), (1, 0): (55, 4)}
    assert [q.seq for q in st.sessions["s"].queue] == [1, 2, 3]


def test_deferred_mesh_mark_does_not_write_the_tables_directly(tmp_path: Path) -> None:
    """With deferral, a batch of queue ops and its MeshMark stays in memory like
    the queue rows (a worker adds a mark to every batch of forwarded messages:
    a direct write each time would undo the deferral)."""
    env = T.open_environment(str(tmp_path / "db"))
    try:
        m = StateMachine(env, defer_queue_ops=8)
        msg = Message("t", b"p", 1)
        _apply(m, 1, SessionPut("s", 4, 60, False))
        _apply(m, 2, QueueAdd([["s", 1, 0, 1, []]], msg), MeshMark(0, 1, 77, 5))
        _apply(m, 3, QueueRemove("s", 1), MeshMark(0, 1, 77, 6))
        assert m.applied_index() == 1  # the tables wait: nothing written directly
        assert m.last_applied() == 3
        m.flush()
        assert m.applied_index() == 3
        with env.begin() as txn:
            row = txn.get(T.mesh_mark_key(0, 1), db=m.db_meta)
        assert T.parse_mesh_mark_row(row) == (77, 6)
        assert m.load().sessions["s"].queue == []
    finally:
        env.close()


def test_mesh_mark_travels_in_snapshots(machine, tmp_path: Path) -> None:
    _apply(machine, 1, MeshMark(2, 3, 11, 42))
    machine.flush()
    env = T.open_environment(str(tmp_path / "other"))
    try:
        other = StateMachine(env)
        other.restore(machine.snapshot_data())
        assert other.load().mesh_marks == {(2, 3): (11, 42)}
    finally:
        env.close()


# -- workers: one Broker and its Mesh, the sibling faked ---------------------------------


class Store:
    """Commits at once; records the batches, and the writes of its channel."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.batches: list[list] = []
        self.unsent: list[list] = []  # submitted, not yet written to the channel
        self.backlog = 0  # bytes the channel holds back (it is backed up)

    def load(self) -> Any:
        raise NotImplementedError

    def submit(self, ops: list, done: Any = None) -> None:
        self.batches.append(ops)
        self.unsent.append(ops)
        if done is not None:
            done()

    def flush(self) -> int:
        if self.unsent:
            self.events.append(("store", [op for ops in self.unsent for op in ops]))
            self.unsent = []
        return self.backlog

    def set_remote_listener(self, listener: Any) -> None:
        pass


class Transport:
    def __init__(self, events: list, name: str) -> None:
        self.events, self.name = events, name

    def write(self, data: bytes) -> None:
        self.events.append((self.name, bytes(data)))

    def close(self) -> None:
        pass


def _worker(index: int, tmp_path: Path, events: list) -> tuple[Broker, M.Mesh, M._Link]:
    """Worker ``index`` of 2, linked to a faked sibling; the link is returned."""
    broker = Broker(Config(), Store(events))
    broker.worker_id = index
    mesh = broker.mesh = M.Mesh(broker, index, 2, str(tmp_path))
    link = M._Link(mesh)
    link.transport = Transport(events, "mesh")
    return broker, mesh, link


def _hello(index: int, incarnation: int) -> bytes:
    return struct.pack("<IBHQ", 11, M.HELLO, index, incarnation)


def _fwd(seq: int, payload: bytes, topic: str = "t/x", qos: int = 1) -> bytes:
    return fwd_frame(M.FWD, seq, b"pub", b"", topic.encode(), payload, qos, False, b"", 0)


def _durable_subscriber(broker: Broker, client_id: str = "sub") -> Session:
    session = Session(client_id, 4, 600)
    session.durable = True
    broker.sessions[client_id] = session
    broker.router.subscribe(session, Subscription("t/#", 1))
    return session


def _acks(events: list) -> list[int]:
    out = []
    for name, data in events:
        if name == "mesh":
            frames, _ = split_frames(bytearray(data), M.FWD, M.FWD_SHARED)
            out += [struct.unpack("<Q", f[1])[0] for f in frames if f[0] == M.ACK]
    return out


def test_receiver_marks_applied_frames_with_its_queue_writes(tmp_path: Path) -> None:
    events: list = []
    broker, mesh, link = _worker(0, tmp_path, events)
    _durable_subscriber(broker)
    mesh._on_frames(link, bytearray(_hello(1, 99) + _fwd(1, b"a") + _fwd(2, b"b")))
    (batch,) = broker.store.batches
    assert [type(op) for op in batch] == [QueueAdd, QueueAdd, MeshMark]
    assert batch[-1] == MeshMark(0, 1, 99, 2)
    mesh.flush()
    assert _acks(events)[-1] == 2


@pytest.mark.parametrize("same_incarnation", [True, False])
def test_restarted_receiver_skips_what_it_applied_before(tmp_path: Path,
                                                         same_incarnation: bool) -> None:
    """Worker 0 restarted (its marks loaded); worker 1 sends again frames 1-3 it
    saw no acknowledgement for: 1-2 were applied (the mark) and are only
    acknowledged; 3 is new.  A sibling that restarted too (another incarnation)
    numbers from 1 again: nothing is skipped."""
    events: list = []
    broker, mesh, link = _worker(0, tmp_path, events)
    session = _durable_subscriber(broker)
    mesh.restore_marks({(0, 1): (99, 2), (1, 0): (5, 7)})
    incarnation = 99 if same_incarnation else 100
    mesh._on_frames(link, bytearray(_hello(1, incarnation) + _fwd(1, b"a") + _fwd(2, b"b")
                                    + _fwd(3, b"c")))
    queued = [out.message.payload for out in session.queue] + \
        [out.message.payload for out in session.inflight.values()]
    assert queued == ([b"c"] if same_incarnation else [b"a", b"b", b"c"])
    (batch,) = broker.store.batches
    assert batch[-1] == MeshMark(0, 1, incarnation, 3)
    mesh.flush()
    assert _acks(events)[-1] == 3  # the skipped ones are acknowledged as well


def test_link_broken_and_back_skips_what_was_applied(tmp_path: Path) -> None:
    events: list = []
    broker, mesh, link = _worker(0, tmp_path, events)
    session = _durable_subscriber(broker)
    mesh._on_frames(link, bytearray(_hello(1, 7) + _fwd(1, b"a")))
    link.connection_lost(None)
    again = M._Link(mesh)
    again.transport = Transport(events, "mesh")
    mesh._on_frames(again, bytearray(_hello(1, 7) + _fwd(1, b"a") + _fwd(2, b"b")))
    assert [out.message.payload for out in session.queue] == [b"a", b"b"]


class Conn:
    """What on_accepted_publish needs of a connection."""

    def __init__(self, session: Session, events: list) -> None:
        self.session = session
        self.client_id = session.client_id
        self.version = 4
        self.qos1_in_pending = 0
        self.events = events

    def write(self, data: bytes) -> None:
        self.events.append(("client", data))


def _publishing_worker(tmp_path: Path, events: list) -> tuple[Broker, M.Mesh, Conn]:
    broker, mesh, link = _worker(1, tmp_path, events)
    mesh._on_frames(link, bytearray(_hello(0, 3)))
    sibling = mesh.siblings[0]
    mesh._on_interest(sibling, 1, "t/#")
    mesh._on_interest(sibling, 1, "t/#", durable=True)
    sibling.known = True
    mesh.flush()
    events.clear()
    session = Session("pub", 4, 600)
    session.durable = True
    broker.sessions["pub"] = session
    return broker, mesh, Conn(session, events)


def test_qos2_forward_leaves_after_the_batch_with_its_receive_state(tmp_path: Path) -> None:
    """The worker dies at any point: if the forward is out, the raft process has
    the Qos2InAdd (it commits what a dead worker wrote), so the publisher's
    resend is recognised.  The loop's order is kept: the read's batch is
    submitted (flush_ops), then the mesh flushes (before the store's channel,
    whose flush was scheduled later)."""
    events: list = []
    broker, mesh, conn = _publishing_worker(tmp_path, events)
    on_accepted_publish(broker, conn, Message("t/x", b"m", 2), 17)
    broker.flush_ops()  # end of the read
    mesh.flush()  # the mesh's call_soon comes first
    kinds = [name for name, _ in events]
    assert "mesh" in kinds and "store" in kinds
    assert kinds.index("store") < kinds.index("mesh"), events
    store_ops = next(ops for name, ops in events if name == "store")
    # ... and records where the message went (the frame to worker 0).
    seq = mesh.siblings[0].sent_seq
    assert store_ops == [Qos2InAdd("pub", 17, [mesh.incarnation, [[0, seq, None]]])]


def test_qos2_forward_waits_while_the_store_channel_is_backed_up(tmp_path: Path) -> None:
    events: list = []
    broker, mesh, conn = _publishing_worker(tmp_path, events)
    broker.store.backlog = 4096
    on_accepted_publish(broker, conn, Message("t/x", b"m", 2), 17)
    broker.flush_ops()
    mesh.flush()
    assert [name for name, _ in events] == ["store"]  # the frames wait
    broker.store.backlog = 0
    mesh.flush()  # (the poll)
    assert [name for name, _ in events] == ["store", "mesh"]


def test_qos1_and_clean_qos2_forwards_do_not_wait(tmp_path: Path) -> None:
    events: list = []
    broker, mesh, conn = _publishing_worker(tmp_path, events)
    broker.store.backlog = 4096
    on_accepted_publish(broker, conn, Message("t/x", b"m", 1), 5)
    conn.session.durable = False
    on_accepted_publish(broker, conn, Message("t/x", b"n", 2), 6)
    mesh.flush()
    assert [name for name, _ in events] == ["mesh"]


def _fwd_frames(events: list) -> list:
    out = []
    for name, data in events:
        if name == "mesh":
            frames, _ = split_frames(bytearray(data), M.FWD, M.FWD_SHARED)
            out += [f for f in frames if f[0] in (M.FWD, M.AGAIN)]
    return out


def test_restarted_publishing_worker_forwards_a_resent_message_again(tmp_path: Path) -> None:
    """Worker 1 restarted with a Qos2InAdd that says its previous process (7)
    forwarded packet 17 to worker 0 as frame 5: the publisher's resend is
    acknowledged, not routed here again, and goes to worker 0 once more behind
    AGAIN(7, 5) -- worker 0 decides whether it had it.  Once only."""
    events: list = []
    broker, mesh, conn = _publishing_worker(tmp_path, events)
    conn.session.qos2_add(17)
    mesh.restore_forwards("pub", {17: [7, [[0, 5, None]]]})
    resend = Publish(topic="t/x", payload=b"m", qos=2, retain=False, dup=True, packet_id=17)
    handle_publish(broker, conn, resend)
    handle_publish(broker, conn, resend)
    mesh.flush()
    frames = _fwd_frames(events)
    assert [f[0] for f in frames] == [M.AGAIN, M.FWD]
    assert struct.unpack("<QQ", frames[0][1]) == (7, 5)
    assert frames[1][5] == b"m" and frames[1][1] > 0  # acknowledged: held for the PUBREC
    assert broker.store.batches == []  # nothing routed here


@pytest.mark.parametrize("applied, routed", [(5, False), (4, True)])
def test_receiver_applies_a_frame_again_only_if_it_lacked_it(tmp_path: Path, applied: int,
                                                             routed: bool) -> None:
    """Worker 0 had applied frames up to ``applied`` of worker 1's process 7;
    process 8 sends frame 5 of process 7 again (AGAIN): applied only if new."""
    events: list = []
    broker, mesh, link = _worker(0, tmp_path, events)
    session = _durable_subscriber(broker)
    mesh._on_frames(link, bytearray(_hello(1, 7) + b"".join(_fwd(s, b"x%d" % s)
                                                            for s in range(1, applied + 1))))
    link.connection_lost(None)
    again = M._Link(mesh)
    again.transport = Transport(events, "mesh")
    events.clear()
    mesh._on_frames(again, bytearray(_hello(1, 8) + struct.pack("<IBQQ", 17, M.AGAIN, 7, 5)
                                     + _fwd(1, b"again", qos=2)))
    got = [out.message.payload for out in session.queue]
    assert (b"again" in got) == routed
    mesh.flush()
    assert _acks(events)[-1] == 1
