"""``$SYS/broker/...`` topics, published like Mosquitto's every ``sys_interval``
seconds as retained QoS 0 messages (only when the value changed, uptime always).

Load averages follow Mosquitto's: an exponentially weighted moving average of
the per-minute rate over 1, 5 and 15 minutes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

# Stats: the counters bumped on the hot path, C integers of the compiled core.
from raftmq._connection import Stats  # noqa: F401 (re-exported)
from raftmq.state.entries import Message

if TYPE_CHECKING:
    from raftmq.broker.server import Broker

try:
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("raftmq")
except Exception:  # pragma: no cover - not installed (running from the tree)
    VERSION = "0.1.0"


# Counters summed over the workers of a node (workers/mesh.py sends them).
NODE_COUNTERS = ("bytes_received", "bytes_sent", "messages_received", "messages_sent",
             "publish_received", "publish_sent", "publish_dropped", "connections",
             "clients_expired", "clients_moved")

_LOAD_SOURCES = {
    "messages/received": "messages_received",
    "messages/sent": "messages_sent",
    "bytes/received": "bytes_received",
    "bytes/sent": "bytes_sent",
    "publish/received": "publish_received",
    "publish/sent": "publish_sent",
    "publish/dropped": "publish_dropped",
    "connections": "connections",
}


class SysTopics:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.started = broker.loop.time()
        self.last: dict[str, str] = {}
        self.loads: dict[str, float] = {}
        self.prev: dict[str, int] = {}
        self.prev_time = self.started
        self.clients_maximum = 0

    def _publish(self, topic: str, value: str, always: bool = False) -> None:
        if not always and self.last.get(topic) == value:
            return
        self.last[topic] = value
        message = Message(topic, value.encode(), 0, True, None, 0)
        # Every worker publishes the node's totals to its own subscribers.
        self.broker.router.route(message, None, None, retain_durable=False, forward=False)

    def _counters(self) -> dict[str, int]:
        """The node's counters: this worker's plus its siblings' last reports."""
        broker = self.broker
        stats = broker.stats
        counters = {attr: getattr(stats, attr) for attr in NODE_COUNTERS}
        counters["connected"] = broker.clients_connected()
        counters["disconnected"] = broker.disconnected_count()
        counters["subscriptions"] = broker.router.subscription_count
        mesh = broker.mesh
        if mesh is not None:
            names = (*mesh.STAT_FIELDS, "connected", "disconnected", "subscriptions")
            for name, value in zip(names, mesh.sibling_totals(), strict=True):
                counters[name] += value
        return counters

    def _update_loads(self, now: float, counters: dict[str, int]) -> None:
        interval = max(now - self.prev_time, 1e-3)
        self.prev_time = now
        for name, attr in _LOAD_SOURCES.items():
            value = counters[attr]
            delta = value - self.prev.get(attr, value)
            self.prev[attr] = value
            per_minute = delta * 60.0 / interval
            for minutes in (1, 5, 15):
                key = f"{name}/{minutes}min"
                factor = math.exp(-interval / (60.0 * minutes))
                old = self.loads.get(key, 0.0)
                self.loads[key] = per_minute + factor * (old - per_minute)

    def publish(self) -> None:
        broker = self.broker
        now = broker.loop.time()
        stats = self._counters()
        self._update_loads(now, stats)
        connected = stats["connected"]
        disconnected = stats["disconnected"]
        # Highest number of clients connected at once: this worker's own
        # maximum, or the node's as seen at each $SYS interval.
        self.clients_maximum = max(self.clients_maximum, broker.stats.clients_maximum, connected)
        p = self._publish
        p("$SYS/broker/version", f"raftmq version {VERSION}")
        p("$SYS/broker/uptime", f"{int(now - self.started)} seconds", always=True)
        p("$SYS/broker/clients/connected", str(connected))
        p("$SYS/broker/clients/active", str(connected))
        p("$SYS/broker/clients/disconnected", str(disconnected))
        p("$SYS/broker/clients/inactive", str(disconnected))
        p("$SYS/broker/clients/total", str(connected + disconnected))
        p("$SYS/broker/clients/maximum", str(self.clients_maximum))
        p("$SYS/broker/clients/expired", str(stats["clients_expired"]))
        p("$SYS/broker/messages/received", str(stats["messages_received"]))
        p("$SYS/broker/messages/sent", str(stats["messages_sent"]))
        p("$SYS/broker/messages/stored", str(broker.retained.count))
        p("$SYS/broker/store/messages/count", str(broker.retained.count))
        p("$SYS/broker/bytes/received", str(stats["bytes_received"]))
        p("$SYS/broker/bytes/sent", str(stats["bytes_sent"]))
        p("$SYS/broker/publish/messages/received", str(stats["publish_received"]))
        p("$SYS/broker/publish/messages/sent", str(stats["publish_sent"]))
        p("$SYS/broker/publish/messages/dropped", str(stats["publish_dropped"]))
        p("$SYS/broker/subscriptions/count", str(stats["subscriptions"]))
        p("$SYS/broker/retained messages/count", str(broker.retained.count))
        mesh = broker.mesh
        if mesh is not None:
            # How the node's clients spread over its worker processes.
            per_worker = mesh.connected_per_worker()
            for index, n in sorted(per_worker.items()):
                p(f"$SYS/broker/workers/{index}/clients/connected", str(n))
            # Connections moved between workers by co-location (workers/colocate.py).
            p("$SYS/broker/clients/moved", str(stats["clients_moved"]))
        for key, value in self.loads.items():
            p(f"$SYS/broker/load/{key}", f"{value:.2f}")
