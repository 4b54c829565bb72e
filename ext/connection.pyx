# cython: language_level=3
"""The compiled protocol core: the per-connection object, the per-read packet
dispatch and the message path from a PUBLISH to the subscribers' buffers.

In the manner of asyncpg's and uvloop's protocol cores: the per-message work is
C, the Python modules around it stay the API.

- ``Connection`` (a cdef class; its fields, and those of ``BrokerCore``,
  ``RouterCore`` and ``Stats``, the hot state of server.py's Broker, router.py's
  Router and the counters, are declared in src/raftmq/_connection.pxd): ``data_received``
  feeds the Cython parser and hands the packets to ``handle_packets``; ``write``
  queues bytes for the broker's one write per connection per turn.
  raftmq.broker.protocol subclasses it with the methods that are not per message.
- ``handle_packets``: every packet of one read, in order.  The dominant case -- a
  QoS 0 PUBLISH (3.1.1, or 5.0 without properties) from a connected client, not
  retained, topic not starting with '$', no debug logging -- is handled here
  (``_publish_qos0``); every other packet goes to its Python handler
  (dispatch.HANDLERS), one by one in the order they were read.
- ``route``: Router.route (retained store, match cache, sibling forwarding, ACL
  receive decisions, QoS 0 fan-out, QoS 1/2 delivery through the session).
  The QoS 0 fan-out (``_fanout_qos0``) is the hot loop.
- ``check_topic_name`` and ``publish_acl``: the PUBLISH checks that both the
  fast case and handlers/publish.py apply (one implementation each).
- write gathering: Broker.mark_dirty, schedule_flush, end_read and _flush.
- ``timed_out``: the upkeep tick's keepalive / CONNECT-timeout walk.
- the connect and close paths (issue 4's connection rate; a connect storm is
  an accept, a CONNECT per read and a close per client): ``handle_connect`` and
  ``handle_disconnect`` (handlers/connect.py and disconnect.py re-export them;
  connect.py gives the refusals, ``install_connect``), ``Session`` (a cdef
  class; raftmq.broker.session re-exports it), Broker.attach_session,
  end_session, on_connection_made, on_connection_lost, after_commit and
  after_store, and Connection.connection_made, connection_lost and close.
  Each is the one implementation; the ``def`` versions are what server.py's
  Broker binds as methods, the ``cdef`` ones what the core calls.
- the per-client log lines: ``info_line`` (the append to raftmq.logsetup's
  batch) and ``write_batch`` / ``flush_logs`` (its write, once per turn).
"""

import logging

import uuid
from os import write as os_write
from time import time
from collections import deque

from raftmq._codec cimport Publish, _encode_publish
from raftmq._codec import Connack, Connect, MQTTError, Parser
from raftmq._trie import valid_topic_name
from raftmq.state.entries import (Message, QueueAdd, SessionDelete, SessionExpiry,
                                   SessionOffline, SessionPut, SubRemove, WillDelete, WillSet)

cdef object log = logging.getLogger("raftmq.broker")

# Connection states.
cdef enum:
    C_NEW = 0        # accepted, no CONNECT yet
    C_CONNECTED = 1  # CONNECT accepted (CONNACK may still wait for the store)
    C_CLOSING = 2    # closing: nothing more is read or written

NEW = C_NEW
CONNECTED = C_CONNECTED
CLOSING = C_CLOSING

# Highest packet size the protocol can express (MQTT 5 §2.1.4, 256 MB).
PROTOCOL_MAX_PACKET = 268435455

# The ACL access types (raftmq.broker.auth re-exports them: Mosquitto's dynsec
# ACL types publishClientSend, publishClientReceive, subscribe, unsubscribe).
ACCESS_PUBLISH_SEND = "publish_client_send"
ACCESS_PUBLISH_RECEIVE = "publish_client_receive"
ACCESS_SUBSCRIBE = "subscribe"
ACCESS_UNSUBSCRIBE = "unsubscribe"

# MQTT 5 §3.1.2.11.2: 0xFFFFFFFF means the session never expires.
EXPIRY_NEVER = 0xFFFFFFFF

# Reason codes (MQTT 5 §2.4).
cdef int RC_PROTOCOL_ERROR = 0x82
cdef int RC_IMPLEMENTATION_SPECIFIC = 0x83
cdef int RC_TOPIC_NAME_INVALID = 0x90

# topic -> trie match, per Router: bounded (cleared when full).
MATCH_CACHE_LIMIT = 10_000
cdef Py_ssize_t _MATCH_CACHE_LIMIT = MATCH_CACHE_LIMIT

# Shared, never written (handle_connect gives a connection its own dict once
# the client announces a Topic Alias Maximum).
cdef dict _NO_ALIASES = {}

# Packet type -> handler(broker, conn, packet), and dispatch.protocol_error:
# set by raftmq.broker.dispatch (install), which owns the mapping.
cdef dict _handlers = {}
cdef object _protocol_error = None


def install(dict handlers, protocol_error) -> None:
    """Give the core the packet handlers and the protocol-error reaction."""
    global _handlers, _protocol_error
    _handlers = handlers
    _protocol_error = protocol_error


def known_protocol_name(data) -> bool:
    """Whether a CONNECT's bytes name MQTT ("MQTT" or 3.1's "MQIsdp")."""
    cdef Py_ssize_t pos = 1
    while pos < len(data) and data[pos] & 0x80:  # skip the Remaining Length
        pos += 1
    pos += 1
    name_len = int.from_bytes(data[pos:pos + 2], "big")
    return data[pos + 2:pos + 2 + name_len] in (b"MQTT", b"MQIsdp")


cdef class Stats:
    """Counters bumped on the hot path (C integers: the cheapest thing)."""

    def __init__(self) -> None:
        self.bytes_received = 0
        self.bytes_sent = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.publish_received = 0
        self.publish_sent = 0
        self.publish_dropped = 0
        self.connections = 0
        self.clients_maximum = 0
        self.clients_expired = 0
        self.clients_moved = 0


cdef class BrokerCore:
    """The fields of raftmq.broker.server.Broker that the compiled path reads
    and writes per message (declared in _connection.pxd); Broker sets them."""


cdef class RouterCore:
    """The fields of raftmq.broker.router.Router that route reads per message
    (declared in _connection.pxd); Router sets them."""


cdef frozenset _NO_IDS = frozenset()


cdef class Subscription:
    """One subscription of one session, with its MQTT 5 options."""

    def __init__(self, str topic_filter, int qos, bint no_local=False,
                 bint retain_as_published=False, int retain_handling=0, long sub_id=0,
                 share_group=None, str match_filter=None) -> None:
        self.topic_filter = topic_filter
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.sub_id = sub_id
        self.share_group = share_group
        self.match_filter = match_filter if match_filter is not None else topic_filter
        # Announced to sibling workers as a persistent session's (workers/mesh.py).
        self.durable = False


