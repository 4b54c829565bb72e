"""The node's HTTP endpoint, served by the supervisor (``http_listener``).

    GET /metrics         Prometheus text format (OpenMetrics if the scraper asks):
                         the files of every process of the node, merged
                         (ops/metrics.py explains the multiprocess mode)
    GET /health          200 while the node's processes (workers, raft process)
                         are all running, else 503 -- for a load balancer
    GET /health/leader   200 only on a healthy Raft leader, else 503; in
                         standalone the node is always its own leader.  In
                         ``ha``, 200 only while the node's workers serve
                         clients (leader, state loaded; cluster/ha.py), so a
                         load balancer in front of the cluster sends the
                         clients to the node that answers 200 (DESIGN.md §1)

Bodies are small JSON documents ({"status": "ok", "role": "leader"}) for people
and scripts; a load balancer needs only the status code.  HEAD works too.

The supervisor's main loop only sleeps and watches its children, so the server
is the stdlib's threaded HTTP server in a daemon thread: a slow scraper costs a
thread, never the supervisor's loop, and the hot path is in other processes.

The supervisor hooks are three calls: ``start_ops(config, healthy, names)`` before it
starts any child (it prepares a fresh ``<data_dir>/metrics`` and sets
``PROMETHEUS_MULTIPROC_DIR`` for the children), ``ops.child_died(pid, name)`` when a
child exits, ``ops.stop()`` at shutdown.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from raftmq.ops.metrics import MULTIPROC_ENV

log = logging.getLogger("raftmq.ops")

METRICS_DIR = "metrics"  # under data_dir
ROLE_CACHE_SECONDS = 1.0  # /health/leader polled by several balancers: ask the raft process at most once a second
REQUEST_TIMEOUT = 10.0  # a client that sends nothing holds a thread this long at most


class OpsError(Exception):
    """The HTTP endpoint cannot start; the message names the config key."""


class OpsServer:
    """``/metrics``, ``/health``, ``/health/leader`` on ``host:port`` in a thread.

    ``healthy()``: whether the node's processes are up.  ``role()``: the node's
    Raft role ("leader", "follower", ...).  Both are called from the server's
    threads, so they must only read.
    """

    def __init__(self, host: str, port: int, metrics_dir: str, healthy: Callable[[], bool],
                 role: Callable[[], str], children: Iterable[str] = (),
                 serving: Callable[[], bool] | None = None) -> None:
        self.host = host
        # ha: whether the workers serve clients (the truth /health/leader tells).
        self.serving = serving
        self.port = port
        self.metrics_dir = metrics_dir
        self.healthy = healthy
        self.role = role
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # child name -> exits seen by the supervisor; every child from 0, so that
        # Prometheus' increase() counts the first restart too.
        self._restarts: dict[str, int] = dict.fromkeys(children, 0)
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind (raises OSError) and serve in a daemon thread; ``port`` is then the bound one."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("_Server", (_Server,), {"address_family": family})
        handler = type("_Handler", (_Handler,), {"ops": self})
        self._server = server_class((self.host, self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="raftmq-http",
                                        kwargs={"poll_interval": 0.25}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def child_died(self, pid: int | None, name: str | None = None) -> None:
        """A child process exited (the supervisor restarts it): count it, and drop
        its live gauges (its counters stay, see metrics.py)."""
        if name:
            with self._lock:
                self._restarts[name] = self._restarts.get(name, 0) + 1
        if pid:
            from prometheus_client import multiprocess

            try:
                multiprocess.mark_process_dead(pid, self.metrics_dir)
            except OSError as exc:  # never let bookkeeping stop the supervisor
                log.warning("Cannot clean the metrics of process %d: %s", pid, exc)

    def metrics(self, accept: str | None) -> tuple[bytes, str]:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        registry.register(_SupervisorCollector(self))
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type


class _SupervisorCollector:
    """What only the supervisor knows: whether the node is up, and restarts."""

    def __init__(self, ops: OpsServer) -> None:
        self.ops = ops

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("raftmq_node_up", "1 while every process of the node runs "
                                "(GET /health answers 200), else 0.",
                                value=1 if self.ops.healthy() else 0)
        restarts = CounterMetricFamily("raftmq_child_restarts", "Child processes (workers, raft "
                                       "process) that exited and were restarted by the supervisor.",
                                       labels=("child",))
        with self.ops._lock:
            counts = sorted(self.ops._restarts.items())
        for name, count in counts:
            restarts.add_metric((name,), count)
        yield restarts


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup
        # that can hang for seconds in a container without DNS); nothing here
        # needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    ops: OpsServer
    server_version = "raftmq"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/metrics":
                status = 200
                data, content_type = self.ops.metrics(self.headers.get("Accept"))
            elif path in ("/health", "/health/leader"):
                status, data = self._health(leader=path == "/health/leader")
                content_type = "application/json"
            else:
                status, data, content_type = 404, b'{"status": "not found"}', "application/json"
        except Exception:  # a broken metrics file must not take the endpoint down
            log.exception("HTTP %s failed", path)
            status, data, content_type = 500, b'{"status": "error"}', "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _health(self, leader: bool) -> tuple[int, bytes]:
        up = bool(self.ops.healthy())
        doc: dict[str, Any] = {"status": "ok" if up else "unavailable"}
        ok = up
        if leader:
            role = self.ops.role() if up else "unknown"
            ok = up and role == "leader"
            if self.ops.serving is not None:
                # ha: the workers' own word, not the cached raft role: 200
                # exactly while this node's workers serve clients.
                ok = up and self.ops.serving()
                role = "leader" if ok else ("leader, not serving yet" if role == "leader" else role)
            doc["role"] = role
            if up and not ok:
                doc["status"] = "not leader"
        return (200 if ok else 503), orjson.dumps(doc)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        # One line per scrape and probe would drown the broker's log.
        log.debug("HTTP %s: " + format, self.client_address[0], *args)


# ---------------------------------------------------------------------------
# Wiring for the supervisor


def prepare_metrics_dir(data_dir: str) -> str:
    """A fresh, empty ``<data_dir>/metrics``, exported as PROMETHEUS_MULTIPROC_DIR
    to the children started from now on.  Emptied at every start: files of an
    earlier run belong to dead processes (their counters would add up into the
    new run's totals; Prometheus sees the restart as a counter reset)."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.abspath(os.path.join(data_dir, METRICS_DIR))
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    os.environ[MULTIPROC_ENV] = path
    return path


class RaftRole:
    """The node's Raft role, asked of the local raft process (cached for a second)."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._role = "unknown"
        self._at = -ROLE_CACHE_SECONDS

    def __call__(self) -> str:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= ROLE_CACHE_SECONDS:
                self._role = self._ask()
                self._at = now
            return self._role

    def _ask(self) -> str:
        from raftmq.raft.channel import BlockingChannel

        try:
            channel = BlockingChannel(self.data_dir, timeout=1.0, connect_timeout=0.2)
        except OSError:
            return "unknown"
        try:
            reply = channel.admin({"op": "status"})
            return str(reply.get("status", {}).get("role", "unknown"))
        except (OSError, ValueError):
            return "unknown"
        finally:
            channel.close()


def node_role(config: Any) -> Callable[[], str]:
    """What /health/leader asks: in standalone (and without a raft process) the
    node is always its own leader; in the cluster modes the raft process knows."""
    if getattr(config, "mode", "standalone") == "standalone" or config.durability == "none":
        return lambda: "leader"
    return RaftRole(config.data_dir)


def start_ops(config: Any, healthy: Callable[[], bool], children: Iterable[str] = (),
              serving: Callable[[], bool] | None = None) -> OpsServer | None:
    """Start the HTTP endpoint of ``config.http_listener`` (None when it is off).
    ``healthy()``: whether all children run; ``children``: their names;
    ``serving()`` (ha): whether the workers serve clients, for /health/leader.

    Call before starting the children: it sets PROMETHEUS_MULTIPROC_DIR for them.
    Raises OpsError (naming the key) when the address cannot be bound.
    """
    listener = getattr(config, "http_listener", None)
    if listener is None:
        # Off means off: a PROMETHEUS_MULTIPROC_DIR left in the environment
        # would make the children write files nobody reads or cleans.
        os.environ.pop(MULTIPROC_ENV, None)
        return None
    host, port = listener
    try:
        metrics_dir = prepare_metrics_dir(config.data_dir)
    except OSError as exc:
        raise OpsError(f"http_listener: cannot prepare the metrics directory in "
                       f"{config.data_dir}: {exc}") from exc
    server = OpsServer(host, port, metrics_dir, healthy, node_role(config), children, serving)
    try:
        server.start()
    except OSError as exc:
        os.environ.pop(MULTIPROC_ENV, None)
        raise OpsError(f"http_listener {host}:{port}: cannot listen: {exc.strerror or exc}") from exc
    log.info("Opening HTTP listen socket on %s:%d (/metrics, /health).", host, server.port)
    return server
