"""Raft peer transport: authenticated TCP between the raft processes of a cluster.

Theory of operation
-------------------
Each node listens on its raft address and *dials* every peer it knows.  Data
flows one way per connection: a node sends its Raft messages to peer P only on
the connection it dialed to P, and receives P's messages on the connection P
dialed to it.  So there is one connection per direction per pair, no
simultaneous-open tie break, and a connection failure only ever loses messages
(which Raft tolerates: every RPC is retried by the core).

Authentication (before any Raft message is accepted) is a challenge-response
on a shared cluster secret, both ways, HMAC-SHA256:

    dialer   -> listener  HELLO  magic, dialer id, expected listener id, Nd (32 random bytes),
                                 dialer's own listen address (so the listener can dial back)
    listener -> dialer    magic, listener id, Nl, HMAC(secret, "raftmq-listener" Nd Nl ids)
    dialer   -> listener  HMAC(secret, "raftmq-dialer" Nl Nd ids)
    listener -> dialer    OK (1 byte), or closes the connection

Each side proves knowledge of the secret over the *other* side's fresh nonce,
and the two MACs carry different labels, so neither can be replayed or reflected
back; both node ids are bound into the MACs.  A peer that fails is logged
("Refused raft peer HOST:PORT: bad authentication") and disconnected.

After the handshake every frame is authenticated too (not encrypted): a session
key K = HMAC(secret, "raftmq-session" Nd Nl ids) and a per-connection frame
counter, tag = HMAC(K, counter || body).  This costs one HMAC per *frame*
(a frame carries every message queued for that peer in one loop turn), so it is
cheap, and it stops a host on the path from injecting or replaying frames into
an established connection.  Confidentiality is not provided: run the raft port
on a trusted network (or loopback), as the raft traffic carries MQTT payloads.

Frame:  u32 body length | body | 32-byte tag;  body = repeated records (u32 head, bytes).
A record head is the length of a whole message, or -- for a message larger
than CHUNK_SIZE (an InstallSnapshot of a big state) -- CHUNK_BIT | length of
one chunk, with LAST_BIT on the final one.  Chunks of one message go out one
per flush, interleaved with the small messages of later turns, so heartbeats
keep flowing while a snapshot streams (the follower does not time out in the
middle of it) and no single write or HMAC covers hundreds of megabytes.  Raft
tolerates the reordering this causes between the snapshot and later messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
from collections.abc import Callable

log = logging.getLogger("raftmq.raft.transport")

MAGIC = b"RMQ1"
NONCE_SIZE = 32
TAG_SIZE = 32
MAX_FRAME = 64 << 20  # bigger messages travel in chunks
MAX_MESSAGE = 4 << 30  # a reassembled message (a snapshot) larger than this is refused
CHUNK_SIZE = 1 << 20
CHUNK_BIT = 0x80000000
LAST_BIT = 0x40000000
_LEN_MASK = 0x3FFFFFFF
HANDSHAKE_TIMEOUT = 5.0
# A peer that does not read: drop messages for it rather than buffer without bound.
MAX_PENDING_BYTES = 256 << 20

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HELLO = struct.Struct("<4sQQ32sH")  # magic, dialer id, expected listener id, nonce, addr length
_REPLY = struct.Struct("<4sQ32s32s")  # magic, listener id, nonce, mac


class SecretFileError(Exception):
    """The cluster secret file is missing, empty or readable by others."""


def read_secret_file(path: str) -> bytes:
    """The cluster secret; refuse a file group or others can read (like ssh with a private key)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecretFileError(f"cannot read cluster secret file {path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(
            f"cluster secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
            "it must not be accessible by group or others (chmod 600)"
        )
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise SecretFileError(f"cluster secret file {path} holds fewer than 16 bytes")
    return secret


def _ids(dialer: int, listener: int) -> bytes:
    return _U64.pack(dialer) + _U64.pack(listener)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(parts), "sha256")