cdef class Session:
    """What the broker remembers of one client id (see raftmq.broker.session)."""

    def __init__(self, client_id, protocol_version, expiry_interval, username=None) -> None:
        self.client_id = client_id
        self.protocol_version = protocol_version
        self.expiry_interval = expiry_interval
        self.username = username
        self.subscriptions = {}
        self.inflight = {}
        # Created on first use: most sessions never queue or receive QoS 2, and
        # an empty deque alone is ~600 bytes (memory per idle connection).
        self.queue = ()
        self.qos2_in = _NO_IDS
        self.will = None
        self.conn = None
        # loop.time() at which an offline session expires (0 = not scheduled).
        self.expire_at = 0.0
        self.next_seq = 1
        self._next_pid = 0
        # Whether the store knows this session (a SessionPut was submitted and
        # no SessionDelete since): its changes must then be submitted too.
        self.durable = False
        # In-flight messages waiting for a commit before they are written: a
        # QoS 1 message may skip that wait only when none is (order).
        self.unwritten = 0

    @property
    def persistent(self) -> bool:
        return self.expiry_interval > 0

    def enqueue(self, out) -> None:
        queue = self.queue
        if type(queue) is tuple:
            queue = self.queue = deque()
        queue.append(out)

    def qos2_add(self, packet_id) -> None:
        if type(self.qos2_in) is frozenset:
            self.qos2_in = set()
        self.qos2_in.add(packet_id)

    def next_packet_id(self) -> int:
        """A packet id not used by any in-flight message [MQTT-2.2.1-3]."""
        cdef long pid = self._next_pid
        cdef dict inflight = self.inflight
        for _ in range(65535):
            pid = pid + 1 if pid < 65535 else 1
            if pid not in inflight:
                self._next_pid = pid
                return pid
        raise RuntimeError("no free packet identifier")

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq = seq + 1
        return seq

    def __repr__(self) -> str:  # debugging aid
        state = "online" if self.conn is not None else "offline"
        return f"<Session {self.client_id!r} v{self.protocol_version} {state}>"


cdef class Connection:
    """One TCP client (the asyncio protocol; see raftmq.broker.protocol)."""

    def __init__(self, broker) -> None:
        self.broker = broker
        self.transport = None
        max_packet = broker.config.max_packet_size or PROTOCOL_MAX_PACKET
        self.parser = Parser(max_packet, True)
        self.state = C_NEW
        self.out = []
        self.dirty = False
        self.session = None
        self.client_id = ""
        self.username = None
        self.version = 4
        self.keepalive = 0
        self.peer = ("?", 0)
        self.rx_bytes = 0
        self.rx_seen = -1
        self.rx_seen_at = 0.0
        self.accepted_at = 0.0
        self.will = None
        self.graceful = False
        self.client_receive_max = 65535
        self.client_max_packet = PROTOCOL_MAX_PACKET
        self.client_alias_max = 0
        self.alias_in = None  # created on first use
        self.alias_out = _NO_ALIASES
        self.next_alias_out = 1
        self.qos1_in_pending = 0
        self.problem_info = True
        self.paused = False
        self.clean_start = True
        # CONNACK written: messages may be delivered (none may precede CONNACK,
        # which can wait for the store) [MQTT-3.2.0-1].
        self.online = False
        # Bytes read before CONNECT was handled, kept only when the node has
        # sibling workers: they travel with a hand-off (raftmq.workers.handoff).
        self.raw_head = b""
        # The last topic this client was allowed to publish to, and that topic's
        # publish_client_receive decisions (publish_acl, Broker.acl_caches_current).
        self.acl_topic = None
        self.acl_receive = None
        self.cert_identity = None

    def data_received(self, data) -> None:
        cdef int state = self.state
        if state == C_CLOSING:
            return
        cdef BrokerCore broker = self.broker
        cdef Py_ssize_t n = len(data)
        self.rx_bytes += n
        broker.stats.bytes_received += n
        broker._in_read = True
        if state == C_NEW and broker.handoff is not None:
            self.raw_head += data
        try:
            packets = self.parser.feed(data)
        except MQTTError as e:
            # Packets parsed before the bad one are handled first, in order.
            if e.packets:
                handle_packets(broker, self, e.packets)
            if self.state == C_NEW and e.reason_code == 0x84 and not known_protocol_name(data):
                # [MQTT-3.1.2-1]: not MQTT at all: close without a CONNACK (as Mosquitto).
                self.close()
            else:
                _protocol_error(self, e.reason_code, str(e))
            broker.flush_ops()
            broker.end_read()
            return
        if packets:
            handle_packets(broker, self, packets)
            # (flush_ops's check inlined: this runs once per read, and a read is
            # often one message.)
            if broker.pending_ops or broker._pending_actions:
                broker.flush_ops()
        _end_read(broker)

    # -- asyncio.Protocol (accept and close: compiled for connect storms) --------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._tx_write = transport.write
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
        self.accepted_at = self.rx_seen_at = self.broker.loop.time()
        transport.set_write_buffer_limits(16 * 1024 * 1024)  # (high; positional: cheaper)
        # (No "New connection from" line: a log line costs about a third of
        # accepting a client; "New client connected" follows CONNECT.)
        _on_connection_made(self.broker, self)

    def connection_lost(self, exc) -> None:
        self.state = C_CLOSING
        self.online = False
        self._tx_write = None
        _on_connection_lost(self.broker, self)

    def close(self) -> None:
        """Flush what is queued and close (the will is sent unless DISCONNECT 0x00 came)."""
        if self.state == C_CLOSING or self.transport is None:
            return
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out.clear()
        self.state = C_CLOSING
        self.online = False
        self.transport.close()

    def write(self, data) -> None:
        """Queue bytes for this turn's single write."""
        self._write(data)

    cdef int _write(self, object data) except -1:
        if self.state == C_CLOSING:
            return 0
        self.out.append(data)
        if not self.dirty:
            self.dirty = True
            mark_dirty(self.broker, self)
        return 0


# -- packets of one read ------------------------------------------------------

