"""Session state: what the broker remembers of one client id.

A ``Session`` outlives its network connection when its expiry interval is
non-zero (MQTT 5 §4.1, 3.1.1 clean session 0).  It holds:

- ``subscriptions``: topic filter (as sent, ``$share/...`` included) ->
  ``Subscription``: its options (qos, no_local, retain_as_published,
  retain_handling, sub_id), share_group, match_filter (the filter without
  ``$share/<group>/``) and durable (announced to sibling workers as a persistent
  session's).  Compiled with the connection (ext/connection.pyx), like
  ``Session``: the QoS 0 fan-out reads a subscriber's options per delivery;
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

from typing import Any

from raftmq._connection import EXPIRY_NEVER, Subscription  # noqa: F401 (re-exported)
from raftmq._connection import Session as CompiledSession
from raftmq.state.entries import QUEUED, Message

__all__ = ["EXPIRY_NEVER", "SHARE_UNKNOWN", "Outgoing", "Session", "Subscription"]
# Outgoing.share of a message loaded from the store, which does not say by
# which subscription it came (router.requeue_shared then works it out).
SHARE_UNKNOWN: Any = object()


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


# Session: compiled with the connection (ext/connection.pyx, "Session"): one
# is created and dropped per clean client, a connect storm's hot path.
Session = CompiledSession
