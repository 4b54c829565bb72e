"""Which channel between the workers of one node: measured (issue 4).

Two real processes, A and B.  A publishes 64-byte-payload messages (a
20-byte topic) to B the way a worker forwards to a sibling: each message is
encoded with ``encode_message`` into a FWD frame (``u32 len | u8 type | body``,
the format of raftmq/workers/mesh.py, replicated here so the benchmark does
not depend on that module's private names) and A writes the frames of one
event-loop turn together.  B parses every whole frame and decodes each
message into a ``Message`` (``decode_message``), so the per-message Python
work a worker really does is included.  Channels:

- ``socket``: a unix stream socket (socketpair), uvloop, asyncio Protocols;
  one ``transport.write`` per loop turn, B acknowledges with an ACK frame
  after each read (what mesh.py does).
- ``ring``: a single-producer single-consumer ring in
  ``multiprocessing.shared_memory`` written from Python; head / tail / count
  in the shared block; B is woken through an ``os.eventfd`` registered with
  ``loop.add_reader``, written only when B said it may sleep; A blocked on a
  full window is woken the same way.  B's acknowledgement is the consumed
  count in the shared block.
- ``pipe``: two pipes (1 MB capacity), otherwise as ``socket``.
- ``inproc``: no second process and no channel: A's batches handed to B's
  parser in the same process.  The floor: what framing and decoding cost.

Each run measures, in one pair of processes:

1. closed loop for ``--seconds``: A keeps at most ``--window`` messages
   unacknowledged, ``--batch`` messages per loop turn; throughput, and the CPU
   time of both processes (getrusage) per message;
2. open loop at ``--rate`` messages/s (A sends what is due every 1 ms timer
   tick, so ~rate/1000 messages per write): latency from the send timestamp
   in the payload (CLOCK_MONOTONIC, shared by the processes) to B's decode,
   p50 / p99, and CPU per message.

Channels alternate within each round; the table gives medians and min-max
over ``--rounds`` rounds, with the load average (the machine is shared).

    PYTHONPATH=src python bench/mesh_channel_bench.py [--quick] [--channels ring,socket]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import multiprocessing
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import uvloop

from raftmq.state.entries import Message, decode_message, encode_message

# -- frames (as in raftmq/workers/mesh.py) ---------------------------------------

FWD, ACK = 2, 6
MARK, END = 100, 101  # the benchmark's own: phase boundaries, end of run
_LEN = struct.Struct("<I")
_FWD_HEAD = struct.Struct("<IBQHH")  # len, type, seq, sender length, assignment length
_FWD_BODY = struct.Struct("<QHH")
_SEQ_FRAME = struct.Struct("<IBQ")  # ACK / MARK / END
_U64 = struct.Struct("<Q")
_HEADER = 5

TOPIC = "bench/mesh/topic/0001"  # 21 bytes
SENDER = b"client-000042"
PAYLOAD_FILL = b"x" * 56  # + 8-byte timestamp = 64 bytes

PIPE_SIZE = 1 << 20
RING_SIZE = 4 << 20
READ_CAP = 256 * 1024  # what uvloop reads at most per data_received; the ring takes as much
SAFETY_TICK = 0.01  # ring: re-check for a missed wake-up (counted; see _Ring)
FENCE = True  # ring: a store-load barrier where the Dekker-like handshakes need one
_FENCE_LOCK = threading.Lock()

# Phase marks.
M_CLOSED_START, M_CLOSED_END, M_OPEN_START, M_OPEN_END = 1, 2, 3, 4


def build_frames(n: int) -> bytes:
    """``n`` FWD frames, one encode_message each, joined for one write."""
    frames = []
    slen = len(SENDER)
    now = time.monotonic_ns
    pack_ts = _U64.pack
    head = _FWD_HEAD.pack
    for _ in range(n):
        body = encode_message(Message(TOPIC, pack_ts(now()) + PAYLOAD_FILL))
        frames.append(b"".join((head(1 + 12 + slen + len(body), FWD, 0, slen, 0), SENDER, body)))
    return b"".join(frames)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- consumer (B) ------------------------------------------------------------------


class Consumer:
    """Parses frames as mesh.py's _on_frames does and keeps the measurements."""

    def __init__(self) -> None:
        self.count = 0  # messages decoded (the cumulative acknowledgement)
        self.marks: dict[int, tuple[float, float, int]] = {}  # mark -> (time, cpu, count)
        self.recording = False
        self.latencies: list[int] = []
        self.batches = 0
        self.ended = False
        self.sink: Message | None = None
        self.on_end: Callable[[], None] | None = None

    def process(self, buf: bytes | bytearray) -> int:
        """Handle every whole frame in ``buf``; return the bytes consumed."""
        pos = 0
        end = len(buf)
        count = self.count
        recording = self.recording
        lat = self.latencies
        while end - pos >= _HEADER:
            (length,) = _LEN.unpack_from(buf, pos)
            stop = pos + 4 + length
            if stop > end:
                break
            kind = buf[pos + 4]
            p = pos + _HEADER
            if kind == FWD:
                seq, slen, alen = _FWD_BODY.unpack_from(buf, p)
                p += 12
                sender = bytes(buf[p:p + slen]).decode("utf-8", "surrogatepass") if slen else None
                p += slen + alen
                message = decode_message(buf[p:stop])
                count += 1
                if recording:
                    lat.append(time.monotonic_ns() - _U64.unpack_from(message.payload, 0)[0])
                self.sink = message if sender else None
            elif kind == MARK:
                mark = _U64.unpack_from(buf, p)[0]
                self.marks[mark] = (time.monotonic(), cpu_seconds(), count)
                recording = self.recording = mark == M_OPEN_START
            elif kind == END:
                self.ended = True
            else:
                raise ValueError(f"unknown frame type {kind}")
            pos = stop
        self.count = count
        self.batches += 1
        if self.ended and self.on_end is not None:
            self.on_end()
        return pos

    def result(self) -> dict[str, Any]:
        return {"marks": self.marks, "latencies": self.latencies, "batches": self.batches}


