"""The replicated state machine: each op's effect, idempotent and deterministic apply,
snapshots, crash recovery, and the storage integration (one transaction per Ready)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as gen

from raftmq.raft.lmdb_storage import LmdbStorage
from raftmq.raft.storage import SnapshotOutOfDateError
from raftmq.raft.types import (
    CONF_CHANGE,
    PROMOTE,
    ConfChange,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from raftmq.state import entries as entries_mod
from raftmq.state import tables as T
from raftmq.state.entries import (
    PUBREC_RECEIVED,
    QUEUED,
    SENT,
    Dynsec,
    LoadedState,
    Message,
    Noop,
    Qos2InAdd,
    Qos2InRemove,
    QueueAdd,
    QueueRemove,
    QueueUpdate,
    RetainDelete,
    RetainSet,
    SessionDelete,
    SessionExpiry,
    SessionOffline,
    SessionPut,
    SubAdd,
    SubRemove,
    WillDelete,
    WillSet,
    decode_ops,
    encode_message,
    encode_ops,
    pack_sub_options,
)
from raftmq.state.machine import (
    ApplyGapError,
    SnapshotFormatError,
    StateMachine,
    default_apply_dynsec,
    load_state,
)
from raftmq.state.rawops import (
    C_QUEUE_ADD,
    C_QUEUE_REMOVE,
    C_QUEUE_UPDATE,
    iter_raw_ops,
    plain_fields,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")

MSG = Message(
    "sensors/1/temp",
    b"21.5",
    qos=1,
    retain=False,
    properties={"content_type": "text/plain", "correlation_data": b"\x00\xffid", "user_property": [("k", "v")]},
    expiry_at=1_700_000_000_000,
)
LONG_ID = "c" * 300  # beyond the inline key limit: hashed key
LONG_TOPIC = "t/" + "x" * 400


@pytest.fixture
def machine(tmp_path: Path):
    s = LmdbStorage(str(tmp_path / "db"))
    m = StateMachine(s)
    yield s, m
    s.close()


class Feeder:
    """Turns op batches into consecutive log entries and applies them."""

    def __init__(self, m: StateMachine, start: int = 1, term: int = 1) -> None:
        self.m, self.index, self.term = m, start, term

    def __call__(self, *ops: Any) -> list[tuple[int, Any]]:
        e = Entry(self.term, self.index, encode_ops(list(ops)))
        self.index += 1
        return self.m.apply([e])


def batches(n: int, seed: int = 7) -> list[Entry]:
    """A deterministic mixed workload of n entries."""
    rng = random.Random(seed)
    out = []
    seqs: dict[str, int] = {}
    for i in range(1, n + 1):
        cid = f"client-{rng.randrange(8)}"
        r = rng.random()
        if r < 0.1:
            ops = [SessionPut(cid, 5, rng.randrange(1000), rng.random() < 0.3, "user")]
        elif r < 0.2:
            ops = [SubAdd(cid, f"a/{rng.randrange(5)}/#", pack_sub_options(1, False, False, 0), rng.randrange(3))]
        elif r < 0.6:
            seq = seqs[cid] = seqs.get(cid, 0) + 1
            ops = [QueueAdd([[cid, seq, 0, 1, [1]]], Message(f"a/{i}", os.urandom(0) + b"p%d" % i, 1))]
        elif r < 0.7:
            ops = [QueueRemove(cid, rng.randrange(1, 1 + seqs.get(cid, 1)))]
        elif r < 0.8:
            ops = [RetainSet(Message(f"r/{rng.randrange(10)}", b"v%d" % i, 1, True))]
        elif r < 0.85:
            ops = [SessionDelete(cid)]
        elif r < 0.9:
            ops = [Qos2InAdd(cid, rng.randrange(1, 100))]
        else:
            ops = [Noop(), WillSet(cid, 5, Message("will", b"w"))]
        out.append(Entry(1 + i // 50, i, encode_ops(ops)))
    return out


# -- the fast op walker agrees with entries.decode_ops ----------------------------------


def test_iter_raw_ops_matches_decode_ops() -> None:
    ops = [
        Noop(), SessionPut("c", 5, 10, True, "u"), SessionExpiry("c", 0), SessionDelete("c"),
        SubAdd("c", "a/+", 3, 9), SubRemove("c", "a/+"), WillSet("c", 4, MSG), WillDelete("c"),
        RetainSet(MSG), RetainDelete("t"), QueueAdd([["c", 1, 2, 1, [3, 4]]], MSG),
        QueueUpdate("c", 1, 2, PUBREC_RECEIVED), QueueRemove("c", 1), Qos2InAdd("c", 7),
        Qos2InRemove("c", 7), Dynsec({"op": "x", "n": [1]}), SessionOffline("c", 1_700_000_000_000),
    ]
    data = encode_ops(ops)
    decoded = decode_ops(data)
    raw = list(iter_raw_ops(data))
    assert len(raw) == len(decoded) == len(ops)
    assert {tag for tag, _, _ in raw} >= {C_QUEUE_ADD, C_QUEUE_UPDATE, C_QUEUE_REMOVE}
    for (tag, fields, msg), op in zip(raw, decoded, strict=True):
        tag, fields = plain_fields(tag, fields)
        assert tag == op.TAG
        assert fields == [getattr(op, f) for f in op.__slots__ if f != "message"]
        m = getattr(op, "message", None)
        assert bytes(msg) == (encode_message(m) if m is not None else b"")


def test_compact_queue_ops_carry_the_table_keys() -> None:
    """Compact ops hold each key exactly as tables.seq_key builds it; a client id
    too long to be kept verbatim in a key falls back to the JSON form."""
    ops = [
        QueueAdd([["é", 2**40, 65535, 2, [1, 2**28]], ["x" * 200, 1, 0, 1, []]], MSG),
        QueueUpdate("é", 3, 9, PUBREC_RECEIVED),
        QueueRemove("é", 4),
        QueueRemove(LONG_ID, 5),
        QueueAdd([["a", 1, 0, 1, []], [LONG_ID, 1, 0, 1, []]], MSG),
    ]
    raw = list(iter_raw_ops(encode_ops(ops)))
    assert [t for t, _, _ in raw] == [C_QUEUE_ADD, C_QUEUE_UPDATE, C_QUEUE_REMOVE, 12, 10]
    assert [k for k, *_ in raw[0][1][0]] == [
        T.seq_key(T.client_key("é"), 2**40), T.seq_key(T.client_key("x" * 200), 1)
    ]
    assert raw[1][1] == (T.seq_key(T.client_key("é"), 3), T.QUEUE_STATE.pack(9, PUBREC_RECEIVED))
    assert raw[2][1] == (T.seq_key(T.client_key("é"), 4),)
    assert decode_ops(encode_ops(ops)) == ops


def test_json_form_queue_ops_of_older_logs_apply_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries written before the compact form (JSON headers) still apply, to the same tables."""
    es = batches(120, seed=3)
    new = [Entry(e.term, e.index, encode_ops(decode_ops(e.data))) for e in es]
    monkeypatch.setattr(entries_mod, "_compact", lambda op: None)
    old = [Entry(e.term, e.index, encode_ops(decode_ops(e.data))) for e in es]
    assert all(e.data[4] < 0x80 for e in old) and any(e.data[4] >= 0x80 for e in new)
    snaps = []
    for name, entries in (("old", old), ("new", new)):
        for defer in (0, 50):
            env = T.open_environment(str(tmp_path / f"{name}{defer}"), sync=False)
            m = StateMachine(env, defer_queue_ops=defer)
            m.apply(entries)
            m.flush()
            snaps.append(m.snapshot_data())
            env.close()
    assert len(set(snaps)) == 1


