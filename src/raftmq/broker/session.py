"""Session state: what the broker remembers of one client id.

A ``Session`` outlives its network connection when its expiry interval is
non-zero (MQTT 5 §4.1, 3.1.1 clean session 0).  It holds:

- ``subscriptions``: topic filter (as sent, ``$share/...`` included) -> ``Subscription``;
- ``inflight``: outgoing QoS 1/2 messages sent and not yet acknowledged, by
  packet id, in the order they were sent (dict order);
- ``queue``: outgoing QoS 1/2 messages waiting for a free in-flight slot or for
  the client to come back; in order;
- ``qos2_in``: packet ids of incoming QoS 2 messages routed and awaiting PUBREL;
- ``will``: (delay interval, message) of the current connection.

No I/O happens here: the connection (protocol.py) and the router
(router.py) move messages between queue, in-flight and the wire.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from raftmq.state.entries import QUEUED, Message

if TYPE_CHECKING:
    from raftmq.broker.protocol import Connection

_NO_IDS: frozenset = frozenset()

# MQTT 5 §3.1.2.11.2: 0xFFFFFFFF means the session never expires.
EXPIRY_NEVER = 0xFFFFFFFF
# Outgoing.share of a message loaded from the store, which does not say by
# which subscription it came (router.requeue_shared then works it out).
SHARE_UNKNOWN: Any = object()


class Subscription:
    """One subscription of one session, with its MQTT 5 options."""

    __slots__ = ("topic_filter", "qos", "no_local", "retain_as_published", "retain_handling",
                 "sub_id", "share_group", "match_filter", "durable")

    def __init__(self, topic_filter: str, qos: int, no_local: bool = False,
                 retain_as_published: bool = False, retain_handling: int = 0, sub_id: int = 0,
                 share_group: str | None = None, match_filter: str | None = None) -> None:
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


class Outgoing:
    """One message on its way to one session (queued or in flight)."""

    __slots__ = ("seq", "message", "qos", "retain", "sub_ids", "packet_id", "state", "share")

    def __init__(self, seq: int, message: Message, qos: int, retain: bool,
                 sub_ids: list[int] | None, packet_id: int = 0, state: int = QUEUED) -> None:
        self.seq = seq
        self.message = message
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.packet_id = packet_id
        self.state = state
        # The shared Subscription it was delivered for (None: a normal one):
        # another member gets it if the session ends first (MQTT 5 §4.8.2).
        self.share: Subscription | None = None


class Session:
    __slots__ = ("client_id", "protocol_version", "expiry_interval", "username", "subscriptions",
                 "inflight", "queue", "qos2_in", "will", "conn", "expire_at", "next_seq",
                 "_next_pid", "durable", "unwritten")

    def __init__(self, client_id: str, protocol_version: int, expiry_interval: int,
                 username: str | None = None) -> None:
        self.client_id = client_id
        self.protocol_version = protocol_version
        self.expiry_interval = expiry_interval
        self.username = username
        self.subscriptions: dict[str, Subscription] = {}
        self.inflight: dict[int, Outgoing] = {}
        # Created on first use: most sessions never queue or receive QoS 2, and
        # an empty deque alone is ~600 bytes (memory per idle connection).
        self.queue: deque[Outgoing] | tuple = ()
        self.qos2_in: set[int] | frozenset = _NO_IDS
        self.will: tuple[int, Message] | None = None
        self.conn: Connection | None = None
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

    def enqueue(self, out: Outgoing) -> None:
        queue = self.queue
        if queue.__class__ is tuple:
            queue = self.queue = deque()
        queue.append(out)

    def qos2_add(self, packet_id: int) -> None:
        if self.qos2_in.__class__ is frozenset:
            self.qos2_in = set()
        self.qos2_in.add(packet_id)

    def next_packet_id(self) -> int:
        """A packet id not used by any in-flight message [MQTT-2.2.1-3]."""
        pid = self._next_pid
        inflight = self.inflight
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

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        state: Any = "online" if self.conn is not None else "offline"
        return f"<Session {self.client_id!r} v{self.protocol_version} {state}>"
