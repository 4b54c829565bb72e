"""Handing a client connection to the worker that owns its client id.

SO_REUSEPORT lets the kernel pick the worker that accepts a connection; the
CONNECT then names a client id that may belong to a sibling (ownership.py).
The accepting worker stops reading at once and sends the socket itself
(SCM_RIGHTS over a unix datagram socket) with every byte it had read, the
CONNECT included, to the owner, which adopts the socket and parses those
bytes as if it had read them: to the client it is one uninterrupted TCP
connection.  Each worker binds ``w<index>.handoff`` in the node's private
run directory (mode 0700, made by the supervisor).

If the owner is not running (it is being restarted) the hand-off fails and
the client is refused with "server unavailable" (5.0 CONNACK 0x88, 3.1.1
return code 3): it retries, and its session is found once the owner is back.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from raftmq.broker.protocol import Connection

if TYPE_CHECKING:
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.workers")

# Bytes read before the CONNECT was handled travel with the socket in one
# datagram; a client that pipelines more than this before its CONNACK is refused.
MAX_HANDOFF_BYTES = 256 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024
SEND_TIMEOUT = 1.0


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


class Handoff:
    def __init__(self, broker: Broker, index: int, run_dir: str) -> None:
        self.broker = broker
        self.index = index
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, f"w{index}.handoff")
        self.sock: socket.socket | None = None
        self.sender: socket.socket | None = None
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
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sender.settimeout(SEND_TIMEOUT)
        self.sender = sender
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self.sock is not None and self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def hand_off(self, conn: Connection, owner: int, raw: bytes) -> bool:
        """Send ``conn``'s socket and the bytes read so far to worker ``owner``;
        False if that worker cannot take it (the caller refuses the client)."""
        if self.sender is None or len(raw) > MAX_HANDOFF_BYTES:
            return False
        transport = conn.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        transport.pause_reading()
        fd = os.dup(sock.fileno())
        try:
            # (socket.send_fds ignores its address argument in 3.11.)
            self.sender.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", [fd]))], 0,
                               os.path.join(self.run_dir, f"w{owner}.handoff"))
        except OSError as exc:
            log.warning("Worker %d: cannot hand client %s to worker %d (%s).", self.index,
                        conn.label(), owner, exc.strerror or exc)
            transport.resume_reading()
            return False
        finally:
            os.close(fd)
        self.handed += 1
        return True

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