# -- each op's effect on load() ------------------------------------------------------------


def test_session_put_and_expiry(machine) -> None:
    _, m = machine
    feed = Feeder(m)
    feed(SessionPut("a", 5, 60, True, "alice"), SessionPut("b", 4, 0, False))
    st = m.load()
    assert set(st.sessions) == {"a", "b"}
    a = st.sessions["a"]
    assert (a.client_id, a.protocol_version, a.expiry_interval, a.username) == ("a", 5, 60, "alice")
    assert st.sessions["b"].username is None
    feed(SessionExpiry("a", 3600), SessionExpiry("nobody", 5))
    st = m.load()
    assert st.sessions["a"].expiry_interval == 3600
    assert "nobody" not in st.sessions


def test_subscriptions(machine) -> None:
    _, m = machine
    feed = Feeder(m)
    opts = pack_sub_options(2, True, True, 1)
    feed(SessionPut("a", 5, 60, True), SubAdd("a", "x/#", opts, 4), SubAdd("a", "$share/g/y", 1, 0))
    feed(SubAdd("a", "x/#", 1, 0))  # re-subscribe replaces the options
    assert m.load().sessions["a"].subscriptions == {"x/#": (1, 0), "$share/g/y": (1, 0)}
    feed(SubRemove("a", "x/#"), SubRemove("a", "never"))
    assert m.load().sessions["a"].subscriptions == {"$share/g/y": (1, 0)}


