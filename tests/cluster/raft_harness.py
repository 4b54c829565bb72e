"""Real raft processes on loopback for the cluster tests.

``RaftCluster(tmp_path, n)`` writes one TOML file per member and starts
``python -m raftmq.raft.process --config FILE`` for each; ``RaftNode`` wraps
one process: start / kill -9 / terminate, its log file, and a client of its
local channel (status, propose, load).  Proposals are RetainSet ops on topics
``t/<key>``, so "what is committed" can be read back from any member's state
machine (LOAD) and compared.

Everything started is killed at ``close()``; every wait is bounded.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raftmq.raft import channel as ch
from raftmq.state.entries import LoadedState, Message, RetainSet, encode_ops
from support.ports import free_port
from support.procs import stop

SRC = str(Path(__file__).resolve().parents[2] / "src")
SECRET = "test-cluster-secret-0123456789"
LOG_LEVEL = os.environ.get("RAFTMQ_TEST_LOG_LEVEL", "info")  # "debug" to chase a failure


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ConnectionError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def write_secret(path: Path, secret: str = SECRET, mode: int = 0o600) -> Path:
    path.write_text(secret)
    os.chmod(path, mode)
    return path


class RaftNode:
    def __init__(self, root: Path, node_id: int, port: int) -> None:
        self.id = node_id
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.data_dir = root / f"node{node_id}"
        self.config_path = root / f"node{node_id}.toml"
        self.log_path = root / f"node{node_id}.log"
        self.proc: subprocess.Popen | None = None

    def write_config(
        self, peers: list[RaftNode], secret_file: Path, *, join: bool = False,
        snapshot_entries: int = 50_000, election_ticks: int = 50,
    ) -> None:
        lines = [
            f'data_dir = "{self.data_dir}"',
            f'log_level = "{LOG_LEVEL}"',
            "[cluster]",
            f"node_id = {self.id}",
            f'listen = "{self.address}"',
            f'secret_file = "{secret_file}"',
            f"join = {'true' if join else 'false'}",
            "tick_ms = 10",
            f"election_ticks = {election_ticks}",
            "heartbeat_ticks = 3",
            f"snapshot_entries = {snapshot_entries}",
            "peers = [",
            *(f'  {{ id = {p.id}, host = "127.0.0.1", port = {p.port} }},' for p in peers),
            "]",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        env = {**os.environ, "PYTHONPATH": SRC}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raftmq.raft.process", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> int | None:
        return stop(self.proc, 15)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- channel client ---------------------------------------------------------

    def channel(self, timeout: float = 5.0) -> ch.BlockingChannel:
        return ch.BlockingChannel(str(self.data_dir), timeout=timeout)

    def admin(self, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        c = self.channel(timeout)
        try:
            return c.admin(request)
        finally:
            c.close()

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.admin({"op": "status"}, timeout)["status"]

    def load(self, timeout: float = 20.0) -> LoadedState:
        c = self.channel(timeout)
        try:
            c.send(ch.frame(ch.LOAD))
            return pickle.loads(c.recv_until(ch.LOADED))
        finally:
            c.close()

    def propose(self, keys: list[str], timeout: float = 20.0, payload_size: int = 0) -> set[str]:
        """Propose one RetainSet entry per key (payload: the key, padded to
        ``payload_size``); the keys reported COMMITTED."""
        c = self.channel(timeout)
        try:
            by_id = {i + 1: k for i, k in enumerate(keys)}
            c.send(b"".join(
                ch.request_frame(ch.PROPOSE, rid, encode_ops([RetainSet(Message(f"t/{k}", k.encode().ljust(payload_size, b"."), 1, True))]))
                for rid, k in by_id.items()
            ))
            committed: set[str] = set()
            answered = 0
            while answered < len(by_id):
                kind, body = c.recv_frame()
                if kind == ch.COMMITTED:
                    ids = ch.parse_ids(body)
                    committed.update(by_id[i] for i in ids)
                    answered += len(ids)
                elif kind == ch.FAILED:
                    answered += len(ch.parse_ids(body[1:]))
            return committed
        finally:
            c.close()


class RaftCluster:
    def __init__(self, root: Path, n: int, **config: Any) -> None:
        self.root = root
        self.secret_file = write_secret(root / "cluster.secret")
        self.nodes = {i: RaftNode(root, i, free_port()) for i in range(1, n + 1)}
        self.config = config
        for node in self.nodes.values():
            node.write_config(list(self.nodes.values()), self.secret_file, **config)

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def add_node(self, node_id: int) -> RaftNode:
        """A new process configured to join (it knows the members; they do not know it yet)."""
        node = RaftNode(self.root, node_id, free_port())
        members = [*self.nodes.values(), node]
        node.write_config(members, self.secret_file, join=True, **self.config)
        self.nodes[node_id] = node
        node.start()
        return node

    def leader(self, timeout: float = 20.0, exclude: int | None = None) -> RaftNode:
        def find() -> RaftNode | None:
            for node in self.nodes.values():
                if not node.running or node.id == exclude:
                    continue
                try:
                    st = node.status(timeout=1.0)
                except (OSError, ConnectionError):
                    continue
                if st["role"] == "leader":
                    return node
            return None

        return wait_for(find, timeout, "a leader")

    def close(self) -> None:
        for node in self.nodes.values():
            if node.running:
                node.proc.kill()  # type: ignore[union-attr]
                node.proc.wait(10)  # type: ignore[union-attr]