class _FrameMac:
    """Tags (or checks) the frames of one direction of one connection."""

    __slots__ = ("key", "counter")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.counter = 0

    def tag(self, body: bytes) -> bytes:
        h = hmac.new(self.key, _U64.pack(self.counter), hashlib.sha256)
        h.update(body)
        self.counter += 1
        return h.digest()


def encode_frame(mac: _FrameMac, messages: list[bytes], chunk: tuple[bytes, bool] | None = None) -> bytes:
    parts: list[bytes] = []
    for m in messages:
        parts.append(_U32.pack(len(m)))
        parts.append(m)
    if chunk is not None:
        data, last = chunk
        parts.append(_U32.pack(CHUNK_BIT | (LAST_BIT if last else 0) | len(data)))
        parts.append(data)
    body = b"".join(parts)
    return b"".join((_U32.pack(len(body)), body, mac.tag(body)))


class _Reassembly:
    """Receiving side: whole messages out of records, chunked ones put back together."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def split(self, body: bytes) -> list[bytes]:
        out = []
        pos = 0
        end = len(body)
        mv = memoryview(body)
        while pos < end:
            (head,) = _U32.unpack_from(body, pos)
            pos += 4
            if head & CHUNK_BIT:
                n = head & _LEN_MASK
                self.parts.append(bytes(mv[pos : pos + n]))
                self.size += n
                if self.size > MAX_MESSAGE:
                    raise ValueError("chunked message too large")
                if head & LAST_BIT:
                    out.append(b"".join(self.parts))
                    self.parts, self.size = [], 0
            else:
                n = head
                out.append(bytes(mv[pos : pos + n]))
            pos += n
        return out


class _Peer:
    """Outbound side towards one peer: its address, queue, connection task."""

    def __init__(self, node_id: int, host: str, port: int) -> None:
        self.id = node_id
        self.host = host
        self.port = port
        self.queue: list[bytes] = []
        self.chunks: list[bytes] = []  # pending chunks of large messages, in order (reversed)
        self.writer: asyncio.StreamWriter | None = None
        self.mac: _FrameMac | None = None
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()
        self.refused_logged = False


class PeerTransport:
    """Sends Raft messages (opaque bytes) to peers and delivers theirs.

    ``on_messages(from_id, [bytes, ...])`` is called on the loop for each frame
    received from an authenticated peer.  ``on_peer_address(id, host, port)`` is
    called when an authenticated peer tells its listen address (so membership
    additions need no separate address distribution).  ``send`` only queues;
    ``flush`` writes one frame per peer (call it once per loop turn, after the
    Ready's state is durable).
    """

    def __init__(
        self,
        node_id: int,
        secret: bytes,
        listen: tuple[str, int] | None,
        on_messages: Callable[[int, list[bytes]], None],
        on_peer_address: Callable[[int, str, int], None] | None = None,
    ) -> None:
        self.id = node_id
        self.secret = secret
        self.listen = listen
        self.on_messages = on_messages
        self.on_peer_address = on_peer_address
        self.peers: dict[int, _Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inbound: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._closed = False
        self._chunk_timer = False
        self.sockname: tuple[str, int] | None = None

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        if self.listen is not None:
            self._server = await asyncio.start_server(
                self._on_inbound, self.listen[0], self.listen[1], reuse_address=True
            )
            self.sockname = self._server.sockets[0].getsockname()[:2]
            log.info("Raft peer transport listening on %s:%d", *self.sockname)

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for p in list(self.peers.values()):
            self._drop_peer(p)
        # Closing the sockets ends the readers (cancelling a start_server
        # callback task makes asyncio log a spurious error).
        for w in list(self._inbound.values()):
            w.close()
        tasks = [p.task for p in self.peers.values() if p.task] + list(self._inbound)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- membership -------------------------------------------------------------

    def set_peer(self, node_id: int, host: str, port: int) -> None:
        """Know (or move) peer ``node_id`` at host:port and keep a connection to it."""
        if node_id == self.id or self._closed:
            return
        p = self.peers.get(node_id)
        if p is not None and (p.host, p.port) == (host, port):
            return
        if p is not None:
            self._drop_peer(p)
        p = _Peer(node_id, host, port)
        self.peers[node_id] = p
        p.task = asyncio.get_running_loop().create_task(self._dial_loop(p))
        p.task.add_done_callback(self._dial_task_done)

    def _dial_task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("Raft peer dialer failed", exc_info=task.exception())

    def remove_peer(self, node_id: int) -> None:
        p = self.peers.pop(node_id, None)
        if p is not None:
            self._drop_peer(p)

    def addresses(self) -> dict[int, tuple[str, int]]:
        return {p.id: (p.host, p.port) for p in self.peers.values()}

    def _drop_peer(self, p: _Peer) -> None:
        if p.task is not None:
            p.task.cancel()
        if p.writer is not None:
            p.writer.close()
            p.writer = None

    # -- sending ----------------------------------------------------------------

    def send(self, to: int, message: bytes) -> bool:
        """Queue ``message`` for peer ``to``; False if the peer is unknown or down
        (the message is dropped: the core retries, Raft tolerates loss)."""
        p = self.peers.get(to)
        if p is None or p.writer is None:
            return False
        if len(message) > CHUNK_SIZE:
            if p.chunks:
                return False  # one large message at a time; the core will retry
            mv = memoryview(message)
            p.chunks = [bytes(mv[i : i + CHUNK_SIZE]) for i in range(0, len(message), CHUNK_SIZE)]
            p.chunks.reverse()
            self._schedule_chunks()
            return True
        p.queue.append(message)
        return True

    def flush(self) -> None:
        """Write what is queued: one frame per peer, with at most one chunk."""
        more = False
        for p in self.peers.values():
            if not p.queue and not p.chunks:
                continue
            queue, p.queue = p.queue, []
            w = p.writer
            if w is None or p.mac is None:
                p.chunks = []
                continue
            if w.transport.get_write_buffer_size() > MAX_PENDING_BYTES:
                log.warning("Raft peer %d is not reading: dropping %d messages", p.id, len(queue))
                continue
            chunk = None
            if p.chunks and w.transport.get_write_buffer_size() < 2 * CHUNK_SIZE:
                data = p.chunks.pop()
                chunk = (data, not p.chunks)
            if p.chunks:
                more = True
            if queue or chunk:
                w.write(encode_frame(p.mac, queue, chunk))
        if more:
            self._schedule_chunks()

    def _schedule_chunks(self) -> None:
        if not self._chunk_timer:
            self._chunk_timer = True
            asyncio.get_running_loop().call_later(0.001, self._flush_chunks)

    def _flush_chunks(self) -> None:
        self._chunk_timer = False
        self.flush()

    def connected(self, node_id: int) -> bool:
        p = self.peers.get(node_id)
        return p is not None and p.writer is not None

    # -- dialing ----------------------------------------------------------------

    async def _dial_loop(self, p: _Peer) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(p.host, p.port), HANDSHAKE_TIMEOUT
                )
            except (TimeoutError, OSError) as exc:
                if backoff == 0.05:  # first failure after a success: say it once
                    log.info("Raft peer %d at %s:%d: cannot connect (%s); retrying", p.id, p.host, p.port,
                             exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            try:
                mac = await asyncio.wait_for(self._dial_handshake(p, reader, writer), HANDSHAKE_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if not p.refused_logged:
                    log.warning("Raft peer %d at %s:%d: handshake failed (%s)", p.id, p.host, p.port, exc or type(exc).__name__)
                    p.refused_logged = True
                writer.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            log.info("Connected to raft peer %d at %s:%d", p.id, p.host, p.port)
            p.refused_logged = False
            backoff = 0.05
            p.chunks = []  # a message half sent on the old connection cannot be finished
            p.mac = mac
            p.writer = writer
            try:
                # Nothing comes back on a dialed connection: a read returns at EOF/error.
                await reader.read(1)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                if p.writer is writer:
                    p.writer = None
                    p.mac = None
                writer.close()
            if not self._closed:
                log.info("Connection to raft peer %d lost", p.id)

    async def _dial_handshake(
        self, p: _Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _FrameMac:
        nd = secrets.token_bytes(NONCE_SIZE)
        addr = b""
        if self.sockname is not None:
            host = self.listen[0] if self.listen and self.listen[0] not in ("", "0.0.0.0", "::") else self.sockname[0]
            # A wildcard listener (0.0.0.0 / ::) has no address a peer could dial:
            # advertising it would make the peer dial itself.  Say nothing; the
            # peer keeps the address from its config.
            if host not in ("", "0.0.0.0", "::"):
                addr = f"{host}:{self.sockname[1]}".encode()
        writer.write(_HELLO.pack(MAGIC, self.id, p.id, nd, len(addr)) + addr)
        magic, lid, nl, mac_l = _REPLY.unpack(await reader.readexactly(_REPLY.size))
        ids = _ids(self.id, p.id)
        if magic != MAGIC or lid != p.id:
            raise ValueError(f"peer answered as node {lid}, expected {p.id}")
        if not hmac.compare_digest(mac_l, _mac(self.secret, b"raftmq-listener", nd, nl, ids)):
            raise ValueError("peer failed to prove the cluster secret")
        writer.write(_mac(self.secret, b"raftmq-dialer", nl, nd, ids))
        ok = await reader.readexactly(1)
        if ok != b"\x01":
            raise ValueError("peer refused our authentication")
        return _FrameMac(_mac(self.secret, b"raftmq-session", nd, nl, ids))

    # -- accepting --------------------------------------------------------------

    async def _on_inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inbound[task] = writer
        peername = writer.get_extra_info("peername") or ("?", 0)
        where = f"{peername[0]}:{peername[1]}"
        try:
            try:
                result = await asyncio.wait_for(self._accept_handshake(reader, writer), HANDSHAKE_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, UnicodeDecodeError):
                result = None
            if result is None:
                log.warning("Refused raft peer %s: bad authentication", where)
                return
            peer_id, mac = result
            log.info("Raft peer %d connected from %s", peer_id, where)
            await self._read_frames(peer_id, mac, reader)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except ValueError as exc:
            log.warning("Raft peer %s: %s; closing", where, exc)
        finally:
            writer.close()
            if task is not None:
                self._inbound.pop(task, None)

    async def _accept_handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, _FrameMac] | None:
        magic, did, expected, nd, alen = _HELLO.unpack(await reader.readexactly(_HELLO.size))
        addr = (await reader.readexactly(alen)).decode() if alen else ""
        if magic != MAGIC or expected != self.id or did == self.id or did == 0:
            return None
        nl = secrets.token_bytes(NONCE_SIZE)
        ids = _ids(did, self.id)
        writer.write(_REPLY.pack(MAGIC, self.id, nl, _mac(self.secret, b"raftmq-listener", nd, nl, ids)))
        mac_d = await reader.readexactly(TAG_SIZE)
        if not hmac.compare_digest(mac_d, _mac(self.secret, b"raftmq-dialer", nl, nd, ids)):
            return None
        writer.write(b"\x01")
        if addr and self.on_peer_address is not None:
            host, _, port = addr.rpartition(":")
            if host and port.isdigit():
                self.on_peer_address(did, host, int(port))
        return did, _FrameMac(_mac(self.secret, b"raftmq-session", nd, nl, ids))

    async def _read_frames(self, peer_id: int, mac: _FrameMac, reader: asyncio.StreamReader) -> None:
        reassembly = _Reassembly()
        while True:
            (n,) = _U32.unpack(await reader.readexactly(4))
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes is too large")
            data = await reader.readexactly(n + TAG_SIZE)
            body = data[:n]
            if not hmac.compare_digest(data[n:], mac.tag(body)):
                raise ValueError("frame failed authentication")
            messages = reassembly.split(body)
            if messages:
                self.on_messages(peer_id, messages)