cpdef handle_packets(BrokerCore broker, Connection conn, list packets):
    """Handle every packet parsed from one read, in order.

    A QoS 0 PUBLISH of the common kind is handled here; any other packet goes
    to its handler, so a read mixing both keeps its order.  A handler's
    ``MQTTError`` is the client's protocol violation (dispatch.protocol_error);
    any other exception is a bug that costs this one connection."""
    broker.stats.messages_received += len(packets)
    if broker.acl_enabled and \
            broker.acl_generation_source.acl_generation != broker.acl_cache_generation:
        broker.acl_caches_current()
    cdef int fast = -1  # whether the broker-wide conditions of the fast case hold (-1: unknown)
    cdef Py_ssize_t size_limit = 0
    try:
        if conn.state == C_NEW:  # the first packet must be CONNECT [MQTT-3.1.0-1]
            first = packets[0]
            if type(first) is not Connect:
                log.info("Client %s sent %s before CONNECT, disconnecting.",
                         conn.label(), type(first).__name__.upper())
                conn.close()
                return
        for packet in packets:
            if conn.state == C_CLOSING:  # ignore what follows
                return
            if type(packet) is Publish and conn.state == C_CONNECTED:
                if fast < 0:
                    fast = not broker.debug
                    size_limit = broker.config.message_size_limit
                if fast and _publish_qos0(broker, conn, <Publish>packet, size_limit):
                    continue
            if type(packet) is Connect:  # (the same handler, called from C)
                handle_connect(broker, conn, packet)
                continue
            _handlers[type(packet)](broker, conn, packet)
    except MQTTError as e:
        _protocol_error(conn, e.reason_code, str(e))
    except Exception:
        # A bug must cost one connection, never the broker or other clients.
        log.exception("Error handling a packet from %s, disconnecting.", conn.label())
        conn.disconnect(RC_IMPLEMENTATION_SPECIFIC)


cdef bint _publish_qos0(BrokerCore broker, Connection conn, Publish packet,
                        Py_ssize_t size_limit) except -1:
    """handlers/publish.py handle_publish for a QoS 0 PUBLISH without retain,
    properties or a '$' topic (False, untouched, for any other: its handler
    takes it).  The same steps in the same order: count, check the topic name,
    publish_client_send, route."""
    if packet.qos or packet.retain or packet.properties:
        return False
    topic = packet.topic
    if not topic or (<str>topic)[0] == "$":
        return False
    payload = packet.payload
    if size_limit and len(payload) > size_limit:
        return False  # dropped and logged by the handler
    broker.stats.publish_received += 1
    check_topic_name(topic)
    acl_receive = None
    if broker.acl_enabled:
        acl_receive = publish_acl(broker, conn, topic, 0, False)
        if acl_receive is False:
            return True  # refused: a QoS 0 message is just dropped
    # (No Message object unless something needs one: route makes it then.)
    _route(broker.router, None, topic, payload, 0, False, None, 0, conn.client_id, None, True,
           acl_receive, True, None)
    return True


cpdef check_topic_name(str topic):
    """A PUBLISH's topic name (after topic alias resolution) must not be empty
    [MQTT-3.3.2-1] nor hold a wildcard [MQTT-3.3.2-2]."""
    if not topic:
        raise MQTTError(RC_PROTOCOL_ERROR, "empty topic name")
    if "+" in topic or "#" in topic:
        raise MQTTError(RC_TOPIC_NAME_INVALID, "wildcard in topic name")


def publish_acl(BrokerCore broker, Connection conn, topic, int qos, bint retain):
    """publish_client_send of ``conn`` to ``topic`` (call only when the broker's
    ACLs apply): False if refused, else the topic's current publish_client_receive
    decisions for route (None: a hook that cannot be cached).

    Most publishers publish to one topic again and again, so the connection
    remembers its last allowed topic and that topic's receive decisions
    (forgotten when the hook's generation moves, Broker.acl_caches_current).
    Else the broker's cache: one lookup gives both answers; the hook is asked
    on a miss."""
    if topic == conn.acl_topic:
        return conn.acl_receive
    try:
        acl_receive = broker.acl_send_cache[topic][conn]
    except KeyError:
        acl_receive = broker.acl_publish_decision(conn, topic, qos, retain)
    if acl_receive is not False and acl_receive is not None:  # cached: remember it
        conn.acl_topic = topic
        conn.acl_receive = acl_receive
    return acl_receive


# -- routing ------------------------------------------------------------------

def route(RouterCore router, message, sender_id, ops, retain_durable=True, acl_receive=None,
          forward=True, assigned=None) -> int:
    """Router.route: store the retained message and deliver to every matching subscription.

    ``ops`` collects store operations (None for QoS 0 messages, which never
    create any).  ``acl_receive``: the broker's publish_client_receive cache for
    this topic, just seen current by the caller (handle_publish); without it
    route fetches it.  With sibling workers (``broker.mesh``) the message is
    also forwarded to those with a matching subscription unless ``forward``
    is False (it came from one, or it is this worker's own ``$SYS``); a
    forwarded message serves only the share groups in ``assigned``.
    Returns the number of deliveries in this worker.
    """
    return _route(router, message, message.topic, message.payload, message.qos, message.retain,
                  message.properties, message.expiry_at, sender_id, ops, retain_durable,
                  acl_receive, forward, assigned)


cdef inline object _message(message, topic, payload, int qos, bint retain, props, expiry_at):
    """``message``, or the Message of these fields when the caller had none."""
    if message is None:
        message = Message(topic, payload, qos, retain, props, expiry_at)
    return message


