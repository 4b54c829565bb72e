"""The broker of one worker: ``Broker(config, store, auth=None)``.

Lifecycle: ``await broker.start()`` loads the committed state from the store,
listens, and starts the 0.5 s upkeep tick (keepalive, connect timeout, session
expiry, delayed wills, ``$SYS``); ``await broker.stop()`` stops accepting,
tells MQTT 5 clients DISCONNECT 0x8B (server shutting down), flushes and
closes every connection.  ``run(config, store)`` runs it on uvloop until
SIGTERM/SIGINT and returns the process exit status.

Hooks for the other parts of raftmq:

- ``Broker.auth``: the ``AuthHook`` (broker/auth.py): ``authenticate`` at
  CONNECT, ``acl_check`` on publish (send and receive), subscribe and
  unsubscribe.  Replace it before ``start()`` (dynsec does).  If the hook has
  ``checks_acl = False`` the broker skips ACL calls entirely.  If it has an
  ``acl_generation`` attribute (dynsec does), the broker caches its
  publish_client_send / publish_client_receive answers per (connection,
  topic) and forgets them all once ``acl_generation`` has changed (it is read
  at the start of every read and on every cache miss): such a hook promises
  that between two changes of the generation a decision depends only on the
  client, the access and the topic (not on QoS or retain), and changes its
  generation outside packet handling (dynsec applies changes from store
  callbacks).  A hook without it is asked on every message.
- ``Broker.control_handlers: dict[str, Callable[[Connection, Message], None]]``:
  a PUBLISH to a topic starting with ``$CONTROL/`` goes, after the ACL check,
  to the handler registered for that exact topic and is never routed to
  subscribers.  The handler answers with ``publish_message``.
- ``Broker.publish_message(message)``: inject a message as if published by the
  broker (retained and routed; QoS 1/2 queued for persistent sessions).
- ``Broker.disconnect_clients(predicate, reason_code, with_will=True)``: kick
  every connected client for which ``predicate(conn)`` is true (5.0 DISCONNECT
  with the reason, 3.x close).  ``conn.client_id``, ``conn.username`` identify
  it.  ``with_will=False`` discards their Wills, stored ones included.
- ``Broker.store``: the Store (state/store.py); durable changes are submitted
  through ``Broker.commit(ops, action)`` (then ``Broker.flush_ops()`` when
  called outside packet handling) so that ``action`` -- e.g. a ``$CONTROL``
  response -- runs only once ``ops`` are committed.
- ``Broker.remote_listeners``: callables given every batch of ops committed
  by another node or worker (``Store.set_remote_listener``), e.g. dynsec
  changes in ``dynsec-sync`` mode (unless a plugin replaced the store's
  listener with its own after the Broker was made).

Durability (DESIGN.md §2): every durable change is an op (state/entries.py).
Ops produced while handling one read are collected in ``pending_ops`` and
submitted as ONE batch at the end of ``data_received`` (``flush_ops``); the
acknowledgements that depend on them (``commit(ops, action)``) run from the
batch's ``done``.  Batches complete in order, so an ack that depends on nothing
but must not overtake an earlier one is chained with ``after_commit``.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from raftmq import _connection as _core
from raftmq._trie import parse_shared
from raftmq.broker.auth import ACCESS_PUBLISH_SEND, DefaultAuth
from raftmq.broker.protocol import CONNECTED, NEW, Connection
from raftmq.broker.retained import Retained
from raftmq.broker.router import Router
from raftmq.broker.session import EXPIRY_NEVER, SHARE_UNKNOWN, Outgoing, Session, Subscription
from raftmq.broker.sys_topics import Stats, SysTopics
from raftmq.broker.will import Wills, will_to_publish
from raftmq.logsetup import flush_logs
from raftmq.state.entries import (
    PUBREC_RECEIVED,
    SENT,
    Message,
    SessionOffline,
    WillDelete,
    unpack_sub_options,
)

log = logging.getLogger("raftmq.broker")

# A connection that has not completed CONNECT this long after accept is closed.
CONNECT_TIMEOUT = 10.0
TICK = 0.5
UPKEEP_SLICE = 500  # connections checked per loop iteration by the upkeep tick
RC_KEEP_ALIVE_TIMEOUT = 0x8D
RC_SERVER_SHUTTING_DOWN = 0x8B
# Cached publish ACL decisions (send + receive) before the caches start over:
# bounds the memory, including closed connections still held as keys.
ACL_CACHE_LIMIT = 10_000


class _NoGeneration:
    """The generation source of a hook without ``acl_generation``: never equal to
    ``Broker.acl_cache_generation``, so the inline cache reads always miss."""

    acl_generation = object()


class Broker(_core.BrokerCore):
    # handle_connect drops the subscriptions of a resumed session that the ACLs
    # no longer allow (dynsec does it itself for a broker without this).
    rechecks_resumed_subscriptions = True

    def __init__(self, config: Any, store: Any, auth: Any = None) -> None:
        self.config = config
        self.store = store
        self.acl_enabled = False
        self.auth = auth if auth is not None else DefaultAuth(config.allow_anonymous)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.sessions: dict[str, Session] = {}
        self.connections: set[Connection] = set()
        self.control_handlers: dict[str, Callable[[Any, Message], None]] = {}
        self.remote_listeners: list[Callable[[list], None]] = []
        # Registered now, so that a plugin installed before start() that sets
        # its own store listener (dynsec does) takes precedence.
        if hasattr(store, "set_remote_listener"):
            store.set_remote_listener(self._on_remote_ops)
        # Set by the worker layer (raftmq.workers) when the node runs several
        # workers: ``mesh`` forwards to siblings and gates acknowledgements,
        # ``handoff`` passes connections to the worker owning their client id.
        self.mesh: Any = None
        self.handoff: Any = None
        self.worker_id = 0
        self.worker_count = 1
        # mode = "ha": (reason code, CONNACK properties) every CONNECT is refused
        # with while this worker does not serve (raftmq.cluster.ha); None = serve.
        self.ha_refusal: tuple[int, dict | None] | None = None
        self.stats = Stats()
        self.retained = Retained()
        self.router = Router(self)
        self.wills = Wills(self)
        self.sys: SysTopics | None = None
        self.metrics: Any = None  # ops/metrics.py WorkerMetrics, set by run() when exported
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.servers: list[asyncio.AbstractServer] = []
        self.ports: list[int] = []
        # Listening sockets held by the supervisor for this worker's slot (they
        # outlive the worker); empty: bind the configured listeners here.
        self.listen_sockets: tuple = ()
        # Writes gathered per connection, flushed once per loop turn.
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        # Adaptive gathering (see end_read): True = flush once per loop turn
        # (call_soon); False = flush at the end of each read.
        self._per_turn = True
        self._in_read = False
        self._reads = 0  # reads since the last flush (per-turn mode) / in this period
        self._sample_reads = 0
        self._sample_flushes = 0
        # Store batching.
        self.pending_ops: list = []
        self._pending_actions: list[Callable[[], None]] = []
        self.outstanding_batches = 0
        self._last_batch_actions: list[Callable[[], None]] = []
        self._tick_handle: asyncio.TimerHandle | None = None
        self._next_sys = 0.0
        self.connect_timeout = CONNECT_TIMEOUT
        self.connected_count = 0  # sessions with a connection
        self._stopping = False  # stop() is closing the connections
        self._expiries: list[tuple[float, str]] = []  # heap of (expire_at, client id)
        # What the broker announces in an MQTT 5 CONNACK (§3.2.2.3).
        inflight = config.max_inflight_messages
        self.receive_maximum = inflight if 0 < inflight < 65535 else 65535
        self.topic_alias_maximum = 10
        props: dict[str, Any] = {"topic_alias_maximum": self.topic_alias_maximum}
        if self.receive_maximum != 65535:
            props["receive_maximum"] = self.receive_maximum
        if not config.retain_available:
            props["retain_available"] = 0
        if config.max_packet_size:
            props["maximum_packet_size"] = config.max_packet_size
        self.connack_properties = props

    @property
    def auth(self) -> Any:
        return self._auth

    @auth.setter
    def auth(self, hook: Any) -> None:
        self._auth = hook
        # Hot path: skip ACL calls entirely for a hook that declares it has none.
        self.acl_enabled = bool(getattr(hook, "checks_acl", True))
        # The bound method, fetched once (not per message).
        self.acl_check: Callable[[Any, str, str, int, bool], bool] = hook.acl_check
        self._acl_cacheable = self.acl_enabled and hasattr(hook, "acl_generation")
        # Publish decisions per topic, then per Connection.  A connection's user
        # name and client id never change; an offline Session's may (another
        # client takes it over), so sessions are never keys.
        # - acl_send_cache: topic -> Connection -> False (may not publish there)
        #   or, when it may, that topic's acl_receive_cache entry: the publish hot
        #   path (handlers/publish.py) gets both answers in one lookup;
        # - acl_receive_cache: topic -> Connection -> may receive (router.route);
        # - Connection.acl_topic / acl_receive: the last topic the connection was
        #   allowed to publish to and its receive decisions (checked first).
        # Valid for the hook's generation ``acl_cache_generation``: compared at
        # the start of each read (dispatch.handle_packets) and on every miss
        # (acl_caches_current), which forgets everything when it moved.  So a
        # hook must change its generation outside packet handling -- from a
        # store callback or a timer, as dynsec applies committed changes.  A
        # hook without a generation gets a source whose generation is never the
        # cached one: nothing is ever cached, the hook is asked every time.
        self.acl_generation_source: Any = hook if self._acl_cacheable else _NoGeneration
        self.acl_cache_generation: Any = None
        self.acl_cached = 0  # entries in both caches (the router counts its inserts too)
        self.acl_send_cache: dict[str, dict[Any, Any]] = {}
        self.acl_receive_cache: dict[str, dict[Any, bool]] = {}

    def acl_caches_current(self) -> bool:
        """Make the decision caches valid for the hook's current generation
        (forgetting everything if it changed or they are full); False when the
        hook cannot be cached."""
        if not self._acl_cacheable:
            return False
        generation = self._auth.acl_generation
        if generation != self.acl_cache_generation or self.acl_cached >= ACL_CACHE_LIMIT:
            self.acl_cache_generation = generation
            self.acl_send_cache = {}
            self.acl_receive_cache = {}
            self.acl_cached = 0
            # Every connection's remembered publish topic goes too (it holds a
            # receive-decision dict that would otherwise live, and grow, on).
            for conn in self.connections:
                conn.acl_topic = None
                conn.acl_receive = None
        return True

    def acl_publish_decision(self, conn: Any, topic: str, qos: int, retain: bool) -> Any:
        """publish_client_send for ``conn`` publishing to ``topic`` (call only when
        ``acl_enabled``): False if refused, else the topic's current receive
        decisions (Connection -> allowed) for router.route, or None for a hook
        that cannot be cached.  Fills the caches (the publish hot path reads them
        inline and calls this on a miss)."""
        if not self.acl_caches_current():
            return None if self.acl_check(conn, ACCESS_PUBLISH_SEND, topic, qos, retain) else False
        per_topic = self.acl_send_cache.get(topic)
        if per_topic is None:
            per_topic = self.acl_send_cache[topic] = {}
        decision = per_topic.get(conn)
        if decision is None:
            if self.acl_check(conn, ACCESS_PUBLISH_SEND, topic, qos, retain):
                decision = self.acl_receive_decisions(topic)
            else:
                decision = False
            per_topic[conn] = decision
            self.acl_cached += 1
        return decision

    def acl_receive_decisions(self, topic: str) -> dict[Any, bool] | None:
        """The current cache of publish_client_receive decisions for ``topic``
        (Connection -> allowed); None when the hook cannot be cached.  The router
        fills it (and counts its inserts in ``acl_cached``)."""
        if not self.acl_caches_current():
            return None
        decisions = self.acl_receive_cache.get(topic)
        if decisions is None:
            decisions = self.acl_receive_cache[topic] = {}
        return decisions

    # -- write gathering --------------------------------------------------------

    # mark_dirty(conn), schedule_flush(), end_read() and _flush(): run per read
    # and per turn, so compiled with the connection (ext/connection.pyx, where
    # their docstrings say how writes are gathered).
    mark_dirty = _core.mark_dirty
    schedule_flush = _core.schedule_flush
    end_read = _core.end_read
    _flush = _core.flush

    # -- store batching ---------------------------------------------------------

    def commit(self, ops: list, action: Callable[[], None] | None) -> None:
        """Submit ``ops`` with this read's batch; run ``action`` once committed
        (and, with sibling workers, once they processed what was forwarded so far)."""
        self.pending_ops.extend(ops)
        if action is not None:
            mesh = self.mesh
            if mesh is not None and mesh.gating():
                action = mesh.gated(action)
            self._pending_actions.append(action)

    # after_commit(action): run ``action`` after everything submitted so far is
    # committed (now if nothing is) and the sibling workers processed what was
    # forwarded to them: the rule for every acknowledgement to a client.
    # after_store(action): the same without the siblings.  Compiled with the
    # connection (ext/connection.pyx): every CONNACK goes through them.
    after_commit = _core.after_commit
    after_store = _core.after_store

    def after_commit_write(self, conn: Connection, out: Outgoing) -> None:
        """Write an in-flight message of a durable session once its op is committed."""
        packet_id = out.packet_id
        session = conn.session
        if session is not None:
            session.unwritten += 1

        def write() -> None:
            if session is not None:
                session.unwritten -= 1
            if conn.state == CONNECTED and session is not None and \
                    session.inflight.get(packet_id) is out and out.state == SENT:
                if not conn.send_outgoing(out):
                    self.router.delivery_done(session, out)

        self._pending_actions.append(write)

    def flush_ops(self) -> None:
        if not self.pending_ops:
            if self._pending_actions:
                actions = self._pending_actions
                self._pending_actions = []
                for action in actions:
                    self.after_store(action)
            return
        ops = self.pending_ops
        actions = self._pending_actions
        self.pending_ops = []
        self._pending_actions = []
        self.outstanding_batches += 1
        self._last_batch_actions = actions
        self.store.submit(ops, lambda: self._batch_done(actions))

    def _batch_done(self, actions: list[Callable[[], None]]) -> None:
        self.outstanding_batches -= 1
        for action in actions:
            try:
                action()
            except Exception:
                log.exception("Error in a commit action")
        if self.pending_ops:  # ops the actions produced (e.g. retained messages after SUBACK)
            self.flush_ops()

    # -- connections and sessions -------------------------------------------------

    # on_connection_made(conn): compiled with the connection (ext/connection.pyx).
    on_connection_made = _core.on_connection_made

    def clients_connected(self) -> int:
        return self.connected_count

    def disconnected_count(self) -> int:
        """Sessions kept without a connection (persistent, offline)."""
        return sum(1 for s in self.sessions.values() if s.conn is None)

    # attach_session(conn, client_id, version, expiry, clean, username, ops)
    # -> (session, present): bind ``conn`` to the session of ``client_id``
    # (take over, start clean or resume); compiled with CONNECT
    # (ext/connection.pyx ``attach_session``).
    attach_session = _core.attach_session

    # end_session(session, ops): the session ends (expired, clean start, expiry 0
    # at close): drop it all.  on_connection_lost(conn): the connection closed
    # (session offline or ended, will).  Compiled with the connection
    # (ext/connection.pyx): every client of a connect storm ends with both.
    end_session = _core.end_session
    on_connection_lost = _core.on_connection_lost

    def publish_will(self, client_id: str, will: Message, durable_session: Session | None = None
                     ) -> None:
        message = will_to_publish(will)
        session = durable_session or self.sessions.get(client_id)
        if self.acl_enabled and session is not None and not self.acl_check(
                session, ACCESS_PUBLISH_SEND, message.topic, message.qos, message.retain):
            return
        ops: list = []
        if session is not None and session.durable:
            ops.append(WillDelete(client_id))
        self.router.route(message, client_id, ops)
        self.pending_ops.extend(ops)

    # -- hooks ----------------------------------------------------------------

    def publish_message(self, message: Message) -> None:
        """Inject a message as if published by the broker."""
        ops: list = []
        self.router.route(message, None, ops)
        self.pending_ops.extend(ops)
        self.flush_ops()

    def disconnect_clients(self, predicate: Callable[[Connection], bool], reason_code: int,
                           with_will: bool = True) -> int:
        """Kick every connected client for which ``predicate(conn)`` is true.

        ``with_will=False`` (dynsec's kicks, as Mosquitto's ``with_will = false``):
        its Will is discarded for good -- not published at the close, and deleted
        from a durable session's stored state, where a restart would find it."""
        n = 0
        ops: list = []
        for conn in list(self.connections):
            if conn.state == CONNECTED and predicate(conn):
                if not with_will and conn.will is not None:
                    conn.will = None
                    session = conn.session
                    if session is not None and session.durable:
                        ops.append(WillDelete(session.client_id))
                conn.disconnect(reason_code)
                n += 1
        if ops:
            self.pending_ops.extend(ops)
            self.flush_ops()
        return n

    def _schedule_expiry(self, session: Session, at: float) -> None:
        session.expire_at = at
        heapq.heappush(self._expiries, (at, session.client_id))

    def _on_remote_ops(self, ops: list) -> None:
        for listener in self.remote_listeners:
            try:
                listener(ops)
            except Exception:
                log.exception("Error in a remote ops listener")

    # -- upkeep ---------------------------------------------------------------

    def _tick(self) -> None:
        self._tick_handle = self.loop.call_later(TICK, self._tick)
        try:
            self._upkeep()
        except Exception:  # never let upkeep die
            log.exception("upkeep failed")

    def _upkeep(self) -> None:
        now = self.loop.time()
        self._check_connections(list(self.connections), 0)
        self._upkeep_rest(now)

    def _check_connections(self, conns: list[Connection], start: int) -> None:
        """Keepalive and CONNECT timeouts, UPKEEP_SLICE connections per loop
        iteration: with many connections one tick would otherwise stall every
        client for milliseconds (~1,150 instructions per connection in Python)."""
        now = self.loop.time()
        end = start + UPKEEP_SLICE
        if end < len(conns):
            self.loop.call_soon(self._check_connections_later, conns, end)
        # (The walk itself is compiled: _core.timed_out.)
        for conn in _core.timed_out(conns, start, end, now, self.connect_timeout):
            if conn.state == NEW:
                log.info("Client %s:%d did not send CONNECT in time, disconnecting.",
                         *conn.peer)
                conn.close()
            else:
                # [MQTT-3.1.2-24]: nothing received for 1.5 x keepalive: close.
                log.info("Client %s has exceeded timeout, disconnecting.", conn.client_id)
                conn.disconnect(RC_KEEP_ALIVE_TIMEOUT)

    def _check_connections_later(self, conns: list[Connection], start: int) -> None:
        try:
            self._check_connections(conns, start)
        except Exception:  # never let upkeep die
            log.exception("upkeep failed")
        flush_logs()

    def _upkeep_rest(self, now: float) -> None:
        ops: list = []
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            at, client_id = heapq.heappop(expiries)
            session = self.sessions.get(client_id)
            # Stale entries (reconnected, ended, rescheduled) are skipped.
            if session is not None and session.conn is None and session.expire_at == at:
                log.info("Expiring client %s.", client_id)
                self.stats.clients_expired += 1
                self.end_session(session, ops)
        self.wills.tick(now)
        flush_logs()  # lines logged outside a client turn (timeouts, expiries)
        if self.mesh is not None:
            self.mesh.send_stats()
        interval = self.config.sys_interval
        if interval and now >= self._next_sys and self.sys is not None:
            self._next_sys = now + interval
            self.sys.publish()
        self.pending_ops.extend(ops)
        self.flush_ops()
        if self.metrics is not None:
            self.metrics.update()

    # -- start-up from the store ------------------------------------------------

    def _load(self) -> None:
        state = self.store.load()
        for message in state.retained.values():
            self.retained.load(message)
        now = self.loop.time()
        # Offline sessions resume their clocks from the recorded disconnect time
        # (wall clock: the loop's clock starts anew with the process).
        now_ms = int(time.time() * 1000)
        mesh = self.mesh
        if mesh is not None:
            mesh.restore_marks(state.mesh_marks)
        for record in state.sessions.values():
            if mesh is not None and mesh.owner_of(record.client_id) != self.worker_id:
                continue  # a sibling owns it (workers/ownership.py)
            session = Session(record.client_id, record.protocol_version, record.expiry_interval,
                              record.username)
            session.durable = True
            if record.disconnected_at:
                # Time already spent offline (none if the clock went back).
                offline = max(0, now_ms - record.disconnected_at) / 1000
            else:
                # Connected when the broker stopped (crash or SIGTERM): no
                # disconnect was recorded, the restart counts as the disconnect
                # (its client could not come back before); recorded, so that a
                # second restart does not start the clocks again.
                offline = 0.0
                if record.expiry_interval != EXPIRY_NEVER or record.will is not None:
                    self.pending_ops.append(SessionOffline(record.client_id, now_ms))
            if record.expiry_interval != EXPIRY_NEVER:
                self._schedule_expiry(session, now + max(0.0, record.expiry_interval - offline))
            self.sessions[record.client_id] = session
            for topic_filter, (options, sub_id) in record.subscriptions.items():
                qos, no_local, rap, rh = unpack_sub_options(options)
                group, match_filter = parse_shared(topic_filter)
                self.router.subscribe(session, Subscription(topic_filter, qos, no_local, rap, rh,
                                                            sub_id, group, match_filter))
            for q in record.queue:
                out = Outgoing(q.seq, q.message, q.qos, q.message.retain, q.subscription_ids or None,
                               q.packet_id, q.state)
                out.share = SHARE_UNKNOWN  # (the store does not say: requeue_shared)
                if q.state in (SENT, PUBREC_RECEIVED) and q.packet_id:
                    session.inflight[q.packet_id] = out
                else:
                    out.packet_id = 0
                    session.enqueue(out)
                session.next_seq = max(session.next_seq, q.seq + 1)
            session.qos2_in = set(record.qos2_in)
            if mesh is not None and record.qos2_forwards:
                mesh.restore_forwards(record.client_id, record.qos2_forwards)
            if record.will is not None:
                delay, message = record.will
                # Due now if its delay passed while the broker was down: the
                # next upkeep tick publishes it.
                self.wills.schedule(record.client_id,
                                    max(0.0, min(delay, record.expiry_interval) - offline), message)
        if state.sessions or state.retained:
            log.info("Restored %d sessions and %d retained messages.", len(state.sessions),
                     len(state.retained))

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._load()
        self.sys = SysTopics(self)
        self._next_sys = self.loop.time()
        if self.mesh is not None:
            # Linked to the siblings before accepting anyone (workers/mesh.py).
            self.handoff.start()
            await self.mesh.start()
        from raftmq.broker.streams import protocol_factory

        listeners = self.config.listeners
        served: list[tuple[asyncio.AbstractServer, Any]] = []  # (server, its listener)
        if self.listen_sockets:
            # (listener index, socket) pairs of this worker's slot (supervisor.py).
            for index, sock in self.listen_sockets:
                listener = listeners[index]
                served.append((await self.loop.create_server(
                    protocol_factory(self, listener), sock=sock, backlog=1024), listener))
        else:
            for listener in listeners:
                served.append((await self.loop.create_server(
                    protocol_factory(self, listener), listener.host, listener.port,
                    reuse_address=True, reuse_port=self.mesh is not None, backlog=1024), listener))
        for server, listener in served:
            self.servers.append(server)
            kind = "websockets" if listener.websockets else "ipv4"
            for sock in server.sockets:
                port = sock.getsockname()[1]
                self.ports.append(port)
                log.info("Opening %s listen socket on port %d%s%s.", kind, port,
                         " (TLS)" if listener.tls else "",
                         f" (worker {self.worker_id})" if self.mesh is not None else "")
        self._tick_handle = self.loop.call_later(TICK, self._tick)

    async def stop(self) -> None:
        self._stopping = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.state == CONNECTED:
                conn.graceful = False
                conn.disconnect(RC_SERVER_SHUTTING_DOWN)
            else:
                conn.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self.flush_ops()
        if self.mesh is not None:
            self.mesh.close()
            self.handoff.close()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except (TimeoutError, Exception):
                pass
        self.servers.clear()


def run(config: Any, store: Any, auth: Any = None, node: Any = None) -> int:
    """Run one broker on uvloop until SIGTERM / SIGINT; the process exit status.

    ``node``: ``attach(broker)`` of the worker layer (raftmq.workers.node) when
    this broker is one of several workers of a node."""
    import uvloop

    async def main() -> int:
        broker = Broker(config, store, auth)
        if node is not None:
            node(broker)
        plugin = None
        if getattr(config, "dynsec_enabled", False) and auth is None:
            from raftmq.dynsec.plugin import install

            plugin = install(broker, config)
        from raftmq.ops.metrics import worker_metrics

        broker.metrics = worker_metrics(broker)
        await broker.start()
        if plugin is not None:
            plugin.start()
        # The hot path allocates many short-lived, acyclic objects: collect
        # less often, and never scan what start-up loaded.
        gc.freeze()
        gc.set_threshold(50_000, 20, 50)
        log.info("raftmq version %s running.", _version())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("raftmq version %s terminating.", _version())
        await broker.stop()
        await store.close()
        return 0

    return uvloop.run(main())


def _version() -> str:
    from raftmq.broker.sys_topics import VERSION

    return VERSION
