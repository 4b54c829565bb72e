"""Prometheus metrics of a node, in prometheus-client's multiprocess mode.

Theory of operation
-------------------
A node is several processes (supervisor, raft process, workers: DESIGN.md §2).
Each process writes its metric values into mmap'ed files under
``PROMETHEUS_MULTIPROC_DIR``; the supervisor's ``GET /metrics`` (ops/http.py)
merges the files of all of them.  prometheus-client chooses between its
in-memory and its file-backed values when it is first imported, so the
supervisor sets the variable before it starts any child, and only when the HTTP
endpoint is on: with ``http_listener`` off nothing here runs at all.

The hot path pays nothing per message.  Workers count in plain attributes
(``broker.stats``, broker/sys_topics.py), and ``WorkerMetrics.update()``, called
from the broker's 0.5 s upkeep tick, adds what those counters gained since the
last call to the Counters and sets the Gauges.  The raft process does the same
with plain values through ``RaftMetrics.update()``.

How the files merge (``multiprocess_mode``):

- Counters sum over every file, including those of dead processes: a worker that
  crashed and was restarted continues from its predecessor's total, so
  ``rate()`` sees no reset (the last half second of the dead one is lost).
- Gauges are "live": the supervisor calls ``mark_process_dead(pid)`` when a
  child dies, which deletes that child's gauge files; a restarted child's values
  replace them.  Every worker series carries a ``worker`` label (its index in
  the node, 0..N-1, as in ``$SYS/broker/workers/K``): sum
  clients, sessions and subscriptions over it; every worker holds all retained
  messages, so take the max of ``raftmq_retained_messages``.

Names follow the Prometheus conventions: ``raftmq_`` prefix, base units
(seconds, bytes), ``_total`` on counters.  The ``$SYS/broker/...`` topic each
one mirrors is in its help text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Inflight / queued totals walk every session (~50 ns each): at every update
# up to this many sessions, beyond it every QUEUE_SCAN_EVERY updates (10 s at
# the broker's 0.5 s tick), so that a worker with 100k sessions does not stall
# its loop for milliseconds twice a second.
QUEUE_SCAN_ALWAYS = 5000
QUEUE_SCAN_EVERY = 20

# (Stats attribute, metric name, help)
WORKER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("clients_moved", "raftmq_clients_moved_total",
     "Connections moved to this worker by co-location ($SYS/broker/clients/moved)."),
    ("publish_received", "raftmq_publish_messages_received_total",
     "PUBLISH packets received from clients ($SYS/broker/publish/messages/received)."),
    ("publish_sent", "raftmq_publish_messages_sent_total",
     "PUBLISH packets sent to clients ($SYS/broker/publish/messages/sent)."),
    ("publish_dropped", "raftmq_publish_messages_dropped_total",
     "PUBLISH messages dropped: queue full, offline session over its limit, or refused "
     "($SYS/broker/publish/messages/dropped)."),
    ("messages_received", "raftmq_packets_received_total",
     "MQTT control packets of every type received ($SYS/broker/messages/received)."),
    ("messages_sent", "raftmq_packets_sent_total",
     "MQTT control packets of every type sent ($SYS/broker/messages/sent)."),
    ("bytes_received", "raftmq_received_bytes_total",
     "Bytes received from clients ($SYS/broker/bytes/received)."),
    ("bytes_sent", "raftmq_sent_bytes_total",
     "Bytes sent to clients ($SYS/broker/bytes/sent)."),
    ("connections", "raftmq_connections_total",
     "Client network connections accepted ($SYS/broker/load/connections)."),
    ("clients_expired", "raftmq_clients_expired_total",
     "Offline persistent sessions expired ($SYS/broker/clients/expired)."),
)

RAFT_ROLES = ("follower", "pre_candidate", "candidate", "leader")
# Persisting one Ready: from a fraction of a millisecond (async, page cache) to
# tens of milliseconds (fsync on a busy or network disk).
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5)


def enabled() -> bool:
    """Whether this process writes metrics (the supervisor turned them on)."""
    return MULTIPROC_ENV in os.environ


class WorkerMetrics:
    """The metrics of one worker, copied from ``broker.stats`` and the broker's
    tables by ``update()`` (call it from the upkeep tick, never per message).

    ``registry``: None in a node (multiprocess mode reads the files, nothing needs
    registering); a ``CollectorRegistry`` to read the values in-process.
    """

    def __init__(self, broker: Any, worker_id: int, registry: CollectorRegistry | None = None) -> None:
        self.broker = broker
        worker = str(worker_id)
        labels = ("worker",)
        self._counters = [
            (attr, Counter(name, text, labels, registry=registry).labels(worker))
            for attr, name, text in WORKER_COUNTERS
        ]
        # Everything the stats counted since the process started is reported,
        # including what start-up counted before this object existed.
        self._seen = [0] * len(self._counters)

        def gauge(name: str, text: str, mode: str = "livesum") -> Any:
            return Gauge(name, text, labels, registry=registry, multiprocess_mode=mode).labels(worker)

        self.clients_connected = gauge(
            "raftmq_clients_connected", "Clients connected now ($SYS/broker/clients/connected).")
        self.clients_maximum = gauge(
            "raftmq_clients_maximum", "Most clients connected at once since the worker started "
            "($SYS/broker/clients/maximum).", "livemax")
        self.sessions = gauge(
            "raftmq_sessions", "Sessions held, connected or not ($SYS/broker/clients/total).")
        self.subscriptions = gauge(
            "raftmq_subscriptions", "Subscriptions of all sessions ($SYS/broker/subscriptions/count).")
        self.retained = gauge(
            "raftmq_retained_messages", "Retained messages; every worker holds all of them: "
            "take the max over workers ($SYS/broker/retained messages/count).", "livemax")
        self.inflight = gauge(
            "raftmq_inflight_messages", "QoS 1/2 messages sent and not yet acknowledged "
            "(counted every 10 s above 5000 sessions).")
        self.queued = gauge(
            "raftmq_queued_messages", "Messages queued for sessions, waiting for a free "
            "in-flight slot or for the client to reconnect (counted every 10 s above 5000 sessions).")
        self._updates = 0

    def update(self) -> None:
        """Copy the deltas of ``broker.stats`` into the Counters, set the Gauges."""
        broker = self.broker
        stats = broker.stats
        seen = self._seen
        for i, (attr, counter) in enumerate(self._counters):
            value = getattr(stats, attr)
            if value > seen[i]:
                counter.inc(value - seen[i])
                seen[i] = value
        self.clients_connected.set(broker.connected_count)
        self.clients_maximum.set(stats.clients_maximum)
        self.sessions.set(len(broker.sessions))
        self.subscriptions.set(broker.router.subscription_count)
        self.retained.set(broker.retained.count)
        sessions = broker.sessions
        if len(sessions) <= QUEUE_SCAN_ALWAYS or self._updates % QUEUE_SCAN_EVERY == 0:
            inflight = queued = 0
            for session in sessions.values():
                inflight += len(session.inflight)
                queued += len(session.queue)
            self.inflight.set(inflight)
            self.queued.set(queued)
        self._updates += 1


def worker_metrics(broker: Any, worker_id: int | None = None) -> WorkerMetrics | None:
    """The worker's metrics when the node exports them, else None (no cost).

    ``worker_id`` defaults to ``broker.worker_id`` (the worker's index in its
    node, as in the child's name and ``$SYS/broker/workers/K``), else 0."""
    if not enabled():
        return None
    if worker_id is None:
        worker_id = getattr(broker, "worker_id", 0)
    return WorkerMetrics(broker, worker_id)


class RaftMetrics:
    """The raft process's metrics, set from plain values by ``update()``.

    Call ``update`` from a timer (every 0.5-1 s), never from the Ready loop;
    the Ready loop only appends each persist time to a list that ``update``
    then receives as ``fsync_seconds`` (or calls ``observe_fsync``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        def gauge(name: str, text: str, labels: tuple[str, ...] = (), mode: str = "livemax") -> Any:
            return Gauge(name, text, labels, registry=registry, multiprocess_mode=mode)

        self.term = gauge("raftmq_raft_term", "Current Raft term of this node.")
        self.commit_index = gauge("raftmq_raft_commit_index", "Highest log index known committed.")
        self.applied_index = gauge(
            "raftmq_raft_applied_index", "Highest log index applied to the state machine.")
        self.last_index = gauge("raftmq_raft_last_index", "Index of the last entry in the local log.")
        self.leader_id = gauge(
            "raftmq_raft_leader_id", "Node id of the leader this node knows (0 = none).", mode="livesum")
        self.is_leader = gauge(
            "raftmq_raft_is_leader", "1 when this node is the Raft leader, else 0.", mode="livesum")
        role = gauge("raftmq_raft_role", "1 for the Raft role this node has now, 0 for the others.",
                     ("role",), mode="livesum")
        self._roles = {name: role.labels(name) for name in RAFT_ROLES}
        self.proposals = Counter(
            "raftmq_raft_proposals_total",
            "Proposals appended by this node as leader (one per worker batch).", registry=registry)
        self.fsync = Histogram(
            "raftmq_raft_fsync_duration_seconds",
            "Time to persist one Raft Ready: its LMDB write transaction including the fsync "
            "(the group-commit latency; no fsync with durability = \"async\").",
            buckets=FSYNC_BUCKETS, registry=registry)
        self._role: str | None = None
        self._proposals_seen = 0

    def update(self, term: int, commit_index: int, applied_index: int, role: Any,
               proposals_total: int = 0, last_index: int | None = None, leader_id: int = 0,
               fsync_seconds: Iterable[float] = ()) -> None:
        """Set the gauges from plain values.  ``role``: a raft.types.Role or its
        lower-case name; ``proposals_total``: the process's running count;
        ``fsync_seconds``: persist times measured since the last call."""
        self.term.set(term)
        self.commit_index.set(commit_index)
        self.applied_index.set(applied_index)
        if last_index is not None:
            self.last_index.set(last_index)
        self.leader_id.set(leader_id)
        name = str(getattr(role, "name", role)).lower()
        if name != self._role:
            self._role = name
            for label, child in self._roles.items():
                child.set(1 if label == name else 0)
            self.is_leader.set(1 if name == "leader" else 0)
        if proposals_total > self._proposals_seen:
            self.proposals.inc(proposals_total - self._proposals_seen)
            self._proposals_seen = proposals_total
        observe = self.fsync.observe
        for seconds in fsync_seconds:
            observe(seconds)

    def observe_fsync(self, seconds: float) -> None:
        self.fsync.observe(seconds)


def raft_metrics() -> RaftMetrics | None:
    """The raft process's metrics when the node exports them, else None."""
    return RaftMetrics() if enabled() else None