cdef Py_ssize_t _route(RouterCore router, message, topic, payload, int qos, bint retain, props, expiry_at,
                       sender_id, ops, retain_durable, acl_receive, bint forward,
                       assigned) except -1:
    """route, given the message's fields; ``message`` may be None (the PUBLISH
    fast path): it is made only if a step needs the object."""
    cdef BrokerCore broker = router.broker
    cdef dict sessions = router.sessions
    if retain:
        message = _message(message, topic, payload, qos, retain, props, expiry_at)
        broker.retained.store(message, ops if ops is not None else broker.pending_ops,
                              retain_durable)
    match = router._matches.get(topic)
    if match is None:
        if len(router._matches) >= _MATCH_CACHE_LIMIT:
            router._matches.clear()
        match = router._matches[topic] = router.trie.match(topic)
    normal, shared = <tuple>match  # shared between calls: never modified in place
    mesh = broker.mesh
    if mesh is not None:
        message = _message(message, topic, payload, qos, retain, props, expiry_at)
        if forward:
            shared = mesh.forward(message, sender_id, shared)
        elif assigned is not None:
            shared = mesh.assigned_shared(message, shared, assigned)
        elif shared:
            shared = []  # the sending worker served those groups
    if not normal and not shared:
        return 0
    if len(normal) > 1:
        normal = _merge_v3_overlaps(sessions, normal)
    cdef Py_ssize_t delivered = 0
    # QoS 0 to normal subscriptions: the receive decisions checked in the fan-out.
    receive_decisions = acl_receive  # None without ACLs
    if broker.acl_enabled and (receive_decisions is None or shared or qos):
        # publish_client_receive.  Hot path (not here): this topic's cached
        # decisions (Connection -> allowed), current for the hook's generation,
        # from handle_publish, handed to the QoS 0 fan-out, which checks each
        # subscriber on the connection it loads anyway.  Otherwise (a hook
        # without a generation, QoS 1/2, shared groups): filter the matches first.
        if receive_decisions is None:
            receive_decisions = broker.acl_receive_decisions(topic)
        if receive_decisions is None or shared or qos:
            message = _message(message, topic, payload, qos, retain, props, expiry_at)
            normal, shared = router._receive_allowed(message, normal, shared)
            receive_decisions = None
    cdef Connection conn
    if qos == 0:
        if normal:
            delivered = _fanout_qos0(router, broker, message, topic, payload, retain, props,
                                     expiry_at, normal, sender_id, receive_decisions)
        if shared:
            message = _message(message, topic, payload, qos, retain, props, expiry_at)
        for group, topic_filter, members in shared:
            member = router._pick_member(group, topic_filter, members, True)
            if member is None:
                continue
            client_id, sub = member
            conn = sessions[client_id].conn
            if conn.version == 5:
                data = router._encode_v5(conn, message, 0, False, sub.sub_id)
            else:
                data = _encode_publish(topic, payload, 0, False, False, 0, None, conn.version)
            if data is not None and not conn.paused and len(data) <= conn.client_max_packet:
                conn._write(data)
                delivered += 1
        broker.stats.publish_sent += delivered
        return delivered

    message = _message(message, topic, payload, qos, retain, props, expiry_at)
    add = QueueAdd([], message)
    for client_id, sub, _filter in normal:
        if sub.no_local and client_id == sender_id:
            continue
        router.deliver(sessions[client_id], message, sub, retain and sub.retain_as_published,
                       add, ops)
        delivered += 1
    for group, topic_filter, members in shared:
        member = router._pick_member(group, topic_filter, members, False)
        if member is None:
            continue
        client_id, sub = member
        router.deliver(sessions[client_id], message, sub, False, add, ops)
        delivered += 1
    if add.deliveries:
        ops.append(add)
    return delivered


cdef list _merge_v3_overlaps(dict sessions, list normal):
    """MQTT 3.1.1 [MQTT-3.3.5-1]: a client with overlapping subscriptions gets
    the message once, at the highest QoS of them.  (MQTT 5 clients get one
    copy per subscription, each with its own identifier, as Mosquitto does.)"""
    cdef set seen = set()
    for match in normal:
        client_id = (<tuple>match)[0]
        if client_id in seen:
            break
        seen.add(client_id)
    else:
        return normal
    cdef list result = []
    cdef dict where = {}
    for match in normal:
        client_id = (<tuple>match)[0]
        if sessions[client_id].protocol_version == 5:
            result.append(match)
            continue
        i = where.get(client_id)
        if i is None:
            where[client_id] = len(result)
            result.append(match)
        elif (<tuple>match)[1].qos > (<tuple>result[i])[1].qos:
            result[i] = match
    return result


cdef Py_ssize_t _fanout_qos0(RouterCore router, BrokerCore broker, message, topic, payload, bint message_retain,
                             props, expiry_at, list normal, sender_id,
                             receive_decisions) except -1:
    """QoS 0 to the online subscribers: the hot loop.  The PUBLISH is encoded
    once per (MQTT 5 or not, retain flag) and the same bytes are appended to
    every subscriber's buffer; only an MQTT 5 delivery that needs its own
    properties (subscription identifier, expiry, topic alias) is encoded alone.

    ``receive_decisions``: the broker's current publish_client_receive cache for
    this topic when the ACLs apply (None: no check, already filtered or no hook).
    ``message``: the Message of these fields, or None (made if needed)."""
    cdef dict sessions = router.sessions
    cdef bint plain = props is None and not expiry_at
    cdef bint retain
    cdef int version, slot
    # The PUBLISH bytes per (MQTT 5 or not, retain flag): the usual one (3.x,
    # no retain) in its own variable, the others in a list made on first use.
    plain_v3 = None
    encoded = None  # [v5 * 2 + retain]
    cdef list dirty = broker._dirty  # (mark_dirty's append inlined: one call less per delivery)
    cdef bint marked = False
    cdef Py_ssize_t delivered = 0, dropped = 0
    cdef Connection conn
    cdef Subscription sub
    cdef tuple match
    for m in normal:
        match = <tuple>m
        client_id = match[0]
        sub = <Subscription?>match[1]
        if sub.no_local and client_id == sender_id:
            continue  # [MQTT-3.8.3-3]
        c = (<Session?>sessions[client_id]).conn
        if c is None:
            continue
        conn = <Connection>c
        if not conn.online:
            continue
        if receive_decisions is not None:
            allowed = (<dict>receive_decisions).get(conn)
            if allowed is None:
                message = _message(message, topic, payload, 0, message_retain, props, expiry_at)
                allowed = router._receive_decision(receive_decisions, conn, message)
            if not allowed:
                continue
        retain = message_retain and sub.retain_as_published
        version = conn.version
        if version == 5 and (not plain or sub.sub_id or conn.client_alias_max):
            message = _message(message, topic, payload, 0, message_retain, props, expiry_at)
            data = conn.encode_publish_v5(message, 0, retain, False, 0,
                                          [sub.sub_id] if sub.sub_id else None)
            if data is None:
                dropped += 1
                continue
        else:
            slot = (2 if version == 5 else 0) + retain
            if slot == 0:
                data = plain_v3
                if data is None:
                    data = plain_v3 = _encode_publish(topic, payload, 0, False, False, 0, None,
                                                      version)
            else:
                if encoded is None:
                    encoded = [None, None, None, None]
                data = encoded[slot]
                if data is None:
                    data = encoded[slot] = _encode_publish(topic, payload, 0, retain, False, 0,
                                                           None, version)
        if conn.paused or len(data) > conn.client_max_packet:
            dropped += 1  # slow reader (QoS 0 is dropped) or too big for it
            continue
        conn.out.append(data)
        if not conn.dirty:
            conn.dirty = True
            dirty.append(conn)
            marked = True
        delivered += 1
    if marked:
        _schedule_flush(broker)
    if dropped:
        broker.stats.publish_dropped += dropped
    return delivered


# -- write gathering (Broker's methods, bound in server.py) -------------------
#
# Writes are gathered per connection (``out``) and flushed with one
# transport.write per connection: per loop turn (``_flush`` by call_soon) or,
# when the load shows about one read per turn, at the end of each read.

