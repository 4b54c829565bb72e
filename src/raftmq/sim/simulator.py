"""The deterministic simulation: a Raft cluster of RawNodes under faults.

One seed drives everything (options.swarm draws the knobs; sub-RNGs for the
network, the nodes' election timers and the fault/workload scheduler are
derived from it), time is a step counter, and nothing depends on wall-clock
time or hash order, so a seed replays exactly.

Disk fault model (per node): the node's ``MemoryStorage`` is its disk. A
``Ready`` is written to it only when its simulated write completes
(``disk_delay`` steps after ``ready()``); messages are sent and entries applied
only then. A crash discards the node's memory (RawNode, key-value state,
pending client requests) and the Ready being written: exactly what was
persisted survives, as with fsync.

Phases: a fault phase (loss, duplication, delay, partitions, crashes and
restarts, clock skew, membership changes, leadership transfers, snapshots and
compaction, client traffic), checking the safety invariants after every
step; then everything heals and the cluster must elect a leader and converge
within the liveness budget; finally the client history must be linearizable.
"""

from __future__ import annotations

import json
import logging
import random
import traceback
from dataclasses import dataclass, field

from raftmq.raft.core import Config, NotLeader, ProposalDropped, RawNode
from raftmq.raft.storage import MemoryStorage
from raftmq.raft.types import (
    CONF_CHANGE,
    MT,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    Message,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)
from raftmq.sim.checker import SafetyChecker, Violation, term_at
from raftmq.sim.linearizability import Op, check
from raftmq.sim.network import Network
from raftmq.sim.options import Options

logger = logging.getLogger("raftmq.sim")

_LEADER_EARLY = frozenset((MT.APP, MT.HEARTBEAT, MT.SNAP))


@dataclass
class SimNode:
    id: int
    storage: MemoryStorage
    tick_len: int
    rng_seed: int
    raw: RawNode | None = None
    kv: dict[str, str] = field(default_factory=dict)
    applied: int = 0
    conf: ConfState = field(default_factory=ConfState)
    pending_ready: Ready | None = None
    ready_done_at: int = 0
    next_tick_at: int = 0
    restart_at: int | None = None
    removed: bool = False
    incarnation: int = 0
    last_commit: int = 0
    commit_incarnation: int = 0
    proposals: dict[str, int] = field(default_factory=dict)  # tag -> client
    read_requests: dict[bytes, int] = field(default_factory=dict)  # ctx -> client
    waiting_reads: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.raw is not None


@dataclass
class Client:
    id: int
    seq: int = 0
    op: Op | None = None
    tag: str = ""
    deadline: int = 0
    leader_hint: int = 0


