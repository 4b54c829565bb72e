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

The same datagrams move a CONNECTED connection to a sibling for co-location
(colocate.py): flag MOVE, the datagram carrying the connection's MQTT state
instead of raw bytes; sent at once or not at all (the connection then stays).
"""

from __future__ import annotations

import _socket
import array
import asyncio
import logging
import os
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from raftmq.broker.protocol import Connection

if TYPE_CHECKING:
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.workers")

# Bytes read before the CONNECT was handled travel with the socket, in
# datagrams of at most CHUNK bytes (a CONNECT with a large will takes several).
CHUNK = 64 * 1024
FIRST, LAST, MOVE = 1, 2, 4
_DGRAM_HEAD = struct.Struct("<HBBI")  # sender worker, FIRST | LAST, address family, total bytes
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


class _AdoptedSocket(socket.socket):
    """The socket object of an adopted connection.  ``loop.connect_accepted_socket``
    reads ``family`` and ``type`` three times; socket.socket's properties turn
    each into an IntEnum (a few thousand instructions apiece, callgrind); the C
    socket's own descriptors give the plain ints uvloop compares them with."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


class _Route:
    """The way to one sibling's hand-off socket: a connected datagram socket
    (so that a full receive queue shows as not writable) and what waits for it."""

    __slots__ = ("path", "sock", "pending", "writer")

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        # (connection, descriptor or -1, datagram, FIRST | LAST)
        self.pending: deque[tuple[Connection, int, bytes, int]] = deque()
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
        # sender worker -> (descriptor, address family, total bytes, chunks so far)
        self.assembling: dict[int, tuple[int, int, list[bytes]]] = {}
        self._adopting: set[Any] = set()  # connect_accepted_socket coroutines under way
        # colocate.py's receiver of moved connections: (socket, sender, state datagram body)
        self.on_moved: Any = None

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
                conn, fd, _data, flags = route.pending.popleft()
                if fd >= 0:
                    os.close(fd)
                if flags & LAST:
                    self._drop(conn, owner, "shutting down")
            if route.writer and route.sock is not None and self.loop is not None:
                self.loop.remove_writer(route.sock.fileno())
            route.close()

    def hand_off(self, conn: Connection, owner: int, raw: bytes) -> bool:
        """Take ``conn`` (whose CONNECT was just read) to worker ``owner``: its
        socket and the bytes read so far go there, now or -- if that worker's
        queue is full -- as soon as it has room.  False if it cannot take it
        (the caller refuses the client); True: the connection is no longer ours."""
        transport = conn.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        route = self.routes.get(owner)
        if route is None:
            route = self.routes[owner] = _Route(os.path.join(self.run_dir, f"w{owner}.handoff"))
        if len(route.pending) >= MAX_PENDING:
            return False
        family = sock.family
        if not route.pending and len(raw) <= CHUNK:
            # The usual case, sent at once: the connection's own descriptor goes
            # (the kernel gives the owner its own copy) and ours is closed right
            # after -- no dup, no pause.
            outcome = self._send(route, sock.fileno(),
                                 _DGRAM_HEAD.pack(self.index, FIRST | LAST, family, len(raw)) + raw)
            if outcome is not None:
                if outcome:
                    self._done(conn)
                return outcome
            # The owner's queue is full: queue it, below.
        transport.pause_reading()
        fd = os.dup(sock.fileno())
        # Datagrams of at most CHUNK bytes: the first carries the descriptor.
        count = max(1, -(-len(raw) // CHUNK))
        datagrams = []
        for i in range(count):
            flags = (FIRST if i == 0 else 0) | (LAST if i == count - 1 else 0)
            datagrams.append((conn, fd if i == 0 else -1,
                              _DGRAM_HEAD.pack(self.index, flags, family, len(raw))
                              + raw[i * CHUNK:(i + 1) * CHUNK], flags))
        if route.pending:
            route.pending.extend(datagrams)  # keep the order of arrival
            return True
        route.pending.extend(datagrams)
        if not self._drain(route, owner, first_try=True):
            route.pending.clear()
            transport.resume_reading()
            return False
        return True

    def move(self, conn: Connection, target: int, body: bytes) -> bool | None:
        """Send ``conn``'s socket with ``body`` (its state, colocate.py) to worker
        ``target`` now, in one datagram.  False if that cannot be done, None if
        not now (the target's queue is full: it holds net.unix.max_dgram_qlen
        datagrams, 10 by default, until it reads them); either way nothing was
        sent and the caller keeps the connection."""
        transport = conn.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or len(body) > CHUNK:
            return False
        route = self.routes.get(target)
        if route is None:
            route = self.routes[target] = _Route(os.path.join(self.run_dir, f"w{target}.handoff"))
        if route.pending:
            return None  # hand-offs wait for it: its queue is full
        head = _DGRAM_HEAD.pack(self.index, FIRST | LAST | MOVE, sock.family, len(body))
        return self._send(route, sock.fileno(), head + body)

    def _send(self, route: _Route, fd: int, data: bytes) -> bool | None:
        """True: sent; None: the owner's queue is full; False: it is not there."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] \
            if fd >= 0 else []
        for attempt in (0, 1):
            try:
                route.connect().sendmsg([data], ancillary)
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

    def _drain(self, route: _Route, owner: int, first_try: bool = False) -> bool:
        """Send what waits for ``owner``, in order, while it has room.  With
        ``first_try`` (nothing was waiting): False if the owner is not there
        and nothing was sent (the caller refuses the client)."""
        while route.pending:
            conn, fd, data, flags = route.pending[0]
            outcome = self._send(route, fd, data)
            if outcome is None:
                self._wait_writable(route, owner)
                return True
            if not outcome:
                if first_try and flags & FIRST:
                    os.close(fd)
                    return False
                self._fail_connection(route, owner, conn)
                continue
            route.pending.popleft()
            first_try = False
            if fd >= 0:
                os.close(fd)
            if flags & LAST:
                self._done(conn)
        if route.writer and self.loop is not None:
            route.writer = False
            if route.sock is not None:
                self.loop.remove_writer(route.sock.fileno())
        return True

    def _fail_connection(self, route: _Route, owner: int, conn: Connection) -> None:
        """The owner went away mid-way: drop every datagram of ``conn``."""
        while route.pending and route.pending[0][0] is conn:
            _c, fd, _data, _flags = route.pending.popleft()
            if fd >= 0:
                os.close(fd)
        self._drop(conn, owner, "worker unavailable")

    def _wait_writable(self, route: _Route, owner: int) -> None:
        if not route.writer and route.sock is not None and self.loop is not None:
            route.writer = True
            self.loop.add_writer(route.sock.fileno(), self._drain, route, owner)

    def _done(self, conn: Connection) -> None:
        """Sent: close our descriptor only; the owner's keeps the connection."""
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
                data, fds, flags, _addr = socket.recv_fds(sock, CHUNK + 64, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("Worker %d: hand-off socket failed: %s.", self.index, exc)
                return
            for extra in fds[1:]:
                os.close(extra)
            if flags & socket.MSG_TRUNC or len(data) < _DGRAM_HEAD.size:
                for fd in fds[:1]:
                    os.close(fd)
                continue
            sender, dflags, family, total = _DGRAM_HEAD.unpack_from(data)
            chunk = data[_DGRAM_HEAD.size:]
            if dflags & FIRST:
                stale = self.assembling.pop(sender, None)
                if stale is not None:
                    os.close(stale[0])
                if not fds:
                    continue
                self.assembling[sender] = (fds[0], family, total, [chunk])
            else:
                for fd in fds[:1]:
                    os.close(fd)
                if sender not in self.assembling:
                    continue
                self.assembling[sender][3].append(chunk)
            if dflags & LAST:
                fd, family, total, parts = self.assembling.pop(sender)
                raw = b"".join(parts)
                if len(raw) != total:
                    log.error("Worker %d: a hand-off from worker %d lost bytes; closing it.",
                              self.index, sender)
                    os.close(fd)
                    continue
                if dflags & MOVE:
                    client = _AdoptedSocket(family, socket.SOCK_STREAM, 0, fileno=fd)
                    if self.on_moved is None:
                        client.close()
                    else:
                        self.on_moved(client, sender, raw)
                    continue
                # Family and type given: no getsockname/getsockopt to find them.
                # No setblocking/TCP_NODELAY either: the accepting worker's loop
                # set both on this same socket, and the adopting transport sets
                # them again (uv_tcp_open); the object only carries the descriptor.
                if family == socket.AF_UNIX:
                    # A TLS / WebSocket client the sibling relays (workers/relay.py).
                    from raftmq.workers.relay import adopt_relayed

                    adopt_relayed(self.broker, fd, raw)
                    continue
                client = _AdoptedSocket(family, socket.SOCK_STREAM, 0, fileno=fd)
                self._adopt(client, raw)

    def _adopt(self, client: socket.socket, data: bytes) -> None:
        broker = self.broker
        self.adopt(client, lambda: AdoptedConnection(broker, data))

    def adopt(self, client: socket.socket, factory: Any) -> None:
        """``loop.connect_accepted_socket`` without a Task per connection: the
        coroutine sets the transport up synchronously, then only waits for
        ``connection_made``; it is resumed from that future's callback."""
        coro = self.loop.connect_accepted_socket(factory, client)  # type: ignore[union-attr]
        try:
            waiter = coro.send(None)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a client's failure must not stop the loop
            self._adopt_failed(client, exc)
            return
        # Held until it finishes (``waiter`` holds the callback, the callback the coroutine).
        self._adopting.add(coro)
        waiter.add_done_callback(lambda _f: self._adopt_resume(coro, client))

    def _adopt_resume(self, coro: Any, client: socket.socket) -> None:
        self._adopting.discard(coro)
        try:
            waiter = coro.send(None)
        except (StopIteration, asyncio.CancelledError):  # done / the loop is closing
            return
        except Exception as exc:  # noqa: BLE001 - a client's failure must not stop the loop
            # connect_accepted_socket closed its transport, which owns the descriptor.
            log.info("Worker %d: a handed-over connection was already gone (%s).", self.index,
                     exc)
            return
        # (Not expected: connect_accepted_socket awaits once without TLS.)
        self._adopting.add(coro)
        waiter.add_done_callback(lambda _f: self._adopt_resume(coro, client))

    def _adopt_failed(self, client: socket.socket, exc: Exception) -> None:
        log.info("Worker %d: a handed-over connection was already gone (%s).", self.index, exc)
        client.close()
