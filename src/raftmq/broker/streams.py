"""TLS and WebSocket listeners: the layer between the TCP transport and ``Connection``.

A plain MQTT listener gives uvloop's TCP transport straight to a
``Connection`` (protocol.py).  A listener with ``certfile`` (TLS) or
``protocol = "websockets"`` gives it a ``StreamProtocol`` instead, which

- terminates TLS with an ``ssl.SSLObject`` over memory BIOs (broker/tls.py),
- answers the WebSocket Upgrade and decodes / encodes frames (broker/websocket.py),
- feeds the resulting MQTT bytes to its ``StreamConnection`` with
  ``data_received``, exactly as a TCP transport would, and
- is that connection's transport: ``write`` frames and encrypts, ``close``
  sends a WebSocket Close 1000 and a TLS close_notify first.

The ``Connection`` thus works unchanged over mqtt, mqtts, ws and wss.

Several workers: a TLS session or a WebSocket stream cannot change process
as a raw socket.  When the CONNECT names a client id a sibling owns, the
hand-off (workers/handoff.py) asks the transport for its socket; this one
answers with one end of a unix socketpair whose other end it relays to
(workers/relay.py): the owner adopts a plain MQTT stream, told the client's
address and certificate identity, and this worker keeps terminating TLS and
WebSocket for it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from raftmq.broker.protocol import Connection
from raftmq.broker.tls import cert_identity, server_context
from raftmq.broker.websocket import (
    CLOSE_NORMAL,
    MAX_REQUEST,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    HandshakeError,
    ProtocolViolation,
    close_frame,
    frame,
    parse_request,
)
from raftmq.logsetup import flush_logs

if TYPE_CHECKING:
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.broker")

_READ_SIZE = 256 * 1024


class StreamConnection(Connection):
    """A Connection on a TLS or WebSocket listener: it may carry the client
    certificate's identity (``cert_identity``, see broker/tls.py)."""

    __slots__ = ()

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        self.cert_identity: str | None = None


def protocol_factory(broker: Broker, listener: Any) -> Any:
    """What ``loop.create_server`` makes per accepted connection on ``listener``."""
    if not listener.tls and not listener.websockets:
        return lambda: Connection(broker)
    context = server_context(listener, getattr(broker.config, "source", "<config>")) \
        if listener.tls else None
    return lambda: StreamProtocol(broker, listener, context)


