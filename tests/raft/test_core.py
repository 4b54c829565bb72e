"""The core's building blocks and API contracts (beyond the paper's rules):
MemoryStorage, RaftLog, quorum arithmetic, message encoding, Ready/advance,
restart from storage, batching and flow control."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftmq.raft.core import Config, NotLeader, ProposalDropped, RawNode
from raftmq.raft.log import RaftLog
from raftmq.raft.messages import DecodeError, decode, encode
from raftmq.raft.quorum import Progress, ProgressState, VoteResult, committed_index, tally
from raftmq.raft.storage import CompactedError, MemoryStorage, UnavailableError
from raftmq.raft.types import (
    CONF_CHANGE,
    MT,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    HardState,
    Message,
    Role,
    Snapshot,
    SnapshotMeta,
)


def boot(voters: tuple[int, ...] = (1,)) -> MemoryStorage:
    s = MemoryStorage()
    s.apply_snapshot(Snapshot(SnapshotMeta(1, 1, ConfState(voters)), b""))
    s.set_hard_state(HardState(1, 0, 1))
    return s


def persist(node: RawNode, s: MemoryStorage) -> list:
    """One Ready cycle; returns the committed entries."""
    rd = node.ready()
    if rd.snapshot is not None:
        s.apply_snapshot(rd.snapshot)
    s.append(rd.entries)
    if rd.hard_state is not None:
        s.set_hard_state(rd.hard_state)
    for e in rd.committed_entries:
        if e.kind == CONF_CHANGE:
            node.apply_conf_change(ConfChange.decode(e.data))
    node.advance(rd)
    return rd.committed_entries


# -- MemoryStorage ----------------------------------------------------------------------


def test_memory_storage_ranges_and_errors() -> None:
    s = boot()
    s.append([Entry(1, i, b"%d" % i) for i in range(2, 7)])
    assert (s.first_index(), s.last_index()) == (2, 6)
    assert [e.index for e in s.entries(2, 5)] == [2, 3, 4]
    assert s.term(1) == 1  # the snapshot's term: the dummy entry
    with pytest.raises(CompactedError):
        s.entries(1, 3)
    with pytest.raises(UnavailableError):
        s.entries(3, 8)
    with pytest.raises(UnavailableError):
        s.term(7)
    # max_bytes: at least one entry, then stop before exceeding.
    assert len(s.entries(2, 7, max_bytes=1)) == 1
    assert len(s.entries(2, 7, max_bytes=2 * 25)) == 2
    # append replaces the suffix from the first new index.
    s.append([Entry(2, 4, b"new")])
    assert s.last_index() == 4 and s.entries(4, 5)[0].data == b"new"
    snap = s.create_snapshot(3, ConfState((1,)), b"state")
    s.compact(3)
    assert (s.first_index(), s.last_index(), s.term(3)) == (4, 4, 1)
    assert s.snapshot() == snap
    with pytest.raises(CompactedError):
        s.term(2)
    hs, cs = s.initial_state()
    assert hs == HardState(1, 0, 1) and cs == ConfState((1,))


# -- RaftLog -----------------------------------------------------------------------------


def test_raft_log_unstable_then_stable() -> None:
    s = boot()
    lg = RaftLog(s)
    lg.append([Entry(2, 2, b"a"), Entry(2, 3, b"b")])
    assert lg.last_index() == 3 and lg.stable_last_index() == 1
    s.append(lg.unstable)
    lg.stable_to(3, 2)
    assert lg.unstable == [] and lg.stable_last_index() == 3
    assert [e.data for e in lg.slice(2, 4)] == [b"a", b"b"]
    # A stale stable_to for a replaced entry is ignored.
    lg.append([Entry(3, 3, b"c"), Entry(3, 4, b"d")])
    lg.stable_to(3, 2)
    assert [e.index for e in lg.unstable] == [3, 4]
    assert [e.data for e in lg.slice(2, 5)] == [b"a", b"c", b"d"]


def test_find_conflict_by_term() -> None:
    s = boot()
    s.append([Entry(1, 2, b""), Entry(2, 3, b""), Entry(2, 4, b""), Entry(4, 5, b"")])
    lg = RaftLog(s)
    assert lg.find_conflict_by_term(5, 3) == (4, 2)
    assert lg.find_conflict_by_term(5, 4) == (5, 4)
    assert lg.find_conflict_by_term(4, 1) == (2, 1)
    assert lg.find_conflict_by_term(9, 9) == (5, 4)


def test_committed_entry_never_overwritten() -> None:
    """Raft §5.4 (State Machine Safety): the log asserts a conflict never
    reaches a committed entry."""
    lg = RaftLog(boot())
    lg.append([Entry(2, 2, b"a"), Entry(2, 3, b"b")])
    lg.commit_to(3)
    with pytest.raises(AssertionError):
        lg.maybe_append(1, 1, 3, [Entry(3, 2, b"x")])


# -- quorum -------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 20), min_size=1, max_size=7))
def test_committed_index_matches_naive(matches: list[int]) -> None:
    voters = tuple(range(1, len(matches) + 1))
    m = dict(zip(voters, matches, strict=True))
    naive = max(i for i in range(0, 21)
                if sum(1 for v in matches if v >= i) >= len(matches) // 2 + 1)
    assert committed_index(voters, m) == naive


def test_tally_only_counts_voters() -> None:
    assert tally((1, 2, 3), {1: True, 4: True, 5: True}) == VoteResult.PENDING
    assert tally((1, 2, 3), {1: True, 2: True}) == VoteResult.WON
    assert tally((1, 2, 3), {1: True, 2: False, 3: False}) == VoteResult.LOST
    assert tally((1, 2, 3, 4), {1: True, 2: True, 3: False}) == VoteResult.PENDING


def test_progress_flow_control() -> None:
    pr = Progress(5, max_inflight=2)
    assert pr.state == ProgressState.PROBE and not pr.is_paused()
    pr.sent_entries(7)
    assert pr.is_paused()  # one probe at a time
    assert pr.maybe_decr_to(4, 2)  # rejected at prev 4, follower hints 2
    assert pr.next == 3 and not pr.is_paused()
    assert not pr.maybe_decr_to(4, 2)  # stale duplicate rejection
    pr.maybe_update(3)
    pr.become_replicate()
    pr.sent_entries(6)
    pr.sent_entries(9)
    assert pr.is_paused() and pr.next == 10  # 2 in flight: window full
    pr.maybe_update(6)
    pr.free_inflights_to(6)
    assert not pr.is_paused()


# -- messages --------------------------------------------------------------------------------


def test_message_roundtrip_every_field() -> None:
    snap = Snapshot(SnapshotMeta(9, 3, ConfState((1, 2, 3), (7,))), b"\x00snap" * 100)
    msgs = [
        Message(MT.APP, src=1, dst=2, term=3, log_term=2, index=5, commit=4,
                entries=[Entry(3, 6, b"a" * 300), Entry(3, 7, b"", CONF_CHANGE)]),
        Message(MT.APP_RESP, src=2, dst=1, term=3, index=5, reject=True, reject_hint=2,
                log_term=1),
        Message(MT.SNAP, src=1, dst=3, term=3, snapshot=snap),
        Message(MT.HEARTBEAT, src=1, dst=3, term=2**40, context=b"read-1"),
        Message(MT.VOTE, src=1, dst=2, term=3, index=8, log_term=3, context=b"transfer"),
    ]
    for m in msgs:
        assert decode(encode(m)) == m
    raw = encode(msgs[0])
    for cut in (1, 10, len(raw) - 1):
        with pytest.raises(DecodeError):
            decode(raw[:cut])
    with pytest.raises(DecodeError):
        decode(raw + b"x")


def test_conf_change_encoding() -> None:
    for t, n in itertools.product(ConfChangeType, (1, 2**40)):
        cc = ConfChange(t, n)
        assert ConfChange.decode(cc.encode()) == cc


# -- RawNode API ------------------------------------------------------------------------------


def test_single_node_propose_ready_advance() -> None:
    s = boot()
    node = RawNode(Config(id=1), s, random.Random(1))
    with pytest.raises(NotLeader):
        node.propose(b"x")
    node.campaign()
    assert node.role == Role.LEADER
    persist(node, s)
    node.propose_many([b"a", b"b"])
    node.propose(b"c")
    rd = node.ready()
    assert [e.data for e in rd.entries] == [b"a", b"b", b"c"]
    assert rd.committed_entries == [] or all(e.data == b"" for e in rd.committed_entries)
    s.append(rd.entries)
    node.advance(rd)  # the self-ack: now committed
    rd = node.ready()
    assert [e.data for e in rd.committed_entries] == [b"a", b"b", b"c"]
    assert rd.hard_state is not None and rd.hard_state.commit == 5
    assert not rd.must_sync  # only the commit index changed
    node.advance(rd)
    assert not node.has_ready()
    st_ = node.status()
    assert (st_["role"], st_["commit"], st_["applied"], st_["last_index"]) == ("leader", 5, 5, 5)


def test_restart_recovers_from_storage() -> None:
    """A node restarted on its storage keeps term, vote and log, re-applies
    committed entries after the snapshot/applied index, and re-elects itself."""
    s = boot()
    node = RawNode(Config(id=1), s, random.Random(1))
    node.campaign()
    persist(node, s)
    for i in range(5):
        node.propose(b"%d" % i)
    persist(node, s)
    persist(node, s)
    term = node.term
    node = RawNode(Config(id=1, applied=3), s, random.Random(2))
    assert node.term == term and node.log.committed == 7
    rd = node.ready()
    assert [e.index for e in rd.committed_entries] == [4, 5, 6, 7]
    node.advance(rd)
    node.campaign()
    assert node.role == Role.LEADER and node.term == term + 1


def test_unpersisted_entries_lost_on_crash_are_re_sent() -> None:
    """A follower that crashed before persisting a Ready has not acknowledged
    it (messages go out only after persistence): the leader re-sends."""
    storages = {i: boot((1, 2)) for i in (1, 2)}
    nodes = {i: RawNode(Config(id=i), storages[i], random.Random(i)) for i in (1, 2)}

    def pump(skip_persist_of: int | None = None) -> None:
        for _ in range(50):
            msgs = []
            for i, n in nodes.items():
                if n.has_ready():
                    if i == skip_persist_of:
                        n.ready()  # taken, then "crash": nothing persisted or sent
                        nodes[i] = RawNode(Config(id=i), storages[i], random.Random(9))
                        skip_persist_of = None
                        continue
                    rd = n.ready()
                    storages[i].append(rd.entries)
                    if rd.hard_state:
                        storages[i].set_hard_state(rd.hard_state)
                    msgs += rd.messages
                    n.advance(rd)
            for m in msgs:
                nodes[m.dst].step(m)
            if not msgs:
                return

    nodes[1].campaign()
    pump()
    nodes[1].propose(b"x")
    pump()
    assert nodes[1].log.committed == storages[2].last_index()
    nodes[1].propose(b"y")
    # Deliver the APP to 2, then 2 crashes before persisting.
    rd = nodes[1].ready()
    storages[1].append(rd.entries)
    nodes[1].advance(rd)
    for m in rd.messages:
        nodes[2].step(m)
    pump(skip_persist_of=2)
    assert nodes[1].log.committed < nodes[1].log.last_index()  # y not committed
    for _ in range(3):  # heartbeats: 2 reports its real log, 1 re-sends
        nodes[1].tick()
        pump()
    assert nodes[1].log.committed == nodes[1].log.last_index()
    assert storages[2].entries(storages[2].last_index(), storages[2].last_index() + 1)[0].data == b"y"


def test_batching_respects_max_size_and_inflight() -> None:
    """Replication batches entries up to max_size_per_msg per APP and keeps at
    most max_inflight_msgs APPs outstanding per follower (pipelining)."""
    storages = {i: boot((1, 2)) for i in (1, 2)}
    cfg = {"max_size_per_msg": 10 * 124, "max_inflight_msgs": 3}
    leader = RawNode(Config(id=1, **cfg), storages[1], random.Random(1))
    follower = RawNode(Config(id=2, **cfg), storages[2], random.Random(2))
    leader.campaign()
    for _ in range(10):
        for m in persist_msgs(leader, storages[1]):
            follower.step(m)
        for m in persist_msgs(follower, storages[2]):
            leader.step(m)
    assert leader.role == Role.LEADER
    assert leader.prs[2].state == ProgressState.REPLICATE
    leader.propose_many([b"x" * 100] * 100)
    apps = [m for m in persist_msgs(leader, storages[1]) if m.type == MT.APP]
    assert len(apps) == 3  # window of 3
    assert all(len(m.entries) == 10 for m in apps)
    assert leader.prs[2].is_paused()


def persist_msgs(node: RawNode, s: MemoryStorage) -> list[Message]:
    rd = node.ready()
    s.append(rd.entries)
    if rd.hard_state:
        s.set_hard_state(rd.hard_state)
    node.advance(rd)
    return rd.messages


def test_proposals_refused_when_not_leader_names_leader() -> None:
    s = boot((1, 2, 3))
    node = RawNode(Config(id=2), s, random.Random(1))
    node.step(Message(MT.HEARTBEAT, src=3, dst=2, term=2, commit=1))
    with pytest.raises(NotLeader) as ei:
        node.propose(b"x")
    assert ei.value.leader == 3
    with pytest.raises(ProposalDropped):
        node.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 9))


def _leader_with_follower() -> tuple[RawNode, RawNode, dict[int, MemoryStorage]]:
    storages = {i: boot((1, 2)) for i in (1, 2)}
    leader = RawNode(Config(id=1), storages[1], random.Random(1))
    follower = RawNode(Config(id=2), storages[2], random.Random(2))
    leader.campaign()
    for _ in range(10):
        for m in persist_msgs(leader, storages[1]):
            follower.step(m)
        for m in persist_msgs(follower, storages[2]):
            leader.step(m)
    assert leader.role == Role.LEADER
    return leader, follower, storages


def test_report_unreachable_stops_streaming() -> None:
    """The transport's report_unreachable turns optimistic REPLICATE into PROBE
    (one message at a time from the last known match)."""
    leader, _, storages = _leader_with_follower()
    pr = leader.prs[2]
    assert pr.state == ProgressState.REPLICATE
    leader.propose(b"x")
    persist_msgs(leader, storages[1])  # APP lost in the network
    leader.report_unreachable(2)
    assert pr.state == ProgressState.PROBE and pr.next == pr.match + 1


def test_snapshot_to_follower_behind_compaction_and_report() -> None:
    """Raft §7: a follower needing compacted entries gets SNAP; until the
    transport reports the outcome the follower is paused; a failure falls back
    to probing, and a later snapshot gets through and the follower catches up."""
    ids = (1, 2, 3)
    storages = {i: boot(ids) for i in ids}
    nodes = {i: RawNode(Config(id=i), storages[i], random.Random(i)) for i in ids}
    down: set[int] = set()
    snaps: list[Message] = []

    def pump() -> None:
        for _ in range(50):
            msgs = []
            for i in ids:
                if nodes[i].has_ready():
                    rd = nodes[i].ready()
                    if rd.snapshot is not None:
                        storages[i].apply_snapshot(rd.snapshot)
                    storages[i].append(rd.entries)
                    if rd.hard_state:
                        storages[i].set_hard_state(rd.hard_state)
                    nodes[i].advance(rd)
                    msgs += rd.messages
            if not msgs:
                return
            for m in msgs:
                if m.type == MT.SNAP:
                    snaps.append(m)
                if m.dst not in down and m.src not in down:
                    nodes[m.dst].step(m)

    leader = nodes[1]
    leader.campaign()
    pump()
    down.add(2)
    for i in range(10):
        leader.propose(b"%d" % i)
    pump()
    applied = leader.log.applied
    assert applied == leader.log.last_index()
    storages[1].create_snapshot(applied, ConfState(ids), b"snap")
    storages[1].compact(applied)
    leader.report_unreachable(2)
    pr = leader.prs[2]
    for _ in range(3):  # heartbeats go unanswered: 2 is down
        leader.tick()
        pump()
    down.clear()
    for _ in range(3):  # 2 answers a heartbeat; its next entries are compacted
        leader.tick()
        pump()
        if snaps:
            break
    assert snaps and snaps[0].dst == 2 and snaps[0].snapshot.data == b"snap"
    assert pr.state == ProgressState.REPLICATE or pr.state == ProgressState.SNAPSHOT
    if pr.state == ProgressState.SNAPSHOT:
        assert pr.is_paused()
    leader.report_snapshot(2, True)
    pump()
    leader.tick()
    pump()
    assert storages[2].snapshot().data == b"snap"
    assert nodes[2].log.last_index() == leader.log.last_index()
    assert pr.state == ProgressState.REPLICATE
    # A failed send falls back to probing.
    pr.become_snapshot(applied)
    leader.report_snapshot(2, False)
    assert pr.state == ProgressState.PROBE and pr.is_paused()
