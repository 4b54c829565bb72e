"""The Raft consensus core, sans-IO, in the manner of etcd-io/raft.

Theory of operation
-------------------
``RawNode`` is pure state. It has no sockets, clocks, threads or disk; the
application (the raft process, or the simulation) drives it:

* ``tick()`` advances logical time: ``election_tick`` ticks are one election
  timeout, ``heartbeat_tick`` ticks one heartbeat interval.
* ``step(msg)`` feeds a message from a peer; ``propose*``, ``read_index``,
  ``transfer_leadership``, ``campaign`` are local requests.
* ``ready()`` returns what to do (a ``Ready``: persist, then send, then apply);
  ``advance(rd)`` says it was done. Only after ``advance`` does the leader count
  its own copy of new entries toward commit (Raft §5.3, thesis §3.8: an entry is
  "replicated" on a server only once it is on stable storage there).

Roles are step functions (``_step_follower``, ``_step_candidate`` for both
pre-candidate and candidate, ``_step_leader``) and tick functions, swapped by
``_become_<role>``. ``step`` applies the term rules shared by every role first
(Figure 2, "Rules for Servers / All Servers": a higher term turns us into a
follower), then dispatches.

Beyond the paper's Figure 2:
* Pre-vote (thesis §9.6): a node first asks whether it *could* win, without
  bumping its term, so a partitioned node rejoining does not disrupt.
* Check-quorum and leader lease (thesis §6.2, §4.2.3): a leader that did not
  hear from a majority during an election timeout steps down; a node that
  heard from a leader within the election timeout ignores (pre-)votes.
* Membership changes one server at a time (thesis §4.1), applied when the
  application applies the committed CONF_CHANGE entry (as etcd does); a second
  change is refused while one is pending, and a new leader may not propose one
  before it applied everything from earlier terms (the fix for the single-server
  bug reported on raft-dev in 2015: the leader must commit an entry in its own
  term first).
* Leadership transfer (thesis §3.10): the leader brings the target up to date,
  then sends TIMEOUT_NOW; proposals are refused meanwhile.
* ReadIndex (thesis §6.4): the leader records its commit index, confirms it
  is still leader with a heartbeat round, then the read may be served once the
  state machine reached that index. Only after committing an entry of its own
  term (§6.4 step 1, and §8's no-op).
* Snapshots (§7): when a follower needs entries already compacted, the leader
  sends the storage's snapshot in one SNAP message; chunking the snapshot bytes
  on the wire is the transport's job (raft/messages.py encodes the whole
  message, raft/transport.py splits it into CHUNK_SIZE frames and reassembles
  them), the core sees one message. The transport reports the outcome with
  ``report_snapshot``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from raftmq.raft.log import RaftLog
from raftmq.raft.quorum import (
    Progress,
    ProgressState,
    VoteResult,
    committed_index,
    majority,
    tally,
)
from raftmq.raft.storage import (
    CompactedError,
    SnapshotTemporarilyUnavailableError,
    Storage,
    UnavailableError,
)
from raftmq.raft.types import (
    CONF_CHANGE,
    MT,
    NONE,
    NORMAL,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    HardState,
    Message,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SoftState,
)

logger = logging.getLogger("raftmq.raft")

_LOCAL_TYPES = frozenset((MT.HUP, MT.BEAT, MT.PROP, MT.CHECK_QUORUM, MT.TRANSFER_LEADER))
_RESP_TYPES = frozenset((MT.APP_RESP, MT.HEARTBEAT_RESP, MT.VOTE_RESP, MT.PRE_VOTE_RESP,
                         MT.READ_INDEX_RESP))

TRANSFER_CONTEXT = b"transfer"
"""Context of a vote request caused by TIMEOUT_NOW: it overrides the lease."""


class ProposalDropped(Exception):
    """The proposal was not appended (leadership transfer in progress, a conf
    change already pending, node removed, ...). Retry later or elsewhere."""


class NotLeader(ProposalDropped):
    """This node is not the leader; ``leader`` is the known leader id or 0."""

    def __init__(self, leader: int) -> None:
        super().__init__(f"not leader (leader={leader})")
        self.leader = leader


@dataclass(slots=True)
class Config:
    id: int
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_size_per_msg: int = 1 << 20
    """Byte budget of the entries in one APP message (at least one entry)."""
    max_inflight_msgs: int = 256
    """APP messages in flight per follower in REPLICATE state (pipelining)."""
    applied: int = 0
    """Last index the application applied before (re)start; must be consistent
    with the ConfState returned by ``storage.initial_state()`` (the membership
    as of that index). With MemoryStorage: the snapshot's index. Committed
    entries after it are handed out again in Ready.committed_entries."""
    max_committed_size_per_ready: int = 64 << 20
    """Byte budget of Ready.committed_entries."""


class _ReadRequest:
    __slots__ = ("index", "src", "acks")

    def __init__(self, index: int, src: int, self_id: int) -> None:
        self.index = index
        self.src = src
        self.acks = {self_id}


class RawNode:
    """One Raft member. Drive it with tick()/step(); loop ready() -> persist,
    send, apply -> advance(rd)."""

    def __init__(self, config: Config, storage: Storage, rng: random.Random) -> None:
        assert config.id != NONE, "node id must be non-zero"
        assert config.heartbeat_tick > 0 and config.election_tick > config.heartbeat_tick
        self.id = config.id
        self.cfg = config
        self._rng = rng
        self.log = RaftLog(storage)
        hs, cs = storage.initial_state()

        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.role = Role.FOLLOWER
        self.voters: tuple[int, ...] = ()
        self.learners: tuple[int, ...] = ()
        self.prs: dict[int, Progress] = {}
        self._votes: dict[int, bool] = {}
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self.lead_transferee = NONE
        self.pending_conf_index = 0
        self._reads: dict[bytes, _ReadRequest] = {}
        self._read_queue: list[bytes] = []
        self._pending_read_msgs: list[Message] = []
        self._bcast_pending = False

        self._set_conf(cs)
        assert hs.commit <= self.log.last_index(), (
            f"hard state commit {hs.commit} out of range [last {self.log.last_index()}]"
        )
        self.log.commit_to(hs.commit)
        self.term = hs.term
        self.vote = hs.vote
        if config.applied > self.log.applied:
            self.log.applied_to(min(config.applied, self.log.committed))
        self._become_follower(self.term, NONE)
        self._prev_soft = SoftState(NONE, Role.FOLLOWER)
        self._prev_hard = HardState(self.term, self.vote, self.log.committed)
        logger.info(
            "%d: started at term %d, commit %d, applied %d, last index %d, voters %s, learners %s",
            self.id, self.term, self.log.committed, self.log.applied, self.log.last_index(),
            self.voters, self.learners,
        )

    # -- public API --------------------------------------------------------------

    def tick(self) -> None:
        """One logical clock tick (election_tick ticks = one election timeout)."""
        if self.role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def step(self, msg: Message) -> None:
        """Feed a message received from a peer. Local message types are refused."""
        if msg.type in _LOCAL_TYPES:
            raise ValueError(f"cannot step local message {msg.type.name}")
        if self.role == Role.LEADER and msg.type in _RESP_TYPES and msg.src not in self.prs:
            # A response from a node no longer in the configuration.
            return
        self._step(msg)

    def propose(self, data: bytes) -> None:
        """Append ``data`` to the log (leader only). Raises NotLeader / ProposalDropped.
        Cheap: the entry goes to the in-memory unstable tail; APP messages are
        built once per ready()."""
        self._check_can_propose()
        idx = self.log.last_index() + 1
        self.log.append([Entry(self.term, idx, data)])
        self._bcast_pending = True

    def propose_many(self, datas: list[bytes]) -> None:
        """Append several entries at once (cheaper than propose() in a loop)."""
        self._check_can_propose()
        if not datas:
            return
        idx = self.log.last_index() + 1
        term = self.term
        self.log.append([Entry(term, idx + i, d) for i, d in enumerate(datas)])
        self._bcast_pending = True

    def propose_conf_change(self, cc: ConfChange) -> None:
        """Propose a membership change (thesis §4.1: one server at a time);
        refused with ProposalDropped while a previous one is not yet applied."""
        self._check_can_propose()
        if self.pending_conf_index > self.log.applied:
            raise ProposalDropped(
                f"conf change already pending (index {self.pending_conf_index} > "
                f"applied {self.log.applied})"
            )
        if cc.type == ConfChangeType.PROMOTE and cc.node_id in self.voters:
            raise ProposalDropped(f"{cc.node_id} is already a voter")
        if cc.type == ConfChangeType.ADD_LEARNER and cc.node_id in self.prs:
            raise ProposalDropped(f"{cc.node_id} is already a member")
        if cc.type == ConfChangeType.REMOVE and cc.node_id not in self.prs:
            raise ProposalDropped(f"{cc.node_id} is not a member")
        if cc.type == ConfChangeType.REMOVE and self.voters == (cc.node_id,):
            raise ProposalDropped("cannot remove the last voter")
        idx = self.log.last_index() + 1
        self.log.append([Entry(self.term, idx, cc.encode(), CONF_CHANGE)])
        self.pending_conf_index = idx
        self._bcast_pending = True

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Call when a committed CONF_CHANGE entry is applied (in log order);
        returns the new membership, which the application persists with its
        state (it is the ConfState of later snapshots)."""
        node = cc.node_id
        voters = set(self.voters)
        learners = set(self.learners)
        if cc.type == ConfChangeType.ADD_LEARNER:
            if node not in voters:  # demoting a voter is not supported
                learners.add(node)
        elif cc.type == ConfChangeType.PROMOTE:
            learners.discard(node)
            voters.add(node)
        elif cc.type == ConfChangeType.REMOVE:
            voters.discard(node)
            learners.discard(node)
        cs = ConfState(tuple(sorted(voters)), tuple(sorted(learners)))
        self._set_conf(cs)
        logger.info("%d: applied conf change %s %d -> voters %s learners %s",
                    self.id, cc.type.name, node, cs.voters, cs.learners)
        if self.role == Role.LEADER:
            if self.id not in self.voters:
                # Removed (thesis §4.2.2: the leader steps down once the
                # configuration without it is committed).
                self._become_follower(self.term, NONE)
            else:
                if self.lead_transferee != NONE and self.lead_transferee not in self.voters:
                    self._abort_leader_transfer()
                # The quorum changed: commit may advance (or a removed node no
                # longer holds it back).
                if self._maybe_commit():
                    self._bcast_append()
                else:
                    self._bcast_pending = True
        return cs

    def transfer_leadership(self, to: int) -> None:
        """Hand leadership to voter ``to`` (thesis §3.10). Leader only."""
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        self._step_leader(Message(MT.TRANSFER_LEADER, src=to))

    def read_index(self, context: bytes) -> None:
        """Request a linearizable read; a ReadState(context, index) appears in a
        later Ready once it is safe (thesis §6.4). ``context`` must be unique.
        Raises NotLeader if no leader is known (the request would be lost)."""
        m = Message(MT.READ_INDEX, src=self.id, context=context)
        if self.role == Role.LEADER:
            self._leader_read_index(m)
        elif self.lead != NONE:
            m.dst = self.lead
            self._send(m)
        else:
            raise NotLeader(NONE)

    def campaign(self) -> None:
        """Start an election now (pre-vote first if enabled)."""
        self._hup(transfer=False)

    def has_ready(self) -> bool:
        self._flush_bcast()
        log = self.log
        if self.msgs or log.unstable or log.unstable_snapshot is not None or self.read_states:
            return True
        if self._soft_state() != self._prev_soft:
            return True
        hs = self._prev_hard
        if hs.term != self.term or hs.vote != self.vote or hs.commit != log.committed:
            return True
        return min(log.committed, log.stable_last_index()) > log.applied

    def ready(self) -> Ready:
        """What to persist, send and apply now (see ``Ready``'s docs). Call
        ``advance`` with it before calling ``ready`` again."""
        self._flush_bcast()
        log = self.log
        rd = Ready()
        ss = self._soft_state()
        if ss != self._prev_soft:
            rd.soft_state = ss
            self._prev_soft = ss
        hs = self._prev_hard
        if hs.term != self.term or hs.vote != self.vote or hs.commit != log.committed:
            rd.hard_state = HardState(self.term, self.vote, log.committed)
            rd.must_sync = hs.term != self.term or hs.vote != self.vote
        if log.unstable:
            rd.entries = list(log.unstable)
            rd.must_sync = True
        if log.unstable_snapshot is not None:
            rd.snapshot = log.unstable_snapshot
            rd.must_sync = True
        hi = min(log.committed, log.stable_last_index())
        if hi > log.applied:
            rd.committed_entries = log.slice(
                log.applied + 1, hi + 1, self.cfg.max_committed_size_per_ready
            )
        if self.msgs:
            rd.messages = self.msgs
            self.msgs = []
        if self.read_states:
            rd.read_states = self.read_states
            self.read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The application persisted, sent and applied ``rd``."""
        log = self.log
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.meta.index)
            if rd.snapshot.meta.index > log.applied:
                log.applied = rd.snapshot.meta.index
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
            if self._pending_read_msgs and self._committed_in_term():
                self._release_pending_reads()
        if self.role == Role.LEADER:
            # The leader's own acknowledgement: its copy counts toward the
            # majority only once durable (thesis §3.8, §10.2.1).
            pr = self.prs.get(self.id)
            stable = log.stable_last_index()
            if pr is not None and stable > pr.match and pr.maybe_update(stable):
                if self._maybe_commit():
                    self._bcast_append()

    def status(self) -> dict:
        """A snapshot of the node's state for logs, metrics and the admin API."""
        return {
            "id": self.id,
            "term": self.term,
            "vote": self.vote,
            "role": self.role.name.lower(),
            "leader": self.lead,
            "commit": self.log.committed,
            "applied": self.log.applied,
            "last_index": self.log.last_index(),
            "first_index": self.log.first_index(),
            "voters": list(self.voters),
            "learners": list(self.learners),
            "lead_transferee": self.lead_transferee,
            "progress": {
                i: {"match": p.match, "next": p.next, "state": p.state.name.lower(),
                    "learner": p.is_learner, "recent_active": p.recent_active,
                    "inflight": len(p.inflights)}
                for i, p in sorted(self.prs.items())
            } if self.role == Role.LEADER else {},
        }

    def report_unreachable(self, node_id: int) -> None:
        """The transport failed to send to ``node_id``: stop optimistic streaming."""
        pr = self.prs.get(node_id)
        if self.role == Role.LEADER and pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def report_snapshot(self, node_id: int, success: bool) -> None:
        """The transport finished (or failed) sending a SNAP message. Must be
        called once for every SNAP sent: until then the follower is paused
        (ProgressState.SNAPSHOT), as in etcd raft."""
        pr = self.prs.get(node_id)
        if self.role != Role.LEADER or pr is None or pr.state != ProgressState.SNAPSHOT:
            return
        if not success:
            pr.pending_snapshot = 0
        pr.become_probe()
        # Wait for a heartbeat response (or the snapshot's APP_RESP) before probing.
        pr.probe_sent = True

    # -- helpers -----------------------------------------------------------------

    def _soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def _promotable(self) -> bool:
        return self.id in self.voters

    def _set_conf(self, cs: ConfState) -> None:
        self.voters = tuple(sorted(cs.voters))
        self.learners = tuple(sorted(cs.learners))
        nxt = self.log.last_index() + 1
        prs = {}
        for i in self.voters + self.learners:
            pr = self.prs.get(i)
            if pr is None:
                pr = Progress(nxt, self.cfg.max_inflight_msgs)
                pr.recent_active = True  # a new member gets a chance to be probed
            pr.is_learner = i in cs.learners
            prs[i] = pr
        self.prs = prs

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee != NONE:
            # thesis §3.10: the leader stops accepting client requests during a transfer.
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")
        if self.id not in self.prs:
            raise ProposalDropped("this node was removed from the cluster")

    def _send(self, m: Message) -> None:
        m.src = self.id
        if m.type not in (MT.VOTE, MT.VOTE_RESP, MT.PRE_VOTE, MT.PRE_VOTE_RESP):
            m.term = self.term
        self.msgs.append(m)

    def _committed_in_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    def _reset_randomized_timeout(self) -> None:
        et = self.cfg.election_tick
        self.randomized_election_timeout = et + self._rng.randrange(et)

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._abort_leader_transfer()
        self._votes = {}
        nxt = self.log.last_index() + 1
        for i, old in list(self.prs.items()):
            pr = Progress(nxt, self.cfg.max_inflight_msgs, old.is_learner)
            if i == self.id:
                pr.match = self.log.stable_last_index()
            self.prs[i] = pr
        self.pending_conf_index = 0
        self._reads = {}
        self._read_queue = []
        self._pending_read_msgs = []
        self._bcast_pending = False

    def _abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE

    # -- role transitions (one log line each) -------------------------------------------

    def _become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER
        logger.info("%d became follower at term %d (leader %d)", self.id, self.term, lead)

    def _become_pre_candidate(self) -> None:
        # Pre-vote (thesis §9.6) changes neither term nor vote.
        assert self.role != Role.LEADER
        self._votes = {}
        self.lead = NONE
        self.role = Role.PRE_CANDIDATE
        logger.info("%d became pre-candidate at term %d", self.id, self.term)

    def _become_candidate(self) -> None:
        # Figure 2, Candidates: "increment currentTerm, vote for self, reset election timer".
        assert self.role != Role.LEADER
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        logger.info("%d became candidate at term %d", self.id, self.term)

    def _become_leader(self) -> None:
        assert self.role != Role.FOLLOWER
        self._reset(self.term)
        self.lead = self.id
        self.role = Role.LEADER
        me = self.prs[self.id]
        me.become_replicate()
        me.recent_active = True
        # No conf change until everything in the log at election time is applied
        # (pending conf changes from earlier terms, and the single-server bug).
        self.pending_conf_index = self.log.last_index()
        # Raft §8 / thesis §6.4: a no-op entry of the new term, so that earlier
        # entries get committed (§5.4.2) and ReadIndex becomes possible.
        idx = self.log.last_index() + 1
        self.log.append([Entry(self.term, idx, b"", NORMAL)])
        logger.info("%d became leader at term %d", self.id, self.term)

    # -- elections ---------------------------------------------------------------------

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self._promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                self._check_quorum()
                if self.role != Role.LEADER:
                    return
            # thesis §3.10: abort a transfer that did not finish within an election timeout.
            if self.lead_transferee != NONE:
                self._abort_leader_transfer()
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _check_quorum(self) -> None:
        """thesis §6.2: step down if a majority was not heard from during the
        last election timeout."""
        active = 0
        for i in self.voters:
            pr = self.prs[i]
            if i == self.id or pr.recent_active:
                active += 1
        for i, pr in self.prs.items():
            pr.recent_active = i == self.id
        if active < majority(len(self.voters)):
            logger.warning("%d stepped down: quorum not active (check-quorum)", self.id)
            self._become_follower(self.term, NONE)

    def _has_unapplied_conf_changes(self) -> bool:
        log = self.log
        if log.applied >= log.committed:
            return False
        try:
            ents = log.slice(log.applied + 1, log.committed + 1)
        except (CompactedError, UnavailableError):
            return True
        return any(e.kind == CONF_CHANGE for e in ents)

    def _hup(self, transfer: bool) -> None:
        if self.role == Role.LEADER or not self._promotable():
            return
        if self._has_unapplied_conf_changes():
            # Our idea of the configuration may be stale: do not campaign (etcd).
            logger.info("%d cannot campaign: committed conf change not yet applied", self.id)
            return
        if self.cfg.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            mtype = MT.PRE_VOTE
            term = self.term + 1  # the term we would stand for, not yet adopted
        else:
            self._become_candidate()
            mtype = MT.VOTE
            term = self.term
        if self._poll(self.id, True) == VoteResult.WON:
            # Single voter: won at once.
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        ctx = TRANSFER_CONTEXT if transfer else b""
        for v in self.voters:
            if v == self.id:
                continue
            self._send(Message(mtype, dst=v, term=term, index=last_index,
                               log_term=last_term, context=ctx))

    def _poll(self, node: int, granted: bool) -> VoteResult:
        self._votes.setdefault(node, granted)
        return tally(self.voters, self._votes)

    def _handle_vote_request(self, m: Message) -> None:
        resp = MT.VOTE_RESP if m.type == MT.VOTE else MT.PRE_VOTE_RESP
        # Figure 2, RequestVote receiver: grant if
        #   (1) we already voted for this candidate in this term (a retry), or
        #   (2) we have not voted in this term and know no leader, or
        #   (3) it is a pre-vote for a future term (thesis §9.6: a pre-vote
        #       changes nothing, so it needs no exclusivity);
        # and (4) the candidate's log is at least as up-to-date as ours (§5.4.1).
        can_vote = (
            self.vote == m.src
            or (self.vote == NONE and self.lead == NONE)
            or (m.type == MT.PRE_VOTE and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(Message(resp, dst=m.src, term=m.term))
            if m.type == MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.src  # persisted (Ready.hard_state) before the reply leaves
        else:
            self._send(Message(resp, dst=m.src, term=self.term, reject=True))

    # -- step -----------------------------------------------------------------------------

    def _step(self, m: Message) -> None:
        # Figure 2, All Servers: "If RPC request or response contains term T >
        # currentTerm: set currentTerm = T, convert to follower".
        if m.term == 0:
            pass  # local message
        elif m.term > self.term:
            if m.type in (MT.VOTE, MT.PRE_VOTE):
                force = m.context == TRANSFER_CONTEXT
                in_lease = (
                    self.cfg.check_quorum
                    and self.lead != NONE
                    and self.election_elapsed < self.cfg.election_tick
                )
                if not force and in_lease:
                    # Leader lease (thesis §4.2.3, §6.2): we heard from a leader
                    # within the minimum election timeout: ignore, do not bump
                    # the term, so a rejoining node cannot disrupt.
                    return
            if m.type == MT.PRE_VOTE:
                pass  # never change term on a pre-vote request
            elif m.type == MT.PRE_VOTE_RESP and not m.reject:
                pass  # a granted pre-vote carries the future term we asked for
            elif m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (MT.APP, MT.HEARTBEAT):
                # A stale leader (e.g. after a partition, whose term we passed
                # through pre-vote-less elections or lease rules): tell it our
                # term so it steps down instead of staying stuck.
                self._send(Message(MT.APP_RESP, dst=m.src))
            elif m.type == MT.PRE_VOTE:
                self._send(Message(MT.PRE_VOTE_RESP, dst=m.src, term=self.term, reject=True))
            return  # Figure 2: "reply false if term < currentTerm" / ignore stale responses

        if m.type == MT.HUP:
            self._hup(transfer=False)
        elif m.type in (MT.VOTE, MT.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MT.APP:
            self.election_elapsed = 0
            self.lead = m.src
            self._handle_append(m)
        elif t == MT.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.src
            self._handle_heartbeat(m)
        elif t == MT.SNAP:
            self.election_elapsed = 0
            self.lead = m.src
            self._handle_snapshot(m)
        elif t == MT.TIMEOUT_NOW:
            # thesis §3.10: start an election at once, skipping pre-vote.
            logger.info("%d received TIMEOUT_NOW from %d: campaigning", self.id, m.src)
            self._hup(transfer=True)
        elif t == MT.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.context, m.index))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        # A candidate discovering the current leader of its term steps down (§5.2).
        if t == MT.APP:
            self._become_follower(m.term, m.src)
            self._handle_append(m)
        elif t == MT.HEARTBEAT:
            self._become_follower(m.term, m.src)
            self._handle_heartbeat(m)
        elif t == MT.SNAP:
            self._become_follower(m.term, m.src)
            self._handle_snapshot(m)
        elif (t == MT.PRE_VOTE_RESP and self.role == Role.PRE_CANDIDATE) or (
            t == MT.VOTE_RESP and self.role == Role.CANDIDATE
        ):
            res = self._poll(m.src, not m.reject)
            if res == VoteResult.WON:
                if self.role == Role.PRE_CANDIDATE:
                    self._campaign(pre=False, transfer=False)
                else:
                    self._become_leader()
                    self._bcast_append()
            elif res == VoteResult.LOST:
                self._become_follower(self.term, NONE)

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MT.APP_RESP:
            self._leader_app_resp(m)
        elif t == MT.HEARTBEAT_RESP:
            self._leader_heartbeat_resp(m)
        elif t == MT.READ_INDEX:
            self._leader_read_index(m)
        elif t == MT.TRANSFER_LEADER:
            self._leader_transfer(m.src)
        elif t in (MT.APP, MT.HEARTBEAT, MT.SNAP):
            # Election Safety (§5.2) makes this impossible at the same term.
            raise AssertionError(f"{self.id}: two leaders in term {self.term}: {m.src}")

    # -- follower side of replication -----------------------------------------------------

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            self._send(Message(MT.APP_RESP, dst=m.src, index=log.committed))
            return
        last_new = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(Message(MT.APP_RESP, dst=m.src, index=last_new))
            return
        # Figure 2 AppendEntries rule 2 failed. Hint where our logs may match:
        # the last index <= prevLogIndex whose term <= prevLogTerm (so the
        # leader skips a whole conflicting term per round trip, §5.3 end).
        hint = min(m.index, log.last_index())
        hint, hint_term = log.find_conflict_by_term(hint, m.log_term)
        self._send(Message(MT.APP_RESP, dst=m.src, index=m.index, reject=True,
                           reject_hint=hint, log_term=hint_term))

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._send(Message(MT.HEARTBEAT_RESP, dst=m.src, context=m.context))

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        assert snap is not None
        if self._restore(snap):
            logger.info("%d restored snapshot at index %d term %d from %d",
                        self.id, snap.meta.index, snap.meta.term, m.src)
            self._send(Message(MT.APP_RESP, dst=m.src, index=self.log.last_index()))
        else:
            self._send(Message(MT.APP_RESP, dst=m.src, index=self.log.committed))

    def _restore(self, snap: Snapshot) -> bool:
        log = self.log
        meta = snap.meta
        if meta.index <= log.committed:
            return False
        if log.match_term(meta.index, meta.term):
            # We have the snapshot's last entry: just commit up to it (§7 rule 6).
            log.commit_to(meta.index)
            return False
        log.restore(snap)  # §7 rule 7: discard the entire log
        self.prs = {}
        self._set_conf(meta.conf_state)
        return True

    # -- leader side ---------------------------------------------------------------------

    def _maybe_commit(self) -> bool:
        match = {i: pr.match for i, pr in self.prs.items()}
        mci = committed_index(self.voters, match)
        # §5.4.2: only an entry of the current term commits by counting.
        ok = self.log.maybe_commit(mci, self.term)
        if ok and self._pending_read_msgs and self._committed_in_term():
            self._release_pending_reads()
        return ok

    def _flush_bcast(self) -> None:
        if self._bcast_pending:
            self._bcast_pending = False
            if self.role == Role.LEADER:
                for i in self.prs:
                    if i != self.id:
                        while self._send_append(i, send_if_empty=False):
                            pass

    def _bcast_append(self) -> None:
        self._bcast_pending = False
        for i in self.prs:
            if i != self.id:
                self._send_append(i, send_if_empty=True)
                while self._send_append(i, send_if_empty=False):
                    pass

    def _send_append(self, to: int, send_if_empty: bool) -> bool:
        pr = self.prs[to]
        if pr.is_paused():
            return False
        log = self.log
        prev = pr.next - 1
        try:
            prev_term = log.term(prev)
            ents = log.entries_from(pr.next, self.cfg.max_size_per_msg)
        except CompactedError:
            return self._send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        self._send(Message(MT.APP, dst=to, index=prev, log_term=prev_term,
                           entries=ents, commit=log.committed))
        if ents:
            pr.sent_entries(ents[-1].index)
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            return False
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailableError:
            return False
        assert not snap.is_empty(), "need a non-empty snapshot"
        logger.info("%d sending snapshot at index %d to %d (next %d < first %d)",
                    self.id, snap.meta.index, to, pr.next, self.log.first_index())
        pr.become_snapshot(snap.meta.index)
        self._send(Message(MT.SNAP, dst=to, snapshot=snap))
        return True

    def _bcast_heartbeat(self, ctx: bytes = b"") -> None:
        if not ctx and self._read_queue:
            ctx = self._read_queue[-1]
        committed = self.log.committed
        for i, pr in self.prs.items():
            if i == self.id:
                continue
            # Never tell a follower to commit beyond what it is known to hold.
            self._send(Message(MT.HEARTBEAT, dst=i, commit=min(pr.match, committed), context=ctx))

    def _leader_app_resp(self, m: Message) -> None:
        pr = self.prs.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.src, send_if_empty=True)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.free_inflights_to(m.index)
        if self._maybe_commit():
            self._bcast_append()
        elif was_paused:
            self._send_append(m.src, send_if_empty=True)
        while self._send_append(m.src, send_if_empty=False):
            pass
        if m.src == self.lead_transferee and pr.match == self.log.last_index():
            self._send_timeout_now(m.src)

    def _leader_heartbeat_resp(self, m: Message) -> None:
        pr = self.prs.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        pr.probe_sent = False
        last = self.log.last_index()
        if pr.state == ProgressState.REPLICATE:
            # An APP lost on the way leaves a gap the follower never reports:
            # if match did not move over a whole heartbeat interval while
            # entries are outstanding, fall back to probing (retransmit).
            if pr.match < last and pr.match == pr.hb_match:
                pr.become_probe()
            pr.hb_match = pr.match
        if pr.match < last:
            self._send_append(m.src, send_if_empty=True)
        if m.context and m.context in self._reads:
            self._read_ack(m.src, m.context)

    def _leader_transfer(self, target: int) -> None:
        if target == self.id or target not in self.voters:
            logger.info("%d ignoring leadership transfer to %d", self.id, target)
            return
        if self.lead_transferee == target:
            return
        self._abort_leader_transfer()
        logger.info("%d transferring leadership to %d at term %d", self.id, target, self.term)
        self.lead_transferee = target
        # The transfer must finish within one election timeout (thesis §3.10).
        self.election_elapsed = 0
        if self.prs[target].match == self.log.last_index():
            self._send_timeout_now(target)
        else:
            self._send_append(target, send_if_empty=True)

    def _send_timeout_now(self, to: int) -> None:
        self._send(Message(MT.TIMEOUT_NOW, dst=to))

    # -- ReadIndex (thesis §6.4) -----------------------------------------------------------

    def _leader_read_index(self, m: Message) -> None:
        if len(self.voters) == 1 and self.voters[0] == self.id:
            self._answer_read(m.src, m.context, self.log.committed)
            return
        if not self._committed_in_term():
            # §6.4 step 1: wait for the no-op of this term to commit, so the
            # commit index is at least that of any earlier leader.
            self._pending_read_msgs.append(m)
            return
        ctx = m.context
        if ctx in self._reads:
            return
        # §6.4 step 2: record the commit index; step 3: confirm leadership
        # with a round of heartbeats carrying the request's context.
        self._reads[ctx] = _ReadRequest(self.log.committed, m.src, self.id)
        self._read_queue.append(ctx)
        self._bcast_heartbeat(ctx)

    def _release_pending_reads(self) -> None:
        msgs, self._pending_read_msgs = self._pending_read_msgs, []
        for m in msgs:
            self._leader_read_index(m)

    def _read_ack(self, node: int, ctx: bytes) -> None:
        req = self._reads[ctx]
        req.acks.add(node)
        if sum(1 for v in self.voters if v in req.acks) < majority(len(self.voters)):
            return
        # A majority confirmed we were leader when ctx was sent: this request and
        # every earlier one are safe (they were sent before).
        while self._read_queue:
            c = self._read_queue.pop(0)
            r = self._reads.pop(c)
            self._answer_read(r.src, c, r.index)
            if c == ctx:
                break

    def _answer_read(self, src: int, ctx: bytes, index: int) -> None:
        if src in (NONE, self.id):
            self.read_states.append(ReadState(ctx, index))
        else:
            self._send(Message(MT.READ_INDEX_RESP, dst=src, index=index, context=ctx))
