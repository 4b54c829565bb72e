"""The rules of the Raft paper, one test each, on the sans-IO core.

Each docstring names the rule ("Raft §5.x ..." for the paper, "thesis §x" for
Ongaro's dissertation), so ``grep -n "Raft §5.3" tests/raft`` finds the test
of a rule. The ``Cluster`` helper wires RawNodes with MemoryStorage: it
persists every Ready before delivering its messages (the Ready contract), and
can isolate nodes or drop messages.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from raftmq.raft.core import Config, NotLeader, ProposalDropped, RawNode
from raftmq.raft.quorum import ProgressState
from raftmq.raft.storage import MemoryStorage
from raftmq.raft.types import (
    CONF_CHANGE,
    MT,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    HardState,
    Message,
    ReadState,
    Role,
    Snapshot,
    SnapshotMeta,
)

ET = 10  # election ticks


def make_storage(voters: tuple[int, ...], learners: tuple[int, ...] = ()) -> MemoryStorage:
    st = MemoryStorage()
    st.apply_snapshot(Snapshot(SnapshotMeta(1, 1, ConfState(voters, learners)), b""))
    st.set_hard_state(HardState(1, 0, 1))  # bootstrapped at term 1, index 1
    return st


def make_node(node_id: int, st: MemoryStorage, **cfg: object) -> RawNode:
    return RawNode(Config(id=node_id, election_tick=ET, **cfg), st, random.Random(node_id))


class Cluster:
    """In-process cluster: ready -> persist -> advance -> deliver messages."""

    def __init__(self, n: int, learners: tuple[int, ...] = (), **cfg: object) -> None:
        voters = tuple(range(1, n + 1))
        self.storage = {i: make_storage(voters, learners) for i in voters + learners}
        self.nodes = {i: make_node(i, st, **cfg) for i, st in self.storage.items()}
        self.cfg = cfg
        self.isolated: set[int] = set()
        self.dropped: set[tuple[int, int]] = set()
        self.drop_if: Callable[[Message], bool] | None = None
        self.applied: dict[int, list[Entry]] = {i: [] for i in self.nodes}
        self.reads: dict[int, list[ReadState]] = {i: [] for i in self.nodes}
        self.sent: list[Message] = []

    def blocked(self, m: Message) -> bool:
        if self.drop_if is not None and self.drop_if(m):
            return True
        return m.src in self.isolated or m.dst in self.isolated or (m.src, m.dst) in self.dropped

    def process(self, i: int) -> list[Message]:
        node, st = self.nodes[i], self.storage[i]
        rd = node.ready()
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        for e in rd.committed_entries:
            self.applied[i].append(e)
            if e.kind == CONF_CHANGE:
                node.apply_conf_change(ConfChange.decode(e.data))
        self.reads[i].extend(rd.read_states)
        node.advance(rd)
        return rd.messages

    def stabilize(self, max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            msgs: list[Message] = []
            for i in sorted(self.nodes):
                if self.nodes[i].has_ready():
                    msgs.extend(self.process(i))
            if not msgs and not any(n.has_ready() for n in self.nodes.values()):
                return
            self.sent.extend(msgs)
            for m in msgs:
                if not self.blocked(m) and m.dst in self.nodes:
                    self.nodes[m.dst].step(m)
        raise AssertionError("cluster did not stabilize")

    def restart(self, i: int) -> RawNode:
        """Crash and restart node i on what its storage holds."""
        self.nodes[i] = make_node(i, self.storage[i], **self.cfg)
        return self.nodes[i]

    def campaign_until_leader(self, i: int, attempts: int = 3) -> RawNode:
        for _ in range(attempts):
            self.nodes[i].campaign()
            self.stabilize()
            if self.nodes[i].role == Role.LEADER:
                return self.nodes[i]
        raise AssertionError(f"{i} not elected")

    def tick(self, i: int, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[i].tick()

    def tick_all(self, n: int) -> None:
        for _ in range(n):
            for i in sorted(self.nodes):
                self.nodes[i].tick()
            self.stabilize()

    def elect(self, i: int) -> RawNode:
        self.nodes[i].campaign()
        self.stabilize()
        assert self.nodes[i].role == Role.LEADER
        return self.nodes[i]

    def leaders(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.role == Role.LEADER]


def drain(node: RawNode) -> list[Message]:
    """Take the node's Ready without a storage behind it (unit tests on one node)."""
    rd = node.ready()
    node.advance(rd)
    return rd.messages