def mark_dirty(BrokerCore broker, conn) -> None:
    """Broker.mark_dirty: ``conn`` has bytes queued; it is written at the next flush."""
    broker._dirty.append(conn)
    _schedule_flush(broker)


def schedule_flush(BrokerCore broker) -> None:
    """Broker.schedule_flush: after connections were appended to ``_dirty``
    directly (the QoS 0 fan-out)."""
    _schedule_flush(broker)


cdef int _schedule_flush(BrokerCore broker) except -1:
    if not broker._flush_scheduled and (broker._per_turn or not broker._in_read):
        broker._flush_scheduled = True
        broker.loop.call_soon(broker._flush)
    return 0


def end_read(BrokerCore broker) -> None:
    """Broker.end_read, after each read.  Writes are gathered per loop turn when
    several connections are read per turn (closed-loop load, fan-in: one write
    per destination per turn).  When the sampled turns show about one read per
    turn (open-loop, many slow clients) the extra loop iteration a ``call_soon``
    costs buys nothing, so for a while each read's writes are flushed at its
    end -- still one write per destination per read."""
    _end_read(broker)


cdef int _end_read(BrokerCore broker) except -1:
    broker._in_read = False
    if broker._per_turn:
        broker._reads += 1
        return 0
    if broker._dirty:
        _flush(broker)
    broker._reads += 1
    if broker._reads >= 2048:  # sample the load again
        broker._reads = 0
        broker._per_turn = True
    return 0


def flush(BrokerCore broker) -> None:
    """Broker._flush: this turn's (or read's) writes, one per connection."""
    _flush(broker)


cdef int _flush(BrokerCore broker) except -1:
    broker._flush_scheduled = False
    _flush_logs()  # this turn's log lines before what they tell the clients
    mesh = broker.mesh
    if mesh is not None:
        # Siblings first: they deliver in parallel with our own writes below.
        mesh.flush()
    if broker._per_turn and broker._reads:
        broker._sample_reads += broker._reads
        broker._reads = 0
        broker._sample_flushes += 1
        if broker._sample_flushes >= 64:
            if broker._sample_reads < 80:  # under 1.25 reads per turn
                broker._per_turn = False
            broker._sample_reads = broker._sample_flushes = 0
    cdef list dirty = broker._dirty
    broker._dirty = []
    cdef Connection conn
    cdef list out
    cdef Py_ssize_t sent = 0, nbytes = 0, k
    for c in dirty:
        conn = <Connection>c
        conn.dirty = False
        out = conn.out
        k = len(out)
        if not k or conn.state == C_CLOSING:
            out.clear()
            continue
        sent += k
        data = out[0] if k == 1 else b"".join(out)
        out.clear()
        nbytes += len(data)
        conn._tx_write(data)
    broker.stats.messages_sent += sent
    broker.stats.bytes_sent += nbytes
    return 0


# -- upkeep -------------------------------------------------------------------

def timed_out(list conns, Py_ssize_t start, Py_ssize_t end, double now,
              double connect_timeout) -> list:
    """The upkeep tick's walk over ``conns[start:end]`` (Broker._check_connections):
    notes which connections received bytes since the last walk, and returns
    those to close, in order: no CONNECT within ``connect_timeout`` of the
    accept (still NEW), or nothing received for 1.5 x their keepalive
    [MQTT-3.1.2-24] (CONNECTED).  A C loop: it visits every connection twice a
    second, and the walk is most of a quiet broker's work."""
    cdef list result = []
    cdef Connection conn
    cdef Py_ssize_t i
    if end > len(conns):
        end = len(conns)
    for i in range(start, end):
        conn = <Connection>conns[i]
        if conn.rx_bytes != conn.rx_seen:
            conn.rx_seen = conn.rx_bytes
            conn.rx_seen_at = now
        if conn.state == C_NEW:
            if now - conn.accepted_at > connect_timeout:
                result.append(conn)
        elif conn.state == C_CONNECTED and conn.keepalive:
            if now - conn.rx_seen_at > conn.keepalive * 1.5:
                result.append(conn)
    return result


# -- the per-client log lines ----------------------------------------------------

cdef class LogBatch:
    """The lines a raftmq.logsetup.BatchingHandler formatted and has not written
    yet.  Compiled so that the broker's question at every flush -- is a line
    waiting? -- is a C field read: it is asked once per loop turn (or read),
    and nearly always answered no."""
    cdef public list lines
    cdef public Py_ssize_t size

    def __init__(self) -> None:
        self.lines = []
        self.size = 0


# The process's batching handler and its batch (install_log_batch), or None:
# lines go through the logging module.  ``_fast_info``: info lines may skip it.
cdef object _batch_handler = None
cdef LogBatch _batch = None
cdef bint _fast_info = False


def install_log_batch(handler, bint fast_info) -> None:
    """raftmq.logsetup.setup_logging: the handler whose batch the broker flushes
    and, with ``fast_info``, info_line appends to."""
    global _batch_handler, _batch, _fast_info
    _batch_handler = handler
    _batch = handler.batch if handler is not None else None
    _fast_info = fast_info and handler is not None


# "<Unix time>: ", made once per second (as "%.0f" of a record's time).
cdef long long _prefix_second = 0
cdef str _prefix = ""


cpdef info_line(logger, str text):
    """Log an info line the caller formatted (having checked that info is
    enabled): when the process batches its log lines (raftmq.logsetup), straight
    into the batch, the text the logging module would write, without a
    LogRecord; else through ``logger``.  Compiled: a connect and a disconnect
    each log one.  The append takes no lock: it runs without a GIL switch, and
    the batch's flush swaps the list before joining it."""
    global _prefix_second, _prefix
    if not _fast_info:
        logger.info("%s", text)
        return
    cdef long long second = <long long>(time() + 0.5)
    if second != _prefix_second:
        _prefix_second = second
        _prefix = f"{second}: "
    line = _prefix + text + "\n"
    cdef LogBatch batch = _batch
    batch.lines.append(line)
    batch.size += len(line)


def flush_logs() -> None:
    """raftmq.logsetup.flush_logs: write the lines batched so far (cheap when
    there are none)."""
    _flush_logs()


cdef inline int _flush_logs() except -1:
    if _batch is not None and _batch.size:
        write_batch(_batch_handler)
    return 0


def write_batch(handler) -> None:
    """BatchingHandler.flush (raftmq.logsetup): one write of the batched lines."""
    cdef LogBatch batch = handler.batch
    with handler._lock:
        lines = batch.lines
        if not lines:
            return
        # Swap, then join: info_line appends without the lock.
        batch.lines = []
        batch.size = 0
        text = "".join(lines)
        try:
            fd = handler.fd
            if fd is None:
                handler.stream.write(text)
                handler.stream.flush()
                return
            data = text.encode("utf-8", "backslashreplace")
            while data:
                data = data[os_write(fd, data):]
        except (OSError, ValueError):
            pass