def test_queue_add_update_remove(machine) -> None:
    _, m = machine
    feed = Feeder(m)
    feed(SessionPut("a", 5, 60, True), SessionPut("b", 5, 60, True))
    feed(QueueAdd([["a", 1, 0, 1, [5]], ["b", 7, 12, 2, []]], MSG))
    st = m.load()
    (qa,) = st.sessions["a"].queue
    (qb,) = st.sessions["b"].queue
    assert (qa.seq, qa.packet_id, qa.state, qa.qos, qa.subscription_ids) == (1, 0, QUEUED, 1, [5])
    assert (qb.seq, qb.packet_id, qb.state, qb.qos, qb.subscription_ids) == (7, 12, SENT, 2, [])
    assert qa.message == MSG and qb.message == MSG
    feed(QueueAdd([["a", 3, 0, 0, []]], Message("z", b"")), QueueAdd([["a", 2, 0, 1, []]], Message("y", b"1")))
    assert [q.seq for q in m.load().sessions["a"].queue] == [1, 2, 3]  # ordered by seq
    feed(QueueUpdate("a", 1, 33, SENT), QueueUpdate("b", 7, 12, PUBREC_RECEIVED), QueueUpdate("a", 99, 1, SENT))
    st = m.load()
    q1 = st.sessions["a"].queue[0]
    assert (q1.packet_id, q1.state, q1.subscription_ids, q1.message) == (33, SENT, [5], MSG)
    assert st.sessions["b"].queue[0].state == PUBREC_RECEIVED
    assert [q.seq for q in st.sessions["a"].queue] == [1, 2, 3]  # update added nothing
    feed(QueueRemove("a", 2), QueueRemove("b", 7), QueueRemove("b", 8))
    st = m.load()
    assert [q.seq for q in st.sessions["a"].queue] == [1, 3]
    assert st.sessions["b"].queue == []


def test_will_retained_qos2(machine) -> None:
    _, m = machine
    feed = Feeder(m)
    will = Message("last/will", b"gone", 1, True, None, 0)
    feed(SessionPut("a", 5, 60, True), WillSet("a", 30, will), Qos2InAdd("a", 5), Qos2InAdd("a", 6))
    feed(RetainSet(MSG), RetainSet(Message(LONG_TOPIC, b"long", 0, True)))
    st = m.load()
    assert st.sessions["a"].will == (30, will)
    assert st.sessions["a"].qos2_in == {5, 6}
    assert st.retained == {MSG.topic: MSG, LONG_TOPIC: Message(LONG_TOPIC, b"long", 0, True)}
    feed(WillDelete("a"), Qos2InRemove("a", 5), RetainDelete(MSG.topic), RetainDelete(LONG_TOPIC))
    st = m.load()
    assert st.sessions["a"].will is None
    assert st.sessions["a"].qos2_in == {6}
    assert st.retained == {}


def _fill_client(feed: Feeder, cid: str) -> None:
    feed(
        SessionPut(cid, 5, 60, True),
        SubAdd(cid, "f/1", 1, 0),
        SubAdd(cid, "f/" + "y" * 300, 1, 0),
        WillSet(cid, 0, Message("w", b"w")),
        QueueAdd([[cid, 1, 0, 1, []], [cid, 2, 0, 1, []]], MSG),
        Qos2InAdd(cid, 9),
    )


def test_clean_session_put_drops_only_that_clients_state(machine) -> None:
    """Clean start: subscriptions, queue, QoS 2 state and will of that id go; other ids
    (including one whose id extends it, and a hashed long id) keep theirs."""
    _, m = machine
    feed = Feeder(m)
    ids = ["c1", "c10", "c", LONG_ID, LONG_ID + "z"]
    for cid in ids:
        _fill_client(feed, cid)
    full = m.load().sessions["c10"]
    assert len(full.subscriptions) == 2 and len(full.queue) == 2 and full.qos2_in == {9} and full.will
    feed(SessionPut("c1", 5, 10, False))  # resume: keeps everything
    assert m.load().sessions["c1"].subscriptions == full.subscriptions
    feed(SessionPut("c1", 5, 10, True), SessionPut(LONG_ID, 5, 10, True))
    st = m.load()
    for cid in ("c1", LONG_ID):
        s = st.sessions[cid]
        assert (s.subscriptions, s.queue, s.qos2_in, s.will, s.expiry_interval) == ({}, [], set(), None, 10)
    for cid in ("c10", "c", LONG_ID + "z"):
        s = st.sessions[cid]
        assert len(s.subscriptions) == 2 and len(s.queue) == 2 and s.qos2_in == {9} and s.will


def test_session_delete_removes_everything_of_the_client(machine) -> None:
    _, m = machine
    feed = Feeder(m)
    for cid in ("c1", "c10"):
        _fill_client(feed, cid)
    feed(SessionDelete("c1"))
    st = m.load()
    assert set(st.sessions) == {"c10"}
    feed(SessionPut("c1", 5, 60, False))  # nothing of the old session comes back
    s = m.load().sessions["c1"]
    assert (s.subscriptions, s.queue, s.qos2_in, s.will) == ({}, [], set(), None)
    with m.env.begin() as txn:
        ck = T.client_key("c1")
        for db in (m.db_subs, m.db_queues, m.db_qos2_in):
            cur = txn.cursor(db=db)
            assert not (cur.set_range(ck) and cur.key().startswith(ck))


