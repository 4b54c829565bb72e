"""TLS and WebSocket clients whose client id a sibling worker owns.

A plain TCP connection is handed to the owner as its socket (handoff.py).  A
TLS session or a WebSocket stream cannot be: its state (keys, sequence
numbers, frame position) lives in the accepting process.  So the accepting
worker keeps terminating TLS / WebSocket and relays the plain MQTT byte
stream over a unix socketpair; the far end of the pair is what it hands off,
through the same SCM_RIGHTS path as a TCP socket.  The owner sees a plain
connection:

    client ==TLS/WS== worker A (StreamProtocol + Relay) --unix stream-- worker B (RelayedConnection)

Before the far end leaves, A writes a preamble into the pair (a 4-byte length
and a JSON object: the client's address, the certificate identity -- see
broker/tls.py); B reads it from the adopted socket before anything else
(it is there: it was written before the descriptor was sent), so its log
lines name the real client and ``use_identity_as_username`` works in B.

Cost: every byte crosses one more unix socket (a write in A, a read in B,
both batched per loop turn like any other connection) -- bench/README.md
"TLS and WebSocket listeners" measures it.  Closing either side closes the
other: the client going away closes the pair (B sees a lost connection and
publishes the will); B closing the connection (DISCONNECT, takeover, kick)
makes A close the client's stream (WebSocket Close 1000, TLS close_notify).

The relayed connection in B is a plain unix stream: a live move of it to a
third worker would only need the preamble's facts to travel along.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

import orjson

from raftmq.broker.protocol import Connection

if TYPE_CHECKING:
    from raftmq.broker.server import Broker
    from raftmq.broker.streams import StreamProtocol

log = logging.getLogger("raftmq.workers")

_LEN = struct.Struct("<I")
_MAX_PREAMBLE = 64 * 1024
_PIPE_BUFFER = 1024 * 1024
_adopting: set[asyncio.Task] = set()  # (the loop holds tasks weakly)


def movable(conn: Any) -> bool:
    """Whether ``conn``'s socket can be handed to another worker as it is: not a
    TLS / WebSocket connection terminated here (its transport is a StreamProtocol)."""
    from raftmq.broker.streams import StreamProtocol

    return not isinstance(conn.transport, StreamProtocol)


class Relay:
    """Worker A's side: the client's decoded stream <-> the near end of the pair."""

    __slots__ = ("proto", "near", "far", "pipe", "pending", "closed", "_task")

    def __init__(self, proto: StreamProtocol) -> None:
        self.proto = proto
        near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (near, far):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _PIPE_BUFFER)
            s.setblocking(False)
        conn = proto.conn
        meta = orjson.dumps({"peer": list(proto.peer),
                             "identity": getattr(conn, "cert_identity", None)})
        near.send(_LEN.pack(len(meta)) + meta)  # (a few bytes into an empty buffer: never short)
        self.near = near
        self.far: socket.socket | None = far
        self.pipe: Any = None  # the transport over ``near`` once made
        self.pending: list[bytes] = []  # client bytes before it is
        self.closed = False
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(loop.connect_accepted_socket(lambda: _Pipe(self), near))
        self._task.add_done_callback(self._pipe_made)

    def _pipe_made(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            if not self.closed:
                log.info("Client %s:%d: relay to the owner worker failed (%s).", *self.proto.peer,
                         None if task.cancelled() else task.exception())
                self.proto.abort()
            return
        transport, _protocol = task.result()
        if self.closed:
            transport.close()
            return
        self.pipe = transport
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending.clear()

    def to_owner(self, data: bytes) -> None:
        if self.pipe is not None:
            self.pipe.write(data)
        elif not self.closed:
            self.pending.append(data)

    def handed_off(self) -> None:
        """The far end reached the owner: close our copy, read the client again
        (the hand-off may have paused it while the owner's queue was full)."""
        if self.far is not None:
            self.far.close()
            self.far = None
        try:
            self.proto.raw.resume_reading()
        except (RuntimeError, AttributeError):
            pass

    def pause_owner(self) -> None:
        if self.pipe is not None:
            self.pipe.pause_reading()

    def resume_owner(self) -> None:
        if self.pipe is not None and not self.closed:
            self.pipe.resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.far is not None:
            self.far.close()
            self.far = None
        if self.pipe is not None:
            self.pipe.close()  # (after what is buffered for the owner)
        elif self._task.done():
            self.near.close()
        # else: _pipe_made closes the transport it gets


class _Pipe(asyncio.Protocol):
    """The near end of the pair, in worker A: the owner's bytes go to the client."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.proto.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self.relay
        relay.pipe = None
        if not relay.closed:
            relay.closed = True
            relay.proto.close()  # the owner closed the MQTT connection

    def pause_writing(self) -> None:
        self.relay.proto.raw.pause_reading()

    def resume_writing(self) -> None:
        proto = self.relay.proto
        if not proto.closing:
            proto.raw.resume_reading()


# -- worker B: adopt the far end ------------------------------------------------


class RelayedConnection(Connection):
    """A TLS / WebSocket client relayed by a sibling: a plain stream here, with
    the real client's address and certificate identity."""

    __slots__ = ("initial", "relay_peer")

    def __init__(self, broker: Broker, initial: bytes, peer: tuple[str, int],
                 identity: str | None) -> None:
        super().__init__(broker)
        self.initial = initial
        self.relay_peer = peer
        self.cert_identity = identity

    def connection_made(self, transport: Any) -> None:
        Connection.connection_made(self, transport)
        self.peer = self.relay_peer
        data, self.initial = self.initial, b""
        if data:
            self.data_received(data)


def _read_preamble(sock: socket.socket) -> dict:
    head = sock.recv(_LEN.size)
    if len(head) != _LEN.size:
        raise ValueError("no preamble")
    (size,) = _LEN.unpack(head)
    if size > _MAX_PREAMBLE:
        raise ValueError("preamble too long")
    body = b""
    while len(body) < size:
        part = sock.recv(size - len(body))
        if not part:
            raise ValueError("short preamble")
        body += part
    return orjson.loads(body)


def adopt_relayed(broker: Broker, fd: int, raw: bytes) -> None:
    """Worker B (handoff.py, for a unix-stream descriptor): adopt a relayed client."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        meta = _read_preamble(sock)
        peer = meta["peer"]
        conn = RelayedConnection(broker, raw, (str(peer[0]), int(peer[1])), meta.get("identity"))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        log.info("Worker %d: a relayed connection was unusable (%s).", broker.worker_id, exc)
        sock.close()
        return
    loop = asyncio.get_running_loop()
    task = loop.create_task(loop.connect_accepted_socket(lambda: conn, sock))
    _adopting.add(task)

    def made(t: asyncio.Task) -> None:
        _adopting.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.info("Worker %d: a relayed connection was already gone (%s).", broker.worker_id,
                     t.exception())
            sock.close()

    task.add_done_callback(made)
