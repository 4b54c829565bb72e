"""The local channel between the raft process and the broker workers (and the admin CLI).

A unix stream socket in the node's data dir (``raft.sock``, mode 0600: only the
node's own user may propose).  Both directions carry length-prefixed frames:

    u32 length (of kind + body) | u8 kind | body

Worker -> raft process
    HELLO     u32 worker id | u8 flags          first frame; id 0 = an admin/test client;
                                                 flags bit 0: send me ENTRY frames (fan-out);
                                                 bit 1: send me ROLE frames only (ha standby)
    PROPOSE   u64 request id | entry data         data = encode_ops(ops); many per write
    PROPOSE_LOCAL  (as PROPOSE)                   the same, but nobody else on this node needs
                                                 the entry: no ENTRY fan-out to the other
                                                 workers (raftmq.state.entries.NODE_WIDE_TAGS)
    LOAD      (empty)                             "send me the committed state"
    ADMIN     u64 request id | JSON request       cluster status / add / remove / transfer
Raft process -> worker
    COMMITTED u64 request id * n                  these proposals are committed (in order)
    FAILED    u8 reason | u64 request id * n      these proposals will never be acknowledged
    ENTRY     entry data                          committed elsewhere (other node or worker)
    LOADED    pickled LoadedState                 answer to LOAD; ENTRY frames follow it
    ADMIN_REPLY u64 request id | JSON reply
    RELOAD    (empty)                             the state was replaced by a snapshot: the
                                                 ENTRY stream has a gap, rebuild from LOAD
    ROLE      JSON {"role", "leader", "term"}      this node's Raft role; sent after HELLO
                                                 (fan-out and role-watch connections) and on
                                                 every change

Frames are gathered per loop turn and written with one ``write`` call (one
syscall for a whole batch of proposals or commit notices).  The peers of this
socket are processes of the same node and user, so nothing is authenticated
here beyond the file mode; LOADED uses pickle for that reason only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable

HELLO = 1
PROPOSE = 2
LOAD = 3
ADMIN = 4
PROPOSE_LOCAL = 5
COMMITTED = 10
FAILED = 11
ENTRY = 12
LOADED = 13
ADMIN_REPLY = 14
RELOAD = 15
ROLE = 16

# FAILED reasons
NOT_LEADER = 1
DROPPED = 2  # leadership lost / term changed before commit: outcome unknown, never acked
SHUTTING_DOWN = 3

SOCKET_NAME = "raft.sock"
MAX_FRAME = 1 << 30

_HEAD = struct.Struct("<IB")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
_REQ = struct.Struct("<IBQ")  # a PROPOSE / ADMIN header: length, kind, request id


def socket_path(data_dir: str) -> str:
    return os.path.join(data_dir, SOCKET_NAME)


def frame(kind: int, body: bytes = b"") -> bytes:
    return _HEAD.pack(len(body) + 1, kind) + body


def request_frame(kind: int, req_id: int, body: bytes) -> bytes:
    """A PROPOSE / ADMIN frame without concatenating ``body`` twice."""
    return _REQ.pack(len(body) + 9, kind, req_id) + body


def hello_frame(worker_id: int, fanout: bool) -> bytes:
    return frame(HELLO, U32.pack(worker_id) + bytes((1 if fanout else 0,)))


def ids_body(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}Q", *ids)


def parse_ids(body: bytes | memoryview) -> list[int]:
    return list(struct.unpack(f"<{len(body) // 8}Q", body))


class FrameReader:
    """Incremental frame splitter: feed bytes, get (kind, body) pairs."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        unpack = _HEAD.unpack_from
        while end - pos >= 5:
            n, kind = unpack(buf, pos)
            if n == 0 or n > MAX_FRAME:
                raise ValueError(f"bad channel frame length {n}")
            if end - pos - 4 < n:
                break
            out.append((kind, bytes(buf[pos + 5 : pos + 4 + n])))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


class FrameProtocol(asyncio.Protocol):
    """asyncio side of the channel: frames in through ``on_frames``, frames out
    gathered per loop turn through ``send``."""

    def __init__(
        self,
        on_frames: Callable[[FrameProtocol, list[tuple[int, bytes]]], None],
        on_lost: Callable[[FrameProtocol], None] | None = None,
        on_made: Callable[[FrameProtocol], None] | None = None,
    ) -> None:
        self.on_frames = on_frames
        self.on_lost = on_lost
        self.on_made = on_made
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False
        self.worker_id: int | None = None  # set by the raft process on HELLO
        self.fanout = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._out:
            self.flush()  # frames sent before the connection was attached
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ValueError:
            self.close()
            return
        if frames:
            self.on_frames(self, frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.on_lost is not None:
            self.on_lost(self)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None:
            out, self._out = self._out, []
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()


class BlockingChannel:
    """A synchronous client of the channel: the CLI's admin commands, a worker's
    start-up LOAD, tests."""

    def __init__(
        self, data_dir: str, worker_id: int = 0, timeout: float = 10.0, fanout: bool = False,
        connect_timeout: float | None = None,
    ) -> None:
        self.path = socket_path(data_dir)
        self.sock = connect_blocking(self.path, timeout if connect_timeout is None else connect_timeout)
        self.sock.settimeout(timeout)
        self.reader = FrameReader()
        self._pending: list[tuple[int, bytes]] = []
        self.sock.sendall(hello_frame(worker_id, fanout))
        self._next_id = 1

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> tuple[int, bytes]:
        while not self._pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("raft process closed the channel")
            self._pending.extend(self.reader.feed(data))
        return self._pending.pop(0)

    def recv_until(self, kind: int) -> bytes:
        """The body of the next frame of ``kind`` (frames of other kinds are skipped)."""
        while True:
            k, body = self.recv_frame()
            if k == kind:
                return body

    def admin(self, request: dict) -> dict:
        import orjson

        rid = self._next_id
        self._next_id += 1
        self.send(request_frame(ADMIN, rid, orjson.dumps(request)))
        while True:
            body = self.recv_until(ADMIN_REPLY)
            if U64.unpack_from(body)[0] == rid:
                return orjson.loads(body[8:])

    def close(self) -> None:
        self.sock.close()


def connect_blocking(path: str, timeout: float) -> socket.socket:
    """Connect to the raft process's socket, retrying while it starts (or restarts)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
