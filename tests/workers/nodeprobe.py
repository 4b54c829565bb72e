"""Placing clients on the workers of one raftmq node and watching those workers.

- ``owned_id``: a fresh client id that ``owner_of`` gives to a chosen worker.
- ``placed_on``: the worker the broker log says a client id connected on
  ("New client connected ... as ID (...) on worker K.").
- ``worker_pids``: worker index -> pid, read from /proc: each worker binds its
  hand-off socket ``w<index>.handoff`` (raftmq.workers.handoff), so the child of
  the supervisor holding that unix socket is worker ``index``.  (The workers are
  multiprocessing spawn children: their command line does not name them.)
- ``accepting_worker``: which worker holds the server side of a TCP connection
  right now (/proc/net/tcp inode, then the workers' fd tables) -- the evidence
  of a hand-off, which the broker does not log: accepted by one worker, served
  by another.
"""

from __future__ import annotations

import os
import re
import socket
import time

from raftmq.workers.ownership import owner_of
from support.brokers import BrokerProcess
from support.helpers import unique
from support.mqttraw import RawClient
from support.procs import children_of

_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(.*?\) on worker (\d+)\.")


def owned_id(worker: int, workers: int, prefix: str = "c") -> str:
    """A client id no other test uses, owned by ``worker`` of ``workers``."""
    while True:
        client_id = unique(prefix)
        if owner_of(client_id, workers) == worker:
            return client_id


def log_text(broker: BrokerProcess) -> str:
    return broker.log_path.read_text(errors="replace")


def placements(broker: BrokerProcess) -> dict[str, list[int]]:
    """Client id -> the workers it connected on, in log order."""
    out: dict[str, list[int]] = {}
    for m in _CONNECTED.finditer(log_text(broker)):
        out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


def placed_on(broker: BrokerProcess, client_id: str, timeout: float = 5.0) -> list[int]:
    """The workers ``client_id`` connected on so far (waits for the first line)."""
    deadline = time.monotonic() + timeout
    while True:
        found = placements(broker).get(client_id, [])
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def assert_placed(broker: BrokerProcess, client_id: str, worker: int) -> None:
    """Every connect of ``client_id`` so far was logged on ``worker``."""
    found = placed_on(broker, client_id)
    assert found and set(found) == {worker}, (
        f"{client_id} expected on worker {worker}, log says {found}:\n{broker.log_tail()}")


# -- processes -----------------------------------------------------------------


def socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _handoff_inodes() -> dict[int, int]:
    """inode -> worker index of every bound ``w<index>.handoff`` unix socket."""
    out = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8:
                m = re.search(r"/w(\d+)\.handoff$", parts[7])
                if m:
                    out[int(parts[6])] = int(m.group(1))
    return out


def worker_pids(broker: BrokerProcess, workers: int, timeout: float = 10.0) -> dict[int, int]:
    """Worker index -> pid of the live worker processes of ``broker`` (waits
    until all ``workers`` are found)."""
    assert broker.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        handoff = _handoff_inodes()
        found: dict[int, int] = {}
        for pid in children_of(broker.proc.pid):
            for inode in socket_inodes(pid) & handoff.keys():
                found[handoff[inode]] = pid
        if len(found) == workers or time.monotonic() > deadline:
            assert len(found) == workers, f"workers found: {found}"
            return found
        time.sleep(0.05)


def server_inode(port: int, client: socket.socket) -> int:
    """Inode of the broker side (listening on ``port``) of ``client``'s TCP
    connection (0 until accepted)."""
    local_port = client.getsockname()[1]
    want_local = f"0100007F:{port:04X}"
    want_remote = f"0100007F:{local_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == want_local and parts[2] == want_remote:
                return int(parts[9])
    return 0


def accepting_worker(broker: BrokerProcess, client: socket.socket, pids: dict[int, int],
                     timeout: float = 5.0) -> int | None:
    """The worker whose fd table holds the broker side of ``client`` (None if
    none does within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        inode = server_inode(broker.port, client)
        if inode:
            holders = [index for index, pid in pids.items() if inode in socket_inodes(pid)]
            if len(holders) == 1:
                return holders[0]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def socket_on_worker(broker: BrokerProcess, worker: int, pids: dict[int, int],
                     attempts: int = 200) -> socket.socket:
    """A TCP connection (nothing sent yet) that ``worker`` accepted: connect until
    the kernel's SO_REUSEPORT choice falls on it."""
    for _ in range(attempts):
        s = socket.create_connection((broker.host, broker.port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if accepting_worker(broker, s, pids) == worker:
            return s
        s.close()
    raise AssertionError(f"no connection accepted by worker {worker} in {attempts} attempts")


def wait_log(broker: BrokerProcess, pattern: str, start: int = 0, timeout: float = 10.0) -> re.Match[str]:
    """The first match of ``pattern`` in the log after character ``start``."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        m = rx.search(log_text(broker), start)
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the log within {timeout}s:\n{broker.log_tail()}")
        time.sleep(0.05)


def raw_over(sock: socket.socket, version: int = 4, timeout: float = 5.0) -> RawClient:
    """A RawClient over an already connected socket (from ``socket_on_worker``)."""
    c = RawClient.__new__(RawClient)
    sock.settimeout(timeout)
    c.version = version
    c.sock = sock
    c.buf = bytearray()
    c.aliases = {}
    c.eof = False
    return c
