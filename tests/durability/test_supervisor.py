"""The supervisor keeps a node whole: a dead child is restarted, SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal

import pytest
from durable_node import PUBACK, RawClient, descendants, wait_for

pytestmark = pytest.mark.timeout(120)


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    c = RawClient(port, f"p-{topic}", clean=True)
    c.publish(topic, payload, qos=1, packet_id=1, retain=True)
    assert c.read()[0] == PUBACK
    c.close()


def read_retained(port: int, topic: str) -> bytes:
    c = RawClient(port, f"r-{topic}", clean=True)
    body = topic.encode()
    c.sock.sendall(bytes((0x82, 2 + 2 + len(body) + 1)) + b"\x00\x01" + len(body).to_bytes(2, "big") + body + b"\x01")
    assert c.read()[0] == 9  # SUBACK
    ptype, _flags, payload = c.read()
    assert ptype == 3
    tlen = int.from_bytes(payload[:2], "big")
    c.close()
    return payload[2 + tlen + 2 :]


def test_raft_process_killed_is_restarted_and_state_kept(node_factory) -> None:
    node = node_factory()
    publish_retained(node.port, "keep/1", b"before")
    raft_pid = next(p for p in descendants(node.proc.pid) if _is_raft(p))
    os.kill(raft_pid, signal.SIGKILL)
    wait_for(lambda: "exited with signal SIGKILL; restarting" in node.log_text(), 20, "the restart log line")
    # The worker lost its channel: it exits and is restarted too, rebuilt from the committed state.
    wait_for(lambda: node.log_text().count("restarted (pid") >= 2, 30, "both children restarted")
    assert "Worker 1: durable store failed (channel to the raft process lost" in node.log_text()
    wait_for(lambda: _try_read(node.port, "keep/1") == b"before", 30, "the node to serve again")
    publish_retained(node.port, "keep/2", b"after")
    assert read_retained(node.port, "keep/2") == b"after"


def _is_raft(pid: int) -> bool:
    """The raft process is the one child with the node's LMDB file open (the only writer)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("raft.lmdb/data.mdb"):
                return True
        except OSError:
            continue
    return False


def _try_read(port: int, topic: str) -> bytes | None:
    try:
        return read_retained(port, topic)
    except (OSError, AssertionError, ConnectionError):
        return None


def test_sigterm_stops_workers_then_raft_and_exits_zero(node_factory) -> None:
    node = node_factory()
    publish_retained(node.port, "bye/1", b"kept")
    pids = descendants(node.proc.pid)
    assert node.stop() == 0
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and _not_zombie(p) for p in pids), 10,
             "every child to exit")
    log = node.log_text()
    assert log.index("raftmq version") < log.index("terminating.") < log.index("Raft node 1 shutting down")
    assert "Supervisor stopped." in log
    node.start()
    assert read_retained(node.port, "bye/1") == b"kept"


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_worker_port_stays_open_and_the_next_worker_accepts(node_factory) -> None:
    """The supervisor holds the listening socket: while the only worker is dead
    (kill -9, restart pending), a client's TCP connect is not refused; its
    CONNECT is answered by the restarted worker."""
    node = node_factory()
    publish_retained(node.port, "hold/1", b"x")
    worker = next(p for p in descendants(node.proc.pid)
                  if not _is_raft(p) and "spawn_main" in _cmdline(p))
    os.kill(worker, signal.SIGKILL)
    # Connect at once: the restart waits at least 0.2 s (supervisor.py).
    client = RawClient(node.port, "hold-early", clean=True, timeout=30)
    assert not client.session_present
    client.close()
    assert read_retained(node.port, "hold/1") == b"x"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_processes_are_named_for_ps_and_pgrep(node_factory) -> None:
    """`ps`/`top`/`pgrep` tell the node's processes apart: the supervisor, the raft
    process (the LMDB writer) and each worker by its index."""
    node = node_factory(extra="workers = 2")
    wait_for(lambda: len([p for p in descendants(node.proc.pid) if _comm(p).startswith("raftmq-")]) == 3,
             20, "the named children")
    names = {p: _comm(p) for p in descendants(node.proc.pid)}
    raft = [p for p, n in names.items() if n == "raftmq-raft"]
    assert len(raft) == 1 and _is_raft(raft[0]), names
    assert sorted(n for n in names.values() if n.startswith("raftmq-worker-")) == \
        ["raftmq-worker-0", "raftmq-worker-1"], names
    assert _comm(node.proc.pid) == "raftmq"
