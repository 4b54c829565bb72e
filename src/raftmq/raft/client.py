"""``RaftStore``: the broker's Store (state/store.py) backed by the node's raft process.

A worker never writes LMDB.  ``submit(ops, done)`` sends the ops as one
proposal over the local channel (raft/channel.py) and calls ``done`` on the
worker's loop when the raft process reports the entry committed (fsynced on
this node in standalone, on a majority in a cluster).  Proposals submitted in
one loop turn leave in one write, and the raft process proposes everything it
read in one turn together: one Ready, one LMDB transaction, one fsync.

``load()`` asks the raft process for the committed state (LOAD) rather than
opening the LMDB map read-only: the answer is a consistent cut *in the same
stream* as the ENTRY fan-out that follows it, so a worker neither misses nor
double-applies an entry committed while it loads (the raft process applies an
entry, then fans it out, then answers a waiting LOAD, all in one loop: ENTRY
frames before LOADED are in the loaded state and dropped, those after are not).  Start-up is the only time it
is used, so the cost (one pickle of the tables) does not matter.

Failure: if the channel breaks (the raft process restarts) every pending
proposal fails: its ``done`` is never called, so the client never gets an
acknowledgement for it (it retransmits after reconnecting, [MQTT-4.4.0-1]).
With a failure listener set, the listener is told and decides (the
supervisor's workers exit and are restarted from the committed state);
without one, the store reconnects in the background.  A FAILED answer (not leader, leadership
lost) is handled the same way.  ``set_failure_listener`` lets the broker learn
about it (e.g. to disconnect the affected clients).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable

import orjson

from raftmq.raft import channel as ch
from raftmq.state.entries import LoadedState, Op, decode_ops, encode_batch, encode_ops

log = logging.getLogger("raftmq.raft.client")

# Failure kinds given to the failure listener.
CHANNEL_LOST = "channel lost"  # the raft process went away: pending outcomes unknown
UNAVAILABLE = "unavailable"  # submitted while the channel is down
NOT_LEADER = "not leader"  # refused before being appended: nothing changed durably
LEADERSHIP_LOST = "leadership lost"  # appended, outcome unknown
SHUTTING_DOWN = "shutting down"
STATE_REPLACED = "state replaced"  # a snapshot replaced the tables: the ENTRY stream has a gap
_FAIL_KINDS = {ch.NOT_LEADER: NOT_LEADER, ch.DROPPED: LEADERSHIP_LOST, ch.SHUTTING_DOWN: SHUTTING_DOWN}


class RaftStore:
    def __init__(self, data_dir: str, worker_id: int = 1, connect_timeout: float = 60.0,
                 forward: bool = False) -> None:
        self.data_dir = data_dir
        # dynsec-sync: on a follower the raft process forwards our proposals to
        # the leader (HELLO flags bit 2) and answers COMMITTED once this node
        # has applied them, instead of refusing them NOT_LEADER.
        self.forward = forward
        self.worker_id = worker_id
        self.connect_timeout = connect_timeout
        self._next_id = 1
        self._pending: dict[int, Callable[[], None] | None] = {}
        self._listener: Callable[[list[Op]], None] | None = None
        self._failure_listener: Callable[[str, str], None] | None = None
        self._role_listener: Callable[[str, int, int], None] | None = None
        self.role: tuple[str, int, int] | None = None  # (role, leader id, term), last known
        self._proto: ch.FrameProtocol | None = None
        self._blocking: ch.BlockingChannel | None = None
        self._attach_task: asyncio.Task | None = None
        self._closed = False
        self._down_logged = False

    # -- Store protocol ------------------------------------------------------------

    def load(self) -> LoadedState:
        """The committed state, from the raft process (waits while it starts)."""
        if self._blocking is None:
            self._blocking = ch.BlockingChannel(
                self.data_dir, self.worker_id, timeout=self.connect_timeout, fanout=True
            )
            if self.forward:
                self._blocking.sock.sendall(self._hello())
        early: list[tuple[int, bytes]] = []
        # A LOAD answers what is applied, and batches that this worker's killed
        # previous process wrote may still be on their way to that: an empty
        # batch of ours committed first comes after them (refused while the
        # raft process is not the leader: nothing of ours can be in flight then).
        # Not for a forwarding (dynsec-sync) store: it keeps no delivery state in
        # Raft, and a forwarded barrier could wait on a leader change forever.
        if not self.forward:
            self._blocking.send(ch.request_frame(ch.PROPOSE, 0, encode_ops([])))
        while not self.forward:
            kind, body = self._blocking.recv_frame()
            if (kind == ch.COMMITTED and 0 in ch.parse_ids(body)) or \
                    (kind == ch.FAILED and 0 in ch.parse_ids(body[1:])):
                break
            if kind == ch.ROLE:
                early = [(kind, body)]
        self._blocking.send(ch.frame(ch.LOAD))
        while True:
            kind, body = self._blocking.recv_frame()
            if kind == ch.LOADED:
                break
            if kind == ch.ROLE:
                early = [(kind, body)]
            # An ENTRY before LOADED is already in the loaded state (the raft
            # process applies, then fans out, then answers LOAD in order): drop it.
        state = pickle.loads(body)
        self._blocking._pending[:0] = early
        self._maybe_attach()
        return state

    def submit(self, ops: list[Op], done: Callable[[], None] | None = None) -> None:
        self._maybe_attach()
        proto = self._proto
        if proto is None or proto.closed:
            if self._attach_task is None or self._attach_task.done():
                self._start_reconnect()
            self._fail(UNAVAILABLE, "raft process unavailable")
            return
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = done
        # A batch no sibling needs is not fanned out to them (entries.NODE_WIDE_TAGS).
        data, wide = encode_batch(ops)
        proto.send(ch.request_frame(ch.PROPOSE if wide else ch.PROPOSE_LOCAL, rid, data))

    def flush(self) -> int:
        """Write the proposals submitted so far now, not at the end of the loop
        turn; the bytes still waiting in this process (the channel is backed
        up).  A worker's QoS 2 forwards wait for it (workers/mesh.py)."""
        proto = self._proto
        if proto is None or proto.closed:
            return 0
        proto.flush()
        return proto.write_buffer_size()

    def set_remote_listener(self, listener: Callable[[list[Op]], None]) -> None:
        self._listener = listener
        self._maybe_attach()

    def set_failure_listener(self, listener: Callable[[str, str], None]) -> None:
        """``listener(kind, detail)`` when proposals fail (they will never be
        acknowledged); ``kind`` is one of the constants above."""
        self._failure_listener = listener

    def set_role_listener(self, listener: Callable[[str, int, int], None]) -> None:
        """``listener(role, leader_id, term)`` on every Raft role change of this
        node ("leader", "follower", "pre_candidate", "candidate"); called at
        once with the last known role."""
        self._role_listener = listener
        self._maybe_attach()
        if self.role is not None:
            listener(*self.role)

    async def close(self) -> None:
        self._closed = True
        if self._attach_task is not None and not self._attach_task.done():
            self._attach_task.cancel()
        if self._proto is not None:
            self._proto.close()
        if self._blocking is not None:
            self._blocking.close()
            self._blocking = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- connection --------------------------------------------------------------

    def _maybe_attach(self) -> None:
        """Hand the start-up socket to the running loop (once one runs)."""
        if self._proto is not None or self._blocking is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        blocking, self._blocking = self._blocking, None
        leftover = list(blocking._pending)
        sock = blocking.sock
        sock.setblocking(False)
        proto = self._new_protocol()
        self._proto = proto  # sends are queued until connection_made
        self._attach_task = loop.create_task(self._attach(sock, proto, leftover))

    async def _attach(self, sock, proto: ch.FrameProtocol, leftover: list[tuple[int, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: proto, sock=sock)
        if leftover:
            self._on_frames(proto, leftover)

    def _new_protocol(self) -> ch.FrameProtocol:
        return ch.FrameProtocol(self._on_frames, on_lost=self._on_lost)

    def _start_reconnect(self) -> None:
        if self._closed:
            return
        self._attach_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        path = ch.socket_path(self.data_dir)
        while not self._closed:
            proto = self._new_protocol()
            try:
                await loop.create_unix_connection(lambda p=proto: p, path)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            proto.send(self._hello())
            self._proto = proto
            self._down_logged = False
            log.info("Worker %d reconnected to the raft process", self.worker_id)
            # Entries committed while we were away are not replayed: the live
            # state of this worker may miss remote changes until it restarts.
            return

    def _hello(self) -> bytes:
        if not self.forward:
            return ch.hello_frame(self.worker_id, True)
        return ch.frame(ch.HELLO, ch.U32.pack(self.worker_id) + bytes((1 | 4,)))

    def _on_lost(self, proto: ch.FrameProtocol) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        if self._closed:
            return
        n = len(self._pending)
        self._pending.clear()
        if self._failure_listener is not None:
            # The owner decides (the supervisor's workers exit and start afresh).
            self._failure_listener(CHANNEL_LOST, f"channel to the raft process lost, {n} proposals pending")
            return
        if n:
            self._fail(CHANNEL_LOST, f"channel to the raft process lost with {n} proposals pending")
        log.warning("Worker %d lost its channel to the raft process; reconnecting", self.worker_id)
        self._start_reconnect()

    def _fail(self, kind: str, detail: str) -> None:
        if not self._down_logged:
            log.warning("Proposals failed: %s (not acknowledged)", detail)
            self._down_logged = True
        if self._failure_listener is not None:
            self._failure_listener(kind, detail)

    # -- frames from the raft process ----------------------------------------------

    def _on_frames(self, proto: ch.FrameProtocol, frames: list[tuple[int, bytes]]) -> None:
        pending = self._pending
        for kind, body in frames:
            if kind == ch.COMMITTED:
                for rid in ch.parse_ids(body):
                    done = pending.pop(rid, None)
                    if done is not None:
                        done()
            elif kind == ch.ENTRY:
                if self._listener is not None:
                    ops = decode_ops(body)
                    if ops:  # (not the empty batch of a sibling's load)
                        self._listener(ops)
            elif kind == ch.ROLE:
                r = orjson.loads(body)
                self.role = (r["role"], r["leader"], r["term"])
                if self._role_listener is not None:
                    self._role_listener(*self.role)
            elif kind == ch.RELOAD:
                self._fail(STATE_REPLACED, "the raft process installed a snapshot; the live state must be reloaded")
            elif kind == ch.FAILED:
                kind = _FAIL_KINDS.get(body[0], LEADERSHIP_LOST)
                ids = ch.parse_ids(body[1:])
                for rid in ids:
                    pending.pop(rid, None)
                self._fail(kind, f"{len(ids)} proposals: {kind}")
