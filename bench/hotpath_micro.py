"""The broker's per-message Python path in one process, without sockets.

    PYTHONPATH=src python bench/hotpath_micro.py [-n 200000] [--batch 1] [--pairs 500]
                                                 [--layout pairs|fanout]

A real ``Broker`` (MemoryStore, no listener) on a uvloop loop gets ``pairs``
publisher/subscriber connections (CONNECT and SUBSCRIBE fed through
``data_received``, fake transports that count bytes).  Then, ``n`` times, one
publisher's ``data_received`` gets one 64-byte QoS 0 PUBLISH (the conns-500
case: one read per message); every ``batch`` reads the loop turns once, so
the broker's per-turn flush runs as in the server.  Prints ns per message.

Under ``valgrind --tool=callgrind`` (two runs with different ``-n``, with
``--no-empty``) the difference of the instruction totals divided by the
difference of ``n`` is the instructions per message, free of the machine's
noise: that is the figure to compare before/after a change.  The same with
``--empty-only`` gives the benchmark's own loop (the loop turn it awaits every
``batch`` messages), to subtract for the broker's share.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from raftmq.broker.protocol import Connection
from raftmq.broker.server import Broker
from raftmq.config import config_from_mapping
from raftmq.state.store import MemoryStore


class FakeTransport:
    def __init__(self) -> None:
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.writes += 1

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + _remaining(len(body)) + body


def subscribe_packet(topic: str) -> bytes:
    t = topic.encode()
    body = b"\x00\x01" + len(t).to_bytes(2, "big") + t + b"\x00"
    return b"\x82" + _remaining(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + payload
    return b"\x30" + _remaining(len(body)) + body


async def main(args: argparse.Namespace) -> None:
    def topic(i: int) -> str:
        # pairs: publisher i -> bench/i <- subscriber i; fanout: all on bench/0.
        return f"bench/{i}" if args.layout == "pairs" else "bench/0"

    config = config_from_mapping({"allow_anonymous": True}, "<bench>")
    broker = Broker(config, MemoryStore())
    broker.loop = asyncio.get_running_loop()
    pubs, subs = [], []
    for i in range(args.pairs):
        for kind, lst in (("p", pubs), ("s", subs)):
            conn = Connection(broker)
            conn.connection_made(FakeTransport())
            conn.data_received(connect_packet(f"bench-{kind}{i}"))
            if kind == "s":
                conn.data_received(subscribe_packet(topic(i)))
            lst.append(conn)
    await asyncio.sleep(0)
    pinned = args.mode != "auto"
    per_turn = args.mode == "per-turn"
    packets = [publish_packet(topic(i), bytes(64)) for i in range(args.pairs)]
    n, batch, pairs = 0 if args.empty_only else args.n, args.batch, args.pairs
    before = sum(c.transport.writes for c in subs)
    t0 = time.perf_counter()
    for k in range(n):
        i = k % pairs
        if pinned:
            # Pin the broker's write gathering (connection.pyx end_read / _flush):
            # the mode, with its load sampling kept from switching it.
            broker._per_turn = per_turn
            broker._reads = broker._sample_flushes = broker._sample_reads = 0
        pubs[i].data_received(packets[i])
        if k % batch == batch - 1:
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    elapsed = time.perf_counter() - t0
    writes = sum(c.transport.writes for c in subs) - before
    # The benchmark's own loop (the await of a loop turn, the indexing), to subtract.
    t0 = time.perf_counter()
    n = args.n
    for k in range(0 if args.no_empty else n):
        i = k % pairs
        packets[i]
        if k % batch == batch - 1:
            await asyncio.sleep(0)
    empty = time.perf_counter() - t0
    if args.empty_only:
        print(f"{n} turns of the benchmark's loop alone, batch {batch}")
        return
    print(f"{n} messages, batch {batch}: {(elapsed - empty) / n * 1e9:.0f} ns/msg "
          f"(+ {empty / n * 1e9:.0f} ns/msg of the benchmark's loop); subscriber writes {writes}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--layout", choices=("pairs", "fanout"), default="pairs",
                    help="fanout: every subscriber on the one topic every publisher uses")
    ap.add_argument("--mode", choices=("auto", "per-turn", "per-read"), default="auto",
                    help="pin the broker's write gathering mode")
    ap.add_argument("--no-empty", action="store_true", help="skip the empty loop (for callgrind)")
    ap.add_argument("--empty-only", action="store_true",
                    help="run only the empty loop (callgrind: the benchmark's own instructions)")
    uvloop.run(main(ap.parse_args()))