# -- producer (A) ------------------------------------------------------------------


class Producer:
    """Closed loop, then open loop; ``channel`` moves bytes and reports acks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, args: argparse.Namespace,
                 channel: Any) -> None:
        self.loop = loop
        self.args = args
        self.channel = channel
        self.sent = 0
        self.acked = 0
        self.marks: dict[int, tuple[float, float, int]] = {}
        self.phase = "warmup"
        self.phase_end = 0.0
        self.blocked = False
        self.writes = 0
        self.block_count = 0
        self.done = loop.create_future()
        self._drained: asyncio.Future | None = None
        self._open_t0 = 0.0
        self._open_sent0 = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.channel.write(data)

    def mark(self, mark: int) -> None:
        self.marks[mark] = (time.monotonic(), cpu_seconds(), self.sent)
        self.write(_SEQ_FRAME.pack(9, MARK, mark))

    def on_ack(self, count: int) -> None:
        if count > self.acked:
            self.acked = count
        if self.blocked and self.sent - self.acked < self.args.window:
            self.blocked = False
            self.pump()
        if self._drained is not None and self.acked >= self.sent and not self._drained.done():
            self._drained.set_result(None)

    def pump(self) -> None:
        """One loop turn of the closed loop: a batch, one write."""
        if self.phase not in ("warmup", "closed"):
            return
        now = time.monotonic()
        if now >= self.phase_end:
            if self.phase == "warmup":
                self.phase = "closed"
                self.phase_end = now + self.args.seconds
                self.mark(M_CLOSED_START)
            else:
                self.phase = "drain"
                self.mark(M_CLOSED_END)
                self.loop.create_task(self._open_loop())
                return
        self.acked = max(self.acked, self.channel.acked())
        room = self.args.window - (self.sent - self.acked)
        n = min(self.args.batch, room)
        if n <= 0 or not self.channel.room():
            self.blocked = True
            self.block_count += 1
            self.channel.wait_ack()
            return
        self.write(build_frames(n))
        self.sent += n
        self.loop.call_soon(self.pump)

    async def _drain(self) -> None:
        self.acked = max(self.acked, self.channel.acked())
        if self.acked < self.sent:
            self._drained = self.loop.create_future()
            self.channel.wait_ack(always=True)
            await self._drained
            self._drained = None

    async def _open_loop(self) -> None:
        await self._drain()
        self.phase = "open"
        self.mark(M_OPEN_START)
        t0 = time.monotonic()
        sent0 = self.sent
        rate = self.args.rate
        stop = t0 + self.args.seconds
        tick = 0.001
        next_tick = t0
        while True:
            now = time.monotonic()
            if now >= stop:
                break
            due = int((now - t0) * rate) - (self.sent - sent0)
            if due > 0:
                self.write(build_frames(due))
                self.sent += due
            next_tick += tick
            delay = next_tick - time.monotonic()
            await asyncio.sleep(delay if delay > 0 else 0)
        self.mark(M_OPEN_END)
        self.phase = "drain"
        await self._drain()
        self.write(_SEQ_FRAME.pack(9, END, 0))
        self.done.set_result(None)

    def start(self) -> None:
        self.phase_end = time.monotonic() + self.args.warmup
        self.pump()

    def result(self) -> dict[str, Any]:
        return {"marks": self.marks, "writes": self.writes, "blocks": self.block_count}


# -- stream channels: unix socket, pipe ---------------------------------------------


class _StreamProto(asyncio.Protocol):
    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.on_data = on_data
        self.transport: Any = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        try:  # as mesh.py: the window, not asyncio, bounds what is in flight
            transport.set_write_buffer_limits(high=64 * 1024 * 1024)
        except NotImplementedError:  # the read end of a pipe
            pass

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class StreamChannel:
    """A's side of a socket or pipe: data out, ACK frames in."""

    def __init__(self) -> None:
        self.out: Any = None
        self.producer: Producer | None = None
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.out.write(data)

    def on_data(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        last = -1
        while len(buf) - pos >= _SEQ_FRAME.size:
            last = _SEQ_FRAME.unpack_from(buf, pos)[2]
            pos += _SEQ_FRAME.size
        del buf[:pos]
        if last >= 0 and self.producer is not None:
            self.producer.on_ack(last)

    def acked(self) -> int:
        return 0  # acknowledgements arrive as frames (on_data)

    def room(self) -> bool:
        return True

    def wait_ack(self, always: bool = False) -> None:
        pass


async def _stream_producer(args: argparse.Namespace, kind: str, fds: tuple) -> dict:
    loop = asyncio.get_running_loop()
    channel = StreamChannel()
    if kind == "socket":
        sock = socket.socket(fileno=fds[0])
        transport, proto = await loop.create_unix_connection(
            lambda: _StreamProto(channel.on_data), sock=sock)
        channel.out = transport
    else:
        data_w, ack_r = fds
        channel.out, _ = await loop.connect_write_pipe(
            lambda: _StreamProto(lambda d: None), os.fdopen(data_w, "wb", buffering=0))
        await loop.connect_read_pipe(lambda: _StreamProto(channel.on_data),
                                     os.fdopen(ack_r, "rb", buffering=0))
    producer = Producer(loop, args, channel)
    channel.producer = producer
    producer.start()
    await producer.done
    await asyncio.sleep(0.05)
    return producer.result()


async def _stream_consumer(args: argparse.Namespace, kind: str, fds: tuple) -> dict:
    loop = asyncio.get_running_loop()
    consumer = Consumer()
    ended = loop.create_future()
    consumer.on_end = lambda: ended.done() or ended.set_result(None)
    buf = bytearray()
    ack_out: Any = None

    def on_data(data: bytes) -> None:
        buf.extend(data)
        used = consumer.process(buf)
        if used:
            del buf[:used]
        # (data may come before create_unix_connection returned: the
        # protocol's own transport, not its return value)
        (ack_out or proto.transport).write(_SEQ_FRAME.pack(9, ACK, consumer.count))

    if kind == "socket":
        sock = socket.socket(fileno=fds[0])
        proto = _StreamProto(on_data)
        await loop.create_unix_connection(lambda: proto, sock=sock)
    else:
        data_r, ack_w = fds
        ack_out, _ = await loop.connect_write_pipe(
            lambda: _StreamProto(lambda d: None), os.fdopen(ack_w, "wb", buffering=0))
        await loop.connect_read_pipe(lambda: _StreamProto(on_data),
                                     os.fdopen(data_r, "rb", buffering=0))
    await ended
    return consumer.result()


# -- shared-memory ring --------------------------------------------------------------

# Layout of the shared block: u64 words (indexes into a 'Q' view), the
# producer's and the consumer's on different cache lines.
_HEAD, _TAIL, _COUNT, _C_SLEEPING, _P_WAITING = 0, 8, 9, 16, 24
_DATA = 256


class _Ring:
    """Single producer, single consumer.  ``head``/``tail`` are byte counts
    that only grow (position = value % size); frames may wrap.

    The producer stores the data, then ``head``; the consumer loads ``head``,
    then the data: x86 keeps stores in order and loads in order, so no fence.
    Sleeping is Dekker-like: the consumer stores ``sleeping = 1`` then loads
    ``head``; the producer stores ``head`` then loads ``sleeping``.  x86 may
    reorder a store and a later load, and Python has no fence: ``fence()``
    borrows the locked instruction of an uncontended lock (a compiled ring
    would use ``__atomic_thread_fence(__ATOMIC_SEQ_CST)``).  A timer every
    SAFETY_TICK still re-checks, and counts the wake-ups it finds missed
    (``rescued``)."""

    def __init__(self, shm: shared_memory.SharedMemory, wake_consumer: int,
                 wake_producer: int) -> None:
        # The parent's mapping, inherited through fork (attaching by name
        # would register the block a second time with the resource tracker).
        self.shm = shm
        self.buf = shm.buf
        # Index words through a memoryview cast to 'Q': one aligned 8-byte
        # store or load each.  struct's "<Q" packs byte by byte, so the other
        # process could see a torn index (it did: a "full" ring, tail read
        # as a fraction of its value).
        self.words = shm.buf[:_DATA].cast("Q")
        self.size = len(self.buf) - _DATA
        self.wake_consumer = wake_consumer
        self.wake_producer = wake_producer

    def fence(self) -> None:
        # Store-load barrier: an uncontended lock's acquire is an atomic
        # compare-and-swap (a locked instruction: a full fence on x86).
        if FENCE:
            _FENCE_LOCK.acquire()
            _FENCE_LOCK.release()

    def get(self, index: int) -> int:
        return self.words[index]

    def set(self, index: int, value: int) -> None:
        self.words[index] = value

    def close(self) -> None:
        self.words.release()
        self.buf = None  # type: ignore[assignment]
        self.shm.close()


class RingChannel:
    """A's side of the ring."""

    def __init__(self, ring: _Ring, loop: asyncio.AbstractEventLoop) -> None:
        self.ring = ring
        self.loop = loop
        self.head = 0
        self.producer: Producer | None = None
        self.wakeups = 0
        self.rescued = 0
        self._poll_scheduled = False
        loop.add_reader(ring.wake_producer, self._woken)
        self._safety = loop.call_later(SAFETY_TICK, self._check)

    def write(self, data: bytes) -> None:
        ring = self.ring
        size = ring.size
        n = len(data)
        if size - (self.head - ring.get(_TAIL)) < n:
            # room() is asked first in the closed loop; 20 msgs/ms never fill it.
            raise RuntimeError(f"ring full: head {self.head} tail {ring.get(_TAIL)} n {n}")
        pos = self.head % size
        first = min(n, size - pos)
        buf = ring.buf
        buf[_DATA + pos:_DATA + pos + first] = data[:first] if first < n else data
        if first < n:
            buf[_DATA:_DATA + n - first] = data[first:]
        self.head += n
        ring.set(_HEAD, self.head)
        ring.fence()
        if ring.get(_C_SLEEPING):
            self.wakeups += 1
            os.eventfd_write(ring.wake_consumer, 1)

    def acked(self) -> int:
        return self.ring.get(_COUNT)

    def room(self) -> bool:
        return self.ring.size - (self.head - self.ring.get(_TAIL)) > 2 * READ_CAP

    def wait_ack(self, always: bool = False) -> None:
        ring = self.ring
        ring.set(_P_WAITING, 1)
        # Re-check after announcing the wait (see _Ring on the race).
        self._poll_scheduled = True
        self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        self._poll_scheduled = False
        producer = self.producer
        ring = self.ring
        if producer is None:
            return
        while True:
            count = ring.get(_COUNT)
            producer.on_ack(count)
            if not (producer.blocked or (producer._drained is not None
                                         and not producer._drained.done())):
                return
            # Still waiting: ask for a wake-up, then look once more.
            ring.set(_P_WAITING, 1)
            ring.fence()
            if ring.get(_COUNT) == count:
                return

    def _woken(self) -> None:
        try:
            os.eventfd_read(self.ring.wake_producer)
        except BlockingIOError:
            pass
        self.ring.set(_P_WAITING, 0)
        self._poll()

    def _check(self) -> None:
        producer = self.producer
        if producer is not None and not self._poll_scheduled and self.ring.get(_P_WAITING) \
                and (producer.blocked or producer._drained is not None):
            count = self.ring.get(_COUNT)
            if count > producer.acked:
                # Progress we were not told of: a missed wake-up unless the
                # eventfd was written and its callback simply has not run yet.
                try:
                    os.eventfd_read(self.ring.wake_producer)
                except BlockingIOError:
                    self.rescued += 1
                self.ring.set(_P_WAITING, 0)
                self._poll()
        self._safety = self.loop.call_later(SAFETY_TICK, self._check)


async def _ring_producer(args: argparse.Namespace, names: tuple) -> dict:
    loop = asyncio.get_running_loop()
    ring = _Ring(*names)
    channel = RingChannel(ring, loop)
    producer = Producer(loop, args, channel)
    channel.producer = producer
    producer.start()
    await producer.done
    channel._safety.cancel()
    loop.remove_reader(ring.wake_producer)
    result = producer.result()
    result.update(wakeups=channel.wakeups, rescued=channel.rescued)
    ring.close()
    return result


async def _ring_consumer(args: argparse.Namespace, names: tuple) -> dict:
    loop = asyncio.get_running_loop()
    ring = _Ring(*names)
    consumer = Consumer()
    ended = loop.create_future()
    consumer.on_end = lambda: ended.done() or ended.set_result(None)
    state = {"tail": 0, "awake": False, "wakeups": 0, "rescued": 0, "sleeps": 0, "suspect": -1}
    size = ring.size

    def turn() -> None:
        buf = ring.buf
        if buf is None:  # closed (a turn still scheduled at the end)
            return
        tail = state["tail"]
        head = ring.get(_HEAD)
        if head == tail:
            # Going to sleep: announce it, then look once more.
            ring.set(_C_SLEEPING, 1)
            ring.fence()
            head = ring.get(_HEAD)
            if head == tail:
                state["awake"] = False
                state["sleeps"] += 1
                return
            ring.set(_C_SLEEPING, 0)
        n = min(head - tail, READ_CAP)
        pos = tail % size
        first = min(n, size - pos)
        if first == n:
            data = bytes(buf[_DATA + pos:_DATA + pos + n])
        else:
            data = bytes(buf[_DATA + pos:_DATA + size]) + bytes(buf[_DATA:_DATA + n - first])
        used = consumer.process(data)
        state["tail"] = tail + used
        ring.set(_TAIL, tail + used)
        ring.set(_COUNT, consumer.count)
        ring.fence()
        if ring.get(_P_WAITING):
            os.eventfd_write(ring.wake_producer, 1)
        # Stay awake one more loop turn (other I/O runs in between): the
        # producer does not pay a wake-up while data keeps coming.
        loop.call_soon(turn)

    def woken() -> None:
        try:
            os.eventfd_read(ring.wake_consumer)
        except BlockingIOError:
            pass
        state["wakeups"] += 1
        ring.set(_C_SLEEPING, 0)
        if not state["awake"]:
            state["awake"] = True
            turn()

    def check() -> None:
        # Data while asleep and no wake-up written: the producer may be
        # between storing head and writing the eventfd, so act (and count a
        # missed wake-up) only when the same is seen again a tick later.
        if not state["awake"] and ring.get(_HEAD) != state["tail"]:
            try:  # written but not yet seen by the loop: not a missed wake-up
                os.eventfd_read(ring.wake_consumer)
                state["suspect"] = -1
            except BlockingIOError:
                if state["suspect"] != state["tail"]:
                    state["suspect"] = state["tail"]
                    safety[:] = [loop.call_later(SAFETY_TICK, check)]
                    return
                state["rescued"] += 1
            state["awake"] = True
            ring.set(_C_SLEEPING, 0)
            turn()
        else:
            state["suspect"] = -1
        safety[:] = [loop.call_later(SAFETY_TICK, check)]

    safety: list[asyncio.TimerHandle] = []
    loop.add_reader(ring.wake_consumer, woken)
    check()
    await ended
    safety[0].cancel()
    loop.remove_reader(ring.wake_consumer)
    result = consumer.result()
    result.update(wakeups=state["wakeups"], rescued=state["rescued"], sleeps=state["sleeps"])
    ring.close()
    return result


# -- in-process floor ------------------------------------------------------------------


def _inproc(args: argparse.Namespace) -> tuple[dict, dict]:
    """No channel: the same batches parsed in the same process."""
    consumer = Consumer()
    sent = 0
    t_end = time.monotonic() + args.warmup
    while time.monotonic() < t_end:
        consumer.process(build_frames(args.batch))
    t0, c0 = time.monotonic(), cpu_seconds()
    n0 = consumer.count
    t_end = t0 + args.seconds
    while time.monotonic() < t_end:
        consumer.process(build_frames(args.batch))
        sent += args.batch
    t1, c1 = time.monotonic(), cpu_seconds()
    marks = {M_CLOSED_START: (t0, c0, n0), M_CLOSED_END: (t1, c1, consumer.count)}
    # The producer's CPU is inside the consumer's: report it all on one side.
    return ({"marks": {M_CLOSED_START: (t0, 0.0, 0), M_CLOSED_END: (t1, 0.0, sent)},
             "writes": 0, "blocks": 0},
            {"marks": marks, "latencies": [], "batches": 0})


# -- processes ------------------------------------------------------------------------


def _child(role: str, kind: str, args: argparse.Namespace, handles: tuple, others: list[int],
           conn: Any) -> None:
    for fd in others:  # the other process's ends
        os.close(fd)
    try:
        uvloop.install()
        if kind == "ring":
            coro = _ring_producer(args, handles) if role == "A" else _ring_consumer(args, handles)
        elif role == "A":
            coro = _stream_producer(args, kind, handles)
        else:
            coro = _stream_consumer(args, kind, handles)
        result = asyncio.run(coro)
        conn.send(("ok", result))
    except BaseException as exc:  # reported to the parent, which fails the run
        conn.send(("error", repr(exc)))
        raise


def run_pair(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    if kind == "inproc":
        a, b = _inproc(args)
        return summarize(kind, a, b, load_before)
    ctx = multiprocessing.get_context("fork")
    shm = None
    to_close: list[int] = []
    if kind == "socket":
        sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ha, hb = (sa.detach(),), (sb.detach(),)
        to_close = [ha[0], hb[0]]
    elif kind == "pipe":
        data_r, data_w = os.pipe()
        ack_r, ack_w = os.pipe()
        for fd in (data_w, ack_w):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        ha, hb = (data_w, ack_r), (data_r, ack_w)
        to_close = [data_r, data_w, ack_r, ack_w]
    elif kind == "ring":
        shm = shared_memory.SharedMemory(create=True, size=_DATA + RING_SIZE)
        shm.buf[:_DATA] = bytes(_DATA)
        _U64.pack_into(shm.buf, _C_SLEEPING * 8, 1)  # B starts asleep
        wake_c = os.eventfd(0, os.EFD_NONBLOCK)
        wake_p = os.eventfd(0, os.EFD_NONBLOCK)
        ha = hb = (shm, wake_c, wake_p)
        to_close = [wake_c, wake_p]
    else:
        raise ValueError(kind)
    results = {}
    procs = []
    conns = {}
    for role, handles in (("B", hb), ("A", ha)):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        others = [fd for fd in to_close if fd not in handles]
        # daemon: a run that fails must not leave its peer waiting forever
        proc = ctx.Process(target=_child, daemon=True,
                           args=(role, kind, args, handles, others, child_conn))
        proc.start()
        procs.append(proc)
        conns[role] = parent_conn
    for fd in to_close:
        os.close(fd)
    timeout = args.warmup + 2 * args.seconds + 30
    for role, conn in conns.items():
        if not conn.poll(timeout):
            raise RuntimeError(f"{kind}: process {role} did not finish")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"{kind}: process {role} failed: {value}")
        results[role] = value
    for proc in procs:
        proc.join(10)
    if shm is not None:
        shm.close()
        shm.unlink()
    return summarize(kind, results["A"], results["B"], load_before)


def _pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1000.0  # ns -> us


def summarize(kind: str, a: dict, b: dict, load: float) -> dict[str, Any]:
    am, bm = a["marks"], b["marks"]
    out: dict[str, Any] = {"channel": kind, "load": load}
    # Closed loop: B's clock and count between the marks; CPU of both.
    t0, cb0, n0 = bm[M_CLOSED_START]
    t1, cb1, n1 = bm[M_CLOSED_END]
    msgs = n1 - n0
    cpu_a = am[M_CLOSED_END][1] - am[M_CLOSED_START][1]
    out["rate"] = msgs / (t1 - t0)
    out["cpu_a"] = cpu_a / msgs * 1e6
    out["cpu_b"] = (cb1 - cb0) / msgs * 1e6
    out["cpu"] = out["cpu_a"] + out["cpu_b"]
    out["writes_per_msg"] = a["writes"] / max(1, am[M_CLOSED_END][2])
    if M_OPEN_START in bm:
        t2, cb2, n2 = bm[M_OPEN_START]
        t3, cb3, n3 = bm[M_OPEN_END]
        omsgs = n3 - n2
        ocpu_a = am[M_OPEN_END][1] - am[M_OPEN_START][1]
        out["open_rate"] = omsgs / (t3 - t2)
        out["open_cpu"] = (ocpu_a + cb3 - cb2) / max(1, omsgs) * 1e6
        out["open_cpu_pct"] = (ocpu_a + cb3 - cb2) / (t3 - t2) * 100
        lat = b["latencies"]
        out["p50"] = _pct(lat, 0.50)
        out["p99"] = _pct(lat, 0.99)
    out["blocks"] = a["blocks"]
    out["rescued"] = a.get("rescued", 0) + b.get("rescued", 0)
    out["rescued_ab"] = f"{a.get('rescued', 0)}/{b.get('rescued', 0)}"
    out["wakeups"] = b.get("wakeups", 0)
    return out


def _fmt_spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(runs: list[dict[str, Any]], channels: list[str]) -> str:
    lines = [
        "channel  closed-loop msg/s        CPU us/msg A+B (A / B)      "
        "open-loop: p50 us       p99 us           CPU us/msg      rescued",
    ]
    for kind in channels:
        rs = [r for r in runs if r["channel"] == kind]
        if not rs:
            continue
        col = [
            f"{kind:8}",
            f"{_fmt_spread([r['rate'] for r in rs], ',.0f'):24}",
            f"{_fmt_spread([r['cpu'] for r in rs], '.2f'):17}"
            f"({statistics.median(r['cpu_a'] for r in rs):.2f} / "
            f"{statistics.median(r['cpu_b'] for r in rs):.2f})  ",
        ]
        if "p50" in rs[0]:
            col += [
                f"{_fmt_spread([r['p50'] for r in rs], '.0f'):18}",
                f"{_fmt_spread([r['p99'] for r in rs], '.0f'):16}",
                f"{_fmt_spread([r['open_cpu'] for r in rs], '.2f'):16}",
                f"{sum(r['rescued'] for r in rs)}",
            ]
        lines.append(" ".join(col))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s phases")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=10_000, help="unacknowledged messages")
    parser.add_argument("--batch", type=int, default=100, help="messages per loop turn")
    parser.add_argument("--rate", type=int, default=20_000, help="open-loop messages/s")
    parser.add_argument("--channels", default="inproc,socket,ring,pipe")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    parser.add_argument("--no-fence", action="store_true",
                        help="ring without the store-load barriers (to see what they are for)")
    args = parser.parse_args()
    global FENCE
    FENCE = not args.no_fence
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 0.2, 1
    channels = [c for c in args.channels.split(",") if c]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  nproc {os.cpu_count()}  "
          f"commit {commit.strip()}  load {os.getloadavg()}  batch {args.batch}  "
          f"window {args.window}  open-loop rate {args.rate}/s  {args.seconds:g} s phases",
          flush=True)
    runs = []
    loads = []
    for rnd in range(args.rounds):
        order = channels[rnd % len(channels):] + channels[:rnd % len(channels)]
        for kind in order:
            r = run_pair(kind, args)
            runs.append(r)
            loads.append(r["load"])
            if args.verbose:
                print(f"round {rnd} {kind:7} {r['rate']:>9,.0f}/s cpu {r['cpu']:.2f} "
                      f"({r['cpu_a']:.2f}/{r['cpu_b']:.2f}) us/msg"
                      + (f"  open {r['open_rate']:,.0f}/s p50 {r['p50']:.0f} us "
                         f"p99 {r['p99']:.0f} us cpu {r['open_cpu']:.2f} us/msg "
                         f"({r['open_cpu_pct']:.0f}% of a core) wakeups {r['wakeups']} "
                         f"rescued A/B {r['rescued_ab']}" if "p50" in r else "")
                      + f"  writes/msg {r['writes_per_msg']:.3f} blocks {r['blocks']}"
                      + f"  load {r['load']:.1f}", flush=True)
    print(report(runs, channels))
    print(f"# load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    sys.exit(main())