def single(voters: tuple[int, ...] = (1, 2, 3), node_id: int = 1, **cfg: object) -> tuple[RawNode, MemoryStorage]:
    st = make_storage(voters)
    return make_node(node_id, st, **cfg), st


# -- §5.1 / §5.2: terms and elections -----------------------------------------------------


def test_higher_term_converts_to_follower() -> None:
    """Raft §5.1, Figure 2 All Servers: a message with a higher term makes a
    leader (or candidate) adopt the term and become a follower."""
    c = Cluster(3)
    leader = c.elect(1)
    term = leader.term
    leader.step(Message(MT.APP, src=2, dst=1, term=term + 3, index=1, log_term=1))
    assert leader.role == Role.FOLLOWER
    assert leader.term == term + 3
    assert leader.lead == 2


def test_stale_term_messages_are_rejected() -> None:
    """Raft §5.1, Figure 2 AppendEntries/RequestVote rule 1: reply false if
    term < currentTerm; the stale sender learns the newer term."""
    node, _ = single()
    node.step(Message(MT.HEARTBEAT, src=2, dst=1, term=5))
    drain(node)
    node.step(Message(MT.APP, src=3, dst=1, term=4, index=1, log_term=1,
                      entries=[Entry(4, 2, b"x")]))
    msgs = drain(node)
    assert node.log.last_index() == 1  # nothing appended
    assert [(m.type, m.dst, m.term) for m in msgs] == [(MT.APP_RESP, 3, 5)]
    node.step(Message(MT.VOTE, src=3, dst=1, term=4, index=10, log_term=4))
    assert drain(node) == [] and node.vote == 0


def test_election_safety_one_leader_per_term() -> None:
    """Raft §5.2, Election Safety: at most one leader can be elected in a term,
    even when every node campaigns at once."""
    c = Cluster(5, pre_vote=False)
    for i in range(1, 6):
        c.nodes[i].campaign()  # five candidates in term 2
    c.stabilize()
    per_term: dict[int, list[int]] = {}
    for i, n in c.nodes.items():
        if n.role == Role.LEADER:
            per_term.setdefault(n.term, []).append(i)
    assert all(len(v) == 1 for v in per_term.values())
    # Every node voted for itself in the same term: nobody could win it.
    assert len({n.term for n in c.nodes.values()}) == 1
    assert all(n.vote == i for i, n in c.nodes.items())
    assert c.leaders() == []
    # The next round (one node times out first) elects exactly one leader.
    c.tick_all(2 * ET)
    assert len(c.leaders()) == 1


def test_vote_granted_once_per_term() -> None:
    """Raft §5.2, RequestVote receiver 2: vote for at most one candidate per
    term (first-come-first-served); a retry from the same candidate is granted."""
    node, _ = single(pre_vote=False)
    node.step(Message(MT.VOTE, src=2, dst=1, term=2, index=1, log_term=1))
    node.step(Message(MT.VOTE, src=3, dst=1, term=2, index=1, log_term=1))
    node.step(Message(MT.VOTE, src=2, dst=1, term=2, index=1, log_term=1))
    rd = node.ready()
    assert rd.hard_state == HardState(2, 2, 1)
    assert rd.must_sync
    assert [(m.dst, m.reject) for m in rd.messages] == [(2, False), (3, True), (2, False)]