class StreamProtocol(asyncio.Protocol):
    """TCP in, MQTT bytes out to ``conn``; and ``conn``'s transport (see the module doc)."""

    __slots__ = ("broker", "listener", "context", "raw", "peer", "sslobj", "incoming",
                 "outgoing", "handshaking", "ws", "upgraded", "head", "reader", "conn", "relay",
                 "closing", "close_sent", "tls_eof")

    def __init__(self, broker: Broker, listener: Any, context: ssl.SSLContext | None) -> None:
        self.broker = broker
        self.listener = listener
        self.context = context
        self.raw: Any = None  # the TCP transport
        self.peer: tuple[str, int] = ("?", 0)
        self.sslobj: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        self.handshaking = context is not None
        self.ws = bool(listener.websockets)
        self.upgraded = False  # WebSocket: 101 sent
        self.head = b""  # WebSocket: the HTTP request so far
        self.reader = FrameReader() if self.ws else None
        self.conn: StreamConnection | None = StreamConnection(broker)
        self.relay: Any = None  # workers/relay.Relay once the client went to a sibling
        self.closing = False
        self.close_sent = False  # WebSocket Close sent
        self.tls_eof = False  # the client's close_notify came

    # -- asyncio.Protocol (the TCP side) ------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.raw = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
        if self.context is not None:
            self.incoming = ssl.MemoryBIO()
            self.outgoing = ssl.MemoryBIO()
            self.sslobj = self.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        # Registered with the broker at once: its CONNECT timeout bounds the TLS
        # handshake and the WebSocket upgrade too.
        self.conn.connection_made(self)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.sslobj is not None:
            data = self._tls_in(data)
            if self.tls_eof:
                if data:
                    self._stream_in(data)
                self.close()
                return
            if not data:
                return
        self._stream_in(data)

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.relay is not None:
            self.relay.close()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_owner()
        elif self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_owner()
        elif self.conn is not None:
            self.conn.resume_writing()

    # -- the Connection's transport ---------------------------------------------

    def write(self, data: bytes) -> None:
        """MQTT bytes to the client (from the Connection, or relayed from the owner)."""
        if self.closing:
            return
        if self.ws:
            data = frame(OP_BINARY, data)
        self._out(data)

    def close(self) -> None:
        """Close gracefully: WebSocket Close 1000, TLS close_notify, then TCP."""
        if self.closing:
            return
        if self.ws and self.upgraded and not self.close_sent:
            self.close_sent = True
            self._out(close_frame(CLOSE_NORMAL))
        self.closing = True
        self._tls_close()
        if self.relay is not None:
            self.relay.close()
        self.raw.close()

    def abort(self) -> None:
        """The hand-off's "sent" (workers/handoff.py closes its copy of the socket
        this way): with a relay, the client now belongs to the sibling and only the
        socketpair end we gave away is closed; otherwise an abort."""
        if self.relay is not None and not self.closing:
            self.relay.handed_off()
            conn, self.conn = self.conn, None
            if conn is not None:
                # As a transport would: the broker forgets it in a later callback.
                asyncio.get_running_loop().call_soon(conn.connection_lost, None)
            return
        self.closing = True
        if self.relay is not None:
            self.relay.close()
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "socket":
            # Only the hand-off asks: the relay's end instead of the TCP socket
            # (which carries TLS / WebSocket framing a sibling cannot continue).
            if self.broker.handoff is None or self.closing:
                return None
            from raftmq.workers.relay import Relay

            if self.relay is None:
                self.relay = Relay(self)
            return self.relay.far
        if name == "ssl_object":
            return self.sslobj
        return self.raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        if not self.closing:
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self.closing:
            self.raw.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    # -- input ------------------------------------------------------------------

    def _stream_in(self, data: bytes) -> None:
        """Bytes after TLS: the WebSocket layer, or MQTT already."""
        if not self.ws:
            self._mqtt_in(data)
            return
        if not self.upgraded:
            data = self._upgrade(data)
            if not data:
                return
        reader = self.reader
        try:
            events = reader.feed(data)  # type: ignore[union-attr]
        except ProtocolViolation as exc:
            self._ws_events(exc.events)
            log.info("Client %s:%d: WebSocket protocol error (%s), closing with %d.",
                     *self.peer, exc, exc.code)
            if not self.closing:
                self.close_sent = True
                self._out(close_frame(exc.code, str(exc)))
                self._drop()
            return
        self._ws_events(events)

    def _mqtt_in(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.to_owner(data)
        elif self.conn is not None:
            self.conn.data_received(data)

    def _ws_events(self, events: list) -> None:
        mqtt: list[bytes] = []
        for op, payload in events:
            if op == OP_BINARY:
                mqtt.append(payload)
                continue
            if mqtt:  # MQTT bytes before a control frame go first, in one piece
                self._mqtt_in(b"".join(mqtt))
                mqtt.clear()
            if self.closing:
                return
            if op == OP_PING:
                self._out(frame(OP_PONG, payload))
            elif op == OP_CLOSE:
                code, _reason = payload
                if not self.close_sent:
                    self.close_sent = True
                    self._out(close_frame(code))
                # The client ends the stream: for MQTT that is a close without
                # DISCONNECT (the will goes unless DISCONNECT came before).
                self._drop()
                return
            elif op != OP_PONG:
                raise AssertionError(op)
        if mqtt and not self.closing:
            self._mqtt_in(mqtt[0] if len(mqtt) == 1 else b"".join(mqtt))

    def _upgrade(self, data: bytes) -> bytes:
        """Collect the HTTP request; answer it; the bytes after it (frames), if any."""
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0 or end > MAX_REQUEST:
            if len(head) > MAX_REQUEST:
                self._refuse(HandshakeError(431, "request head over 8 KB"))
            else:
                self.head = head
            return b""
        self.head = b""
        try:
            answer = parse_request(head[:end])
        except HandshakeError as exc:
            self._refuse(exc)
            return b""
        self._out(answer)
        self.upgraded = True
        return head[end + 4:]

    def _refuse(self, exc: HandshakeError) -> None:
        log.info("Client %s:%d: WebSocket handshake refused with %d (%s).", *self.peer,
                 exc.status, exc)
        flush_logs()  # no client turn follows that would write it
        self._out(exc.response())
        self._drop()

    def _drop(self) -> None:
        """Close after what is queued (no WebSocket Close of our own)."""
        self.closing = True
        self._tls_close()
        if self.relay is not None:
            self.relay.close()
        self.raw.close()

    # -- TLS --------------------------------------------------------------------

    def _tls_in(self, data: bytes) -> bytes:
        """Decrypt ``data`` (the handshake first); the plaintext, b"" if none."""
        sslobj = self.sslobj
        self.incoming.write(data)  # type: ignore[union-attr]
        if self.handshaking:
            try:
                sslobj.do_handshake()  # type: ignore[union-attr]
            except ssl.SSLWantReadError:
                self._tls_flush()
                return b""
            except (ssl.SSLError, ValueError) as exc:
                self._tls_flush()  # the alert, so the client learns why
                self._tls_failed("TLS handshake", exc)
                return b""
            self.handshaking = False
            self._tls_flush()
            self.conn.cert_identity = cert_identity(sslobj, self.listener)  # type: ignore[union-attr]
        chunks = []
        while True:
            try:
                chunk = sslobj.read(_READ_SIZE)  # type: ignore[union-attr]
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.tls_eof = True
                break
            except ssl.SSLError as exc:
                self._tls_flush()
                self._tls_failed("TLS", exc)
                return b""
            if not chunk:
                break
            chunks.append(chunk)
        if self.outgoing.pending:  # type: ignore[union-attr]
            self._tls_flush()  # a key update, a session ticket
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _tls_failed(self, what: str, exc: Exception) -> None:
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        log.info("Client %s:%d: %s failed (%s), closing.", *self.peer, what, reason)
        flush_logs()  # no client turn follows that would write it
        self.closing = True
        self.raw.close()  # (after the alert just written)

    def _tls_flush(self) -> None:
        out = self.outgoing.read()  # type: ignore[union-attr]
        if out:
            self.raw.write(out)

    def _tls_close(self) -> None:
        sslobj = self.sslobj
        if sslobj is None or self.handshaking:
            return
        try:
            sslobj.unwrap()  # our close_notify (the client's need not be awaited)
        except (ssl.SSLError, ValueError):
            pass
        self._tls_flush()

    def _out(self, data: bytes) -> None:
        """Bytes after WebSocket framing: encrypt if TLS, then TCP."""
        sslobj = self.sslobj
        if sslobj is None:
            self.raw.write(data)
            return
        if self.handshaking:
            return  # nothing can be sent before the handshake
        try:
            sslobj.write(data)
        except ssl.SSLError as exc:
            self._tls_failed("TLS", exc)
            return
        self.raw.write(self.outgoing.read())  # type: ignore[union-attr]