class Simulation:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        master = random.Random(opts.seed)
        self.rng = random.Random(master.getrandbits(64))  # scheduler: faults, workload
        self.net = Network(random.Random(master.getrandbits(64)), opts.loss, opts.duplicate,
                           opts.delay_min, opts.delay_max)
        self._node_seeds = random.Random(master.getrandbits(64))
        self.now = 0
        self.event = 0  # global event counter: the clients' real-time order
        self.checker = SafetyChecker()
        self.nodes: dict[int, SimNode] = {}
        self.next_id = opts.nodes + 1
        initial = ConfState(tuple(range(1, opts.nodes + 1)))
        for i in range(1, opts.nodes + 1):
            st = MemoryStorage()
            # Bootstrap: every initial member starts from the same snapshot at
            # index 1 holding the initial configuration.
            st.apply_snapshot(Snapshot(SnapshotMeta(1, 1, initial), b""))
            self._add_node(i, st)
        self.clients = [Client(c) for c in range(1, opts.client_count + 1)]
        self.history: list[Op] = []
        self.partition_until = 0
        self.doomed: dict[int, tuple[int, int]] = {}  # node -> (term, crash at step)
        self.faults = True
        self.stats = {"crashes": 0, "restarts": 0, "partitions": 0, "conf_changes": 0,
                      "transfers": 0, "snapshots": 0, "ops_ok": 0, "ops_timeout": 0,
                      "reads_index": 0, "leaders": 0}

    # -- nodes ---------------------------------------------------------------------

    def _add_node(self, node_id: int, storage: MemoryStorage) -> SimNode:
        tick_len = self.rng.randint(self.opts.tick_min, self.opts.tick_max)
        n = SimNode(node_id, storage, tick_len, self._node_seeds.getrandbits(64))
        n.next_tick_at = self.rng.randint(1, tick_len)
        self.nodes[node_id] = n
        self._start(n)
        return n

    def _start(self, n: SimNode) -> None:
        snap = n.storage.snapshot()
        n.incarnation += 1
        cfg = Config(
            id=n.id,
            election_tick=self.opts.election_tick,
            heartbeat_tick=1,
            max_size_per_msg=self.opts.max_size_per_msg,
            max_inflight_msgs=self.opts.max_inflight_msgs,
            applied=snap.meta.index,
        )
        n.raw = RawNode(cfg, n.storage, random.Random(n.rng_seed + n.incarnation))
        n.kv = json.loads(snap.data) if snap.data else {}
        n.applied = snap.meta.index
        n.conf = snap.meta.conf_state
        n.pending_ready = None
        n.restart_at = None

    def _crash(self, n: SimNode) -> None:
        n.raw = None
        n.pending_ready = None  # the write in progress is lost
        n.kv = {}
        n.proposals.clear()
        n.read_requests.clear()
        n.waiting_reads.clear()

    # -- main loop --------------------------------------------------------------------

    def run(self) -> None:
        opts = self.opts
        for _ in range(opts.steps):
            self._step()
        self._heal()
        deadline = self.now + opts.liveness_budget
        probe_tag = None
        while self.now < deadline:
            self._step()
            leader = self._stable_leader()
            if leader is None:
                continue
            if probe_tag is None:
                try:
                    leader.raw.propose(b"probe")
                    probe_tag = "probe"
                except ProposalDropped:
                    continue
            if self._converged(leader):
                self._check_final_logs(leader)
                return
        self._fail_liveness()

    def _check_final_logs(self, leader: SimNode) -> None:
        """After convergence every member's log equals the leader's over the
        range both still hold (Log Matching, checked whole once more)."""
        ref = leader.raw.log
        for m in self._members(leader):
            lg = m.raw.log
            lo = max(ref.first_index(), lg.first_index())
            hi = min(ref.last_index(), lg.last_index())
            if lg.last_index() != ref.last_index():
                raise Violation(f"final logs: node {m.id} last index {lg.last_index()}, "
                                f"leader {leader.id} {ref.last_index()}")
            for a, b in zip(ref.slice(lo, hi + 1), lg.slice(lo, hi + 1), strict=True):
                if (a.term, a.data, a.kind) != (b.term, b.data, b.kind):
                    raise Violation(f"final logs: node {m.id} differs from leader "
                                    f"{leader.id} at index {a.index}")

    def _step(self) -> None:
        self.now += 1
        now = self.now
        if self.faults:
            self._faults()
        for m in self.net.deliver_due(now, self._deliver):
            if m.type == MT.SNAP:
                self._report_snapshot(m, False)
        for i in sorted(self.nodes):
            n = self.nodes[i]
            if n.raw is None:
                if n.restart_at is not None and now >= n.restart_at and not n.removed:
                    self.stats["restarts"] += 1
                    logger.info("t=%d restart node %d", now, i)
                    self._start(n)
                continue
            if now >= n.next_tick_at:
                n.next_tick_at = now + n.tick_len
                n.raw.tick()
        self._clients()
        for i in sorted(self.nodes):
            n = self.nodes[i]
            if n.raw is not None:
                self._process_ready(n)
        self._check()

    def _deliver(self, m: Message) -> bool:
        dst = self.nodes.get(m.dst)
        ok = dst is not None and dst.raw is not None
        if ok:
            dst.raw.step(m)
        if ok and m.type == MT.SNAP:
            self._report_snapshot(m, True)
        return ok

    def _report_snapshot(self, m: Message, ok: bool) -> None:
        # The transport tells the sender how the snapshot went.
        src = self.nodes.get(m.src)
        if src is not None and src.raw is not None:
            src.raw.report_snapshot(m.dst, ok)

    def _process_ready(self, n: SimNode) -> None:
        raw = n.raw
        if n.pending_ready is None:
            if not raw.has_ready():
                return
            rd = n.pending_ready = raw.ready()
            n.ready_done_at = self.now + self.rng.randint(0, self.opts.disk_delay_max)
            if self.opts.leader_early_send and rd.messages:
                # Thesis §10.2.1: a leader may replicate while it writes its own
                # disk; its own copy counts only after advance(). Only leaders
                # produce these types. Everything else waits for the write.
                keep = []
                for m in rd.messages:
                    if m.type in _LEADER_EARLY:
                        self._send(raw, m)
                    else:
                        keep.append(m)
                rd.messages = keep
        if self.now < n.ready_done_at:
            return
        rd = n.pending_ready
        n.pending_ready = None
        st = n.storage
        # 1. persist (atomically, "fsynced")
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        if rd.entries:
            first = rd.entries[0].index
            prev_term = 0 if first == 1 else term_at_storage(st, first - 1)
            if prev_term is not None:
                self.checker.observe_persisted(n.id, rd.entries, prev_term)
            st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        # 2. send
        for m in rd.messages:
            self._send(raw, m)
        # 3. apply
        if rd.snapshot is not None:
            snap = rd.snapshot
            n.kv = json.loads(snap.data) if snap.data else {}
            n.applied = snap.meta.index
            n.conf = snap.meta.conf_state
        for e in rd.committed_entries:
            self._apply(n, e)
        for rs in rd.read_states:
            if rs.context in n.read_requests:
                n.waiting_reads.append((rs.index, rs.context))
        self._serve_reads(n)
        raw.advance(rd)

    def _send(self, raw: RawNode, m: Message) -> None:
        if not self.net.send(self.now, m) and m.type == MT.SNAP:
            raw.report_snapshot(m.dst, False)  # the transport saw the send fail

    def _apply(self, n: SimNode, e: Entry) -> None:
        if e.index != n.applied + 1:
            raise Violation(f"node {n.id} applied index {e.index} after {n.applied}")
        self.checker.observe_apply(n.id, e)
        n.applied = e.index
        if e.kind == CONF_CHANGE:
            cc = ConfChange.decode(e.data)
            n.conf = n.raw.apply_conf_change(cc)
            if cc.type == ConfChangeType.REMOVE and cc.node_id in self.nodes:
                gone = self.nodes[cc.node_id]
                if not gone.removed:
                    # The operator decommissions the server once its removal committed.
                    gone.removed = True
                    logger.info("t=%d node %d removed", self.now, cc.node_id)
            return
        if not e.data or e.data == b"probe":
            return
        parts = e.data.decode().split(" ")
        kind, client, seq, key = parts[0], int(parts[1]), int(parts[2]), parts[3]
        result = None
        if kind == "P":
            n.kv[key] = parts[4]
        else:
            result = n.kv.get(key)
        tag = f"{client} {seq}"
        if n.proposals.pop(tag, None) is not None:
            self._complete(client, tag, result)

    def _serve_reads(self, n: SimNode) -> None:
        if not n.waiting_reads:
            return
        keep = []
        for index, ctx in n.waiting_reads:
            if index <= n.applied:
                client = n.read_requests.pop(ctx, None)
                if client is None:
                    continue  # a duplicated response already served it
                c = self.clients[client - 1]
                if c.op is not None and c.tag == ctx.decode():
                    self._complete(client, c.tag, n.kv.get(c.op.key))
            else:
                keep.append((index, ctx))
        n.waiting_reads = keep

    # -- clients ----------------------------------------------------------------------

    def _complete(self, client: int, tag: str, result: str | None) -> None:
        c = self.clients[client - 1]
        if c.op is None or c.tag != tag:
            return  # timed out already
        self.event += 1
        if c.op.kind == "get":
            c.op.value = result
        c.op.ret = self.event
        c.op = None
        self.stats["ops_ok"] += 1

    def _clients(self) -> None:
        opts = self.opts
        for c in self.clients:
            if c.op is not None:
                if self.now > c.deadline:
                    c.op = None
                    self.stats["ops_timeout"] += 1
                continue
            if not self.faults or self.rng.random() >= opts.client_rate:
                continue
            up = [n for i, n in sorted(self.nodes.items()) if n.raw is not None and not n.removed]
            if not up:
                continue
            target = self.nodes.get(c.leader_hint)
            if target is None or target.raw is None or self.rng.random() < 0.2:
                target = self.rng.choice(up)
            key = f"k{self.rng.randrange(opts.keys)}"
            c.seq += 1
            tag = f"{c.id} {c.seq}"
            is_get = self.rng.random() < 0.5
            try:
                if is_get and self.rng.random() < opts.read_index_ratio:
                    target.raw.read_index(tag.encode())
                    target.read_requests[tag.encode()] = c.id
                    self.stats["reads_index"] += 1
                elif is_get:
                    target.raw.propose(f"G {tag} {key}".encode())
                    target.proposals[tag] = c.id
                else:
                    value = f"v{c.id}.{c.seq}"
                    target.raw.propose(f"P {tag} {key} {value}".encode())
                    target.proposals[tag] = c.id
            except NotLeader as e:
                c.leader_hint = e.leader
                continue
            except ProposalDropped:
                continue
            self.event += 1
            c.op = Op(c.id, "get" if is_get else "put", key,
                      None if is_get else f"v{c.id}.{c.seq}", self.event)
            c.tag = tag
            c.deadline = self.now + opts.client_timeout
            c.leader_hint = target.id
            self.history.append(c.op)

    # -- faults and operator actions ----------------------------------------------------------

    def _faults(self) -> None:
        rng = self.rng
        opts = self.opts
        now = self.now
        live_ids = [i for i, n in sorted(self.nodes.items()) if not n.removed]
        if self.net.blocked and now >= self.partition_until:
            logger.info("t=%d heal partition", now)
            self.net.heal()
        elif not self.net.blocked and rng.random() < opts.partition_rate and len(live_ids) > 1:
            self.net.partition(live_ids)
            self.partition_until = now + rng.randint(1, opts.partition_len_max)
            self.stats["partitions"] += 1
            logger.info("t=%d partition: %s", now, self.net.partition_desc)
        if rng.random() < opts.crash_rate:
            up = [i for i in live_ids if self.nodes[i].raw is not None]
            if up:
                victim = self.nodes[rng.choice(up)]
                self._crash(victim)
                victim.restart_at = now + rng.randint(1, opts.restart_delay_max)
                self.stats["crashes"] += 1
                logger.info("t=%d crash node %d", now, victim.id)
        for node_id, (term, at) in list(self.doomed.items()):
            n = self.nodes[node_id]
            if n.raw is None or n.raw.term != term:
                del self.doomed[node_id]
            elif now >= at:
                del self.doomed[node_id]
                self._crash(n)
                n.restart_at = now + rng.randint(1, opts.restart_delay_max)
                self.stats["crashes"] += 1
                logger.info("t=%d crash new leader %d of term %d", now, node_id, term)
        leader = self._any_leader()
        if leader is not None and rng.random() < opts.leader_crash_rate:
            self._crash(leader)
            leader.restart_at = now + rng.randint(1, opts.restart_delay_max)
            self.stats["crashes"] += 1
            logger.info("t=%d crash leader %d", now, leader.id)
            leader = None
        if leader is not None and rng.random() < opts.conf_change_rate:
            self._conf_change(leader)
        if leader is not None and rng.random() < opts.transfer_rate:
            others = [v for v in leader.raw.voters if v != leader.id]
            if others:
                to = rng.choice(others)
                self.stats["transfers"] += 1
                logger.info("t=%d transfer leadership %d -> %d", now, leader.id, to)
                leader.raw.transfer_leadership(to)
        if rng.random() < opts.snapshot_rate:
            self._snapshot(self.nodes[rng.choice(live_ids)])

    def _conf_change(self, leader: SimNode) -> None:
        raw = leader.raw
        rng = self.rng
        choices = []
        for lid in raw.learners:
            pr = raw.prs[lid]
            if pr.match >= raw.log.committed:
                choices.append(ConfChange(ConfChangeType.PROMOTE, lid))
        max_voters = self.opts.nodes + 2
        if not raw.learners and len(raw.voters) < max_voters:
            choices.append(ConfChange(ConfChangeType.ADD_LEARNER, self.next_id))
        if len(raw.voters) > 3 or (len(raw.voters) > 1 and rng.random() < 0.1 and len(raw.voters) > self.opts.nodes):
            choices.append(ConfChange(ConfChangeType.REMOVE, rng.choice(raw.voters)))
        if not choices:
            return
        cc = rng.choice(choices)
        try:
            raw.propose_conf_change(cc)
        except ProposalDropped:
            return
        self.stats["conf_changes"] += 1
        logger.info("t=%d propose %s %d via %d", self.now, cc.type.name, cc.node_id, leader.id)
        if cc.type == ConfChangeType.ADD_LEARNER:
            self.next_id += 1
            self._add_node(cc.node_id, MemoryStorage())

    def _snapshot(self, n: SimNode) -> None:
        if n.raw is None:
            return
        st = n.storage
        if n.applied <= st.snapshot().meta.index or n.applied > st.last_index():
            return
        data = json.dumps(n.kv, sort_keys=True).encode()
        st.create_snapshot(n.applied, n.conf, data)
        keep = self.rng.randint(0, 20)
        compact_to = n.applied - keep
        if compact_to >= st.first_index():
            st.compact(compact_to)
        self.stats["snapshots"] += 1
        logger.info("t=%d node %d snapshot at %d, compacted to %d", self.now, n.id, n.applied,
                    compact_to)

    def _heal(self) -> None:
        logger.info("t=%d heal everything, liveness phase", self.now)
        self.faults = False
        self.net.heal()
        self.net.loss = 0.0
        self.net.duplicate = 0.0
        for _, n in sorted(self.nodes.items()):
            if n.raw is None and not n.removed:
                n.restart_at = self.now

    # -- checks --------------------------------------------------------------------------

    def _any_leader(self) -> SimNode | None:
        best = None
        for _, n in sorted(self.nodes.items()):
            if n.raw is not None and n.raw.role == Role.LEADER and not n.removed:
                if best is None or n.raw.term > best.raw.term:
                    best = n
        return best

    def _check(self) -> None:
        for _, n in sorted(self.nodes.items()):
            raw = n.raw
            if raw is None:
                continue
            # Within one incarnation commit never goes back; applied <= commit.
            commit = raw.log.committed
            if commit < n.last_commit and n.commit_incarnation == n.incarnation:
                raise Violation(f"node {n.id} commit index went back {n.last_commit} -> {commit}")
            if n.applied > commit:
                raise Violation(f"node {n.id} applied {n.applied} > commit {commit}")
            n.last_commit = commit
            n.commit_incarnation = n.incarnation
            if raw is not None and raw.role == Role.LEADER:
                if raw.term not in self.checker.leaders:
                    self.stats["leaders"] += 1
                    if self.faults and self.rng.random() < self.opts.new_leader_crash:
                        at = self.now + self.rng.randint(1, 2 * self.opts.delay_max + 2)
                        self.doomed[n.id] = (raw.term, at)
                self.checker.observe_leader(n.id, raw.term, raw.log)

    def _members(self, leader: SimNode) -> list[SimNode]:
        return [self.nodes[i] for i in leader.raw.voters + leader.raw.learners if i in self.nodes]

    def _stable_leader(self) -> SimNode | None:
        leader = self._any_leader()
        if leader is None:
            return None
        for m in self._members(leader):
            if m.raw is None or m.raw.lead != leader.id or m.raw.term != leader.raw.term:
                return None
        return leader

    def _converged(self, leader: SimNode) -> bool:
        raw = leader.raw
        last = raw.log.last_index()
        if raw.log.committed != last or raw.log.term(last) != raw.term:
            return False
        return all(m.applied == last and m.pending_ready is None for m in self._members(leader))

    def _fail_liveness(self) -> None:
        lines = []
        for i, n in sorted(self.nodes.items()):
            if n.raw is None:
                lines.append(f"  node {i}: down removed={n.removed}")
            else:
                s = n.raw.status()
                lines.append(
                    f"  node {i}: {s['role']} term={s['term']} lead={s['leader']} "
                    f"commit={s['commit']} applied={n.applied} last={s['last_index']} "
                    f"voters={s['voters']} learners={s['learners']} progress={s['progress']}"
                )
        raise Violation("liveness: the healed cluster did not converge within "
                        f"{self.opts.liveness_budget} steps\n" + "\n".join(lines))

    def check_history(self) -> None:
        err = check(self.history)
        if err:
            raise Violation("linearizability: " + err)


def term_at_storage(st: MemoryStorage, index: int) -> int | None:
    try:
        return st.term(index)
    except Exception:
        return None


@dataclass
class Result:
    seed: int
    ok: bool
    error: str = ""
    stats: dict = field(default_factory=dict)


def run_seed(opts: Options) -> Result:
    sim = Simulation(opts)
    try:
        sim.run()
        sim.check_history()
    except Violation as v:
        return Result(opts.seed, False, f"t={sim.now}: {v}", sim.stats)
    except Exception:
        return Result(opts.seed, False, f"t={sim.now}: exception\n{traceback.format_exc()}",
                      sim.stats)
    stats = dict(sim.stats)
    stats["steps"] = sim.now
    stats["ops"] = len(sim.history)
    stats["msgs"] = sim.net.sent
    return Result(opts.seed, True, "", stats)


__all__ = ["Simulation", "run_seed", "Result", "Violation", "term_at"]