@pytest.mark.parametrize(
    ("cand_index", "cand_term", "granted"),
    [
        (3, 2, True),   # same last term, same length
        (4, 2, True),   # same last term, longer
        (2, 2, False),  # same last term, shorter
        (1, 3, True),   # later last term wins even if shorter
        (9, 1, False),  # earlier last term loses even if longer
    ],
)
def test_vote_requires_up_to_date_log(cand_index: int, cand_term: int, granted: bool) -> None:
    """Raft §5.4.1, RequestVote receiver 2: grant only if the candidate's log is
    at least as up-to-date: later last term, or same last term and at least as long."""
    node, st = single(pre_vote=False)
    st.append([Entry(2, 2, b"a"), Entry(2, 3, b"b")])
    st.set_hard_state(HardState(2, 0, 0))
    node = make_node(1, st, pre_vote=False)
    node.step(Message(MT.VOTE, src=2, dst=1, term=3, index=cand_index, log_term=cand_term))
    (resp,) = drain(node)
    assert resp.type == MT.VOTE_RESP
    assert resp.reject is (not granted)
    assert node.vote == (2 if granted else 0)


def test_candidate_steps_down_on_append_from_leader_of_same_term() -> None:
    """Raft §5.2: a candidate that receives AppendEntries from a leader whose
    term is at least its own recognizes it and returns to follower."""
    node, _ = single(pre_vote=False)
    node.campaign()
    assert node.role == Role.CANDIDATE
    drain(node)
    node.step(Message(MT.APP, src=2, dst=1, term=node.term, index=1, log_term=1, commit=1))
    assert node.role == Role.FOLLOWER and node.lead == 2


def test_candidate_restarts_election_on_timeout() -> None:
    """Raft §5.2: if the election times out without a winner, the candidate
    increments its term and starts a new election; timeouts are randomized in
    [election_tick, 2 * election_tick)."""
    node, _ = single(pre_vote=False)
    node.campaign()
    drain(node)
    assert node.term == 2
    timeout = node.randomized_election_timeout
    assert ET <= timeout < 2 * ET
    for _ in range(timeout):
        node.tick()
    assert node.term == 3 and node.role == Role.CANDIDATE
    votes = [m for m in drain(node) if m.type == MT.VOTE]
    assert sorted(m.dst for m in votes) == [2, 3] and all(m.term == 3 for m in votes)
    seen = set()
    for seed in range(50):
        n = RawNode(Config(id=1, election_tick=ET), make_storage((1, 2, 3)), random.Random(seed))
        n._reset_randomized_timeout()
        seen.add(n.randomized_election_timeout)
    assert min(seen) >= ET and max(seen) < 2 * ET and len(seen) > 3


def test_follower_starts_election_when_no_heartbeat() -> None:
    """Raft §5.2: a follower that receives no communication over the election
    timeout begins an election (here: pre-vote first, thesis §9.6)."""
    node, _ = single()
    for _ in range(2 * ET):
        node.tick()
    assert node.role == Role.PRE_CANDIDATE
    assert node.term == 1  # a pre-vote does not bump the term
    msgs = drain(node)
    assert {m.type for m in msgs} == {MT.PRE_VOTE} and all(m.term == 2 for m in msgs)


def test_leader_heartbeats_reset_follower_timers() -> None:
    """Raft §5.2: leaders send periodic heartbeats to maintain authority; a
    follower hearing them never times out."""
    c = Cluster(3)
    c.elect(1)
    for _ in range(5 * ET):
        c.tick_all(1)
    assert c.leaders() == [1]
    assert all(n.lead == 1 for n in c.nodes.values())
    assert any(m.type == MT.HEARTBEAT for m in c.sent)


def test_new_leader_appends_noop_entry() -> None:
    """Raft §8 / thesis §6.4: a new leader commits a blank no-op entry of its
    term at the start of its term."""
    c = Cluster(3)
    leader = c.elect(1)
    last = leader.log.last_index()
    assert leader.log.term(last) == leader.term
    assert c.storage[2].entries(last, last + 1)[0].data == b""
    assert leader.log.committed == last


# -- §5.3 log replication ------------------------------------------------------------------