# -- the acknowledgement rule ------------------------------------------------------

def after_commit(BrokerCore broker, action) -> None:
    """Broker.after_commit: run ``action`` after everything submitted so far is
    committed (now if nothing is) and the sibling workers processed what was
    forwarded to them: the rule for every acknowledgement to a client."""
    _after_commit(broker, action)


cdef int _after_commit(BrokerCore broker, action) except -1:
    mesh = broker.mesh
    if mesh is not None and mesh.gating():
        action = mesh.gated(action)
    return _after_store(broker, action)


def after_store(BrokerCore broker, action) -> None:
    """Broker.after_store: run ``action`` after everything submitted so far is
    committed (now if nothing is)."""
    _after_store(broker, action)


cdef int _after_store(BrokerCore broker, action) except -1:
    if broker.pending_ops:
        broker._pending_actions.append(action)
    elif broker.outstanding_batches:
        broker._last_batch_actions.append(action)
    else:
        action()
    return 0


# -- CONNECT --------------------------------------------------------------------
#
# A flat run of checks in the order of the standard (MQTT 5 §3.1.4, 3.1.1
# §3.1.4); each refusal is a CONNACK with the version's code and a close
# (handlers/connect.py ``refuse``).  Takeover and resume happen only after
# authentication (as in Mosquitto's ``connect__on_authorised``).  Compiled
# because a connect storm (issue 4's idle-10k) is one CONNECT per read: typed
# access to the connection's fields, no bytecode, and the common CONNACKs and
# log line without generic formatting.

# MQTT 5 CONNACK reason codes (§3.2.2.2) the checks below refuse with.
cdef int RC_CLIENT_ID_NOT_VALID = 0x85
cdef int RC_NOT_AUTHORIZED = 0x87
cdef int RC_BAD_USER_PASS = 0x86
cdef int RC_BAD_AUTH_METHOD = 0x8C
cdef int RC_PAYLOAD_FORMAT_INVALID = 0x99
cdef int RC_RETAIN_NOT_SUPPORTED = 0x9A

# The protocol level as Mosquitto's log line shows it ("p2" for 3.1.1).
LOG_PROTOCOL = {3: 1, 4: 2, 5: 5}

# [version * 2 + session present] -> the CONNACK accepting a 3.x client:
# always the same four bytes, encoded once.
cdef list _plain_connacks = [None] * 10

# handlers/connect.py's refuse(conn, reason_code[, properties]) and
# _hand_off(broker, conn, owner, raw): set by install_connect.
cdef object _refuse = None
cdef object _hand_off = None


def install_connect(refuse, hand_off) -> None:
    """Give handle_connect the refusal and the hand-off (handlers/connect.py)."""
    global _refuse, _hand_off
    _refuse = refuse
    _hand_off = hand_off


cdef class DefaultAuth:
    """raftmq.broker.auth.DefaultAuth (re-exported there): no password
    database, no ACLs: ``allow_anonymous`` alone decides.  Compiled: asked once
    per connect."""
    cdef public bint allow_anonymous

    # The broker skips acl_check calls entirely when this is False (hot path).
    checks_acl = False

    def __init__(self, allow_anonymous) -> None:
        self.allow_anonymous = allow_anonymous

    def authenticate(self, client_id, username, password) -> int:
        # With no password database nothing can prove who a client is, so
        # without allow_anonymous every client is refused -- user name or not
        # (Mosquitto 2.0 answers both with "not authorised").
        if not self.allow_anonymous:
            return RC_NOT_AUTHORIZED
        return 0

    def acl_check(self, client, access, topic, qos, retain) -> bool:
        return True


cdef class _SendConnack:
    """The accepting CONNACK, written once the session's ops are committed."""
    cdef Connection conn
    cdef object session
    cdef bytes connack

    def __call__(self) -> None:
        cdef Connection conn = self.conn
        session = self.session
        if conn.state != C_CONNECTED or session.conn is not conn:
            return
        conn._write(self.connack)
        conn.online = True
        if session.inflight or session.queue:
            # [MQTT-4.4.0-1]: resend unacknowledged PUBLISH / PUBREL, then what is queued.
            conn.broker.router.resume(session)


