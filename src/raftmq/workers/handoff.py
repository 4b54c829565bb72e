"""Handing a client connection to the worker that owns its client id.

SO_REUSEPORT lets the kernel pick the worker that accepts a connection; the
CONNECT then names a client id that may belong to a sibling (ownership.py).
The accepting worker stops reading at once and sends the socket itself
(SCM_RIGHTS over a unix datagram socket) with every byte it had read, the
CONNECT included, to the owner, which adopts the socket and parses those
bytes as if it had read them: to the client it is one uninterrupted TCP
connection.  Each worker binds ``w<index>.handoff`` in the node's private
run directory (mode 0700, made by the supervisor).

Hand-offs are sent without blocking: when the owner's queue is full they wait
(reading paused) until it has room, in order.  If the owner is not running
(it is being restarted) the hand-off fails and the client is refused with "server unavailable" (5.0 CONNACK 0x88, 3.1.1
return code 3): it retries, and its session is found once the owner is back.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from raftmq.broker.protocol import Connection

if TYPE_CHECKING:
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.workers")

# Bytes read before the CONNECT was handled travel with the socket in one
# datagram; a client that pipelines more than this before its CONNACK is refused.
MAX_HANDOFF_BYTES = 256 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024
# Connections waiting for a sibling whose hand-off queue is full, before new
# ones are refused with "server unavailable".
MAX_PENDING = 10_000


class AdoptedConnection(Connection):
    """A connection accepted by a sibling: starts with the bytes it had read."""

    __slots__ = ("initial",)

    def __init__(self, broker: Broker, initial: bytes) -> None:
        super().__init__(broker)
        self.initial = initial

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        data, self.initial = self.initial, b""
        if data:
            self.data_received(data)


class _Route:
    """The way to one sibling's hand-off socket: a connected datagram socket
    (so that a full receive queue shows as not writable) and what waits for it."""

    __slots__ = ("path", "sock", "pending", "writer")

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.pending: deque[tuple[Connection, int, bytes]] = deque()
        self.writer = False

    def connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setblocking(False)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Handoff:
    def __init__(self, broker: Broker, index: int, run_dir: str) -> None:
        self.broker = broker
        self.index = index
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, f"w{index}.handoff")
        self.sock: socket.socket | None = None
        self.routes: dict[int, _Route] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handed = 0
        self.adopted = 0

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        sock.bind(self.path)
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self.sock is not None and self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for owner, route in self.routes.items():
            while route.pending:
                conn, fd, _raw = route.pending.popleft()
                os.close(fd)
                self._drop(conn, owner, "shutting down")
            if route.writer and route.sock is not None and self.loop is not None:
                self.loop.remove_writer(route.sock.fileno())
            route.close()

    def hand_off(self, conn: Connection, owner: int, raw: bytes) -> bool:
        """Take ``conn`` (whose CONNECT was just read) to worker ``owner``: its
        socket and the bytes read so far go there, now or -- if that worker's
        queue is full -- as soon as it has room.  False if it cannot take it
        (the caller refuses the client); True: the connection is no longer ours."""
        if len(raw) > MAX_HANDOFF_BYTES:
            return False
        transport = conn.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        route = self.routes.get(owner)
        if route is None:
            route = self.routes[owner] = _Route(os.path.join(self.run_dir, f"w{owner}.handoff"))
        if len(route.pending) >= MAX_PENDING:
            return False
        transport.pause_reading()
        fd = os.dup(sock.fileno())
        if route.pending:
            route.pending.append((conn, fd, raw))  # keep the order of arrival
            return True
        outcome = self._send(route, fd, raw)
        if outcome is None:
            route.pending.append((conn, fd, raw))
            self._wait_writable(route, owner)
            return True
        os.close(fd)
        if outcome:
            self._done(conn)
            return True
        transport.resume_reading()
        return False

    def _send(self, route: _Route, fd: int, raw: bytes) -> bool | None:
        """True: sent; None: the owner's queue is full; False: it is not there."""
        for attempt in (0, 1):
            try:
                route.connect().sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 array.array("i", [fd]))])
                return True
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                # The owner restarted (a new socket at the path) or is down.
                route.close()
                if attempt:
                    log.warning("Worker %d: cannot hand a client to %s (%s).", self.index,
                                route.path, exc.strerror or exc)
        return False

    def _wait_writable(self, route: _Route, owner: int) -> None:
        if not route.writer and route.sock is not None and self.loop is not None:
            route.writer = True
            self.loop.add_writer(route.sock.fileno(), self._drain, route, owner)

    def _drain(self, route: _Route, owner: int) -> None:
        while route.pending:
            conn, fd, raw = route.pending[0]
            outcome = self._send(route, fd, raw)
            if outcome is None:
                return  # still full: wait for the next writable event
            route.pending.popleft()
            os.close(fd)
            if outcome:
                self._done(conn)
            else:
                self._drop(conn, owner, "worker unavailable")
        if route.writer and self.loop is not None:
            route.writer = False
            if route.sock is not None:
                self.loop.remove_writer(route.sock.fileno())

    def _done(self, conn: Connection) -> None:
        """Sent: close our descriptor only; the owner's keeps the connection."""
        self.handed += 1
        conn.transport.abort()

    def _drop(self, conn: Connection, owner: int, why: str) -> None:
        log.info("Client %s:%d closed: cannot hand it to worker %d (%s).", conn.peer[0],
                 conn.peer[1], owner, why)
        conn.transport.close()

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while True:
            try:
                data, fds, flags, _addr = socket.recv_fds(sock, MAX_HANDOFF_BYTES + 1024, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("Worker %d: hand-off socket failed: %s.", self.index, exc)
                return
            if not fds:
                continue
            for extra in fds[1:]:
                os.close(extra)
            if flags & socket.MSG_TRUNC:
                os.close(fds[0])
                continue
            client = socket.socket(fileno=fds[0])
            client.setblocking(False)
            try:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self.adopted += 1
            self.loop.create_task(self._adopt(client, data))  # type: ignore[union-attr]

    async def _adopt(self, client: socket.socket, data: bytes) -> None:
        broker = self.broker
        try:
            await self.loop.connect_accepted_socket(  # type: ignore[union-attr]
                lambda: AdoptedConnection(broker, data), client)
        except OSError as exc:
            log.info("Worker %d: a handed-over connection was already gone (%s).", self.index,
                     exc)
            client.close()