def test_append_consistency_check_rejects_with_hint() -> None:
    """Raft §5.3, AppendEntries receiver 2: reply false if the log has no entry
    at prevLogIndex whose term matches prevLogTerm; the reply hints where the
    logs may match so the leader can skip a term per round trip."""
    node, st = single()
    st.append([Entry(1, 2, b"a"), Entry(2, 3, b"b"), Entry(2, 4, b"c")])
    st.set_hard_state(HardState(3, 0, 1))
    node = make_node(1, st)
    # The leader thinks entry 4 has term 3: mismatch.
    node.step(Message(MT.APP, src=2, dst=1, term=3, index=4, log_term=3,
                      entries=[Entry(3, 5, b"d")]))
    (resp,) = drain(node)
    assert resp.type == MT.APP_RESP and resp.reject
    assert resp.index == 4
    assert (resp.reject_hint, resp.log_term) == (4, 2)
    assert node.log.last_index() == 4
    # Beyond our log: the hint is our last index.
    node.step(Message(MT.APP, src=2, dst=1, term=3, index=9, log_term=3))
    (resp,) = drain(node)
    assert resp.reject and resp.reject_hint == 4


def test_append_deletes_conflicting_suffix() -> None:
    """Raft §5.3, AppendEntries receiver 3 and 4: an existing entry that
    conflicts with a new one (same index, different term) is deleted with all
    that follow; new entries are appended."""
    node, st = single()
    st.append([Entry(1, 2, b"a"), Entry(2, 3, b"old3"), Entry(2, 4, b"old4")])
    st.set_hard_state(HardState(3, 0, 2))
    node = make_node(1, st)
    node.step(Message(MT.APP, src=2, dst=1, term=3, index=2, log_term=1, commit=2,
                      entries=[Entry(3, 3, b"new3")]))
    rd = node.ready()
    assert [(e.index, e.term, e.data) for e in rd.entries] == [(3, 3, b"new3")]
    assert [(m.reject, m.index) for m in rd.messages] == [(False, 3)]
    st.append(rd.entries)
    node.advance(rd)
    assert [e.data for e in st.entries(2, 4)] == [b"a", b"new3"]
    assert st.last_index() == 3


def test_append_existing_entries_not_truncated() -> None:
    """Raft §5.3, AppendEntries receiver 3: entries that already match are kept
    (a delayed, shorter AppendEntries must not truncate a longer log)."""
    node, st = single()
    st.append([Entry(2, 2, b"a"), Entry(2, 3, b"b"), Entry(2, 4, b"c")])
    st.set_hard_state(HardState(2, 0, 1))
    node = make_node(1, st)
    node.step(Message(MT.APP, src=2, dst=1, term=2, index=1, log_term=1,
                      entries=[Entry(2, 2, b"a")]))
    rd = node.ready()
    assert rd.entries == []
    assert node.log.last_index() == 4


def test_follower_commit_is_min_of_leader_commit_and_last_new() -> None:
    """Raft §5.3, AppendEntries receiver 5: commitIndex = min(leaderCommit,
    index of last new entry)."""
    node, _ = single()
    node.step(Message(MT.APP, src=2, dst=1, term=2, index=1, log_term=1, commit=10,
                      entries=[Entry(2, 2, b"a"), Entry(2, 3, b"b")]))
    assert node.log.committed == 3
    node.step(Message(MT.APP, src=2, dst=1, term=2, index=3, log_term=2, commit=3,
                      entries=[Entry(2, 4, b"c")]))
    assert node.log.committed == 3


def test_leader_commits_after_majority_persisted() -> None:
    """Raft §5.3: an entry is committed once the leader replicated it on a
    majority; the leader's own copy counts only after its Ready was persisted
    (thesis §3.8). Followers learn the commit index and apply in order."""
    c = Cluster(3)
    leader = c.elect(1)
    c.isolated = {3}
    leader.propose(b"x")
    rd = leader.ready()
    idx = rd.entries[-1].index
    assert leader.log.committed < idx
    # Follower 2 acknowledges, but the leader has not persisted yet: 1 of 3.
    for m in rd.messages:
        if m.dst == 2:
            c.nodes[2].step(m)
    for m in c.process(2):
        leader.step(m)
    assert leader.prs[2].match == idx
    # Counting follower 2 plus... nothing else: the leader's copy is not durable.
    assert leader.log.committed < idx
    c.storage[1].append(rd.entries)
    leader.advance(rd)  # now the leader's copy counts: 2 of 3
    assert leader.log.committed == idx
    c.stabilize()
    assert [e.data for e in c.applied[2] if e.data] == [b"x"]
    assert [e.data for e in c.applied[3] if e.data] == []  # isolated


