"""The links between the workers of one node: forwarding, interest, barriers.

Every pair of workers shares one unix stream socket (the higher index
connects to the lower; both directions use it).  On it flow frames::

    u32 length of what follows | u8 type | body

- HELLO(index, incarnation): first frame of each side of a new connection
  (``incarnation``: a random number of this worker process, new at every start).
- FWD(seq, sender, assigned share groups, message): a message published in
  the sending worker, for the receiver's matching subscriptions.  Only the
  share groups listed are served by the receiver (the sender picked, for each
  group, the one worker whose member gets the message).
- INTEREST(seq, delta, filter): the sender's count of subscriptions on a
  filter changed by ``delta`` (``$share/...`` filters count group members).
  DURABLE(seq, delta, filter): the same for the subscriptions of persistent
  sessions (those must have a QoS 1/2 message queued before its publisher is
  acknowledged; an online clean session's copy may go as QoS 0 would).
  RESET(seq): forget every interest of the sender (sent, with the full set,
  when a connection starts).
- SYNC(seq): nothing but a sequence number to acknowledge (a barrier).
- ACK(seq): every frame of the receiver's up to ``seq`` was processed and
  what it changed in the store is committed.
- STATS(counters): the sender's ``$SYS`` counters, every upkeep tick, then its
  connected clients, offline sessions, subscriptions and CPU load (colocate.py).
- FWD_SHARED: as FWD, for the listed share groups only: a message that a
  member which left had not acknowledged, for another member (MQTT 5 §4.8.2).
- AGAIN(incarnation, seq): the next FWD is a QoS 2 message that the previous
  process ``incarnation`` of the sender forwarded as frame ``seq`` (see below).
- MOVED(move, client id): the connection of ``client id`` moved here (its
  socket comes over the hand-off socket); every FWD of its messages before the
  move precedes this frame (colocate.py).  KICK(seq, move, client id): the
  owner of the id took a new CONNECT for it: close the moved connection as
  taken over.  GONE(move, client id): a moved connection's session ended.
  HERE(move, client id): a moved connection of the receiver's id is here
  (sent on a new link, so that a restarted owner knows again).

Why forwarding by interest: a worker forwards a message only to siblings
that subscribed to a matching filter, so in the common case of a publisher
and subscriber in the same worker nothing crosses.  The cost is ordering: a
sibling must know a new subscription before the subscriber is told SUBACK,
or a message published right after the SUBACK could miss it.  Hence frames
that need an answer carry a sequence number, the receiver acknowledges
cumulatively once what the frames changed is committed, and the broker holds
every client acknowledgement (CONNACK, SUBACK, PUBACK, PUBREC, ...) until the
siblings acknowledged the frames sent before it (``gated``).  The same
barrier gives the durability promise across workers: a QoS 1/2 message is
acknowledged to its publisher only once every sibling that may hold a
matching persistent session has queued it durably.

Only frames that need it carry a sequence number and hold acknowledgements:
QoS 1/2 messages for a sibling with a matching persistent session (or not
known yet), retained messages, shared-group assignments, interest changes and
barriers.  A QoS 1/2 message for a sibling's clean sessions only is not
waited for: if that sibling dies, those sessions die with it.

Until a sibling has told its interest (it has not connected since this worker
started) it is assumed to want every QoS 1/2 and retained message: those are
kept (with their sequence numbers) and sent when it connects, so a sibling
that restarts misses nothing a publisher was acknowledged for.  Retained
messages go to every sibling (each worker holds every retained message).
A sibling whose link breaks keeps its last known interest; its unacknowledged
frames are sent again when it is back (QoS 1 may then be delivered twice, as
the standard allows after a failure).

Exactly once for QoS 2 across a worker's kill -9:

- The receiver does not apply a frame twice.  It proposes, in the same store
  batch as the queue writes its forwarded frames caused, a MeshMark: the last
  sequence number applied from that sibling, with the sibling's incarnation.
  A restarted receiver reads its marks back, and when the same incarnation of
  the sibling links and sends again the frames it had not seen acknowledged,
  those at or below the mark are acknowledged without being routed again (the
  session restored from the store already holds them).  A restarted sender has
  a new incarnation and sequence numbers from 1, and nothing to send again.
- A QoS 2 message of a persistent session is forwarded before its publisher's
  worker has committed the packet id awaiting PUBREL (Qos2InAdd): were the
  worker to die with the forward sent and that batch lost, its restart would
  take the publisher's resend for a new message, delivered again where the
  forward went.  The raft process commits what a worker wrote to it before
  dying; so after such a message (``store_first``) the frames wait until the
  store's channel has written everything submitted so far (the batch, with this
  worker's own deliveries) -- at once unless that channel is backed up, when
  the whole mesh output waits for it (polled).
- The other way round, the worker may die with that batch committed and the
  frames not sent: its restart then recognises the publisher's resend and
  must not lose the forward.  So the Qos2InAdd records where the message was
  forwarded (incarnation, and per sibling the frame's sequence number, always
  acknowledged); the restarted worker forwards the resent message again to
  those siblings, each frame preceded by AGAIN, and a sibling applies it only
  if it had not applied that frame of the previous process (its last sequence
  number applied from it, ``Sibling.prev``).
- A restarted worker loads the store only once its previous process's last
  batches are committed (raft/client.py RaftStore.load).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from raftmq._mesh import fwd_frame, split_frames
from raftmq._trie import TopicTrie
from raftmq.broker.sys_topics import NODE_COUNTERS
from raftmq.state.entries import MeshMark, Message, decode_properties, encode_properties
from raftmq.workers.ownership import assign_client_id, owner_of

if TYPE_CHECKING:
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.workers")

HELLO, FWD, INTEREST, RESET, SYNC, ACK, STATS, FWD_SHARED, DURABLE, AGAIN = range(1, 11)
MOVED, KICK, GONE, HERE = range(11, 15)  # co-location (colocate.py)

_LEN = struct.Struct("<I")
_HELLO = struct.Struct("<IBHQ")
_SEQ_FRAME = struct.Struct("<IBQ")  # RESET / SYNC / ACK
_AGAIN = struct.Struct("<IBQQ")
_AGAIN_BODY = struct.Struct("<QQ")
_INTEREST_HEAD = struct.Struct("<IBQi")
_INTEREST_BODY = struct.Struct("<Qi")
_U64 = struct.Struct("<Q")
_MOVE_HEAD = struct.Struct("<IBQ")  # MOVED / GONE / HERE: length, kind, move id
_KICK_HEAD = struct.Struct("<IBQQ")  # length, KICK, seq, move id

CONNECT_RETRY = 0.05
START_TIMEOUT = 10.0
# Frames kept for a sibling that has not acknowledged them: every multiple of
# this is logged (the publishers' acknowledgements wait meanwhile, so their
# in-flight windows bound the growth).
RESEND_WARN = 100_000
MATCH_CACHE_LIMIT = 10_000

# The $SYS counters exchanged for node totals, in STATS order: sys_topics' own.
# A STATS frame is STAT_FIELDS, then connected clients, offline sessions and
# subscriptions (summed too: STAT_SUMMED values), then the CPU load.
STAT_FIELDS = NODE_COUNTERS
STAT_CONNECTED = len(STAT_FIELDS)
STAT_SUMMED = STAT_CONNECTED + 3
STAT_CPU = STAT_SUMMED


class Sibling:
    """What this worker knows of one other worker."""

    __slots__ = ("index", "path", "link", "out", "sent_seq", "acked", "resend", "known",
                 "counts", "durable", "stats", "recv_seq", "incarnation", "applied", "prev")

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.link: _Link | None = None  # the connection, once its HELLO came
        self.out: list[bytes] = []
        self.sent_seq = 0  # last sequence number given to a frame for it
        self.acked = 0  # its cumulative acknowledgement
        self.resend: deque[tuple[int, bytes]] = deque()  # FWD frames not yet acknowledged
        self.known = False  # it told us its interest at least once
        self.counts: dict[str, int] = {}  # its interest: filter -> subscriptions
        self.durable: dict[str, int] = {}  # the same, of its persistent sessions
        self.stats: tuple = ()
        self.recv_seq = 0  # highest sequence number of its frames we processed
        self.incarnation = 0  # of its process, from its HELLO
        self.applied = 0  # highest sequence number of its FWD frames applied (MeshMark)
        self.prev: tuple[int, int] = (0, 0)  # (incarnation, applied) of its previous process


class Mesh:
    """This worker's end of the links to its siblings (one per other worker)."""

    STAT_FIELDS = STAT_FIELDS

    def __init__(self, broker: Broker, index: int, count: int, run_dir: str) -> None:
        self.broker = broker
        self.index = index
        self.count = count
        self.run_dir = run_dir
        self.siblings: dict[int, Sibling] = {
            j: Sibling(j, os.path.join(run_dir, f"w{j}.mesh")) for j in range(count) if j != index
        }
        self._sibling_list = list(self.siblings.values())
        self.local_interest: dict[str, int] = {}  # filter -> our subscriptions on it
        self.local_durable: dict[str, int] = {}  # the same, of persistent sessions
        self.remote = TopicTrie()  # siblings' filters, key = sibling index
        self.remote_durable = TopicTrie()  # siblings' persistent sessions' filters
        # topic -> (sibling indexes with a match, those with a persistent session's
        # match, shared groups): until the siblings' interest changes
        self._matches: dict[str, tuple[tuple[int, ...], frozenset, list]] = {}
        self._waiters: deque[tuple[tuple[int, ...], Callable[[], None]]] = deque()
        self._flush_scheduled = False
        self._share_rr: dict[tuple[str, str], int] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._link_lost: dict[int, asyncio.Event] = {}  # set when a link we keep up breaks
        self._closed = False
        self._all_up = asyncio.Event()
        self.matched = 0  # siblings the last forward() found a matching subscription in
        self.loop: asyncio.AbstractEventLoop | None = None
        # Random per process, so a sibling tells our sequence numbers from those
        # of an earlier process of this worker (both start at 1).
        self.incarnation = int.from_bytes(os.urandom(8), "little") >> 2
        self._marks: dict[int, tuple[int, int]] = {}  # sender -> MeshMark as loaded
        # Set after a QoS 2 message of a persistent session was routed: the
        # store's channel is written before the frames (see "Exactly once").
        self.store_first = False
        self._store_poll: asyncio.TimerHandle | None = None
        self._capture: list | None = None  # forwards of the QoS 2 message being routed
        # (client id, packet id) -> Qos2InAdd.forwards of our previous process
        self.prev_forwards: dict[tuple[str, int], list] = {}
        self.colocate: Any = None  # colocate.Colocate when connections may move
        # This worker's CPU use over the last STATS interval (thousandths of a
        # core), sent with the STATS: colocate's load rule.
        self.cpu_load = 0
        self._all_known = False  # every sibling told us its interest (Sibling.known)
        self._cpu_at, self._cpu_used = time.monotonic(), time.process_time()

    # -- ownership (used by handle_connect) ---------------------------------------

    def owner_of(self, client_id: str) -> int:
        return owner_of(client_id, self.count)

    def assign_client_id(self) -> str:
        return assign_client_id(self.index, self.count)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Listen for siblings, connect to the lower-numbered ones, and wait (up to
        ``timeout``) until every sibling is linked, so that clients are accepted
        only once the node is whole (a sibling still down is caught up later)."""
        self.loop = asyncio.get_running_loop()
        path = os.path.join(self.run_dir, f"w{self.index}.mesh")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._server = await self.loop.create_unix_server(lambda: _Link(self), path)
        for sibling in self._sibling_list:
            if sibling.index < self.index:
                self._tasks.append(self.loop.create_task(self._keep_connected(sibling)))
        if not self._sibling_list:
            return
        try:
            await asyncio.wait_for(self._all_up.wait(), timeout)
        except TimeoutError:
            missing = [s.index for s in self._sibling_list if s.link is None]
            log.warning("Worker %d: siblings %s not linked after %.0f s; serving anyway.",
                        self.index, missing, timeout)

    def restore_marks(self, marks: dict[tuple[int, int], tuple[int, int]]) -> None:
        """The MeshMarks loaded from the store (Broker._load)."""
        for (receiver, sender), mark in marks.items():
            if receiver == self.index:
                self._marks[sender] = mark

    def restore_forwards(self, client_id: str, forwards: dict[int, list]) -> None:
        """A session's Qos2InAdd.forwards loaded from the store (Broker._load)."""
        for packet_id, fwd in forwards.items():
            self.prev_forwards[(client_id, packet_id)] = fwd

    def forwards_again(self, client_id: str, packet_id: int) -> list | None:
        """A QoS 2 message our previous process forwarded, resent by its
        publisher: where it went (for ``forward_again``), once; else None."""
        if not self.prev_forwards:
            return None
        return self.prev_forwards.pop((client_id, packet_id), None)

    def start_capture(self) -> None:
        """Record where the forwards that follow go (all acknowledged), until
        ``end_capture``: a QoS 2 message of a persistent session."""
        self._capture = []

    def end_capture(self) -> list | None:
        """The Qos2InAdd.forwards of the message routed since ``start_capture``."""
        captured, self._capture = self._capture, None
        return [self.incarnation, captured] if captured else None

    def forward_again(self, message: Message, sender_id: str, forwards: list) -> None:
        """Forward ``message`` again where our previous process did (AGAIN)."""
        incarnation, targets = forwards
        sender = sender_id.encode("utf-8", "surrogatepass")
        topic = message.topic.encode()
        props = encode_properties(message.properties)
        for index, seq, assigned in targets:
            sibling = self.siblings.get(index)
            if sibling is not None:
                self._send_forward(sibling, FWD, sender, assigned, message, topic, props, True,
                                   _AGAIN.pack(17, AGAIN, incarnation, seq))

    async def _keep_connected(self, sibling: Sibling) -> None:
        loop = self.loop
        assert loop is not None
        # Woken by _link_down, not by polling: a linked mesh costs nothing while idle.
        lost = self._link_lost[sibling.index] = asyncio.Event()
        while not self._closed:
            if sibling.link is None:
                try:
                    await loop.create_unix_connection(lambda: _Link(self), sibling.path)
                except OSError:
                    pass
                await asyncio.sleep(CONNECT_RETRY)  # (its HELLO makes the link)
                continue
            lost.clear()
            await lost.wait()

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._store_poll is not None:
            self._store_poll.cancel()
        if self._server is not None:
            self._server.close()
        self._flush()
        for sibling in self._sibling_list:
            if sibling.link is not None:
                sibling.link.transport.close()

    # -- link events -------------------------------------------------------------

    def _link_up(self, sibling: Sibling, link: _Link, incarnation: int) -> None:
        old = sibling.link
        if old is not None and old is not link:
            old.sibling = None
            old.transport.close()
        sibling.link = link
        sibling.recv_seq = 0  # a new connection: its sender may be a new process
        if incarnation != sibling.incarnation:
            # A new process (or the first link since we started): its frames
            # applied by our previous process are those of our stored mark.
            mark = self._marks.pop(sibling.index, None)
            if sibling.incarnation:
                sibling.prev = (sibling.incarnation, sibling.applied)
            elif mark is not None and mark[0] != incarnation:
                sibling.prev = mark
            sibling.incarnation = incarnation
            sibling.applied = mark[1] if mark is not None and mark[0] == incarnation else 0
        log.info("Worker %d: linked to worker %d.", self.index, sibling.index)
        # Our whole interest, then the frames it has not acknowledged, then a
        # barrier whose acknowledgement covers every sequence number so far.
        frames = [_SEQ_FRAME.pack(9, RESET, 0)]
        for topic_filter, n in self.local_interest.items():
            frames.append(_interest_frame(0, n, topic_filter))
        for topic_filter, n in self.local_durable.items():
            frames.append(_interest_frame(0, n, topic_filter, DURABLE))
        frames.extend(frame for _seq, frame in sibling.resend)
        if self.colocate is not None:
            for move_id, client_id in self.colocate.here_frames(sibling):
                frames.append(_move_frame(HERE, move_id, client_id))
        sibling.sent_seq += 1
        frames.append(_SEQ_FRAME.pack(9, SYNC, sibling.sent_seq))
        sibling.out[:0] = frames
        self._schedule_flush()
        if all(s.link is not None for s in self._sibling_list):
            self._all_up.set()

    def _link_down(self, sibling: Sibling) -> None:
        sibling.link = None
        lost = self._link_lost.get(sibling.index)
        if lost is not None:
            lost.set()
        # Its share-group members went with it (persistent ones come back with
        # its next RESET): meanwhile the groups are served by the others.  Its
        # other filters stay: a persistent session there still wants QoS 1/2.
        for topic_filter in [f for f in sibling.counts if f.startswith("$share/")]:
            del sibling.counts[topic_filter]
            self.remote.unsubscribe(topic_filter, sibling.index)
        self._matches.clear()
        # What was queued for it and not kept for resending is dropped (QoS 0).
        sibling.out.clear()
        if self.colocate is not None:
            self.colocate.on_link_down(sibling)
        if not self._closed:
            log.warning("Worker %d: link to worker %d lost.", self.index, sibling.index)

    # -- sending -------------------------------------------------------------------

    def _send(self, sibling: Sibling, frame: bytes) -> None:
        if sibling.link is None:
            return
        sibling.out.append(frame)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what waits for the siblings (the broker calls it before writing
        to its clients; otherwise it runs once per loop turn)."""
        if self.store_first and self._store_backlog():
            return
        for sibling in self._sibling_list:
            out = sibling.out
            if out and sibling.link is not None:
                sibling.link.transport.write(out[0] if len(out) == 1 else b"".join(out))
                out.clear()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def _store_backlog(self) -> bool:
        """Write the store's proposals now; True while some still wait in this
        process (its channel is backed up): then poll until they are out."""
        flush = getattr(self.broker.store, "flush", None)
        if flush is None or not flush():
            self.store_first = False
            return False
        if self._store_poll is None and self.loop is not None and not self._closed:
            self._store_poll = self.loop.call_later(0.001, self._poll_store)
        return True

    def _poll_store(self) -> None:
        self._store_poll = None
        self.flush()

    def _next_seq(self, sibling: Sibling) -> int:
        sibling.sent_seq += 1
        return sibling.sent_seq

    # -- interest ------------------------------------------------------------------

    def interest(self, topic_filter: str, delta: int, durable: bool = False) -> None:
        """Our subscriptions (``durable``: of persistent sessions) on
        ``topic_filter`` changed by ``delta`` (router.py)."""
        counts = self.local_durable if durable else self.local_interest
        n = counts.get(topic_filter, 0) + delta
        if n > 0:
            counts[topic_filter] = n
        else:
            counts.pop(topic_filter, None)
        kind = DURABLE if durable else INTEREST
        for sibling in self._sibling_list:
            seq = self._next_seq(sibling)
            self._send(sibling, _interest_frame(seq, delta, topic_filter, kind))

    def _on_interest(self, sibling: Sibling, delta: int, topic_filter: str,
                     durable: bool = False) -> None:
        self._matches.clear()
        counts = sibling.durable if durable else sibling.counts
        trie = self.remote_durable if durable else self.remote
        old = counts.get(topic_filter, 0)
        n = old + delta
        if n > 0:
            counts[topic_filter] = n
            if old <= 0 or topic_filter.startswith("$share/"):
                trie.subscribe(topic_filter, sibling.index, n)  # (shared: member count)
        else:
            counts.pop(topic_filter, None)
            if old > 0:
                trie.unsubscribe(topic_filter, sibling.index)

    def _on_reset(self, sibling: Sibling) -> None:
        self._matches.clear()
        for topic_filter in sibling.counts:
            self.remote.unsubscribe(topic_filter, sibling.index)
        sibling.counts.clear()
        for topic_filter in sibling.durable:
            self.remote_durable.unsubscribe(topic_filter, sibling.index)
        sibling.durable.clear()
        sibling.known = True
        self._all_known = all(s.known for s in self._sibling_list)

    # -- forwarding ------------------------------------------------------------------

    def forward(self, message: Message, sender_id: str | None, local_shared: list) -> list:
        """Send ``message`` to every sibling that needs it; return the shared
        groups of ``local_shared`` this worker serves itself."""
        qos = message.qos
        retain = message.retain
        if len(self.remote):
            match = self._matches.get(message.topic)
            if match is None:
                match = self._match_remote(message.topic)
            indexes, durable, shared_remote = match
            if not qos and not retain and not shared_remote and not local_shared:
                # Hot path: QoS 0, no share group: one frame (no sequence number,
                # nothing kept for resending) for every sibling that matched.
                self.matched = len(indexes)
                if self.colocate is not None and sender_id:
                    self._note(sender_id, message.topic, indexes, False)
                if indexes:
                    frame = fwd_frame(FWD, 0, sender_id.encode("utf-8", "surrogatepass")
                                      if sender_id else b"", b"", message.topic.encode(),
                                      message.payload, 0, False,
                                      encode_properties(message.properties), message.expiry_at)
                    siblings = self.siblings
                    for index in indexes:
                        sibling = siblings[index]
                        if sibling.link is not None:
                            sibling.out.append(frame)
                    if not self._flush_scheduled:
                        self._schedule_flush()
                return local_shared
            if not indexes and not shared_remote and not retain and not local_shared \
                    and self._all_known:
                # QoS 1/2 that no sibling wants (a co-located pair): nothing to send.
                self.matched = 0
                if self.colocate is not None and sender_id:
                    self._note(sender_id, message.topic, (), False)
                return local_shared
        else:
            if not qos and not retain:
                self.matched = 0  # no sibling subscribed to anything
                if self.colocate is not None and sender_id:
                    self._note(sender_id, message.topic, (), bool(local_shared))
                return local_shared
            indexes = ()
            durable = frozenset()
            shared_remote = ()
        if self.colocate is not None and sender_id:
            self._note(sender_id, message.topic, () if retain or shared_remote else indexes,
                       bool(local_shared))
        targets: dict[int, list | None] = dict.fromkeys(indexes)
        # Siblings with a matching subscription (PUBACK 0x10 "no matching
        # subscribers" looks at the whole node).
        self.matched = len(targets) + len(shared_remote)
        if qos or retain:
            for sibling in self._sibling_list:
                # Retained: every worker keeps them.  QoS 1/2: a sibling whose
                # interest we do not know yet may hold a persistent session.
                if retain or not sibling.known:
                    targets.setdefault(sibling.index, None)
        if shared_remote or (local_shared and len(self.remote)):
            local_shared = self._assign_shared(local_shared, shared_remote, targets)
        if not targets:
            return local_shared
        sender = sender_id.encode("utf-8", "surrogatepass") if sender_id else b""
        topic = message.topic.encode()
        props = encode_properties(message.properties)
        siblings = self.siblings
        capture = self._capture
        for index, assigned in targets.items():
            sibling = siblings[index]
            needs_ack = retain or (qos > 0 and (index in durable or not sibling.known
                                                or assigned is not None))
            if capture is not None:
                needs_ack = True
                capture.append([index, sibling.sent_seq + 1, assigned])
            self._send_forward(sibling, FWD, sender, assigned, message, topic, props,
                               needs_ack)
        return local_shared

    def _note(self, sender_id: str, topic: str, indexes: tuple, local: bool) -> None:
        """Tell colocate where a message of ``sender_id`` went: to ``indexes``,
        and here if ``local`` or a normal subscription of ours matched (the
        router's match of this topic, just made by route())."""
        if not indexes:
            # Delivered here (or nowhere): only a sender with a tally cares.
            t = self.colocate.tally.get(sender_id)
            if t is not None:
                t[0] = -1
            return
        if not local:
            match = self.broker.router._matches.get(topic)
            local = match is None or bool(match[0])
        self.colocate.note(sender_id, topic, indexes, local)

    def send_moved(self, sibling: Sibling, move_id: int, client_id: str) -> None:
        """MOVED after the frames already queued for ``sibling`` (colocate.py)."""
        self._send(sibling, _move_frame(MOVED, move_id, client_id))

    def send_gone(self, sibling: Sibling, move_id: int, client_id: str) -> None:
        self._send(sibling, _move_frame(GONE, move_id, client_id))

    def send_kick(self, sibling: Sibling, move_id: int, client_id: str) -> None:
        """KICK, sequenced: acknowledgements given after it wait for it (gated)."""
        raw = client_id.encode("utf-8", "surrogatepass")
        seq = self._next_seq(sibling)
        self._send(sibling, _KICK_HEAD.pack(1 + 16 + len(raw), KICK, seq, move_id) + raw)

    def _match_remote(self, topic: str) -> tuple[tuple[int, ...], frozenset, list]:
        if len(self._matches) >= MATCH_CACHE_LIMIT:
            self._matches.clear()
        normal, shared = self.remote.match(topic)
        indexes = tuple(dict.fromkeys(index for index, _n, _f in normal))
        durable: frozenset = frozenset()
        if len(self.remote_durable):
            d_normal, d_shared = self.remote_durable.match(topic)
            durable = frozenset([i for i, _n, _f in d_normal]
                                + [i for _g, _f, members in d_shared for i, _n in members])
        match = self._matches[topic] = (indexes, durable, shared)
        return match

    def _send_forward(self, sibling: Sibling, kind: int, sender: bytes, assigned: list | None,
                      message: Message, topic: bytes, props: bytes, needs_ack: bool,
                      prefix: bytes = b"") -> None:
        seq = self._next_seq(sibling) if needs_ack else 0
        frame = fwd_frame(kind, seq, sender, orjson.dumps(assigned) if assigned else b"", topic,
                          message.payload, message.qos, message.retain, props, message.expiry_at)
        if prefix:
            frame = prefix + frame
        if needs_ack:
            sibling.resend.append((seq, frame))
            if len(sibling.resend) % RESEND_WARN == 0:
                log.warning("Worker %d: %d messages wait for worker %d to acknowledge them.",
                            self.index, len(sibling.resend), sibling.index)
        self._send(sibling, frame)

    def assigned_shared(self, message: Message, shared: list, assigned: set) -> list:
        """A forwarded message: the share groups of ``shared`` (local matches) it
        was assigned to here.  A group assigned here that has no member here any
        more (it left, or this worker restarted) goes on to a sibling that has one."""
        kept = [g for g in shared if (g[0], g[1]) in assigned]
        if len(kept) < len(assigned):
            here = {(g[0], g[1]) for g in kept}
            for group, topic_filter in assigned - here:
                if not self.forward_shared(message, group, topic_filter):
                    log.info("Worker %d: no member left in share group %s for %s; dropped.",
                             self.index, group, message.topic)
        return kept

    def forward_shared(self, message: Message, group: str, topic_filter: str) -> bool:
        """Give ``message`` to a member of share group ``group`` on
        ``topic_filter`` in a sibling worker; False if no sibling has one."""
        key = f"$share/{group}/{topic_filter}"
        candidates = [s for s in self._sibling_list if s.counts.get(key, 0) > 0]
        if not candidates:
            return False
        rr_key = (group, topic_filter)
        turn = self._share_rr.get(rr_key, 0)
        self._share_rr[rr_key] = turn + 1
        sibling = candidates[turn % len(candidates)]
        self._send_forward(sibling, FWD_SHARED, b"", [[group, topic_filter]], message,
                           message.topic.encode(), encode_properties(message.properties),
                           message.qos > 0)
        return True

    def _assign_shared(self, local_shared: list, shared_remote: list,
                       targets: dict[int, list | None]) -> list:
        """Pick, for each matching share group, the worker that serves it this
        time: round-robin weighted by each worker's member count."""
        groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
        local: dict[tuple[str, str], Any] = {}
        for entry in local_shared:
            key = (entry[0], entry[1])
            local[key] = entry
            groups[key] = [(self.index, len(entry[2]))]
        for group, topic_filter, members in shared_remote:
            key = (group, topic_filter)
            weights = groups.setdefault(key, [])
            for index, n in members:
                weights.append((index, n))
        kept = []
        rr = self._share_rr
        for key, weights in groups.items():
            if len(weights) == 1:
                chosen = weights[0][0]
            else:
                weights.sort()
                total = sum(n for _i, n in weights)
                turn = rr.get(key, 0)
                rr[key] = turn + 1
                pick = turn % total
                chosen = weights[-1][0]
                for index, n in weights:
                    if pick < n:
                        chosen = index
                        break
                    pick -= n
            if chosen == self.index:
                kept.append(local[key])
            else:
                assigned = targets.get(chosen)
                if assigned is None:
                    targets[chosen] = [list(key)]
                else:
                    assigned.append(list(key))
        return kept

    # -- acknowledgements and barriers ----------------------------------------------

    def gating(self) -> bool:
        """Whether an acknowledgement given now must wait for the siblings."""
        if self._waiters:
            return True
        for sibling in self._sibling_list:
            if sibling.acked < sibling.sent_seq:
                return True
        return False

    def gated(self, action: Callable[[], None]) -> Callable[[], None]:
        """``action`` made to wait, once called, for the siblings to acknowledge
        every frame sent to them until now (order among gated actions kept)."""
        token = tuple(s.sent_seq for s in self._sibling_list)

        def run() -> None:
            self.when_acked(token, action)

        return run

    def when_acked(self, token: tuple[int, ...], action: Callable[[], None]) -> None:
        if not self._waiters and self._satisfied(token):
            action()
        else:
            self._waiters.append((token, action))

    def _satisfied(self, token: tuple[int, ...]) -> bool:
        for sibling, seq in zip(self._sibling_list, token, strict=True):
            if sibling.acked < seq:
                return False
        return True

    def _on_ack(self, sibling: Sibling, seq: int) -> None:
        if seq <= sibling.acked:
            return
        sibling.acked = seq
        resend = sibling.resend
        while resend and resend[0][0] <= seq:
            resend.popleft()
        waiters = self._waiters
        while waiters and self._satisfied(waiters[0][0]):
            _token, action = waiters.popleft()
            try:
                action()
            except Exception:
                log.exception("Error in an acknowledgement")
        self.broker.flush_ops()

    def _send_ack(self, sibling: Sibling, seq: int) -> None:
        self._send(sibling, _SEQ_FRAME.pack(9, ACK, seq))

    # -- co-location (colocate.py) ---------------------------------------------------

    def _on_move_frame(self, sibling: Sibling, kind: int, body: bytes) -> None:
        colocate = self.colocate
        if kind == KICK:
            seq, move_id = _AGAIN_BODY.unpack_from(body)
            if colocate is not None:
                colocate.on_kick(move_id, body[16:].decode("utf-8", "surrogatepass"))
            sibling.recv_seq = seq
            return
        move_id = _U64.unpack_from(body)[0]
        client_id = body[8:].decode("utf-8", "surrogatepass")
        if colocate is None:
            return  # (every worker of a node has the same setting)
        if kind == MOVED:
            colocate.on_marker(sibling, move_id, client_id)
        elif kind == GONE:
            colocate.on_gone(move_id, client_id)
        else:
            colocate.on_here(sibling, move_id, client_id)

    # -- $SYS totals ---------------------------------------------------------------

    def send_stats(self) -> None:
        broker = self.broker
        stats = broker.stats
        values = [getattr(stats, f) for f in STAT_FIELDS]
        now, cpu = time.monotonic(), time.process_time()
        if now > self._cpu_at:
            self.cpu_load = int((cpu - self._cpu_used) * 1000 / (now - self._cpu_at))
        self._cpu_at, self._cpu_used = now, cpu
        values += [broker.connected_count, broker.disconnected_count(),
                   broker.router.subscription_count, self.cpu_load]
        frame_body = orjson.dumps(values)
        frame = _LEN.pack(1 + len(frame_body)) + bytes((STATS,)) + frame_body
        for sibling in self._sibling_list:
            self._send(sibling, frame)
        if self.colocate is not None:
            self.colocate.tick()  # (every upkeep tick, like the STATS)

    def sibling_totals(self) -> list[int]:
        """Sum of the siblings' last STATS: STAT_FIELDS, then connected,
        disconnected sessions, subscriptions."""
        totals = [0] * STAT_SUMMED
        for sibling in self._sibling_list:
            for i, value in enumerate(sibling.stats[:STAT_SUMMED]):
                totals[i] += value
        return totals

    def connected_per_worker(self) -> dict[int, int]:
        """Connected clients by worker index (siblings as of their last STATS)."""
        counts = {self.index: self.broker.connected_count}
        for sibling in self._sibling_list:
            # Every worker from the first interval on (0 until it reports), so
            # the set of $SYS topics -- and the retained count -- stays put.
            counts[sibling.index] = sibling.stats[STAT_CONNECTED] if sibling.stats else 0
        return counts

    def load_per_worker(self) -> dict[int, int]:
        """Thousandths of a core each worker used over its last STATS interval."""
        loads = {self.index: self.cpu_load}
        for sibling in self._sibling_list:
            stats = sibling.stats
            loads[sibling.index] = stats[STAT_CPU] if len(stats) > STAT_CPU else 0
        return loads

    # -- receiving -------------------------------------------------------------------

    def _on_frames(self, link: _Link, buf: bytearray) -> int:
        """Handle every whole frame in ``buf``; return the bytes consumed."""
        frames, used = split_frames(buf, FWD, FWD_SHARED)
        if not frames:
            return 0
        sibling = link.sibling
        acked_before = sibling.recv_seq if sibling is not None else 0
        broker = self.broker
        router = broker.router
        marked = 0  # the last of these frames applied (MeshMark)
        broker._in_read = True
        try:
            for frame in frames:
                kind = frame[0]
                if sibling is None:
                    if kind != HELLO:
                        raise ValueError(f"frame {kind} before HELLO")
                    index = int.from_bytes(frame[1][:2], "little")
                    sibling = self.siblings.get(index)
                    if sibling is None:
                        raise ValueError(f"HELLO from unknown worker {index}")
                    link.sibling = sibling
                    self._link_up(sibling, link, int.from_bytes(frame[1][2:10], "little"))
                    acked_before = 0
                elif kind == FWD or kind == FWD_SHARED:
                    _k, seq, sender, assign, topic, payload, qos, retain, props, expiry = frame
                    if seq:
                        if seq <= sibling.applied:
                            # Sent again after a broken link: applied already (by
                            # our previous process, if we restarted).
                            sibling.recv_seq = seq
                            continue
                        sibling.applied = marked = seq
                        again = link.again
                        if again is not None:
                            link.again = None
                            if again[0] == sibling.prev[0] and again[1] <= sibling.prev[1]:
                                sibling.recv_seq = seq  # its previous process's forward was
                                continue  # applied here
                    message = Message(topic, payload, qos, retain,
                                      decode_properties(props) if props is not None else None,
                                      expiry)
                    groups = {(g, f) for g, f in orjson.loads(assign)} if assign is not None \
                        else None
                    if kind == FWD:
                        router.route(message, sender, broker.pending_ops if qos else None, False,
                                     None, False, groups)
                    elif groups:
                        router.deliver_shared(message, groups)
                    if seq:
                        sibling.recv_seq = seq
                elif kind == AGAIN:
                    link.again = _AGAIN_BODY.unpack_from(frame[1])
                elif kind == ACK:
                    self._on_ack(sibling, _U64.unpack_from(frame[1])[0])
                elif kind == INTEREST or kind == DURABLE:
                    seq, delta = _INTEREST_BODY.unpack_from(frame[1])
                    self._on_interest(sibling, delta, frame[1][12:].decode(), kind == DURABLE)
                    if seq:
                        sibling.recv_seq = seq
                elif kind == SYNC:
                    sibling.recv_seq = _U64.unpack_from(frame[1])[0]
                elif kind == RESET:
                    self._on_reset(sibling)
                elif kind == STATS:
                    sibling.stats = tuple(orjson.loads(frame[1]))
                elif MOVED <= kind <= HERE:
                    self._on_move_frame(sibling, kind, frame[1])
                elif kind == HELLO:
                    raise ValueError("second HELLO")
                else:
                    raise ValueError(f"unknown frame type {kind}")
        finally:
            if marked and broker.pending_ops:
                # What these frames changed in the store, and that they were applied.
                broker.pending_ops.append(MeshMark(self.index, sibling.index,
                                                   sibling.incarnation, marked))
            broker.flush_ops()
            broker.end_read()
        if sibling is not None and sibling.recv_seq != acked_before:
            seq = sibling.recv_seq
            target = sibling
            # After what these frames changed is committed (the store only: never
            # behind our own barrier, or two workers could wait for each other).
            broker.after_store(lambda: self._send_ack(target, seq))
        return used


def _move_frame(kind: int, move_id: int, client_id: str) -> bytes:
    raw = client_id.encode("utf-8", "surrogatepass")
    return _MOVE_HEAD.pack(1 + 8 + len(raw), kind, move_id) + raw


def _interest_frame(seq: int, delta: int, topic_filter: str, kind: int = INTEREST) -> bytes:
    raw = topic_filter.encode()
    return _INTEREST_HEAD.pack(1 + 12 + len(raw), kind, seq, delta) + raw


class _Link(asyncio.Protocol):
    """One connection between two workers (either end)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.sibling: Sibling | None = None
        self.transport: Any = None
        self.buf = bytearray()
        self.again: tuple[int, int] | None = None  # from an AGAIN frame, for the next FWD

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024 * 1024)
        transport.write(_HELLO.pack(11, HELLO, self.mesh.index, self.mesh.incarnation))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            used = self.mesh._on_frames(self, buf)
        except Exception:
            log.exception("Worker %d: bad frame from a sibling; closing the link.",
                          self.mesh.index)
            self.transport.close()
            return
        if used:
            del buf[:used]

    def connection_lost(self, exc: Exception | None) -> None:
        sibling = self.sibling
        if sibling is not None and sibling.link is self:
            self.mesh._link_down(sibling)
        self.sibling = None