def test_dynsec_replace_and_pluggable_apply(tmp_path: Path) -> None:
    env = T.open_environment(str(tmp_path / "db"))
    seen: list[dict] = []

    def apply_dynsec(doc: dict | None, change: dict) -> dict:
        seen.append(change)
        if change["op"] == "bad":
            raise ValueError("no such client")
        doc = dict(doc or {})
        doc.setdefault("clients", []).append(change["username"])
        return doc

    m = StateMachine(env, apply_dynsec=apply_dynsec)
    feed = Feeder(m)
    feed(Dynsec({"op": "add", "username": "u1"}))
    res = feed(Dynsec({"op": "bad"}), Dynsec({"op": "add", "username": "u2"}))
    assert res == [(2, ["dynsec: no such client"])]
    assert m.load().dynsec == {"clients": ["u1", "u2"]}
    assert len(seen) == 3
    # several entries in one apply, a rejected change between good ones
    e1 = Entry(1, 3, encode_ops([Dynsec({"op": "add", "username": "u3"}), Dynsec({"op": "bad"})]))
    e2 = Entry(1, 4, encode_ops([SessionPut("s", 5, 1, True), Dynsec({"op": "add", "username": "u4"})]))
    assert m.apply([e1, e2]) == [(3, ["dynsec: no such client"]), (4, None)]
    assert m.load().dynsec == {"clients": ["u1", "u2", "u3", "u4"]}
    env.close()

    env = T.open_environment(str(tmp_path / "db2"))
    m = StateMachine(env)  # the default: the dynsec library's apply_change
    feed = Feeder(m)
    feed(Dynsec({"commands": [{"command": "createClient", "username": "u1"}]}))
    doc = m.load().dynsec
    assert [c["username"] for c in doc["clients"]] == ["u1"]
    feed(Dynsec({"replace": {"clients": [{"username": "u9", "roles": []}], "groups": [], "roles": []}}))
    assert [c["username"] for c in m.load().dynsec["clients"]] == ["u9"]
    env.close()


def test_default_dynsec_fallback_replaces_whole_document() -> None:
    doc = {"clients": []}
    assert default_apply_dynsec(None, {"replace": doc}) is doc
    assert default_apply_dynsec({"x": 1}, {"op": "replace", "document": doc}) is doc
    with pytest.raises(ValueError):
        default_apply_dynsec(None, {"commands": []})


def test_malformed_entry_is_a_result_not_a_crash(machine) -> None:
    _, m = machine
    res = m.apply([Entry(1, 1, b"\x05\x00\x00\x00garbage"), Entry(1, 2, encode_ops([SessionPut("a", 5, 1, True)]))])
    assert res[0][0] == 1 and res[0][1][0].startswith("malformed")
    assert res[1] == (2, None)
    assert m.applied() == (2, 1)
    assert set(m.load().sessions) == {"a"}


# -- apply: exactly once, in order ------------------------------------------------------------


def test_apply_is_idempotent_and_refuses_gaps(machine) -> None:
    _, m = machine
    es = batches(60)
    assert [i for i, _ in m.apply(es[:40])] == list(range(1, 41))
    once = m.snapshot_data()
    assert m.apply(es[:40]) == []  # all at or below the applied index: skipped
    assert m.snapshot_data() == once
    assert [i for i, _ in m.apply(es[30:])] == list(range(41, 61))  # overlap skipped, rest applied
    assert m.applied() == (60, es[-1].term)
    with pytest.raises(ApplyGapError):
        m.apply([Entry(2, 62, b"")])
    assert m.applied_index() == 60


def test_determinism_two_machines_same_bytes(tmp_path: Path) -> None:
    es = batches(400)
    snaps = []
    for name, chunks in (("a", [es]), ("b", [es[:7], es[7:150], es[150:]])):
        env = T.open_environment(str(tmp_path / name))
        m = StateMachine(env)
        for c in chunks:
            m.apply(c)
        snaps.append(m.snapshot_data())
        env.close()
    assert snaps[0] == snaps[1]


def test_snapshot_restore_identical(tmp_path: Path) -> None:
    es = batches(300)
    env_a = T.open_environment(str(tmp_path / "a"))
    a = StateMachine(env_a)
    a.apply(es)
    a.set_cluster_id("cluster-7")
    data = a.snapshot_data()
    env_b = T.open_environment(str(tmp_path / "b"))
    b = StateMachine(env_b)
    b.apply(batches(50, seed=99))  # different content to be replaced entirely
    assert b.restore(data) == (300, es[-1].term)
    assert b.load() == a.load()
    assert b.snapshot_data() == data
    assert b.applied() == a.applied() and b.cluster_id == "cluster-7"
    # restore then the tail gives what applying everything gives
    more = batches(350)[300:]
    a.apply(more)
    b.apply(more)
    assert b.snapshot_data() == a.snapshot_data()
    env_a.close()
    env_b.close()