def test_leader_never_commits_previous_term_entry_by_counting() -> None:
    """Raft §5.4.2 (Figure 8): a leader does not commit an entry from a previous
    term by counting replicas, even on a majority; it is committed indirectly
    once an entry of the current term is."""
    # Node 1 is leader of term 3 with an uncommitted entry 2 of term 2 in its log.
    st = make_storage((1, 2, 3))
    st.append([Entry(2, 2, b"old")])
    st.set_hard_state(HardState(2, 1, 1))
    leader = make_node(1, st, pre_vote=False)
    leader.campaign()
    leader.step(Message(MT.VOTE_RESP, src=2, dst=1, term=3))
    assert leader.role == Role.LEADER and leader.term == 3
    rd = leader.ready()
    st.append(rd.entries)
    leader.advance(rd)
    noop = leader.log.last_index()
    assert noop == 3
    # Follower 2 acknowledges entry 2 only (the old-term entry): a majority
    # (leader + 2) holds it, but it must not be committed by counting.
    leader.step(Message(MT.APP_RESP, src=2, dst=1, term=3, index=2))
    assert leader.log.committed == 1
    # Once the no-op of term 3 is on a majority, both commit.
    leader.step(Message(MT.APP_RESP, src=2, dst=1, term=3, index=3))
    assert leader.log.committed == 3