cpdef handle_connect(BrokerCore broker, Connection conn, p):
    if conn.state != C_NEW:
        # A second CONNECT is a protocol error [MQTT-3.1.0-2].
        raise MQTTError(RC_PROTOCOL_ERROR, "second CONNECT")
    config = broker.config
    cdef int version = p.protocol_version
    conn.version = version
    refusal = broker.ha_refusal
    if refusal is not None:
        # mode = "ha", this worker does not serve (raftmq.cluster.ha): 0x9C with
        # the leader as Server Reference, or 0x88 while no leader is known.
        # mode = "dynsec-sync": 0x88 while the node is outside a working majority.
        log.info("Client %s:%d refused: this node does not serve clients now (cluster role).",
                 *conn.peer)
        return _refuse(conn, *refusal)
    raw = conn.raw_head  # what a hand-off would pass on (empty with one worker)
    conn.raw_head = b""
    cdef bint v5 = version == 5
    cdef bint clean_start = p.clean_start

    # -- client identifier [MQTT-3.1.3-5 .. 9] --------------------------------
    client_id = p.client_id
    assigned = None
    mesh = broker.mesh
    if not client_id:
        if version == 3:
            return _refuse(conn, RC_CLIENT_ID_NOT_VALID)  # 3.1 needs 1..23 characters
        if not config.allow_zero_length_clientid:
            return _refuse(conn, RC_CLIENT_ID_NOT_VALID)
        if version == 4 and not clean_start:
            # 3.1.1: a zero-length id requires CleanSession=1 [MQTT-3.1.3-8].
            return _refuse(conn, RC_CLIENT_ID_NOT_VALID)
        client_id = assigned = f"auto-{uuid.uuid4()}" if mesh is None \
            else mesh.assign_client_id()
    elif mesh is not None:
        owner = mesh.owner_of(client_id)
        if owner != broker.worker_id:
            return _hand_off(broker, conn, owner, raw)

    # -- MQTT 5 CONNECT properties -------------------------------------------
    if v5:
        props = p.properties or {}
        if props.get("authentication_method") is not None:
            # No enhanced authentication method is supported: 0x8C [MQTT-4.12.0-1].
            return _refuse(conn, RC_BAD_AUTH_METHOD)
        conn.client_receive_max = props.get("receive_maximum", 65535)
        conn.client_max_packet = props.get("maximum_packet_size", conn.client_max_packet)
        conn.client_alias_max = props.get("topic_alias_maximum", 0)
        if conn.client_alias_max:
            conn.alias_out = {}
        conn.problem_info = props.get("request_problem_information", 1) != 0
        expiry = props.get("session_expiry_interval", 0)
    elif clean_start:
        expiry = 0  # 3.x clean session: the session ends with the connection
    else:
        expiry = config.persistent_client_expiration or EXPIRY_NEVER

    # -- keep alive (MQTT 5 §3.2.2.3.14 Server Keep Alive) -------------------------
    cdef int keepalive = p.keepalive
    server_keepalive = None
    if v5:
        max_keepalive = config.max_keepalive
        if max_keepalive and (keepalive > max_keepalive or keepalive == 0):
            # The broker imposes its own keep alive [MQTT-3.2.2-21]; like Mosquitto
            # a client asking for none (0) gets max_keepalive too.  A 3.x client
            # cannot be told, and Mosquitto accepts it with its own value.
            keepalive = server_keepalive = max_keepalive

    # -- will -----------------------------------------------------------------
    will = None
    will_topic = p.will_topic
    if will_topic is not None:
        if not valid_topic_name(will_topic):
            if v5:
                return _refuse(conn, RC_TOPIC_NAME_INVALID)
            return conn.close()
        if p.will_retain and not config.retain_available:
            if v5:
                return _refuse(conn, RC_RETAIN_NOT_SUPPORTED)  # [MQTT-3.2.2-13]
            return conn.close()
        wprops = dict(p.will_properties) if p.will_properties else {}
        delay = wprops.pop("will_delay_interval", 0)
        if wprops.get("payload_format_indicator") == 1:
            try:
                p.will_payload.decode("utf-8")
            except UnicodeDecodeError:
                return _refuse(conn, RC_PAYLOAD_FORMAT_INVALID)  # [MQTT-3.1.3-11]
        # A will's Message Expiry Interval stays in its properties: it counts
        # from when the will is published (will.will_to_publish), not from now.
        will = (delay, Message(will_topic, bytes(p.will_payload or b""), p.will_qos,
                               bool(p.will_retain), wprops or None, 0))

    # -- authentication ---------------------------------------------------------
    username = p.username
    cdef int rc = 0
    identity = conn.cert_identity
    if identity is not None:
        # use_identity_as_username / use_subject_as_username (broker/tls.py): as
        # Mosquitto, the certificate names the user, the CONNECT's user name and
        # password are ignored and no password check is made; ACLs see the name.
        if not identity:
            log.info("Client %s:%d refused: no usable client certificate (%s).", conn.peer[0],
                     conn.peer[1], client_id)
            return _refuse(conn, RC_BAD_USER_PASS)
        username = identity
    else:
        rc = broker._auth.authenticate(client_id, username, p.password)
        if rc != 0:
            log.info("Client %s:%d refused: not authorised (%s).", conn.peer[0], conn.peer[1],
                     client_id)
            return _refuse(conn, rc if rc >= 0x80 else RC_NOT_AUTHORIZED)
    if will is not None and will_topic.startswith("$CONTROL/"):
        # $CONTROL requests run with the sender's rights; a will would run one
        # unattended after the connection is gone.  Refused as Mosquitto 2.0.22
        # does (dynsec spec §3.1), whoever the client is.
        log.info("Client %s:%d refused: a will on %s is not allowed (%s).", conn.peer[0],
                 conn.peer[1], will_topic, client_id)
        return _refuse(conn, RC_NOT_AUTHORIZED)

    # -- accepted: take over / resume / create the session ------------------------
    conn.client_id = client_id
    conn.username = username
    conn.keepalive = keepalive
    conn.will = will
    conn.clean_start = clean_start
    conn.state = C_CONNECTED
    cdef list ops = []
    mesh = broker.mesh
    if mesh is not None and mesh.colocate is not None:
        mesh.colocate.before_connect(client_id)  # connected on a sibling: kicked there
    session, present = _attach_session(broker, conn, client_id, version, expiry, clean_start,
                                       username, ops)
    if session.persistent:
        ops.append(SessionPut(client_id, version, expiry, clean_start, username))
        session.durable = True
        if will is not None:
            ops.append(WillSet(client_id, will[0], will[1]))
        elif present:
            ops.append(WillDelete(client_id))
    if present and broker.acl_enabled and session.subscriptions:
        # A resumed session keeps only the subscriptions its client may still
        # make (Mosquitto re-checks them at CONNECT; spec/dynsec.md §7).
        for topic_filter, sub in list(session.subscriptions.items()):
            if not broker.acl_check(conn, ACCESS_SUBSCRIBE, topic_filter, sub.qos, False):
                broker.router.unsubscribe(session, topic_filter)
                if session.durable:
                    ops.append(SubRemove(client_id, topic_filter))

    cdef _SendConnack send = _SendConnack.__new__(_SendConnack)
    send.conn = conn
    send.session = session
    if v5:
        cprops = dict(broker.connack_properties)
        if assigned is not None:
            cprops["assigned_client_identifier"] = assigned
        if server_keepalive is not None:
            cprops["server_keep_alive"] = server_keepalive
        send.connack = Connack(present, 0, cprops or None).encode(version)
    else:
        key = version * 2 + present
        connack = _plain_connacks[key]
        if connack is None:
            connack = _plain_connacks[key] = Connack(present, 0, None).encode(version)
        send.connack = connack

    if log.isEnabledFor(20):  # logging.INFO
        peer = conn.peer
        info_line(log, f"New client connected from {peer[0]}:{peer[1]} as {client_id} "
                       f"(p{LOG_PROTOCOL.get(version, version)}, c{1 if clean_start else 0}, "
                       f"k{keepalive}"
                       + (f", u'{username}'" if username is not None else "")
                       + (f") on worker {broker.worker_id}." if mesh is not None else ")."))

    if ops:
        broker.commit(ops, send)
    else:
        _after_commit(broker, send)


# -- DISCONNECT (MQTT 5 §3.14, 3.1.1 §3.14) --------------------------------------
# Compiled for the same reason as CONNECT: every client of a connect storm
# ends with one.

def handle_disconnect(BrokerCore broker, Connection conn, p) -> None:
    session = conn.session
    reason = p.reason_code or 0
    props = p.properties
    expiry = props.get("session_expiry_interval") if props else None
    if expiry is not None:
        if session.expiry_interval == 0 and expiry != 0:
            # [MQTT-3.14.2-2]: from 0 at CONNECT to non-zero here is a protocol error.
            raise MQTTError(RC_PROTOCOL_ERROR, "session expiry set after CONNECT with 0")
        if expiry != session.expiry_interval:
            session.expiry_interval = expiry
            if session.durable:
                broker.commit([SessionExpiry(session.client_id, expiry)], None)
    # Only a normal disconnection (0x00, and every 3.x DISCONNECT) discards the
    # will [MQTT-3.14.4-3]; 0x04 asks for it, and so does any error reason: a
    # client closing "without first sending a DISCONNECT with Reason Code 0x00"
    # gets its will published (MQTT 5 §3.1.2.5).
    conn.graceful = reason == 0
    if log.isEnabledFor(20):  # logging.INFO
        info_line(log, f"Client {conn.client_id} disconnected.")
    conn.close()


