"""The raft process: the I/O shell around the sans-IO Raft core of one node.

Theory of operation
-------------------
One process per node, the only writer of the node's LMDB environment
(``<data_dir>/raft.lmdb``).  It runs one uvloop event loop with three inputs:

* a ticker (``tick_ms``) driving ``node.tick()`` (elections, heartbeats);
* the peer transport (raft/transport.py): messages from the other members;
* the local channel (raft/channel.py, ``<data_dir>/raft.sock``): proposals,
  LOAD and admin requests from the broker workers and the CLI.

Every input only *queues* and schedules one ``_process`` call for the end of
the loop turn.  ``_process`` proposes everything queued (``propose_many``), then
runs etcd raft's loop until the core has nothing more::

    rd = node.ready()
    notify proposers / fan out rd.committed_entries to the workers       # already stable
    storage.save(rd.hard_state, rd.entries, rd.snapshot, committed=...)   # 1 txn, 1 fsync
    transport.send(rd.messages); transport.flush()                       # only after the fsync
    node.advance(rd)

(The core hands out as committed only entries persisted by an earlier Ready,
so the workers may answer their clients while this Ready's fsync runs.)

So every proposal that arrived while the previous fsync ran shares the next
transaction and fsync and the next AppendEntries (group commit).  The state
machine applies committed entries inside that same transaction
(``LmdbStorage.save``), so the tables, the log and the applied index never
disagree after a crash.

Entries: the data of a normal entry proposed here is an *envelope* --
``u8 version, u64 origin node, u32 channel connection, u64 request id`` --
followed by the op batch (state/entries.py).  When the entry commits, the
origin node finds the proposer by (connection, request id) and answers
COMMITTED; every other worker that asked for fan-out gets the op batch as an
ENTRY frame.  The state machine only ever sees the op batch.

Forwarding (dynsec-sync): a worker whose HELLO sets flags bit 2 has its
proposals forwarded when this node is a follower that knows a leader: the
envelope is built here (origin = this node) and sent to the leader as a
FORWARD payload on the peer transport; the leader appends it unchanged, and
this node answers COMMITTED when it applies the entry, as for its own.  A
leader that cannot append answers FORWARD_REFUSED (failed NOT_LEADER here); a
change of leader fails what is in flight (DROPPED: it may still commit, and is
then fanned out to its proposer too).

A proposal whose outcome becomes unknown (this node loses leadership before it
commits) is answered FAILED: the worker never acknowledges it to its client.
It may still commit under the next leader; that is safe (an unacknowledged
message may be delivered, an acknowledged one is never lost).

Snapshots: every ``snapshot_entries`` applied entries the log is compacted up
to ``applied - snapshot_entries // 4`` (a margin for slightly slow followers);
the core sends a follower that needs compacted entries a snapshot, which the
storage serializes from the tables (``storage.snapshot()``).  Membership
changes arrive as committed CONF_CHANGE entries; the state machine calls back
``node.apply_conf_change`` and records the new membership in the same
transaction.

Durability: "sync" (default) opens LMDB with a flush at every commit, so a
proposer is told COMMITTED only after the entry is on disk (on a majority, in a
cluster).  "async" commits to the OS page cache and fsyncs once a second: a
crash of the process loses nothing (the page cache survives it), a crash of
the machine may lose the last second of acknowledged messages -- and, as LMDB
documents for MDB_NOSYNC, on a file system that does not keep write order it
may leave the environment unusable.  It is the weaker setting, for nodes
whose durability comes from the cluster rather than from their own disk.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import random
import signal
import struct
import sys
import time
import tomllib
from typing import Any

import orjson

from raftmq.cluster.config import ClusterSettings, cluster_from_mapping, parse_hostport
from raftmq.raft import channel as ch
from raftmq.raft import messages as wire
from raftmq.raft.core import Config as CoreConfig
from raftmq.raft.core import NotLeader, ProposalDropped, RawNode
from raftmq.raft.lmdb_storage import LmdbStorage
from raftmq.raft.transport import PeerTransport, read_secret_file
from raftmq.raft.types import (
    NORMAL,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    HardState,
    Message,
    MessageType,
    Ready,
    Role,
)
from raftmq.state.machine import StateMachine

log = logging.getLogger("raftmq.raft.process")

ENVELOPE = struct.Struct("<BQIQ")  # version, origin node id, connection id, request id
ENVELOPE_VERSION = 1
LMDB_DIR = "raft.lmdb"
PEERS_FILE = "peers.json"
ASYNC_FSYNC_INTERVAL = 1.0
# Messages a leader may send before its own fsync of the same Ready (thesis §10.2.1).
_LEADER_EARLY = frozenset((MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP))
# A learner is promoted once it is this close to the leader's last index.
PROMOTE_LAG = 64
# The state machine may keep queue rows in memory for this many entries
# (state/machine.py "Deferred queue rows"): most durable deliveries are added
# and removed within it and never written to the queue table.
DEFER_QUEUE_ENTRIES = 512
# Peer transport payloads that are not Raft messages (a wire message starts with
# its MessageType, far below these): proposals a follower forwards to the leader
# for workers that asked for it (HELLO flags bit 2, dynsec-sync), and the
# leader's refusal of such proposals (not appended: the follower fails them).
FORWARD = 0xF0
FORWARD_REFUSED = 0xF1
_FWD_LEN = struct.Struct("<I")


class RaftProcess:
    def __init__(self, settings: ClusterSettings, data_dir: str, durability: str = "sync") -> None:
        self.settings = settings
        self.id = settings.node_id
        self.data_dir = data_dir
        self.durability = durability
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.secret: bytes | None = None
        if settings.secret_file is not None:
            self.secret = read_secret_file(settings.secret_file)  # raises SecretFileError
        self.storage = LmdbStorage(os.path.join(data_dir, LMDB_DIR), sync=durability != "async")
        self.machine = StateMachine(
            self.storage, on_conf_change=self._on_conf_change, defer_queue_ops=DEFER_QUEUE_ENTRIES
        )
        self._bootstrap()
        self.node = RawNode(
            CoreConfig(
                id=self.id,
                election_tick=settings.election_ticks,
                heartbeat_tick=settings.heartbeat_ticks,
                pre_vote=True,
                check_quorum=True,
                applied=self.machine.applied_index(),
            ),
            self.storage,
            random.Random(),
        )
        self.role = Role.FOLLOWER
        self.leader = 0
        self.applied = self.machine.applied_index()
        self.conf_state = self.storage.conf_state()
        self._leader_barrier = 0
        # Channel connections and what they wait for.
        self._conns: dict[int, ch.FrameProtocol] = {}
        self._next_conn = 1
        self._proposals: list[tuple[int, int, bytes]] = []  # (conn id, request id, ops)
        self._pending: dict[tuple[int, int], int] = {}  # (conn, req) -> proposing term
        # A proposal forwarded to the leader is pending with the negated term it
        # was forwarded in: the leader appends it in that term or a later one.
        # Forwarded proposals answered FAILED (leader changed) may still commit:
        # their entry is then fanned out to the proposer too, like a remote one.
        self._forward_lost: set[tuple[int, int]] = set()
        # Proposals (conn, request) of PROPOSE_LOCAL frames until they commit or
        # fail: their entries are not fanned out to this node's other workers.
        self._local: set[tuple[int, int]] = set()
        self._waiting_loads: list[ch.FrameProtocol] = []
        self._admin_waits: list[tuple[Any, ch.FrameProtocol, int, float]] = []
        self._learners_to_promote: set[int] = set()
        self._scheduled = False
        self._stopping = False
        self._last_compact_check = self.applied
        # Plain values for the metrics (ops/metrics.py RaftMetrics, read every
        # 0.5 s); _fsync_times stays None while the node exports no metrics.
        self.proposals_total = 0
        self._fsync_times: list[float] | None = None
        self.transport: PeerTransport | None = None
        self._server: asyncio.AbstractServer | None = None
        self.peer_addresses: dict[int, tuple[str, int]] = self._load_peer_addresses()

    # -- start-up ------------------------------------------------------------------

    def _bootstrap(self) -> None:
        """A brand-new member of a new cluster records the initial membership."""
        hs, cs = self.storage.initial_state()
        fresh = hs.term == 0 and self.storage.last_index() == 0 and not cs.voters and not cs.learners
        voters = self.settings.initial_voters()
        if fresh and voters:
            self.storage.set_conf_state(ConfState(voters=voters))
            log.info("Bootstrapped a new Raft group: voters %s", list(voters))

    def _load_peer_addresses(self) -> dict[int, tuple[str, int]]:
        addrs = {p.id: (p.host, p.port) for p in self.settings.peers}
        try:
            with open(os.path.join(self.data_dir, PEERS_FILE), "rb") as f:
                for k, v in orjson.loads(f.read()).items():
                    addrs.setdefault(int(k), (v[0], int(v[1])))
        except FileNotFoundError:
            pass
        addrs.pop(self.id, None)
        return addrs

    def _save_peer_addresses(self) -> None:
        path = os.path.join(self.data_dir, PEERS_FILE)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps({str(k): [h, p] for k, (h, p) in self.peer_addresses.items()}))
        os.replace(tmp, path)

    def _on_peer_address(self, node_id: int, host: str, port: int) -> None:
        """An authenticated peer told its listen address (or an admin did)."""
        members = set(self.conf_state.voters) | set(self.conf_state.learners)
        if node_id not in members and node_id not in self.peer_addresses:
            return  # not ours to dial: a removed member, or one not added yet
        if self.peer_addresses.get(node_id) != (host, port):
            self.peer_addresses[node_id] = (host, port)
            self._save_peer_addresses()
            if self.transport is not None:
                self.transport.set_peer(node_id, host, port)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_event.set)
        if self.settings.listen is not None:
            assert self.secret is not None
            self.transport = PeerTransport(
                self.id, self.secret, self.settings.listen, self._on_peer_messages, self._on_peer_address
            )
            await self.transport.start()
            for nid, (host, port) in self.peer_addresses.items():
                self.transport.set_peer(nid, host, port)
        await self._start_channel()
        ticker = loop.create_task(self._ticker())
        syncer = loop.create_task(self._async_fsync()) if self.durability == "async" else None
        from raftmq.ops.metrics import raft_metrics

        metrics = raft_metrics()  # None unless the supervisor serves /metrics
        reporter = loop.create_task(self._report_metrics(metrics)) if metrics is not None else None
        if self.conf_state.voters == (self.id,):
            # A one-member group (standalone) need not wait an election timeout.
            self.node.campaign()
        self._schedule()
        log.info(
            "Raft node %d started: data %s, applied %d, voters %s, learners %s",
            self.id, self.data_dir, self.applied, list(self.conf_state.voters), list(self.conf_state.learners),
        )
        await self._stop_event.wait()
        log.info("Raft node %d shutting down", self.id)
        await self._hand_over_leadership()
        self._stopping = True
        ticker.cancel()
        if syncer is not None:
            syncer.cancel()
        if reporter is not None:
            reporter.cancel()
        while self.node.has_ready():  # persist whatever is in flight
            self._handle_ready(self.node.ready())
        self._fail_all(ch.SHUTTING_DOWN)
        self.machine.flush()  # a restart then has nothing to apply again
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.close()
        if self.transport is not None:
            await self.transport.close()
        if self.durability == "async":
            self.storage.sync()
        self.storage.close()
        try:
            os.unlink(ch.socket_path(self.data_dir))
        except OSError:
            pass
        log.info("Raft node %d stopped", self.id)

    async def _hand_over_leadership(self) -> None:
        """A leader that stops on purpose hands over first (thesis §3.10), so the
        cluster does not wait an election timeout (rolling restarts)."""
        if self.role != Role.LEADER or len(self.conf_state.voters) < 2:
            return
        progress = _progress_of(self.node.status())
        others = [v for v in self.conf_state.voters if v != self.id]
        target = max(others, key=lambda v: progress.get(str(v), {}).get("match", 0))
        log.info("Transferring leadership to node %d before shutdown", target)
        try:
            self.node.transfer_leadership(target)
        except ProposalDropped:
            return
        self._schedule()
        deadline = time.monotonic() + 2 * self.settings.election_ticks * self.settings.tick_ms / 1000
        while self.role == Role.LEADER and time.monotonic() < deadline:
            await asyncio.sleep(self.settings.tick_ms / 1000)

    async def _start_channel(self) -> None:
        path = ch.socket_path(self.data_dir)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket is created 0600: only this user may propose
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(self._new_conn, path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def _new_conn(self) -> ch.FrameProtocol:
        proto = ch.FrameProtocol(self._on_channel_frames, on_lost=self._on_conn_lost)
        proto.conn_id = self._next_conn  # type: ignore[attr-defined]
        self._next_conn += 1
        self._conns[proto.conn_id] = proto  # type: ignore[attr-defined]
        return proto

    def _on_conn_lost(self, proto: ch.FrameProtocol) -> None:
        cid = proto.conn_id  # type: ignore[attr-defined]
        self._conns.pop(cid, None)
        # Its pending proposals may still commit; nobody is left to tell.
        for key in [k for k in self._pending if k[0] == cid]:
            del self._pending[key]
        if proto in self._waiting_loads:
            self._waiting_loads.remove(proto)

    # -- timers --------------------------------------------------------------------

    async def _ticker(self) -> None:
        interval = self.settings.tick_ms / 1000
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            if now - next_at > 5 * interval:
                next_at = now  # the loop was blocked: do not fire a burst of ticks
            self.node.tick()
            self._check_admin_waits()
            self._schedule()

    async def _report_metrics(self, metrics: Any) -> None:
        """Every 0.5 s: plain values into the metrics, nothing on the Ready path
        but one list append (ops/metrics.py)."""
        self._fsync_times = []
        while True:
            await asyncio.sleep(0.5)
            times, self._fsync_times = self._fsync_times, []
            metrics.update(self._term, self.storage.hard_state.commit, self.applied, self.role,
                           self.proposals_total, self.storage.last_index(), self.leader, times)

    async def _async_fsync(self) -> None:
        while True:
            await asyncio.sleep(ASYNC_FSYNC_INTERVAL)
            await asyncio.get_running_loop().run_in_executor(None, self.storage.sync)

    # -- inputs ----------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._process)

    def _on_peer_messages(self, src: int, payloads: list[bytes]) -> None:
        step = self.node.step
        decode = wire.decode
        for p in payloads:
            if p and p[0] >= FORWARD:
                self._on_forward_payload(src, p)
                continue
            m = decode(p)  # a DecodeError closes that peer's connection (transport)
            try:
                step(m)
            except ProposalDropped:
                pass
            except Exception:
                _die(f"the Raft core failed on a message from node {src}")
        self._schedule()

    def _on_channel_frames(self, proto: ch.FrameProtocol, frames: list[tuple[int, bytes]]) -> None:
        cid = proto.conn_id  # type: ignore[attr-defined]
        proposals = self._proposals
        for kind, body in frames:
            if kind == ch.PROPOSE:
                proposals.append((cid, ch.U64.unpack_from(body)[0], body[8:]))
            elif kind == ch.PROPOSE_LOCAL:
                rid = ch.U64.unpack_from(body)[0]
                proposals.append((cid, rid, body[8:]))
                if len(self._local) > 1_000_000:
                    self._local.clear()  # ids of proposals long gone (at worst: fanned out)
                self._local.add((cid, rid))
            elif kind == ch.HELLO:
                proto.worker_id = ch.U32.unpack_from(body)[0]
                proto.fanout = len(body) > 4 and bool(body[4] & 1)
                # Flags bit 1: ROLE frames without the ENTRY fan-out (an ha
                # standby worker only needs to know who leads).
                proto.role_watch = len(body) > 4 and bool(body[4] & 2)  # type: ignore[attr-defined]
                # Flags bit 2: on a follower, forward this connection's proposals
                # to the leader instead of refusing them (dynsec-sync workers).
                proto.forward = len(body) > 4 and bool(body[4] & 4)  # type: ignore[attr-defined]
                if proto.fanout or proto.role_watch:  # type: ignore[attr-defined]
                    proto.send(self._role_frame())
            elif kind == ch.LOAD:
                self._waiting_loads.append(proto)
            elif kind == ch.ADMIN:
                rid = ch.U64.unpack_from(body)[0]
                try:
                    self._on_admin(proto, rid, orjson.loads(body[8:]))
                except Exception as exc:  # an admin request must never kill the node
                    log.exception("admin request failed")
                    self._admin_reply(proto, rid, {"ok": False, "error": str(exc)})
        self._schedule()

    # -- the Ready loop --------------------------------------------------------------

    def _process(self) -> None:
        try:
            self._process_once()
        except Exception:
            # The core or the disk failed in the middle of a Ready: the only
            # safe continuation is a restart from what is on disk (crash-only;
            # the supervisor restarts us and the log says why).
            _die("the Ready loop failed")

    def _process_once(self) -> None:
        self._scheduled = False
        if self._proposals:
            self._propose_queued()
        node = self.node
        if node.has_ready():
            self._handle_ready(node.ready())
            if node.has_ready():
                # Usually the commit of what was just persisted (the leader
                # counts its own copy after advance).  Let the loop read the
                # sockets first: proposals that arrived during the fsync then
                # share the next Ready with this commit -- one transaction and
                # one fsync for both instead of two.
                self._scheduled = True
                loop = asyncio.get_running_loop()
                loop.call_soon(loop.call_soon, self._process)
        if self._waiting_loads:
            self._serve_loads()

    def _propose_queued(self) -> None:
        queued, self._proposals = self._proposals, []
        if self._stopping:
            self._fail_requests(queued, ch.SHUTTING_DOWN)
            return
        if self.role != Role.LEADER:
            self._forward_or_fail(queued)
            return
        me = self.id
        pack = ENVELOPE.pack
        datas = [pack(ENVELOPE_VERSION, me, cid, rid) + ops for cid, rid, ops in queued]
        try:
            self.node.propose_many(datas)
        except NotLeader:
            self._fail_requests(queued, ch.NOT_LEADER)
            return
        except ProposalDropped:  # e.g. a leadership transfer is in progress: not appended
            self._fail_requests(queued, ch.NOT_LEADER)
            return
        self.proposals_total += len(queued)
        term = self.node.term  # the term of the entries just appended
        pending = self._pending
        for cid, rid, _ in queued:
            pending[(cid, rid)] = term

    @property
    def _term(self) -> int:
        return self.storage.hard_state.term

    def _handle_ready(self, rd: Ready) -> None:
        if rd.soft_state is not None:
            self._on_soft_state(rd.soft_state.role, rd.soft_state.leader, rd.hard_state, rd.entries)
        committed = rd.committed_entries
        stripped = [_strip(e) for e in committed] if committed else ()
        messages = rd.messages
        if messages and self.role == Role.LEADER and self.transport is not None:
            # Raft thesis §10.2.1: the leader may replicate to followers while it
            # writes its own disk -- its copy counts toward commit only after
            # advance() (the core's rule).  Everything else (votes, append
            # responses) vouches for our disk state and waits for the fsync.
            early = [m for m in messages if m.type in _LEADER_EARLY]
            if early:
                self._send(early)
                messages = [m for m in messages if m.type not in _LEADER_EARLY]
        # Committed entries are already on this node's disk (the core hands out
        # only entries at or below its stable index, persisted by an earlier
        # Ready) and on a majority: the proposers may learn it now, before
        # this Ready's fsync, so the workers answer their clients (and send
        # the follow-up proposals) while we write -- instead of one fsync
        # later.  Applying them still happens in this Ready's transaction; a
        # LOAD is answered only after it.  With a snapshot the fan-out must
        # follow the RELOAD frame: that (rare) Ready keeps the later order.
        installs_snapshot = rd.snapshot is not None and not rd.snapshot.is_empty()
        notified_early = False
        if committed and not installs_snapshot:
            self._notify_committed(committed)
            for c in self._conns.values():
                c.flush()
            notified_early = True
        # 1. Persist (and apply) in one transaction, one fsync.
        started = time.perf_counter()
        self.storage.save(rd.hard_state, rd.entries, rd.snapshot, committed=stripped)
        if self._fsync_times is not None:
            self._fsync_times.append(time.perf_counter() - started)
        if installs_snapshot:
            self.applied = rd.snapshot.meta.index
            self.conf_state = rd.snapshot.meta.conf_state
            self._sync_transport_peers()
            log.info("Installed snapshot at index %d (term %d)", rd.snapshot.meta.index, rd.snapshot.meta.term)
            for c in self._conns.values():
                if c.fanout:
                    c.send(ch.frame(ch.RELOAD))
        # 2. Only now may messages vouching for that state leave (Raft thesis §3.8).
        if messages and self.transport is not None:
            self._send(messages)
        # 3. Tell proposers and fan out (unless done above), count applied.
        if committed:
            if not notified_early:
                self._notify_committed(committed)
            self._after_commit(committed)
        self.node.advance(rd)

    def _send(self, messages: list[Message]) -> None:
        assert self.transport is not None
        send = self.transport.send
        encode = wire.encode
        unreachable = set()
        snaps = []
        for m in messages:
            ok = send(m.dst, encode(m))
            if not ok:
                unreachable.add(m.dst)
            if m.type == MessageType.SNAP:
                snaps.append((m.dst, ok))
        self.transport.flush()
        for nid in unreachable:
            self.node.report_unreachable(nid)
        for nid, ok in snaps:
            self.node.report_snapshot(nid, ok)
            if ok:
                log.info("Sent a snapshot to node %d", nid)

    def _on_soft_state(self, role: Role, leader: int, hs: HardState | None,
                       entries: list[Entry] | tuple = ()) -> None:
        was_leader = self.role == Role.LEADER
        if role != self.role or leader != self.leader:
            term = hs.term if hs is not None else self._term
            log.info("Raft node %d is now %s (leader %d, term %d)", self.id, role.name.lower(), leader, term)
        changed = role != self.role or leader != self.leader
        self.role, self.leader = role, leader
        if changed:
            frame = None
            for c in self._conns.values():
                if c.fanout or getattr(c, "role_watch", False):
                    frame = frame or self._role_frame(hs.term if hs is not None else None)
                    c.send(frame)
        if role == Role.LEADER and not was_leader:
            # Entries up to the new leader's first entry may be committed but
            # not yet known as such: a LOAD waits until they are applied.  The
            # first entry is the no-op the core appended for the new term, in
            # this Ready (ha: the workers serve only after it, Raft §8).
            term = hs.term if hs is not None else self.node.term
            own = [e.index for e in entries if e.term == term]
            self._leader_barrier = own[0] if own else self.storage.last_index() + 1
        if was_leader and role != Role.LEADER:
            self._fail_all(ch.DROPPED)
        elif changed and role != Role.LEADER:
            self._fail_forwarded()

    def _role_frame(self, term: int | None = None) -> bytes:
        """Workers learn the role (in cluster modes a follower's workers refuse clients)."""
        body = {"role": self.role.name.lower(), "leader": self.leader, "term": term or self.node.term}
        return ch.frame(ch.ROLE, orjson.dumps(body))

    def _notify_committed(self, committed: list[Entry]) -> None:
        """Queue COMMITTED to the proposers and ENTRY to the fan-out connections."""
        me = self.id
        pending = self._pending
        conns = self._conns
        done: dict[int, list[int]] = {}
        fanout = [c for c in conns.values() if c.fanout]
        local = self._local
        unpack = ENVELOPE.unpack_from
        # A follower with no workers listening has nobody to tell: skip the walk.
        for e in committed if (pending or fanout) else ():
            if e.kind != NORMAL:
                continue
            data = e.data
            if len(data) < ENVELOPE.size or data[0] != ENVELOPE_VERSION:
                continue
            _v, origin, cid, rid = unpack(data)
            # The term check: an entry left by an earlier incarnation of this
            # process (same connection and request numbers, reused after a
            # restart) has an older term than anything proposed now.
            t = pending.get((cid, rid)) if origin == me else None
            if t is not None and (t == e.term or 0 > t >= -e.term):
                del pending[(cid, rid)]
                lst = done.get(cid)
                if lst is None:
                    done[cid] = [rid]
                else:
                    lst.append(rid)
            if local and origin == me and (cid, rid) in local:
                local.discard((cid, rid))
                continue  # its proposer's alone (PROPOSE_LOCAL): no fan-out
            if fanout:
                frame = None
                for c in fanout:
                    if origin == me and c.conn_id == cid:  # type: ignore[attr-defined]
                        if not self._forward_lost or (cid, rid) not in self._forward_lost:
                            continue
                        self._forward_lost.discard((cid, rid))
                    if frame is None:
                        frame = ch.frame(ch.ENTRY, data[ENVELOPE.size :])
                    c.send(frame)
        for cid, rids in done.items():
            c = conns.get(cid)
            if c is not None:
                c.send(ch.frame(ch.COMMITTED, ch.ids_body(rids)))

    def _after_commit(self, committed: list[Entry]) -> None:
        """``committed`` is applied: advance the applied index, compact when due."""
        last = committed[-1].index
        self.applied = max(self.applied, last)
        if self.applied - self._last_compact_check >= self.settings.snapshot_entries:
            self._last_compact_check = self.applied
            self._compact()

    def _compact_all(self) -> None:
        self.machine.flush()
        if self.applied >= self.storage.first_index():
            self.storage.compact(self.applied)
            self._last_compact_check = self.applied
            log.info("Compacted the raft log up to index %d for a new member", self.applied)

    def _compact(self) -> None:
        # Never beyond what the tables hold (deferred rows are not in them yet).
        upto = min(self.applied - self.settings.snapshot_entries // 4, self.machine.applied_index())
        if upto < self.storage.first_index():
            return
        try:
            self.storage.compact(upto)
        except Exception:
            log.exception("log compaction to %d failed", upto)
            return
        log.info("Compacted the raft log up to index %d (applied %d)", upto, self.applied)

    def _on_conf_change(self, e: Entry) -> ConfState:
        """Called by the state machine inside the apply transaction."""
        cc = ConfChange.decode(e.data)
        cs = self.node.apply_conf_change(cc)
        self.conf_state = cs
        log.info("Membership change at %d: %s node %d -> voters %s, learners %s",
                 e.index, cc.type.name.lower(), cc.node_id, list(cs.voters), list(cs.learners))
        if cc.type == ConfChangeType.ADD_LEARNER and cc.node_id != self.id:
            # The initial membership was bootstrapped outside the log, so a new
            # member must start from a snapshot (which carries the membership),
            # never from entry 1: compact right away, on every member (any of
            # them may be the leader that catches the newcomer up).
            asyncio.get_running_loop().call_soon(self._compact_all)
        if cc.type == ConfChangeType.REMOVE:
            self._learners_to_promote.discard(cc.node_id)
            if self.peer_addresses.pop(cc.node_id, None) is not None:
                self._save_peer_addresses()
            if self.transport is not None:
                self.transport.remove_peer(cc.node_id)
            if cc.node_id == self.id:
                log.warning("Raft node %d was removed from the cluster", self.id)
        asyncio.get_running_loop().call_soon(self._sync_transport_peers)
        return cs

    def _sync_transport_peers(self) -> None:
        """Keep connections to the members (and to anyone we know an address of)."""
        if self.transport is None:
            return
        members = set(self.conf_state.voters) | set(self.conf_state.learners)
        for nid in list(self.transport.peers):
            if nid not in members and nid not in self.peer_addresses:
                self.transport.remove_peer(nid)
        for nid in members:
            addr = self.peer_addresses.get(nid)
            if addr is not None and nid != self.id:
                self.transport.set_peer(nid, *addr)

    # -- answers ----------------------------------------------------------------------

    # -- proposals forwarded to the leader (dynsec-sync) -----------------------------

    def _forward_or_fail(self, queued: list[tuple[int, int, bytes]]) -> None:
        """On a follower: send the proposals of forwarding connections to the
        leader, enveloped with this node as origin (so this node answers them
        when it applies the entry); refuse the rest, and all if no leader is known."""
        conns = self._conns
        leader = self.leader
        forward = [q for q in queued if getattr(conns.get(q[0]), "forward", False)]
        if not forward or not leader or self.transport is None:
            self._fail_requests(queued, ch.NOT_LEADER)
            return
        if len(forward) < len(queued):
            self._fail_requests([q for q in queued if not getattr(conns.get(q[0]), "forward", False)],
                                ch.NOT_LEADER)
        me = self.id
        pack = ENVELOPE.pack
        parts = [bytes((FORWARD,))]
        for cid, rid, ops in forward:
            data = pack(ENVELOPE_VERSION, me, cid, rid) + ops
            parts.append(_FWD_LEN.pack(len(data)))
            parts.append(data)
        if not self.transport.send(leader, b"".join(parts)):
            self._fail_requests(forward, ch.NOT_LEADER)  # never left: nothing appended
            return
        self.transport.flush()
        term = -self._term
        for cid, rid, _ in forward:
            self._pending[(cid, rid)] = term

    def _on_forward_payload(self, src: int, p: bytes) -> None:
        if p[0] == FORWARD_REFUSED:
            # The leader we forwarded to appended nothing: refuse them here.
            n = (len(p) - 1) // 12
            reqs = [struct.unpack_from("<IQ", p, 1 + 12 * i) for i in range(n)]
            failed = [(cid, rid, b"") for cid, rid in reqs if self._pending.pop((cid, rid), 0) < 0]
            self._fail_requests(failed, ch.NOT_LEADER)
            return
        if p[0] != FORWARD:
            return
        datas: list[bytes] = []
        pos = 1
        while pos + 4 <= len(p):
            (n,) = _FWD_LEN.unpack_from(p, pos)
            datas.append(p[pos + 4 : pos + 4 + n])
            pos += 4 + n
        # Only well-formed envelopes naming the sender as origin.
        datas = [d for d in datas if len(d) >= ENVELOPE.size and d[0] == ENVELOPE_VERSION
                 and ENVELOPE.unpack_from(d)[1] == src]
        if not datas:
            return
        try:
            if self.role != Role.LEADER:
                raise NotLeader(self.leader)
            self.node.propose_many(datas)
        except ProposalDropped:  # NotLeader included
            body = b"".join(struct.pack("<IQ", *ENVELOPE.unpack_from(d)[2:]) for d in datas)
            if self.transport is not None and self.transport.send(src, bytes((FORWARD_REFUSED,)) + body):
                self.transport.flush()
            return
        self.proposals_total += len(datas)

    def _fail_forwarded(self) -> None:
        """The leader changed (or is unknown): a forwarded proposal's outcome is
        unknown (it may still commit): answer it FAILED (leadership lost)."""
        by_conn: dict[int, list[int]] = {}
        for (cid, rid), t in list(self._pending.items()):
            if t < 0:
                del self._pending[(cid, rid)]
                if len(self._forward_lost) > 10_000:
                    self._forward_lost.clear()  # long gone: never committed
                self._forward_lost.add((cid, rid))
                by_conn.setdefault(cid, []).append(rid)
        if by_conn:
            self._send_failed(by_conn, ch.DROPPED)

    def _fail_requests(self, reqs: list[tuple[int, int, bytes]], reason: int) -> None:
        by_conn: dict[int, list[int]] = {}
        local = self._local
        for cid, rid, _ in reqs:
            by_conn.setdefault(cid, []).append(rid)
            local.discard((cid, rid))
        self._send_failed(by_conn, reason)

    def _fail_all(self, reason: int) -> None:
        by_conn: dict[int, list[int]] = {}
        for cid, rid in self._pending:
            by_conn.setdefault(cid, []).append(rid)
        self._pending.clear()
        self._local.clear()
        if self._proposals:
            for cid, rid, _ in self._proposals:
                by_conn.setdefault(cid, []).append(rid)
            self._proposals = []
        self._send_failed(by_conn, reason)

    def _send_failed(self, by_conn: dict[int, list[int]], reason: int) -> None:
        for cid, rids in by_conn.items():
            c = self._conns.get(cid)
            if c is not None:
                c.send(ch.frame(ch.FAILED, bytes((reason,)) + ch.ids_body(rids)))

    def _load_ready(self) -> bool:
        if self.role == Role.LEADER:
            return self.applied >= self._leader_barrier
        return self.leader != 0 and self.applied >= self.storage.hard_state.commit

    def _serve_loads(self) -> None:
        if not self._load_ready():
            return
        state = pickle.dumps(self.machine.load(), protocol=pickle.HIGHEST_PROTOCOL)
        for proto in self._waiting_loads:
            proto.send(ch.frame(ch.LOADED, state))
        self._waiting_loads.clear()

    # -- admin ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.node.status()
        return {
            "id": self.id,
            "role": self.role.name.lower(),
            "leader": self.leader,
            "term": self._term,
            "commit": self.storage.hard_state.commit,
            "applied": self.applied,
            "first_index": self.storage.first_index(),
            "last_index": self.storage.last_index(),
            "voters": list(self.conf_state.voters),
            "learners": list(self.conf_state.learners),
            "peers": {str(k): f"{h}:{p}" for k, (h, p) in self.peer_addresses.items()},
            "connected": sorted(k for k in self.peer_addresses if self.transport and self.transport.connected(k)),
            "progress": _progress_of(st),
            "durability": self.durability,
        }

    def _admin_reply(self, proto: ch.FrameProtocol, rid: int, reply: dict[str, Any]) -> None:
        proto.send(ch.request_frame(ch.ADMIN_REPLY, rid, orjson.dumps(reply)))

    def _on_admin(self, proto: ch.FrameProtocol, rid: int, req: dict[str, Any]) -> None:
        op = req.get("op")
        if op == "status":
            self._admin_reply(proto, rid, {"ok": True, "status": self.status()})
            return
        if op in ("add", "remove", "transfer") and self.role != Role.LEADER:
            self._admin_reply(proto, rid, {"ok": False, "error": "not leader", "leader": self.leader,
                                           "leader_address": _addr(self.peer_addresses.get(self.leader))})
            return
        if op == "add":
            nid = int(req["id"])
            host, port = parse_hostport(str(req["address"]), "address")
            if nid in self.conf_state.voters:
                self._admin_reply(proto, rid, {"ok": True, "message": f"node {nid} is already a voter"})
                return
            self.peer_addresses[nid] = (host, port)
            self._save_peer_addresses()
            if self.transport is not None:
                self.transport.set_peer(nid, host, port)
            if nid not in self.conf_state.learners:
                self.node.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, nid))
            self._learners_to_promote.add(nid)
            deadline = time.monotonic() + float(req.get("timeout", 30))
            self._admin_waits.append((lambda: nid in self.conf_state.voters, proto, rid, deadline))
        elif op == "remove":
            nid = int(req["id"])
            if nid not in self.conf_state.voters and nid not in self.conf_state.learners:
                self._admin_reply(proto, rid, {"ok": True, "message": f"node {nid} is not a member"})
                return
            self.node.propose_conf_change(ConfChange(ConfChangeType.REMOVE, nid))
            deadline = time.monotonic() + float(req.get("timeout", 30))
            self._admin_waits.append(
                (lambda: nid not in self.conf_state.voters and nid not in self.conf_state.learners, proto, rid, deadline)
            )
        elif op == "transfer":
            nid = int(req["id"])
            if nid == self.id:
                self._admin_reply(proto, rid, {"ok": True, "message": "already leader"})
                return
            self.node.transfer_leadership(nid)
            deadline = time.monotonic() + float(req.get("timeout", 10))
            self._admin_waits.append((lambda: self.leader == nid, proto, rid, deadline))
        else:
            self._admin_reply(proto, rid, {"ok": False, "error": f"unknown admin op {op!r}"})
            return
        self._schedule()

    def _check_admin_waits(self) -> None:
        if self._learners_to_promote and self.role == Role.LEADER:
            self._promote_caught_up_learners()
        if not self._admin_waits:
            return
        now = time.monotonic()
        keep = []
        for cond, proto, rid, deadline in self._admin_waits:
            if cond():
                self._admin_reply(proto, rid, {"ok": True, "status": self.status()})
            elif now > deadline:
                self._admin_reply(proto, rid, {"ok": False, "error": "timed out", "status": self.status()})
            else:
                keep.append((cond, proto, rid, deadline))
        self._admin_waits = keep

    def _promote_caught_up_learners(self) -> None:
        """Raft thesis §4.2.1: a new member catches up as a learner, then becomes a voter."""
        progress = _progress_of(self.node.status())
        last = self.storage.last_index()
        for nid in list(self._learners_to_promote):
            if nid in self.conf_state.voters:
                self._learners_to_promote.discard(nid)
                continue
            if nid not in self.conf_state.learners:
                continue  # the ADD_LEARNER entry is not applied yet
            match = progress.get(str(nid), {}).get("match", 0)
            if match and last - match <= PROMOTE_LAG:
                try:
                    self.node.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, nid))
                except ProposalDropped:
                    continue  # another conf change is pending: next tick
                log.info("Promoting learner %d (match %d, last %d)", nid, match, last)
                self._schedule()