def test_figure8_previous_term_entry_not_lost() -> None:
    """Raft §5.4.2, Figure 8 replayed: an entry of term 2 that leader S1 (term 4)
    has copied to a majority must not be committed by counting; S5 (with a
    term-3 entry at that index) may still be elected and overwrite it, and no
    node ever applied the overwritten entry."""
    c = Cluster(5, pre_vote=False, check_quorum=False, max_size_per_msg=1, max_inflight_msgs=1)
    s1 = c.elect(1)  # (a) S1 leads term 2
    k = s1.log.last_index() + 1
    c.isolated = {3, 4, 5}
    s1.propose(b"x")  # entry k, term 2, reaches S2 only
    c.stabilize()
    assert c.storage[2].last_index() == k and s1.log.committed < k
    # (b) S1 crashes. S5 is elected for term 3 by S3, S4 and itself, writes
    # its no-op at index k, and crashes before sending it anywhere.
    c.restart(1)
    c.isolated = {1, 2}
    c.drop_if = lambda m: m.src == 5 and m.type == MT.APP
    s5 = c.campaign_until_leader(5)
    assert s5.term == 3 and s5.log.term(k) == 3
    c.restart(5)
    # (c) S1 is elected for term 4 and copies entry k (term 2) to S3 and S4,
    # but the term-4 no-op after it reaches only S2.
    c.isolated = {5}
    c.drop_if = lambda m: (
        m.dst in (3, 4) and m.type == MT.APP and c.nodes[m.dst].log.last_index() >= k
        and any(e.index > k for e in m.entries)
    )
    s1 = c.campaign_until_leader(1)
    assert s1.term == 4
    assert [c.nodes[i].log.term_or_zero(k) for i in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert s1.log.committed < k  # on a majority, yet never committed by counting
    # (d) S1 crashes; S5 comes back and wins term 5 (its last term 3 beats the
    # term 2 of S3 and S4), overwriting entry k.
    c.drop_if = None
    c.restart(1)
    c.isolated = {1}
    s5 = c.campaign_until_leader(5)
    assert s5.term == 5
    c.isolated = set()
    c.tick_all(3)
    final = {e.index: (e.term, e.data) for e in c.applied[5]}
    assert final[k][0] == 3
    for i, entries in c.applied.items():
        for e in entries:
            assert final.get(e.index, (e.term, e.data)) == (e.term, e.data), (i, e)


def test_leader_is_append_only() -> None:
    """Raft §5.3, Leader Append-Only (Figure 3): a leader never overwrites or
    deletes entries in its log, whatever followers reply."""
    c = Cluster(3)
    leader = c.elect(1)
    leader.propose(b"a")
    c.stabilize()
    before = [(e.index, e.term, e.data) for e in leader.log.slice(2, leader.log.last_index() + 1)]
    leader.step(Message(MT.APP_RESP, src=2, dst=1, term=leader.term, index=2, reject=True,
                        reject_hint=0, log_term=0))
    c.stabilize()
    after = [(e.index, e.term, e.data) for e in leader.log.slice(2, leader.log.last_index() + 1)]
    assert after[: len(before)] == before


def test_leader_backs_up_next_index_and_repairs_follower() -> None:
    """Raft §5.3: after a rejection the leader decrements nextIndex (skipping by
    the follower's hint) and retries until the logs match; the follower's
    conflicting entries are replaced by the leader's."""
    c = Cluster(3)
    # Follower 3 has junk from a term-2 leader that never committed.
    c.storage[3].append([Entry(2, 2, b"junk2"), Entry(2, 3, b"junk3"), Entry(2, 4, b"junk4")])
    for i in (1, 2, 3):  # everyone saw term 2; only 3 got its leader's entries
        c.storage[i].set_hard_state(HardState(2, 0, 1))
        c.nodes[i] = make_node(i, c.storage[i])
    c.isolated = {3}
    leader = c.elect(1)
    for d in (b"a", b"b", b"c", b"d", b"e"):
        leader.propose(d)
    c.stabilize()
    c.isolated = set()
    c.tick_all(2)
    assert c.nodes[3].log.last_index() == leader.log.last_index()
    assert [e.data for e in c.storage[3].entries(2, c.storage[3].last_index() + 1)] == [
        e.data for e in c.storage[1].entries(2, c.storage[1].last_index() + 1)
    ]
    assert not any(e.data.startswith(b"junk") for e in c.applied[3])


def test_replies_only_after_persistence() -> None:
    """Raft thesis §3.8 / Figure 2 "Persistent state ... updated on stable storage
    before responding to RPCs": vote and append acknowledgements are in the same
    Ready as the state they vouch for, to be sent after it is persisted."""
    node, _ = single(pre_vote=False)
    node.step(Message(MT.VOTE, src=2, dst=1, term=2, index=1, log_term=1))
    rd = node.ready()
    assert rd.hard_state is not None and rd.hard_state.vote == 2 and rd.must_sync
    assert [m.type for m in rd.messages] == [MT.VOTE_RESP]
    node.advance(rd)
    node.step(Message(MT.APP, src=2, dst=1, term=2, index=1, log_term=1,
                      entries=[Entry(2, 2, b"x")]))
    assert node.msgs  # queued, not sent: only Ready hands messages out
    rd = node.ready()
    assert [e.index for e in rd.entries] == [2] and rd.must_sync
    assert [(m.type, m.index) for m in rd.messages] == [(MT.APP_RESP, 2)]


# -- §5.4 / thesis §6, §9: pre-vote, check-quorum, lease ----------------------------------------


def test_prevote_rejoining_node_does_not_disrupt() -> None:
    """Raft thesis §9.6: a node partitioned away keeps timing out but, with
    pre-vote, never increments its term; when it rejoins, the leader and term
    are unchanged."""
    c = Cluster(3)
    leader = c.elect(1)
    term = leader.term
    c.isolated = {3}
    for _ in range(10 * ET):
        c.tick_all(1)
    assert c.nodes[3].term == term  # pre-votes failed, term never bumped
    c.isolated = set()
    c.tick_all(3 * ET)
    assert c.leaders() == [1] and all(n.term == term for n in c.nodes.values())


def test_without_prevote_rejoining_node_disrupts() -> None:
    """Raft thesis §9.6 (counterpart): without pre-vote, the partitioned node's
    term grows and its return deposes the leader — what pre-vote prevents."""
    c = Cluster(3, pre_vote=False, check_quorum=False)
    leader = c.elect(1)
    term = leader.term
    c.isolated = {3}
    for _ in range(5 * ET):
        c.tick_all(1)
    assert c.nodes[3].term > term
    c.isolated = set()
    c.tick_all(3 * ET)
    assert max(n.term for n in c.nodes.values()) > term


def test_check_quorum_leader_steps_down() -> None:
    """Raft thesis §6.2: a leader that does not hear from a majority within an
    election timeout steps down (so clients find the real leader)."""
    c = Cluster(3)
    leader = c.elect(1)
    c.isolated = {1}
    for _ in range(2 * ET + 1):
        c.tick(1)
        c.stabilize()
    assert leader.role == Role.FOLLOWER
    with pytest.raises(NotLeader):
        leader.propose(b"x")


def test_lease_follower_ignores_vote_with_live_leader() -> None:
    """Raft thesis §4.2.3: a server that heard from a current leader within the
    minimum election timeout ignores RequestVote (and keeps its term)."""
    c = Cluster(3)
    c.elect(1)
    f = c.nodes[2]
    term = f.term
    f.step(Message(MT.VOTE, src=3, dst=2, term=term + 1, index=99, log_term=99))
    assert f.term == term
    assert not [m for m in f.msgs if m.type == MT.VOTE_RESP]
    # A transfer-forced vote (TIMEOUT_NOW) overrides the lease.
    f.step(Message(MT.VOTE, src=3, dst=2, term=term + 1, index=99, log_term=99,
                   context=b"transfer"))
    assert f.term == term + 1 and f.vote == 3


# -- §4 membership ---------------------------------------------------------------------------------


def test_learner_neither_campaigns_nor_counts() -> None:
    """Raft thesis §4.2.1: a learner (non-voting member) receives the log but
    never campaigns and its acknowledgements or votes do not count toward a
    quorum."""
    c = Cluster(1, learners=(2,))
    leader = c.elect(1)
    leader.propose(b"x")
    c.stabilize()
    assert [e.data for e in c.applied[2] if e.data] == [b"x"]
    learner = c.nodes[2]
    for _ in range(5 * ET):
        learner.tick()
    assert learner.role == Role.FOLLOWER and not learner.msgs
    # A candidate in a {1,2,3} configuration does not count learner 4's vote.
    node, _ = single((1, 2, 3), pre_vote=False)
    node.learners = (4,)
    node.campaign()
    node.step(Message(MT.VOTE_RESP, src=4, dst=1, term=node.term))
    assert node.role == Role.CANDIDATE
    node.step(Message(MT.VOTE_RESP, src=2, dst=1, term=node.term))
    assert node.role == Role.LEADER


def test_conf_change_one_at_a_time() -> None:
    """Raft thesis §4.1: membership changes one server at a time; a second
    change is refused until the first is applied. A learner added and then
    promoted becomes a voter that counts for commit."""
    c = Cluster(3)
    leader = c.elect(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ProposalDropped):
        leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE, 3))
    c.storage[4] = MemoryStorage()
    c.nodes[4] = make_node(4, c.storage[4])
    c.applied[4] = []
    c.reads[4] = []
    c.stabilize()
    c.tick_all(3)
    assert leader.learners == (4,) and c.nodes[4].learners == (4,)
    assert c.nodes[4].log.last_index() == leader.log.last_index()
    leader.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, 4))
    c.stabilize()
    assert leader.voters == (1, 2, 3, 4)
    # 4 voters: a majority is 3; with 3 and 4 cut off nothing commits.
    c.isolated = {3, 4}
    before = leader.log.committed
    leader.propose(b"needs 3 of 4")
    c.stabilize()
    assert leader.log.committed == before
    c.isolated = set()
    c.tick_all(2)
    assert leader.log.committed > before