# MQTT 5 DISCONNECT reason: Session taken over (§3.14.2.1).
cdef int RC_SESSION_TAKEN_OVER = 0x8E


def take_over(BrokerCore broker, Session existing, client_id, bint clean) -> None:
    """Close the connection of ``existing`` because a new one takes the client id
    over [MQTT-3.1.4-3]: 5.0 DISCONNECT 0x8E, then its will unless it sent
    DISCONNECT 0x00 -- at once when the session ends (``clean``, no will delay,
    not persistent), else left to its delay."""
    _take_over(broker, existing, client_id, clean)


cdef _take_over(BrokerCore broker, Session existing, client_id, bint clean):
    old = existing.conn
    log.info("Client %s already connected, closing old connection.", client_id)
    existing.conn = None
    broker.connected_count -= 1
    old.session = None
    old_will = None if old.graceful else old.will
    old.will = None
    old.disconnect(RC_SESSION_TAKEN_OVER)
    if old_will is not None and (clean or old_will[0] == 0 or not existing.persistent):
        broker.publish_will(client_id, old_will[1], durable_session=existing)


def attach_session(BrokerCore broker, Connection conn, client_id, int version, expiry,
                   bint clean, username, list ops):
    """Broker.attach_session: bind ``conn`` to the session of ``client_id``: take
    over a connected one [MQTT-3.1.4-3], start clean or resume [MQTT-3.1.2-4,
    MQTT-3.1.2-5].  Returns (session, session present)."""
    return _attach_session(broker, conn, client_id, version, expiry, clean, username, ops)


cdef tuple _attach_session(BrokerCore broker, Connection conn, client_id, int version, expiry,
                           bint clean, username, list ops):
    cdef Session existing = broker.sessions.get(client_id)
    cdef Session session
    cdef bint present
    if existing is not None and existing.conn is None and \
            0 < existing.expire_at <= broker.loop.time():
        # Expired but not yet reached by the upkeep tick (e.g. its time
        # passed while the broker was down): it ends now, will included.
        log.info("Expiring client %s.", client_id)
        broker.stats.clients_expired += 1
        broker.end_session(existing, ops)
        existing = None
    if existing is not None and existing.conn is not None:
        _take_over(broker, existing, client_id, clean)
    if existing is not None and (clean or not existing.persistent):
        broker.end_session(existing, ops)
        existing = None
    else:
        wills = broker.wills
        if wills.pending:
            wills.cancel(client_id)  # reconnected within the will delay [MQTT-3.1.3-9]
    if existing is not None:
        session = existing
        session.protocol_version = version
        session.expiry_interval = expiry
        session.username = username
        session.expire_at = 0.0
        present = True
        broker.router.note_persistence(session)
    else:
        session = Session(client_id, version, expiry, username)
        broker.sessions[client_id] = session
        present = False
    session.conn = conn
    conn.session = session
    broker.connected_count += 1
    cdef Stats stats = broker.stats
    if broker.connected_count > stats.clients_maximum:
        stats.clients_maximum = broker.connected_count
    return session, present


# -- accept and close -----------------------------------------------------------

def on_connection_made(BrokerCore broker, Connection conn) -> None:
    """Broker.on_connection_made."""
    _on_connection_made(broker, conn)


cdef int _on_connection_made(BrokerCore broker, Connection conn) except -1:
    broker.connections.add(conn)
    broker.stats.connections += 1
    return 0


def end_session(BrokerCore broker, Session session, list ops) -> None:
    """Broker.end_session: the session ends (expired, clean start, expiry 0 at
    close): drop it all."""
    _end_session(broker, session, ops)


cdef int _end_session(BrokerCore broker, Session session, list ops) except -1:
    # (Most sessions that end are a clean client's with nothing of this: a
    # connect storm's closes skip the calls.)
    if session.inflight or session.queue:
        broker.router.requeue_shared(session)
    if session.subscriptions:
        broker.router.unsubscribe_all(session)
    cdef dict sessions = broker.sessions
    client_id = session.client_id
    if sessions.get(client_id) is session:
        del sessions[client_id]
    if session.durable:
        ops.append(SessionDelete(client_id))
        session.durable = False
    # A will still waiting for its delay is published when the session ends.
    wills = broker.wills
    if wills.pending:
        wills.fire(client_id)
    return 0


def on_connection_lost(BrokerCore broker, Connection conn) -> None:
    """Broker.on_connection_lost: the session goes offline or ends; the will."""
    _on_connection_lost(broker, conn)


cdef int _on_connection_lost(BrokerCore broker, Connection conn) except -1:
    broker.connections.discard(conn)  # (a connection handed to a sibling ends here)
    session_obj = conn.session
    if session_obj is None:
        return 0  # never connected or refused
    cdef Session session = session_obj
    if session.conn is not conn:
        return 0  # taken over (attach_session handled it)
    session.conn = None
    broker.connected_count -= 1
    if not conn.graceful and log.isEnabledFor(20):  # logging.INFO
        info_line(log, f"Client {conn.client_id} closed its connection.")
    will = None if conn.graceful else conn.will
    cdef list ops = []
    client_id = session.client_id
    if conn.graceful and conn.will is not None and session.durable:
        ops.append(WillDelete(client_id))
    expiry = session.expiry_interval
    if expiry == 0:
        if will is not None:
            broker.publish_will(client_id, will[1], durable_session=None)
        _end_session(broker, session, ops)
    else:
        if session.durable and not broker._stopping:
            # Expiry and will delay count from now, also across a restart
            # (a session still connected when the broker stops counts from
            # the restart instead: Broker._load).
            ops.append(SessionOffline(client_id, int(time() * 1000)))
        if expiry != EXPIRY_NEVER:
            broker._schedule_expiry(session, broker.loop.time() + expiry)
        if will is not None:
            delay = min(will[0], expiry)
            if delay == 0:
                broker.publish_will(client_id, will[1], durable_session=session)
            else:
                broker.wills.schedule(client_id, delay, will[1])
    if ops:
        broker.pending_ops.extend(ops)
    if broker.pending_ops or broker._pending_actions:
        broker.flush_ops()
    return 0
