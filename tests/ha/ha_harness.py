"""Real ``raftmq serve`` nodes in ``mode = "ha"`` on loopback, for tests/ha.

``HaCluster(tmp_path, n)`` writes one raftmq.toml per node (client listener,
HTTP listener, a [cluster] table whose peers carry ``mqtt_port``, one shared
secret file of mode 0600) and starts ``python -m raftmq serve`` for each.
``HaNode`` wraps one node: start, kill -9 (of the supervisor: its children die
with it, PR_SET_PDEATHSIG), SIGTERM, /health/leader, raft status and
``raftmq cluster`` commands.  Everything started is stopped at ``close()``;
every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from raftmq.raft import channel as ch
from support.ports import free_port
from support.procs import stop

SRC = str(Path(__file__).resolve().parents[2] / "src")
HOST = "127.0.0.1"
SECRET = "ha-test-cluster-secret-0123456789"
LOG_LEVEL = os.environ.get("RAFTMQ_TEST_LOG_LEVEL", "debug")
# Workers per node (as tests/support/brokers.py): `RAFTMQ_TEST_WORKERS=2 pytest tests/ha`.
TEST_WORKERS = int(os.environ.get("RAFTMQ_TEST_WORKERS", "1"))


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ConnectionError, KeyError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class HaNode:
    def __init__(self, root: Path, node_id: int) -> None:
        self.id = node_id
        self.mqtt_port = free_port()
        self.raft_port = free_port()
        self.http_port = free_port()
        self.dir = root / f"node{node_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "raftmq.toml"
        self.log_path = self.dir / "raftmq.log"
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    @property
    def address(self) -> str:
        """The client listener, as a Server Reference names it."""
        return f"{HOST}:{self.mqtt_port}"

    def write_config(self, peers: list[HaNode], secret_file: Path, workers: int,
                     election_ticks: int, extra: tuple[str, ...] = ()) -> None:
        lines = [
            *extra,
            'mode = "ha"',
            f'data_dir = "{self.data_dir}"',
            f'log_level = "{LOG_LEVEL}"',
            f"workers = {workers}",
            *(() if any(x.startswith("allow_anonymous") for x in extra) else ("allow_anonymous = true",)),
            f'http_listener = "{HOST}:{self.http_port}"',
            "[[listener]]",
            f'host = "{HOST}"',
            f"port = {self.mqtt_port}",
            "[cluster]",
            f"node_id = {self.id}",
            f'listen = "{HOST}:{self.raft_port}"',
            f'secret_file = "{secret_file}"',
            "tick_ms = 10",
            f"election_ticks = {election_ticks}",
            "heartbeat_ticks = 3",
            "peers = [",
            *(f'  {{ id = {p.id}, host = "{HOST}", port = {p.raft_port}, mqtt_port = {p.mqtt_port} }},'
              for p in peers),
            "]",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        env = {**os.environ, "PYTHONPATH": SRC, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "raftmq", "serve", "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir, start_new_session=True,
            )

    def wait_listening(self, timeout: float = 30.0) -> None:
        def listening() -> bool:
            assert self.running, f"node {self.id} exited:\n{self.log_tail()}"
            with socket.create_connection((HOST, self.mqtt_port), timeout=0.5):
                return True

        wait_for(listening, timeout, f"node {self.id} listening")

    def kill9(self) -> None:
        """kill -9 of the supervisor; its children get SIGKILL from the kernel."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        # The children die with their parent; wait until the listener is gone.
        wait_for(lambda: not _port_open(self.mqtt_port), 10, f"node {self.id}'s workers gone")

    def terminate(self) -> int | None:
        return stop(self.proc, 20)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- what the node says ----------------------------------------------------------

    def health_leader(self) -> int:
        """The status code of GET /health/leader (0: no answer)."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/health/leader", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        c = ch.BlockingChannel(str(self.data_dir), timeout=timeout, connect_timeout=timeout)
        try:
            return c.admin({"op": "status"})["status"]
        finally:
            c.close()

    def cluster_cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": SRC}
        return subprocess.run(
            [sys.executable, "-m", "raftmq", "cluster", "--data-dir", str(self.data_dir), *args],
            capture_output=True, text=True, env=env, timeout=timeout,
        )


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.3):
            return True
    except OSError:
        return False


class HaCluster:
    def __init__(self, root: Path, n: int = 3, workers: int = TEST_WORKERS, election_ticks: int = 50,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.root = root
        self.secret_file = root / "cluster.secret"
        self.secret_file.write_text(SECRET)
        os.chmod(self.secret_file, 0o600)
        self.nodes = {i: HaNode(root, i) for i in range(1, n + 1)}
        for node in self.nodes.values():  # extra: top-level TOML lines; env: the nodes' environment
            node.write_config(list(self.nodes.values()), self.secret_file, workers, election_ticks, extra)
            node.env = dict(env or {})

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_listening()
        self.stable_leader()

    def stable_leader(self, hold: float = 1.0, timeout: float = 60.0) -> HaNode:
        """The serving node, once it has served for ``hold`` seconds in a row: at
        start, nine Python processes importing on two loaded CPUs can delay a
        heartbeat past the election timeout, and a second election follows."""
        deadline = time.monotonic() + timeout
        while True:
            node = self.serving(timeout=max(1.0, deadline - time.monotonic()))
            since = time.monotonic()
            while time.monotonic() - since < hold and node.health_leader() == 200:
                time.sleep(0.1)
            if time.monotonic() - since >= hold:
                return node
            if time.monotonic() > deadline:
                raise AssertionError("no stable serving leader")

    def serving(self, timeout: float = 30.0, exclude: tuple[int, ...] = ()) -> HaNode:
        """The node whose /health/leader answers 200 (its workers serve clients)."""
        def find() -> HaNode | None:
            for node in self.nodes.values():
                if node.id not in exclude and node.running and node.health_leader() == 200:
                    return node
            return None

        return wait_for(find, timeout, "a serving leader")

    def others(self, node: HaNode) -> list[HaNode]:
        return [n for n in self.nodes.values() if n.id != node.id]

    def by_address(self, address: str) -> HaNode:
        return next(n for n in self.nodes.values() if n.address == address)

    def close(self) -> None:
        for node in self.nodes.values():  # all at once: no leadership ping-pong
            if node.running:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            node.terminate()

    def logs(self) -> str:
        return "\n".join(f"--- node {n.id}\n{n.log_tail()}" for n in self.nodes.values())


def cluster_factory(cls: type, tmp_path: Path, request: Any) -> Iterator[Callable[..., Any]]:
    """Body of a pytest fixture making 3-node clusters of ``cls`` (HaCluster or a
    subclass): each is closed at teardown, its logs printed when the test failed
    (``rep_call``, set by ``pytest_runtest_makereport`` below)."""
    made: list[Any] = []

    def make(n: int = 3, **kw: object) -> Any:
        cluster = cls(tmp_path, n, **kw)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None)
    for cluster in made:
        cluster.close()
        if failed is not None and failed.failed:
            print(cluster.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """Import into a conftest: keeps each phase's report on the test item."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