def test_leader_removed_steps_down() -> None:
    """Raft thesis §4.2.2: a leader that is removed from the configuration steps
    down once the change is committed (applied)."""
    c = Cluster(3)
    leader = c.elect(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE, 1))
    c.stabilize()
    assert leader.role == Role.FOLLOWER
    assert c.nodes[2].voters == (2, 3)
    c.tick_all(3 * ET)
    assert len(c.leaders()) == 1 and c.leaders()[0] in (2, 3)


# -- thesis §3.10 leadership transfer, §6.4 ReadIndex, §7 snapshots -------------------------------------


def test_transfer_leadership() -> None:
    """Raft thesis §3.10: the leader brings the target up to date, sends
    TimeoutNow, and the target wins an election at once (bypassing lease and
    pre-vote); proposals are refused during the transfer."""
    c = Cluster(3)
    leader = c.elect(1)
    c.isolated = {3}
    leader.propose(b"x")
    c.stabilize()
    c.isolated = set()
    leader.transfer_leadership(3)  # 3 is behind: it gets the entry first
    with pytest.raises(ProposalDropped):
        leader.propose(b"refused")
    c.stabilize()
    assert c.leaders() == [3]
    assert any(m.type == MT.TIMEOUT_NOW and m.dst == 3 for m in c.sent)
    assert c.nodes[3].term == leader.term