def _die(what: str) -> None:
    log.critical("Raft process exiting: %s", what, exc_info=True)
    logging.shutdown()
    os._exit(70)  # EX_SOFTWARE


def _addr(a: tuple[str, int] | None) -> str | None:
    return f"{a[0]}:{a[1]}" if a else None


def _progress_of(status: Any) -> dict[str, dict[str, int]]:
    """Per-peer replication progress from the core's status(), as plain JSON."""
    prs = status.get("progress") if isinstance(status, dict) else None
    out: dict[str, dict[str, int]] = {}
    if not prs:
        return out
    for nid, pr in prs.items():
        if isinstance(pr, dict):
            out[str(nid)] = {"match": int(pr.get("match", 0)), "next": int(pr.get("next", 0))}
        else:
            out[str(nid)] = {"match": int(getattr(pr, "match", 0)), "next": int(getattr(pr, "next", 0))}
    return out


def _strip(e: Entry) -> Entry:
    """The entry as the state machine sees it: the op batch without the envelope."""
    if e.kind == NORMAL and len(e.data) >= ENVELOPE.size and e.data[0] == ENVELOPE_VERSION:
        return Entry(e.term, e.index, e.data[ENVELOPE.size :], NORMAL)
    return e


# ---------------------------------------------------------------------------------
# Command line: python -m raftmq.raft.process --config FILE [--data-dir DIR]