def test_corrupt_snapshot_is_refused_and_changes_nothing(machine) -> None:
    _, m = machine
    m.apply(batches(20))
    before = m.snapshot_data()
    bad = bytearray(before)
    bad[len(bad) // 2] ^= 1
    for data in (bytes(bad), before[:-10], b"nope"):
        with pytest.raises(SnapshotFormatError):
            m.restore(data)
    assert m.snapshot_data() == before


# -- with the log: one transaction per Ready ---------------------------------------------------


def test_save_applies_committed_in_the_same_transaction(machine) -> None:
    s, m = machine
    es = batches(10)
    s.save(HardState(1, 1, 0), es[:6], None)
    res = s.save(HardState(1, 1, 4), es[6:], None, committed=es[:4])
    assert [i for i, _ in res] == [1, 2, 3, 4]
    assert m.applied_index() == 4
    assert s.initial_state()[0].commit == 4


def test_crash_between_log_save_and_apply_resumes_at_applied_plus_one(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    es = batches(30)
    s = LmdbStorage(path)
    m = StateMachine(s)
    s.save(HardState(2, 1, 30), es, None)  # log durable, commit known...
    m.apply(es[:12])  # ...applied only in part when the process dies
    s.close()
    s = LmdbStorage(path)
    m = StateMachine(s)
    hs, _ = s.initial_state()
    applied = m.applied_index()
    assert applied == 12
    res = m.apply(s.entries(applied + 1 - 5, hs.commit + 1))  # replay with overlap
    assert [i for i, _ in res] == list(range(13, 31))
    s.close()
    env = T.open_environment(str(tmp_path / "ref"))
    ref = StateMachine(env)
    ref.apply(es)
    s = LmdbStorage(path)
    assert StateMachine(s).snapshot_data() == ref.snapshot_data()
    s.close()
    env.close()


def test_storage_snapshot_comes_from_the_machine_and_installs_on_another(tmp_path: Path) -> None:
    a = LmdbStorage(str(tmp_path / "a"))
    ma = StateMachine(a)
    a.set_conf_state(ConfState((1, 2, 3)))
    es = batches(100)
    a.save(HardState(3, 1, 100), es, None, committed=es)
    a.compact(80)
    assert a.first_index() == 81
    snap = a.snapshot()
    assert snap.meta == SnapshotMeta(100, es[-1].term, ConfState((1, 2, 3)))
    assert a.snapshot() is snap  # cached while the applied index does not move

    b = LmdbStorage(str(tmp_path / "b"))
    mb = StateMachine(b)
    b.save(HardState(1, 0, 0), batches(5, seed=3), None)  # a stale log to be replaced
    b.save(HardState(3, 0, 100), [], snap)
    assert (b.first_index(), b.last_index(), b.term(100)) == (101, 100, es[-1].term)
    assert mb.load() == ma.load()
    assert mb.applied_index() == 100
    assert b.initial_state()[1] == ConfState((1, 2, 3))
    tail = [Entry(4, 101, encode_ops([SessionDelete("client-1")]))]
    for store in (a, b):
        store.save(None, tail, None, committed=tail)
    assert mb.snapshot_data() == ma.snapshot_data()
    # a snapshot whose data does not match its metadata is refused, atomically
    wrong = Snapshot(SnapshotMeta(200, 4, ConfState((1,))), snap.data)
    with pytest.raises(Exception, match="metadata"):
        b.save(None, [], wrong)
    assert b.last_index() == 101 and mb.applied_index() == 101
    # nor one older than what the tables already hold (it would roll them back)
    with pytest.raises(SnapshotOutOfDateError):
        b.save(None, [], snap)
    assert mb.applied_index() == 101 and mb.snapshot_data() == ma.snapshot_data()
    a.close()
    b.close()


def test_conf_change_membership_recorded_at_apply(machine) -> None:
    s, m = machine
    s.set_conf_state(ConfState((1,)))
    m.on_conf_change = lambda e: ConfState((1, ConfChange.decode(e.data).node_id))
    es = [Entry(1, 1, b""), Entry(1, 2, ConfChange(PROMOTE, 2).encode(), CONF_CHANGE)]
    res = s.save(HardState(1, 1, 2), es, None, committed=es)
    assert res[1] == (2, ConfState((1, 2)))
    assert s.initial_state()[1] == ConfState((1, 2))


def test_worker_process_reads_the_tables_while_the_writer_has_them_open(machine) -> None:
    s, m = machine
    Feeder(m)(SessionPut("a", 5, 60, True), SubAdd("a", "x", 1, 0), RetainSet(MSG))
    code = "import sys; from raftmq.state.machine import load_state; st = load_state(sys.argv[1]); print(sorted(st.sessions), sorted(st.retained))"
    out = subprocess.run(
        [sys.executable, "-c", code, s.path], env=dict(os.environ, PYTHONPATH=SRC),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert out.split("\n")[0] == f"['a'] ['{MSG.topic}']"
    assert load_state  # also importable in-process


# -- kill -9 during save+apply ---------------------------------------------------------------

APPLIER = textwrap.dedent(
    """
    import sys
    from raftmq.raft.lmdb_storage import LmdbStorage
    from raftmq.raft.types import Entry, HardState
    from raftmq.state.entries import QueueAdd, Message, SessionPut, encode_ops
    from raftmq.state.machine import StateMachine

    s = LmdbStorage(sys.argv[1])
    m = StateMachine(s)
    if s.last_index() == 0:
        s.save(HardState(1, 1, 0), [Entry(1, 1, encode_ops([SessionPut("c", 5, 60, True)]))], None)
    i = s.last_index()
    pending = s.entries(m.applied_index() + 1, i + 1)
    while True:
        es = [Entry(1, j, encode_ops([QueueAdd([["c", j, 0, 1, []]], Message("t", b"%d" % j))]))
              for j in range(i + 1, i + 201)]
        s.save(HardState(1, 1, i), es, None, committed=pending)   # apply the previous batch
        pending, i = es, es[-1].index
        print(m.applied_index(), flush=True)
    """
)


def test_kill_9_during_apply_keeps_tables_and_applied_index_in_step(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    rng = random.Random(42)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", APPLIER, path], stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=SRC),
        )
        try:
            last = 0
            for _ in range(rng.randint(2, 30)):
                line = proc.stdout.readline()
                assert line, "applier died"
                last = int(line)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
        s = LmdbStorage(path)
        m = StateMachine(s)
        applied = m.applied_index()
        assert applied >= last
        assert s.initial_state()[0].commit == applied  # saved in the same transaction
        queue = m.load().sessions["c"].queue
        # entry j queued seq j: exactly the entries 2..applied, each once
        assert [q.seq for q in queue] == list(range(2, applied + 1))
        assert all(q.message.payload == b"%d" % q.seq for q in queue)
        s.close()


def test_readonly_environment_cannot_apply(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        Feeder(StateMachine(s))(SessionPut("a", 5, 60, True))
    env = T.open_environment(path, readonly=True)
    try:
        ro = StateMachine(env)
        assert set(ro.load().sessions) == {"a"}
        with pytest.raises(lmdb.Error):
            ro.apply([Entry(1, 2, b"")])
    finally:
        env.close()


def test_load_state_before_the_tables_exist(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    LmdbStorage(path).close()  # log databases only
    assert load_state(path) == LoadedState()


# -- model-based: random op sequences against a dict model of entries.py's semantics ---------

CIDS = ["a", "ab", "b", "é", LONG_ID]
TOPICS = ["t/1", "t/2", LONG_TOPIC]
MSGS = [MSG, Message("x", b"", 0), Message(LONG_TOPIC, b"big" * 50, 2, True, {"user_property": [("a", "b")]}, 5)]
_cid = gen.sampled_from(CIDS)
_seq = gen.integers(1, 6)
OPS = gen.one_of(
    gen.builds(SessionPut, _cid, gen.sampled_from([3, 4, 5]), gen.integers(0, 10), gen.booleans(), gen.sampled_from([None, "u"])),
    gen.builds(SessionExpiry, _cid, gen.integers(0, 10)),
    gen.builds(SessionOffline, _cid, gen.sampled_from([0, 1, 1_700_000_000_000])),
    gen.builds(SessionDelete, _cid),
    gen.builds(SubAdd, _cid, gen.sampled_from(["f/#", "+/x", "$share/g/f", "f/" + "z" * 250]), gen.integers(0, 63), gen.integers(0, 3)),
    gen.builds(SubRemove, _cid, gen.sampled_from(["f/#", "+/x"])),
    gen.builds(WillSet, _cid, gen.integers(0, 9), gen.sampled_from(MSGS)),
    gen.builds(WillDelete, _cid),
    gen.builds(RetainSet, gen.sampled_from(MSGS)),
    gen.builds(RetainDelete, gen.sampled_from(TOPICS + ["x", MSG.topic])),
    gen.builds(
        QueueAdd,
        gen.lists(gen.tuples(_cid, _seq, gen.integers(0, 3), gen.integers(1, 2), gen.lists(gen.integers(1, 9), max_size=2)).map(list), min_size=1, max_size=3),
        gen.sampled_from(MSGS),
    ),
    gen.builds(QueueUpdate, _cid, _seq, gen.integers(0, 5), gen.sampled_from([QUEUED, SENT, PUBREC_RECEIVED])),
    gen.builds(QueueRemove, _cid, _seq),
    gen.builds(Qos2InAdd, _cid, gen.integers(1, 4)),
    gen.builds(Qos2InRemove, _cid, gen.integers(1, 4)),
    gen.just(Noop()),
)


class Model:
    """The documented semantics of every op, on plain dicts."""

    def __init__(self) -> None:
        self.sessions: dict[str, tuple] = {}
        self.subs: dict[str, dict] = {}
        self.wills: dict[str, tuple] = {}
        self.queues: dict[str, dict] = {}
        self.qos2: dict[str, set] = {}
        self.retained: dict[str, Message] = {}

    def drop(self, cid: str) -> None:
        for table in (self.subs, self.wills, self.queues, self.qos2):
            table.pop(cid, None)

    def apply(self, op: Any) -> None:
        t = type(op)
        if t is SessionPut:
            if op.clean:
                self.drop(op.client_id)
            self.sessions[op.client_id] = (op.protocol_version, op.expiry_interval, op.username, 0)
        elif t is SessionExpiry:
            if op.client_id in self.sessions:
                pv, _, u, off = self.sessions[op.client_id]
                self.sessions[op.client_id] = (pv, op.expiry_interval, u, off)
        elif t is SessionOffline:
            if op.client_id in self.sessions:
                pv, e, u, _ = self.sessions[op.client_id]
                self.sessions[op.client_id] = (pv, e, u, op.disconnected_at)
        elif t is SessionDelete:
            self.drop(op.client_id)
            self.sessions.pop(op.client_id, None)
        elif t is SubAdd:
            self.subs.setdefault(op.client_id, {})[op.topic_filter] = (op.options, op.subscription_id)
        elif t is SubRemove:
            self.subs.get(op.client_id, {}).pop(op.topic_filter, None)
        elif t is WillSet:
            self.wills[op.client_id] = (op.delay_interval, op.message)
        elif t is WillDelete:
            self.wills.pop(op.client_id, None)
        elif t is RetainSet:
            self.retained[op.message.topic] = op.message
        elif t is RetainDelete:
            self.retained.pop(op.topic, None)
        elif t is QueueAdd:
            for cid, seq, pid, qos, sub_ids in op.deliveries:
                state = SENT if pid else QUEUED
                self.queues.setdefault(cid, {})[seq] = [pid, state, qos, list(sub_ids), op.message]
        elif t is QueueUpdate:
            row = self.queues.get(op.client_id, {}).get(op.seq)
            if row is not None:
                row[0], row[1] = op.packet_id, op.state
        elif t is QueueRemove:
            self.queues.get(op.client_id, {}).pop(op.seq, None)
        elif t is Qos2InAdd:
            self.qos2.setdefault(op.client_id, set()).add(op.packet_id)
        elif t is Qos2InRemove:
            self.qos2.get(op.client_id, set()).discard(op.packet_id)

    def loaded(self) -> LoadedState:
        from raftmq.state.entries import QueuedMessage, SessionRecord

        out = LoadedState(retained=dict(self.retained))
        for cid, (pv, expiry, username, offline) in self.sessions.items():
            rec = SessionRecord(cid, pv, expiry, username, disconnected_at=offline)
            rec.subscriptions = dict(self.subs.get(cid, {}))
            rec.will = self.wills.get(cid)
            rec.queue = [QueuedMessage(seq, *row[:4], row[4]) for seq, row in sorted(self.queues.get(cid, {}).items())]
            rec.qos2_in = set(self.qos2.get(cid, set()))
            out.sessions[cid] = rec
        return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches_=gen.lists(gen.lists(OPS, min_size=1, max_size=6), min_size=1, max_size=12))
def test_random_ops_match_the_model(tmp_path_factory: pytest.TempPathFactory, batches_: list) -> None:
    env = T.open_environment(str(tmp_path_factory.mktemp("model") / "db"), sync=False)
    try:
        m = StateMachine(env)
        model = Model()
        entries = [Entry(1, i + 1, encode_ops(ops)) for i, ops in enumerate(batches_)]
        results = m.apply(entries)
        assert all(r is None for _, r in results)
        for ops in batches_:
            for op in ops:
                model.apply(op)
        assert m.load() == model.loaded()
        data = m.snapshot_data()
        m.restore(data)
        assert m.load() == model.loaded()
        assert m.snapshot_data() == data
    finally:
        env.close()


# -- deferred queue rows (the raft process's setting) ------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches_=gen.lists(gen.lists(OPS, min_size=1, max_size=6), min_size=1, max_size=16),
    cuts=gen.lists(gen.integers(1, 16), max_size=6),
    defer=gen.sampled_from([1, 3, 1000]),
)
def test_deferred_queue_rows_give_the_same_tables(
    tmp_path_factory: pytest.TempPathFactory, batches_: list, cuts: list, defer: int
) -> None:
    """However the entries are grouped into transactions, and whenever the rows are
    written, a deferring machine ends with the tables of one that applies at once;
    and at every point its META_APPLIED names a state it really holds."""
    d = tmp_path_factory.mktemp("defer")
    env_a = T.open_environment(str(d / "a"), sync=False)
    env_b = T.open_environment(str(d / "b"), sync=False)
    env_c = T.open_environment(str(d / "c"), sync=False)
    try:
        ref = StateMachine(env_a)
        m = StateMachine(env_b, defer_queue_ops=defer)
        at_applied = StateMachine(env_c)  # replays up to m's META_APPLIED
        entries = [Entry(1, i + 1, encode_ops(ops)) for i, ops in enumerate(batches_)]
        bounds = sorted({c for c in cuts if c < len(entries)} | {0, len(entries)})
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            assert [i for i, _ in m.apply(entries[lo:hi])] == list(range(lo + 1, hi + 1))
            assert m.last_applied() == hi
            table_at = m.applied_index()
            assert table_at <= hi and hi - table_at <= max(defer, 1) + len(entries)
            at_applied.apply(entries[:table_at])
            assert at_applied.applied_index() == table_at
            # What the tables say now is exactly the state at META_APPLIED.
            with env_b.begin() as txn:
                held = m._load_in(txn)
            assert held == at_applied.load()
        ref.apply(entries)
        assert m.load() == ref.load()  # load() writes the deferred rows first
        assert m.deferred == 0 and m.applied_index() == len(entries)
        assert m.snapshot_data() == ref.snapshot_data()
    finally:
        env_a.close()
        env_b.close()
        env_c.close()


def test_deferred_row_is_seen_by_a_later_direct_op_of_the_same_entry(tmp_path: Path) -> None:
    env = T.open_environment(str(tmp_path / "db"), sync=False)
    try:
        m = StateMachine(env, defer_queue_ops=100)
        Feeder(m)(SessionExpiry("a", 0), QueueAdd([["a", 1, 0, 1, []]], MSG), SessionDelete("a"))
        with env.begin() as txn:
            assert txn.stat(m.db_queues)["entries"] == 0
        assert m.deferred == 0 and m.load() == LoadedState()
    finally:
        env.close()


def test_deferred_add_then_remove_never_reaches_the_table(tmp_path: Path) -> None:
    env = T.open_environment(str(tmp_path / "db"), sync=False)
    try:
        m = StateMachine(env, defer_queue_ops=100)
        f = Feeder(m)
        f(SessionPut("s", 4, 100, True))
        f(QueueAdd([["s", 1, 0, 1, []], ["s", 2, 0, 1, []]], MSG))
        f(QueueUpdate("s", 1, 7, SENT), QueueRemove("s", 2))
        assert m.deferred == 1  # seq 2 came and went in memory
        assert m.applied_index() == 1 and m.last_applied() == 3
        with env.begin() as txn:
            assert txn.stat(m.db_queues)["entries"] == 0
        f(QueueRemove("s", 1))
        assert m.deferred == 0 and m.applied_index() == 4  # nothing left: the tables are current
        f(QueueAdd([["s", 3, 0, 1, []]], MSG))
        f(SubAdd("s", "a/#", 1))  # a direct write takes the deferred rows with it
        assert m.deferred == 0 and m.applied_index() == 6
        assert [q.seq for q in m.load().sessions["s"].queue] == [3]
    finally:
        env.close()


def test_deferred_rows_lost_in_a_crash_are_applied_again_from_the_log(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    es = [Entry(1, 1, encode_ops([SessionPut("s", 4, 100, True)]))] + [
        Entry(1, i, encode_ops([QueueAdd([["s", i, 0, 1, []]], MSG)] + ([QueueRemove("s", i - 1)] if i > 2 else [])))
        for i in range(2, 12)
    ]
    s = LmdbStorage(path)
    m = StateMachine(s, defer_queue_ops=1000)
    s.save(HardState(1, 1, 11), es, None, committed=es)
    assert m.applied_index() == 1 and m.last_applied() == 11
    s.close()  # the process dies: the deferred rows are gone, the log is not
    s = LmdbStorage(path)
    m = StateMachine(s, defer_queue_ops=1000)
    assert m.applied_index() == 1
    m.apply(s.entries(2, 12))
    assert [q.seq for q in m.load().sessions["s"].queue] == [11]
    s.close()


def test_aborted_transaction_puts_the_deferred_rows_back(tmp_path: Path) -> None:
    env = T.open_environment(str(tmp_path / "db"), sync=False)
    try:
        m = StateMachine(env, defer_queue_ops=100)
        f = Feeder(m)
        f(SessionPut("s", 4, 100, True))
        f(QueueAdd([["s", 1, 0, 1, []]], MSG))
        assert m.deferred == 1
        bad = [Entry(1, 3, encode_ops([QueueRemove("s", 1), SubAdd("s", "x", 0)]))]
        with pytest.raises(RuntimeError):
            with env.begin(write=True) as txn:
                m.apply_in(txn, bad)  # removes seq 1 in memory and flushes ...
                raise RuntimeError("disk full")  # ... but the transaction never commits
        m.txn_aborted()
        assert m.deferred == 1 and m.last_applied() == 2 and m.applied_index() == 1
        f.index = 3
        f(QueueAdd([["s", 2, 0, 1, []]], MSG))
        assert [q.seq for q in m.load().sessions["s"].queue] == [1, 2]
    finally:
        env.close()