def test_transfer_aborted_after_election_timeout() -> None:
    """Raft thesis §3.10: if the transfer does not complete within an election
    timeout, the leader aborts it and accepts proposals again."""
    c = Cluster(3)
    leader = c.elect(1)
    c.isolated = {3}
    leader.transfer_leadership(3)
    with pytest.raises(ProposalDropped):
        leader.propose(b"x")
    c.tick_all(ET)
    assert leader.role == Role.LEADER and leader.lead_transferee == 0
    leader.propose(b"x")


def test_read_index_confirms_leadership() -> None:
    """Raft thesis §6.4: a read is served at the commit index recorded when it
    arrived, only after a heartbeat round confirms leadership with a majority,
    and not before the leader committed an entry of its term."""
    c = Cluster(3)
    leader = c.elect(1)
    leader.propose(b"x")
    c.stabilize()
    commit = leader.log.committed
    c.isolated = {2, 3}
    leader.read_index(b"r1")
    c.stabilize()
    assert c.reads[1] == []  # no majority confirmation yet
    c.isolated = set()
    c.tick_all(1)  # next heartbeat carries the read's context
    assert c.reads[1] == [ReadState(b"r1", commit)]
    # From a follower: forwarded to the leader, answered with the leader's index.
    c.nodes[2].read_index(b"r2")
    c.stabilize()
    assert c.reads[2] == [ReadState(b"r2", commit)]
    # A fresh leader must first commit its no-op.
    node, st = single(pre_vote=False)
    node.campaign()
    node.step(Message(MT.VOTE_RESP, src=2, dst=1, term=node.term))
    node.read_index(b"early")
    rd = node.ready()
    assert rd.read_states == [] and not any(m.context == b"early" for m in rd.messages)
    st.append(rd.entries)
    node.advance(rd)
    node.step(Message(MT.APP_RESP, src=2, dst=1, term=node.term, index=node.log.last_index()))
    msgs = node.ready().messages
    assert any(m.type == MT.HEARTBEAT and m.context == b"early" for m in msgs)


def test_snapshot_install_for_lagging_follower() -> None:
    """Raft §7: when the leader compacted entries a follower needs, it sends a
    snapshot (InstallSnapshot); the follower discards its log, restores the
    state, and then receives the rest normally."""
    c = Cluster(3)
    leader = c.elect(1)
    c.isolated = {3}
    for i in range(20):
        leader.propose(b"e%d" % i)
    c.stabilize()
    st = c.storage[1]
    applied = leader.log.applied
    st.create_snapshot(applied, ConfState((1, 2, 3)), b"state@%d" % applied)
    st.compact(applied)
    c.isolated = set()
    leader.propose(b"after")
    c.stabilize()
    c.tick_all(3)
    assert any(m.type == MT.SNAP and m.dst == 3 for m in c.sent)
    assert c.storage[3].snapshot().data == b"state@%d" % applied
    assert c.nodes[3].log.last_index() == leader.log.last_index()
    assert leader.prs[3].state == ProgressState.REPLICATE
    assert [e.data for e in c.applied[3]][-1] == b"after"
