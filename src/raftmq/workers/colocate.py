"""Connection co-location: move a publisher to the worker where its messages go.

SO_REUSEPORT and client-id ownership place a publisher and its subscriber on
different workers about half the time with two workers; every message then
costs a mesh frame out, a wake-up and a read + decode in the sibling.  When a
connection's recent messages were delivered to no local subscriber and
forwarded to exactly one sibling X, moving the connection itself to X makes
them local.  ``colocate = true`` (the default with more than one worker)
turns this on; off, nothing here runs and the mesh counts nothing.

Decision (``tick``, from the upkeep tick, once per window of WINDOW seconds):
``note`` (called by ``Mesh.forward`` for every message a client publishes)
tallies, per sender, the one sibling all its messages of the window went to
(-1 as soon as one was delivered here or went to none or several).  A sender
with at least MIN_MESSAGES in the window, all to X, is a candidate; it moves
only when its state can move whole:

- CONNECTED and online, no subscriptions, nothing in flight or queued either
  way (no QoS 2 receive state), no partial packet in the parser, nothing in
  its output buffer nor in the transport's;
- a session that ends with the connection (3.1.1 clean session, 5.0 expiry 0,
  never written to the store): nothing durable names the worker holding it;
- nothing owed to it: the candidates are first *held* (not read) until
  everything submitted before is committed and acknowledged by the siblings
  (``Broker.after_commit``), so a QoS 1 publisher's PUBACKs waiting for a
  commit are written before it moves (an acknowledgement closure holds the
  connection it writes to); a held connection that still cannot move reads on;
- it did not move in the last MIN_STAY seconds (no ping-pong);
- X has room for it, by CPU: every worker reports the share of a core it
  used over the last STATS interval.  X is refused when, with the mover's
  estimated share added (ours / our connections), it would be at least BUSY
  *and* busier than we would be by more than MARGIN: locality wins while X
  has room or is the idler one, and many publishers to one subscriber
  (fan-in) stop moving once that worker is the busy one instead of piling
  onto a single core.  Once refused, X stays refused until it is below
  RELEASE or no busier than us (hysteresis).  Loads are adjusted for this
  round's moves.  A cap on connections (at most CAP_RATIO x ours + CAP_SLACK
  after the move) keeps lagging load figures from emptying a worker.
- at most MAX_PER_ROUND moves per window, and only between a client id's
  owner worker and one other (away from home, or back home): the owner's
  directory (below) then always knows where the id is.

Mechanism: the source stops reading, sends the socket (SCM_RIGHTS, handoff.py)
with the connection's MQTT state in one datagram, then queues a MIGRATE marker
on the mesh link to X *after* the FWD frames of everything the client
published so far.  X starts reading the adopted socket only once it has both
the socket and the marker, so every message published before the move reaches
its subscribers before any published after.  If the datagram cannot be sent
at once (X down, queue full, state too big) the connection resumes where it
was, untouched.

Client-id directory: a client id's new CONNECTs always reach its owner worker
(ownership.py), so the owner remembers ``away[client id] = (worker, move id)``
for its ids connected elsewhere.  A CONNECT for such an id sends KICK to that
worker (a sequenced frame: the new CONNACK waits for its acknowledgement),
which closes the old connection as a takeover (5.0 reason 0x8E) and publishes
its will; the new session starts clean (the moved one ended with its
connection).  A moved connection that closes sends GONE to its owner; a worker
whose link breaks (it died) loses its entries; a restarted owner is told again
(HERE) by the siblings holding its ids.  A connection that arrives where its
id already has a session (a takeover raced with the move) is closed as taken
over.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import TYPE_CHECKING, Any

import orjson

from raftmq._connection import take_over
from raftmq.broker.protocol import CLOSING, CONNECTED, Connection
from raftmq.state.entries import decode_message, encode_message

if TYPE_CHECKING:
    from raftmq.broker.server import Broker
    from raftmq.workers.handoff import Handoff
    from raftmq.workers.mesh import Mesh, Sibling

log = logging.getLogger("raftmq.workers")

WINDOW = 1.0  # seconds of traffic a decision looks at
MIN_MESSAGES = 16  # messages in the window, all to one sibling, to be a candidate
MIN_STAY = 10.0  # seconds a moved connection stays before it may move again
MAX_PER_ROUND = 128  # moves per window and worker (a move costs ~0.1 ms of the tick)
# The load rule, in thousandths of a core (the siblings' STATS frames).
BUSY = 700  # refuse X at this load after the move ...
MARGIN = 100  # ... when it would also be busier than us by more than this
RELEASE = 550  # a refused X is asked again below this load (or when no busier)
CAP_RATIO, CAP_SLACK = 3, 8  # never more than CAP_RATIO x our connections + CAP_SLACK
# A marker whose socket did not come, or a socket whose marker did not come
# while the link to its sender stayed up (a broken link serves it at once).
ARRIVAL_TIMEOUT = 60.0
ROUND_PAUSE = 0.002  # seconds before a round goes on after a target's queue was full
ROUND_RETRIES = 100  # pauses per round before the rest waits for the next window
HOLD_MAX = 1.0  # seconds a candidate may be held (not read) waiting for what it is owed

RC_SESSION_TAKEN_OVER = 0x8E

_MIG_HEAD = struct.Struct("<QII")  # move id, state JSON length, will length
_U64 = struct.Struct("<Q")


class MovedConnection(Connection):
    """A connection adopted from a sibling by co-location (already CONNECTED)."""

    __slots__ = ("move_id", "moved_at", "colocate", "raw", "kicked", "source")

    def __init__(self, broker: Broker, colocate: Colocate, move_id: int, state: dict,
                 will: Any, raw: bytes, kicked: bool, source: int) -> None:
        super().__init__(broker)
        self.colocate = colocate
        self.move_id = move_id
        self.moved_at = time.monotonic()
        self.raw = raw  # read by the source, not parsed yet
        self.kicked = kicked  # a KICK came before the socket
        self.source = source
        self._restore(state, will)

    def _restore(self, s: dict, will: Any) -> None:
        self.client_id = s["id"]
        self.username = s["user"]
        self.version = s["v"]
        self.parser.protocol_version = s["v"]
        self.keepalive = s["ka"]
        self.will = (s["wd"], will) if will is not None else None
        self.client_receive_max = s["rm"]
        self.client_max_packet = s["mp"]
        self.client_alias_max = s["am"]
        if s["ai"]:
            self.alias_in = {int(k): t for k, t in s["ai"]}
        if self.client_alias_max:
            self.alias_out = dict(s["ao"])
        self.next_alias_out = s["na"]
        self.problem_info = s["pi"]
        self.clean_start = s["cs"]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        raw, self.raw = self.raw, b""
        self.colocate._activate(self, raw)

    def connection_lost(self, exc: Exception | None) -> None:
        session = self.session
        ended = session is not None and session.conn is self
        super().connection_lost(exc)
        if ended:
            self.colocate._gone(self)


class _Arrival:
    """One move seen from the target: the socket and the marker, in either order."""

    __slots__ = ("sock", "state", "will", "raw", "marker", "kicked", "since", "source")

    def __init__(self) -> None:
        self.sock: Any = None
        self.state: dict | None = None
        self.will: Any = None
        self.raw = b""
        self.marker = False
        self.kicked = False
        self.since = time.monotonic()
        self.source = -1


class Colocate:
    def __init__(self, broker: Broker, mesh: Mesh, handoff: Handoff) -> None:
        self.broker = broker
        self.mesh = mesh
        self.handoff = handoff
        self.index = mesh.index
        # sender client id -> [the one sibling its messages went to (-1: not one), count]
        self.tally: dict[str, list[int]] = {}
        self.window_start = 0.0
        # Owner side: our client ids connected on a sibling -> (worker, move id).
        self.away: dict[str, tuple[int, int]] = {}
        self.arrivals: dict[int, _Arrival] = {}  # move id -> what came so far
        self.refused: set[int] = set()  # siblings refused by the load rule (hysteresis)
        self._pending_round: Any = None  # a hold's timer, or the rest of a round (a full queue)
        self.moved_out = 0
        self.moved_in = 0
        mesh.colocate = self
        handoff.on_moved = self.on_socket

    # -- decision ---------------------------------------------------------------

    def note(self, sender: str, topic: str, indexes: tuple, local: bool) -> None:
        """A message of ``sender`` was forwarded to the siblings ``indexes``;
        ``local``: some subscription of this worker matched it too."""
        dest = indexes[0] if len(indexes) == 1 and not local else -1
        t = self.tally.get(sender)
        if t is None:
            self.tally[sender] = [dest, 1]
        elif t[0] == dest:
            t[1] += 1
        else:
            t[0] = -1

    def tick(self) -> None:
        now = time.monotonic()
        self._expire_arrivals(now)
        if now - self.window_start < WINDOW or self._pending_round is not None:
            return
        self.window_start = now
        tally = self.tally
        if not tally:
            return
        self.tally = {}
        candidates = [(cid, t[0]) for cid, t in tally.items() if t[0] >= 0 and t[1] >= MIN_MESSAGES]
        if candidates:
            self._hold(candidates, now)

    def _hold(self, candidates: list, now: float) -> None:
        """Stop reading the candidates that may move, then go on (``_round``) once
        everything submitted so far is committed and the siblings processed what
        was forwarded: every acknowledgement owed to a held connection (a QoS 1
        PUBACK waiting for its commit) is then written, and nothing new can be
        owed to it, as it reads nothing.  So a publisher that always has a
        message in flight can move too, after a pause of one commit."""
        broker = self.broker
        if broker._stopping:
            return
        held = []
        for client_id, dest in candidates:
            session = broker.sessions.get(client_id)
            conn = session.conn if session is not None else None
            if conn is None or not self._may_move(conn, session, now):
                continue
            conn.transport.pause_reading()
            held.append((conn, dest))
            if len(held) >= MAX_PER_ROUND:
                break
        if not held:
            return
        # A hold that outlasts HOLD_MAX (a commit or a sibling's acknowledgement
        # stuck: the raft process or a sibling restarting) is given up: they read
        # on, and stay.
        loop = broker.loop
        timer = loop.call_later(HOLD_MAX, self._give_up, held)
        self._pending_round = timer
        mesh = self.mesh

        def committed() -> None:
            if self._pending_round is not timer:
                return  # given up meanwhile
            timer.cancel()
            # (call_soon: the acknowledgements those commits wrote are flushed first.)
            self._pending_round = loop.call_soon(
                self._round, held, 0, mesh.load_per_worker(), mesh.connected_per_worker(),
                [0, 0, 0, 0])

        broker.after_commit(committed)

    def _give_up(self, held: list) -> None:
        self._pending_round = None
        for conn, _dest in held:
            if conn.state == CONNECTED:
                self._release(conn)

    def _round(self, held: list, start: int, loads: dict[int, int], counts: dict[int, int],
               done: list) -> None:
        """Move the held connections from ``start`` on; when a target's hand-off
        queue is full (it reads it once per loop turn) go on a moment later.
        ``done``: moved, cannot move now, kept by the load rule, pauses."""
        self._pending_round = None
        broker = self.broker
        if any(conn.out for conn, _dest in held[start:]):
            broker._flush()
        for i in range(start, len(held)):
            conn, dest = held[i]
            session = conn.session
            if session is None or session.conn is not conn or conn.state != CONNECTED:
                continue  # closed or taken over meanwhile
            if broker._stopping or not self._drained(conn, session):
                done[1] += 1
                self._release(conn)
                continue
            share = self._balanced(loads, counts, dest)
            if share is None:
                done[2] += 1
                self._release(conn)
                continue
            moved = self.move(conn, dest)
            if moved:  # this round's later decisions see it
                loads[dest] = loads.get(dest, 0) + share
                loads[self.index] -= share
                counts[dest] = counts.get(dest, 0) + 1
                counts[self.index] -= 1
            if moved is None and not broker._stopping and done[3] < ROUND_RETRIES:
                done[3] += 1
                self._pending_round = broker.loop.call_later(
                    ROUND_PAUSE, self._round, held, i, loads, counts, done)
                return
            if moved:
                done[0] += 1
            else:
                self._release(conn)
        if broker.debug:
            log.debug("Worker %d: %d candidates to move, %d moved, %d cannot move now, %d kept "
                      "by the load rule.", self.index, len(held), *done[:3])

    @staticmethod
    def _release(conn: Connection) -> None:
        """A held connection stays: it reads again (unless its own output
        backlog paused it, which resumes it when drained)."""
        transport = conn.transport
        if transport is not None and not conn.paused and not transport.is_closing():
            transport.resume_reading()

    def _may_move(self, conn: Connection, session: Any, now: float) -> bool:
        """What a wait cannot change: the connection and its session can move whole."""
        if conn.state != CONNECTED or not conn.online or conn.paused:
            return False
        if _carries_state(session) or session.durable or session.expiry_interval:
            return False
        if now - getattr(conn, "moved_at", -MIN_STAY) < MIN_STAY:
            return False
        transport = conn.transport
        # (A TLS session could not follow its socket: such a connection stays.)
        return transport is not None and not transport.is_closing() \
            and transport.get_extra_info("sslcontext") is None

    def _drained(self, conn: Connection, session: Any) -> bool:
        """After the hold: nothing owed to it, nothing half-read, nothing unwritten."""
        if conn.paused or conn.out or conn.dirty or conn.qos1_in_pending:
            return False
        if _carries_state(session):
            return False  # a SUBSCRIBE or QoS 2 PUBLISH read before the hold
        if conn.parser.buffered or conn.parser.error is not None:
            return False
        transport = conn.transport
        return transport is not None and not transport.is_closing() \
            and transport.get_write_buffer_size() == 0

    def _balanced(self, loads: dict[int, int], counts: dict[int, int], dest: int) -> int | None:
        """The load rule (module docstring): the mover's estimated load if it
        may move to ``dest``, else None."""
        me = self.index
        ours, theirs = loads.get(me, 0), loads.get(dest, 0)
        share = ours // max(1, counts.get(me, 0))
        if dest in self.refused:
            if theirs >= RELEASE and theirs > ours:
                return None
            self.refused.discard(dest)
        if theirs + share >= BUSY and theirs + share > ours - share + MARGIN:
            self.refused.add(dest)
            return None
        if counts.get(dest, 0) + 1 > (counts.get(me, 0) - 1) * CAP_RATIO + CAP_SLACK:
            return None
        return share

    # -- the move (source side) ---------------------------------------------------

    def move(self, conn: Connection, dest: int) -> bool | None:
        """Move ``conn`` (held: not reading) to sibling ``dest``; False (and
        untouched) if it cannot, None (untouched) if not now: the target's
        hand-off queue is full."""
        mesh = self.mesh
        broker = self.broker
        sibling = mesh.siblings.get(dest)
        if sibling is None or sibling.link is None:
            return False
        client_id = conn.client_id
        owner = mesh.owner_of(client_id)
        if owner != self.index and dest != owner:
            return False  # only away from home or back: the owner's directory stays right
        move_id = int.from_bytes(os.urandom(8), "little") >> 1 or 1
        body = _encode_state(conn, move_id)
        transport = conn.transport
        sent = self.handoff.move(conn, dest, body)
        if not sent:
            return sent
        # After the FWD frames of everything this client published here.
        mesh.send_moved(sibling, move_id, client_id)
        session = conn.session
        conn.state = CLOSING  # nothing more is read, handled or written here
        conn.online = False
        conn.will = None
        conn.session = None
        session.conn = None
        if broker.sessions.get(client_id) is session:
            del broker.sessions[client_id]
        broker.connected_count -= 1
        broker.stats.connections -= 1  # counted again by the target
        broker.connections.discard(conn)
        if owner == self.index:
            self.away[client_id] = (dest, move_id)
        self.moved_out += 1
        if broker.debug:
            log.debug("Client %s moved from worker %d to worker %d (its messages go there).",
                      client_id, self.index, dest)
        transport.abort()  # our descriptor only: the sibling's copy keeps the connection
        return True

    # -- the move (target side) -----------------------------------------------------

    def on_socket(self, sock: Any, sender: int, body: bytes) -> None:
        """The socket and state of a move from worker ``sender``, from the
        hand-off socket."""
        try:
            move_id, state, will, raw = _decode_state(body)
        except Exception:  # noqa: BLE001 - a bad datagram must not stop the loop
            log.exception("Worker %d: a moved connection's state is unreadable; closing it.",
                          self.index)
            sock.close()
            return
        arrival = self.arrivals.get(move_id)
        if arrival is None:
            arrival = self.arrivals[move_id] = _Arrival()
        arrival.sock, arrival.state, arrival.will, arrival.raw = sock, state, will, raw
        arrival.source = sender
        sibling = self.mesh.siblings.get(sender)
        if arrival.marker or sibling is None or sibling.link is None:
            # (No link: the sender died after sending it; no marker will come.)
            self._adopt(move_id)

    def on_marker(self, sibling: Sibling, move_id: int, client_id: str) -> None:
        """MIGRATE from ``sibling``: everything it forwarded for the client came."""
        entry = self.away.get(client_id)
        if entry is not None and entry[0] == sibling.index:
            del self.away[client_id]  # coming home
        arrival = self.arrivals.get(move_id)
        if arrival is None:
            arrival = self.arrivals[move_id] = _Arrival()
        arrival.marker = True
        arrival.source = sibling.index
        if arrival.sock is not None:
            self._adopt(move_id)

    def _adopt(self, move_id: int) -> None:
        arrival = self.arrivals.pop(move_id)
        broker = self.broker
        state, will, raw, kicked = arrival.state, arrival.will, arrival.raw, arrival.kicked
        self.handoff.adopt(arrival.sock, lambda: MovedConnection(broker, self, move_id, state, will,
                                                                raw, kicked, arrival.source))

    def _activate(self, conn: MovedConnection, raw: bytes) -> None:
        """The adopted connection's transport is up: attach its session and read."""
        broker = self.broker
        client_id = conn.client_id
        if conn.kicked or client_id in broker.sessions:
            # A CONNECT for this id came meanwhile: this one was taken over.
            log.info("Client %s already connected, closing old connection.", client_id)
            conn.state = CONNECTED
            will = conn.will
            conn.will = None
            conn.disconnect(RC_SESSION_TAKEN_OVER)
            if will is not None:
                broker.publish_will(client_id, will[1])
                broker.flush_ops()
            return
        ops: list = []
        session, _present = broker.attach_session(conn, client_id, conn.version, 0,
                                                  conn.clean_start, conn.username, ops)
        conn.state = CONNECTED
        conn.online = True
        self.moved_in += 1
        broker.stats.clients_moved += 1
        if ops:
            broker.pending_ops.extend(ops)
            broker.flush_ops()
        if broker.debug:
            log.debug("Client %s arrived on worker %d from worker %d.", client_id, self.index,
                      conn.source)
        if raw:
            conn.data_received(raw)

    def _expire_arrivals(self, now: float) -> None:
        """A marker whose socket never came is forgotten; a socket whose marker
        never came is served anyway (not expected: a sender that dies breaks
        its link, which serves it at once; a backed-up link only delays it)."""
        for move_id in [m for m, a in self.arrivals.items() if now - a.since > ARRIVAL_TIMEOUT]:
            arrival = self.arrivals[move_id]
            if arrival.sock is None:
                del self.arrivals[move_id]
            else:
                log.warning("Worker %d: no marker for a moved connection of %s; serving it.",
                            self.index, arrival.state["id"] if arrival.state else "?")
                self._adopt(move_id)

    # -- the client-id directory ----------------------------------------------------

    def before_connect(self, client_id: str) -> None:
        """A CONNECT for ``client_id`` (we own it) was accepted: if it is connected
        on a sibling, that connection is taken over there (KICK; the CONNACK
        waits for its acknowledgement, mesh.gated)."""
        entry = self.away.pop(client_id, None)
        if entry is None:
            return
        worker, move_id = entry
        sibling = self.mesh.siblings.get(worker)
        if sibling is not None and sibling.link is not None:
            self.mesh.send_kick(sibling, move_id, client_id)

    def on_kick(self, move_id: int, client_id: str) -> None:
        broker = self.broker
        arrival = self.arrivals.get(move_id)
        if arrival is not None:
            arrival.kicked = True
            return
        session = broker.sessions.get(client_id)
        conn = session.conn if session is not None else None
        if conn is None or getattr(conn, "move_id", None) != move_id:
            return  # gone already, or moved on
        take_over(broker, session, client_id, True)  # a moved session ends with its connection
        ops: list = []
        broker.end_session(session, ops)
        broker.pending_ops.extend(ops)

    def _gone(self, conn: MovedConnection) -> None:
        """A moved connection's session ended here: its owner forgets it."""
        owner = self.mesh.owner_of(conn.client_id)
        if owner == self.index:
            return
        sibling = self.mesh.siblings.get(owner)
        if sibling is not None:
            self.mesh.send_gone(sibling, conn.move_id, conn.client_id)

    def on_gone(self, move_id: int, client_id: str) -> None:
        entry = self.away.get(client_id)
        if entry is not None and entry[1] == move_id:
            del self.away[client_id]

    def on_here(self, sibling: Sibling, move_id: int, client_id: str) -> None:
        """A sibling holds a connection of our id (told when the link comes up)."""
        if client_id not in self.broker.sessions:
            self.away[client_id] = (sibling.index, move_id)

    def here_frames(self, sibling: Sibling) -> list[tuple[int, str]]:
        """(move id, client id) of the moved connections here owned by ``sibling``."""
        out = []
        for conn in self.broker.connections:
            move_id = getattr(conn, "move_id", None)
            if move_id is not None and conn.session is not None and conn.state == CONNECTED \
                    and self.mesh.owner_of(conn.client_id) == sibling.index:
                out.append((move_id, conn.client_id))
        return out

    def on_link_down(self, sibling: Sibling) -> None:
        """The sibling died: its connections, ours by id, went with it; one it
        was moving here is served."""
        index = sibling.index
        for client_id in [c for c, (w, _m) in self.away.items() if w == index]:
            del self.away[client_id]
        for move_id in [m for m, a in self.arrivals.items() if a.source == index]:
            if self.arrivals[move_id].sock is None:
                del self.arrivals[move_id]
            else:
                # Its marker will not come (what it forwarded before is lost
                # with the link, as any QoS 0 message in flight there).
                self._adopt(move_id)