def settings_from_file(path: str | None) -> tuple[ClusterSettings, dict[str, Any]]:
    data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    return cluster_from_mapping(data.get("cluster"), path or "<defaults>"), data


def setup_logging(level: str) -> None:
    level = level.upper()
    logging.basicConfig(
        level=getattr(logging, "INFO" if level == "NOTICE" else level, logging.INFO),
        format="%(created).0f: %(message)s" if level != "DEBUG" else "%(created).3f: %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def run_node(settings: ClusterSettings, data_dir: str, durability: str) -> int:
    """Run the raft process of this node until SIGTERM/SIGINT; the exit status."""
    if durability == "none":
        durability = "async"
    try:
        proc = RaftProcess(settings, data_dir, durability)
    except Exception as exc:
        log.error("Error: raft process cannot start: %s", exc)
        return 1
    profile_to = os.environ.get("RAFTMQ_PROFILE")  # a debugging aid: cProfile stats file
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        import uvloop

        uvloop.run(proc.run())
    except KeyboardInterrupt:
        pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_to}.{settings.node_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftmq.raft.process")
    parser.add_argument("--config", help="raftmq TOML file ([cluster] table, data_dir, durability)")
    parser.add_argument("--data-dir")
    parser.add_argument("--durability", choices=("sync", "async"))
    parser.add_argument("--log-level", default=None)
    args = parser.parse_args(argv)
    settings, data = settings_from_file(args.config)
    setup_logging(args.log_level or data.get("log_level") or "info")
    data_dir = args.data_dir or data.get("data_dir", "./data")
    return run_node(settings, data_dir, args.durability or data.get("durability", "sync"))


if __name__ == "__main__":
    sys.exit(main())
