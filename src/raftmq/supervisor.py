"""The supervisor: starts, watches and restarts the processes of one node.

    raftmq serve
     └─ supervisor        this module: children, signals and the listening sockets
         ├─ raft process  raftmq.raft.process.run_node (the only LMDB writer)
         └─ worker × N    raftmq.broker.server.run with a RaftStore (raft/client.py)

Children are started with multiprocessing's "spawn" (a fresh interpreter, the
frozen Config pickled across).  Each child puts itself in its own process
group, so a Ctrl-C on the terminal reaches the supervisor only and shutdown
keeps its order, and asks the kernel to SIGKILL it if the supervisor dies
(PR_SET_PDEATHSIG): a node is never left half alive.

Crash-only children: a child that dies is started again (one log line; the
delay doubles up to 5 s while it keeps dying within 10 s of starting).  A worker
whose channel to the raft process breaks, or whose proposal fails, exits on
purpose (EXIT_STORE_LOST): its in-memory state may hold changes that were
never committed, and a fresh worker rebuilds from the committed state.  The
unacknowledged client packets are retransmitted by the clients after they
reconnect ([MQTT-4.4.0-1]).

Shutdown (SIGTERM / SIGINT): workers first (they stop accepting, flush their
last batch and wait for its commit), then the raft process (it persists the
Ready in progress and closes LMDB), then exit 0.  Signal handlers only set a
flag; the watch loop does the work (as uvicorn's multiprocess supervisor).

``mode = "ha"``: each worker serves only while the node is the Raft leader and
stands by (refusing clients) otherwise; a worker whose node changes role exits
with EXIT_ROLE_CHANGED and is started again at once, in its new role
(raftmq.cluster.ha).  Its serving flag (shared memory, one byte per worker)
feeds /health/leader.

The listening sockets belong to the supervisor: for each worker slot and
listener one socket (SO_REUSEPORT when there are several workers), handed to
the worker at every start with the index of its listener (TLS and WebSocket
settings are per listener; the TLS files are checked here before any child
starts: broker/tls.py).  A worker that dies or restarts (a crash, an ha
role change) thus never closes its port: connections that arrive meanwhile
wait in the socket's backlog and are accepted by the next worker of that slot
instead of being refused (one worker: the port never closes at all).  The
supervisor only binds them; a worker's listen() opens the port, so at start-up
an open port still means a worker is serving.

``durability = "none"`` runs no raft process: the workers keep state in memory
(MemoryStore), like Mosquitto with persistence off.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import tomllib
from dataclasses import fields, replace
from typing import Any

from raftmq.cluster.config import ClusterSettings, cluster_from_mapping, load_cluster_settings

log = logging.getLogger("raftmq.supervisor")

EXIT_STORE_LOST = 75  # a worker lost its durable store (EX_TEMPFAIL): restart it
EXIT_ROLE_CHANGED = 76  # ha: the node's Raft role changed (cluster/ha.py): restart at once
STOP_TIMEOUT = 15.0
# The longest the watch loop sleeps with nothing to do (it wakes at once when a
# child dies or a signal comes): a safety net, not a poll.
WATCH_INTERVAL = 5.0
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, arg: Any) -> None:
    """prctl(2) through libc (Linux); nothing where it is missing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def name_process(name: str) -> None:
    """Set this process's name as ``ps``, ``top`` and ``pgrep`` show it
    (/proc/PID/comm, 15 bytes): "raftmq", "raftmq-raft", "raftmq-worker-N"
    instead of N times "python"."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def _die_with_parent(parent_pid: int, name: str) -> None:
    """Child side: SIGKILL us when the supervisor dies (Linux), and leave its
    process group so terminal signals go to the supervisor only; take ``name``."""
    name_process(name)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os._exit(1)


def _setup_child_logging(level: str, batched: bool = False) -> None:
    from raftmq.logsetup import setup_logging

    setup_logging(level.lower(), batched)


def _raft_child(parent_pid: int, settings: ClusterSettings, data_dir: str, durability: str, level: str) -> None:
    _die_with_parent(parent_pid, "raftmq-raft")
    _setup_child_logging(level)
    from raftmq.raft.process import run_node

    sys.exit(run_node(settings, data_dir, durability))


def _worker_child(parent_pid: int, config: Any, index: int, count: int, run_dir: str,
                  serving: Any = None, sockets: tuple[tuple[int, socket.socket], ...] = ()) -> None:
    _die_with_parent(parent_pid, f"raftmq-worker-{index}" if index < 10 else f"raftmq-w{index}")
    _setup_child_logging(config.log_level, batched=True)
    import functools

    from raftmq.broker.server import run
    from raftmq.workers.node import attach_worker

    node = functools.partial(attach_worker, index=index, count=count, run_dir=run_dir,
                             sockets=sockets)
    worker_id = index + 1  # the raft process numbers its channel clients from 1
    if config.durability == "none":
        from raftmq.state.store import MemoryStore

        sys.exit(run(config, MemoryStore(), node=node))
    from raftmq.raft.client import NOT_LEADER, RaftStore

    if config.mode == "dynsec-sync":
        # Every node of the majority serves; only dynsec goes through Raft (cluster/dsync.py).
        from raftmq.cluster import dsync

        dstore = dsync.DsyncStore(config.data_dir, worker_id)

        def crash(detail: str) -> None:
            logging.getLogger("raftmq.worker").error(
                "Worker %d: durable store failed (%s); restarting the worker.", worker_id, detail)
            logging.shutdown()
            os._exit(EXIT_STORE_LOST)

        dstore.set_failure_listener(dsync.failure_listener(dstore, worker_id, crash))
        sys.exit(run(config, dstore, node=dsync.attach(node, dstore, index)))
    ha_stopping = None
    if config.mode == "ha":
        # Only the leader's workers serve; the others refuse (cluster/ha.py).
        from raftmq.cluster import ha

        role = ha.probe_role(config.data_dir)
        if role[0] != "leader":
            sys.exit(ha.run_standby(config, node, index, role))
    store = RaftStore(config.data_dir, worker_id)
    if config.mode == "ha":
        node, ha_stopping = ha.attach_serving(node, store, config.cluster, serving, index)
    worker_log = logging.getLogger("raftmq.worker")

    def store_lost(kind: str, detail: str) -> None:
        if ha_stopping is not None and ha_stopping():
            return  # leadership lost: the worker is closing its clients and exits (ha.py)
        if kind == NOT_LEADER:
            # Refused before being appended: nothing durable changed.  A worker
            # on a follower must not take durable work (cluster modes refuse
            # clients there); log, and let the client time out.
            worker_log.warning("Worker %d: proposal refused: %s.", worker_id, detail)
            return
        # Crash-only (see the module doc).  Nothing not committed was acknowledged.
        worker_log.error("Worker %d: durable store failed (%s); restarting the worker.", worker_id, detail)
        logging.shutdown()
        os._exit(EXIT_STORE_LOST)

    store.set_failure_listener(store_lost)
    sys.exit(run(config, store, node=node))


class _Child:
    def __init__(self, name: str, target: Any, args: tuple) -> None:
        self.name = name
        self.target = target
        self.args = args
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.started_at = 0.0
        self.restart_delay = 0.0
        self.restart_at = 0.0

    def start(self, ctx: Any) -> None:
        self.proc = ctx.Process(target=self.target, args=self.args, name=self.name, daemon=False)
        self.proc.start()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()


class Supervisor:
    def __init__(self, config: Any, settings: ClusterSettings) -> None:
        if getattr(config, "cluster", settings) is not settings:
            config = replace(config, cluster=settings)  # the workers read config.cluster (ha)
        self.config = config
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self._stop_signal: int | None = None
        self.ops: Any = None  # ops/http.py OpsServer while http_listener is on
        me = os.getpid()
        self.raft: _Child | None = None
        if config.durability != "none":
            self.raft = _Child(
                "raftmq-raft", _raft_child,
                (me, settings, config.data_dir, config.durability, config.log_level),
            )
        count = worker_count(config)
        # mode = "ha": 1 while worker i serves clients (the node leads and the
        # worker has loaded the state), for /health/leader.
        self.serving: Any = self.ctx.RawArray("b", count) if config.mode == "ha" else None
        # Private (0700) and short (unix socket paths are limited to 108 bytes):
        # the workers' mesh and hand-off sockets (raftmq.workers).
        self.run_dir = tempfile.mkdtemp(prefix="raftmq-")
        self.count = count
        # per worker slot (open_listeners): (listener index, socket) pairs
        self.sockets: list[tuple[tuple[int, socket.socket], ...]] = []
        self.workers = [
            _Child(f"raftmq-worker-{i}", _worker_child, (me, config, i, count, self.run_dir, self.serving))
            for i in range(count)
        ]

    def open_listeners(self) -> str | None:
        """Bind every listener once per worker slot; an error message if one cannot be."""
        try:
            self.sockets = listen_sockets(self.config, self.count)
        except OSError as exc:
            return f"Error: {exc.strerror or exc} (listener: {exc.filename or '?'})."
        for child, socks in zip(self.workers, self.sockets, strict=True):
            child.args = (*child.args, socks)
        return None

    def close_listeners(self) -> None:
        for socks in self.sockets:
            for _index, sock in socks:
                sock.close()
        self.sockets = []

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        children = ([self.raft] if self.raft else []) + self.workers
        from raftmq.ops.http import OpsError, start_ops

        try:  # before the children: they inherit PROMETHEUS_MULTIPROC_DIR
            self.ops = start_ops(self.config, lambda: all(c.alive() for c in children),
                                 [c.name for c in children], self._serving())
        except OpsError as exc:
            log.error("Error: %s", exc)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return 1
        problem = self.open_listeners()
        if problem is not None:
            log.error(problem)
            if self.ops is not None:
                self.ops.stop()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return 1
        for c in children:
            c.start(self.ctx)
        log.info(
            "Supervisor %d started: raft process %s, %d worker(s), data dir %s.",
            os.getpid(), self.raft.proc.pid if self.raft and self.raft.proc else "none",
            len(self.workers), self.config.data_dir,
        )
        # Sleep until a child dies (its sentinel fd becomes readable), a signal
        # arrives (the wakeup fd) or a restart is due: no polling while all is
        # well (the supervisor's CPU counts in the node's per-message figures).
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            while self._stop_signal is None:
                self._wait(children, wake_r)
                for c in children:
                    self._watch(c)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
        log.info("Supervisor: received %s, stopping.", signal.Signals(self._stop_signal).name)
        return self.shutdown()

    def _wait(self, children: list[_Child], wake_fd: int) -> None:
        fds = [wake_fd]
        timeout = WATCH_INTERVAL
        now = time.monotonic()
        for c in children:
            if c.restart_at:
                timeout = min(timeout, max(0.0, c.restart_at - now))
            elif c.proc is not None and c.proc.sentinel is not None:
                fds.append(c.proc.sentinel)
        multiprocessing.connection.wait(fds, timeout)
        with contextlib.suppress(OSError):
            while os.read(wake_fd, 64):
                pass

    def _serving(self) -> Any:
        """/health/leader's test in ha: every worker serves (None elsewhere)."""
        flags = self.serving
        if flags is None:
            return None
        return lambda: all(flags[i] == 1 for i in range(len(self.workers))) and all(
            c.alive() for c in self.workers)

    def _watch(self, c: _Child) -> None:
        if c.alive() or self._stop_signal is not None:
            return
        now = time.monotonic()
        if self.serving is not None and c in self.workers:
            self.serving[self.workers.index(c)] = 0  # it cannot say so itself after a kill
        code = c.proc.exitcode if c.proc is not None else None
        if code == EXIT_ROLE_CHANGED and c.restart_at == 0.0:
            # ha: the node's role changed; the worker comes back in its new role at once.
            if self.ops is not None:
                self.ops.child_died(c.proc.pid if c.proc else None)
            c.start(self.ctx)
            log.info("Child %s restarted for a role change (pid %d).", c.name,
                     c.proc.pid if c.proc else -1)
            return
        if c.restart_at == 0.0:
            quick = now - c.started_at < 10.0
            c.restart_delay = min(max(c.restart_delay * 2, 0.2), 5.0) if quick else 0.0
            c.restart_at = now + c.restart_delay
            log.warning("Child %s (pid %s) exited with %s; restarting in %.1f s.",
                        c.name, c.proc.pid if c.proc else "?", _exit_text(code), c.restart_delay)
            if self.ops is not None:
                self.ops.child_died(c.proc.pid if c.proc else None, c.name)
        if now >= c.restart_at:
            c.restart_at = 0.0
            c.start(self.ctx)
            log.info("Child %s restarted (pid %d).", c.name, c.proc.pid if c.proc else -1)

    def shutdown(self) -> int:
        # Workers first: each flushes its last batch and waits for its commit.
        self._stop(self.workers)
        self.close_listeners()
        if self.raft is not None:
            self._stop([self.raft])
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.ops is not None:
            self.ops.stop()
        log.info("Supervisor stopped.")
        return 0

    def _stop(self, children: list[_Child]) -> None:
        for c in children:
            if c.alive() and c.proc is not None and c.proc.pid:
                os.kill(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for c in children:
            if c.proc is None:
                continue
            c.proc.join(max(0.0, deadline - time.monotonic()))
            if c.proc.is_alive():
                log.warning("Child %s did not stop in %.0f s: killing it.", c.name, STOP_TIMEOUT)
                c.proc.kill()
                c.proc.join(5)


def check_listeners(config: Any) -> str | None:
    """An error message if a listener's address cannot be bound.

    The worker slots' sockets (listen_sockets) use SO_REUSEPORT, which would let
    them silently share a port with another process of the same user (a second
    node, say); binding once here without it refuses a port that is already
    taken, as Mosquitto does."""
    for listener in getattr(config, "listeners", ()):
        try:
            infos = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError as exc:
            return f"Error: listener {listener.host}:{listener.port}: {exc}"
        for family, kind, proto, _name, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    return f"Error: {exc.strerror} ({listener.host}:{listener.port})."
    return None


def listen_sockets(config: Any, count: int) -> list[tuple[tuple[int, socket.socket], ...]]:
    """For each of ``count`` worker slots, one bound socket per listener
    address, in listener order, as ``(listener index, socket)``: the worker
    serves each with its listener's protocol and TLS settings (Broker.start).
    SO_REUSEPORT when ``count`` > 1: the kernel spreads connections over the
    slots.  A listener on port 0 gets one port, the same in every slot.
    OSError (``filename`` set to "host:port") if an address cannot be bound."""
    slots: list[list[tuple[int, socket.socket]]] = [[] for _ in range(count)]
    try:
        for index, listener in enumerate(getattr(config, "listeners", ())):
            for family, kind, proto, _name, address in socket.getaddrinfo(
                    listener.host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                for socks in slots:
                    sock = socket.socket(family, kind, proto)
                    socks.append((index, sock))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if count > 1:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    try:
                        sock.bind(address)
                    except OSError as exc:
                        exc.filename = f"{listener.host}:{listener.port}"
                        raise
                    # Not listen(): the worker does, when it is ready to serve.  Until
                    # the first worker of a slot starts, the kernel refuses connections
                    # there (or gives them to a listening sibling slot); afterwards the
                    # socket listens for as long as the supervisor holds it.
                    sock.setblocking(False)
                    address = sock.getsockname()  # port 0: the same port in every slot
    except BaseException:
        for socks in slots:
            for _index, sock in socks:
                sock.close()
        raise
    return [tuple(socks) for socks in slots]


def worker_count(config: Any) -> int:
    """``workers`` from the config; 0 (the default) means one per CPU."""
    return getattr(config, "workers", 0) or os.cpu_count() or 1


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def cluster_settings_of(config: Any) -> ClusterSettings:
    """The [cluster] settings: from ``config.cluster`` once config.py carries
    them, else read from the config file itself."""
    cluster = getattr(config, "cluster", None)
    if isinstance(cluster, ClusterSettings):
        return cluster
    source = getattr(config, "source", None)
    return load_cluster_settings(source if source and os.path.exists(source) else None)


def serve(config: Any) -> int:
    """Run the node (raft process + workers) until SIGTERM/SIGINT; exit status."""
    try:
        settings = cluster_settings_of(config)
    except Exception as exc:
        log.error("Error: %s", exc)
        return 2
    return run_node(config, settings)


def run_node(config: Any, settings: ClusterSettings) -> int:
    """Check what would only fail later in a child (mode, listeners, secret
    file), then run the supervisor; exit status."""
    name_process("raftmq")
    mode = getattr(config, "mode", "standalone")
    if mode in ("ha", "dynsec-sync"):
        if settings.standalone or settings.listen is None:
            log.error("Error: mode = \"%s\" needs a [cluster] table with 'listen' and 'peers'.", mode)
            return 2
        if config.durability == "none":
            log.error("Error: mode = \"%s\" replicates through the raft process: "
                      "durability = \"none\" is not possible.", mode)
            return 2
    problem = check_listeners(config)
    if problem is not None:
        log.error(problem)
        return 1
    from raftmq.broker.tls import check_listeners as check_tls

    problems = check_tls(config)  # certificates and keys, before any child needs them
    if problems:
        for problem in problems:
            log.error("Error: %s", problem)
        return 2
    if settings.secret_file is not None:
        from raftmq.raft.transport import SecretFileError, read_secret_file

        try:
            read_secret_file(settings.secret_file)
        except SecretFileError as exc:
            log.error("Error: %s", exc)
            return 1
    return Supervisor(config, settings).run()


# ------------------------------------------------------------------------------
# python -m raftmq.supervisor --config FILE [-p PORT] [--data-dir DIR]


def load_node_config(path: str | None, overrides: dict[str, Any]) -> tuple[Any, ClusterSettings]:
    """Config (raftmq.config) and ClusterSettings from one TOML file."""
    from raftmq.config import Listener, config_from_mapping

    data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    cluster_table = data.pop("cluster", None)
    config = config_from_mapping(data, path or "<defaults>")
    changes = {k: v for k, v in overrides.items() if v is not None}
    port = changes.pop("port", None)
    if port is not None:
        changes["listeners"] = (Listener(changes.pop("host", config.listeners[0].host), port),)
    names = {f.name for f in fields(config)}
    config = replace(config, **{k: v for k, v in changes.items() if k in names})
    return config, cluster_from_mapping(cluster_table, path or "<defaults>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftmq.supervisor")
    parser.add_argument("-c", "--config")
    parser.add_argument("-p", "--port", type=int)
    parser.add_argument("--host")
    parser.add_argument("--data-dir")
    parser.add_argument("--workers", type=int)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    overrides = {"port": args.port, "host": args.host, "data_dir": args.data_dir,
                 "workers": args.workers}
    if args.verbose:
        overrides["log_level"] = "debug"
    try:
        config, settings = load_node_config(args.config, overrides)
    except Exception as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    _setup_child_logging(config.log_level)
    return run_node(config, settings)


if __name__ == "__main__":
    sys.exit(main())