def _carries_state(session: Any) -> bool:
    """Whether the session holds what a move does not carry: subscriptions,
    messages in flight or queued either way, QoS 2 receive state."""
    return bool(session.subscriptions or session.inflight or session.queue or session.qos2_in
                or session.unwritten)


def _encode_state(conn: Connection, move_id: int) -> bytes:
    will = conn.will
    state = {
        "id": conn.client_id, "user": conn.username, "v": conn.version, "ka": conn.keepalive,
        "wd": will[0] if will is not None else 0,
        "rm": conn.client_receive_max, "mp": conn.client_max_packet,
        "am": conn.client_alias_max,
        "ai": list(conn.alias_in.items()) if conn.alias_in else [],
        "ao": conn.alias_out if conn.client_alias_max else {},
        "na": conn.next_alias_out, "pi": conn.problem_info, "cs": conn.clean_start,
    }
    blob = orjson.dumps(state)
    will_blob = encode_message(will[1]) if will is not None else b""
    return _MIG_HEAD.pack(move_id, len(blob), len(will_blob)) + blob + will_blob


def _decode_state(body: bytes) -> tuple[int, dict, Any, bytes]:
    move_id, slen, wlen = _MIG_HEAD.unpack_from(body)
    pos = _MIG_HEAD.size
    state = orjson.loads(body[pos:pos + slen])
    pos += slen
    will = decode_message(body[pos:pos + wlen]) if wlen else None
    pos += wlen
    return move_id, state, will, body[pos:]
