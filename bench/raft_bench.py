"""Entries committed per second through raft processes with group commit.

Starts real raft processes (``python -m raftmq.raft.process``) on a temporary
data dir -- one member, then three members on loopback -- and drives the
leader over its local channel (raft/channel.py) with many concurrent
proposers: a closed loop keeping ``--window`` proposals outstanding, each one
entry of ``--size`` bytes (a RetainSet op batch, so the state machine really
applies it).  Reports commits/s and the commit latency (proposal sent ->
COMMITTED received) p50 / p99.

    python bench/raft_bench.py [--seconds 10] [--window 4096] [--members 1,3]

Durability is "sync" (an fsync per Ready) unless ``--durability async``.

Measured on the 2-core development VM shared with other jobs (2026-11-25; the
figures move by 2x with the machine's load and its fsync latency, which
varied from 0.2 to 7 ms during the day):

    members  window  commits/s        p50      p99
    1        4096    176,000-191,000  19 ms    40-62 ms   (quiet machine)
    3        4096    77,000           44 ms    176 ms     (quiet machine)
    1        4096    80,000-85,000    45 ms    85 ms      (load average 3)
    3        4096    42,000-47,000    82-90 ms 157-187 ms (load average 3)
    1        64      34,000           1.5 ms   16 ms
    3        64      10,500           4.6 ms   32 ms
    fan-out to 2 extra readers (unix socket): every reader receives every
    committed entry at the commit rate (96,000 entries/s at load average 3).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

from raftmq.raft import channel as ch  # noqa: E402
from raftmq.state.entries import Message, RetainSet, encode_ops  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry_data(i: int, size: int) -> bytes:
    base = encode_ops([RetainSet(Message(f"bench/{i % 100}", b"", 1, True))])
    pad = max(0, size - len(base))
    return encode_ops([RetainSet(Message(f"bench/{i % 100}", b"x" * pad, 1, True))])


def start_cluster(root: str, members: int, durability: str) -> list[tuple[subprocess.Popen, str]]:
    ports = [free_port() for _ in range(members)]
    secret = os.path.join(root, "secret")
    with open(secret, "w") as f:
        f.write("bench-secret-0123456789abcdef")
    os.chmod(secret, 0o600)
    procs = []
    for i in range(members):
        nid = i + 1
        d = os.path.join(root, f"n{nid}")
        os.makedirs(d)
        cfg = os.path.join(root, f"n{nid}.toml")
        with open(cfg, "w") as f:
            f.write(f'data_dir = "{d}"\ndurability = "{durability}"\nlog_level = "warning"\n')
            if members > 1:
                f.write(f'[cluster]\nnode_id = {nid}\nlisten = "127.0.0.1:{ports[i]}"\n')
                f.write(f'secret_file = "{secret}"\npeers = [\n')
                for j in range(members):
                    f.write(f'  {{ id = {j + 1}, host = "127.0.0.1", port = {ports[j]} }},\n')
                f.write("]\ntick_ms = 10\nelection_ticks = 30\nheartbeat_ticks = 3\n")
        env = {**os.environ, "PYTHONPATH": SRC}
        p = subprocess.Popen([sys.executable, "-m", "raftmq.raft.process", "--config", cfg], env=env)
        procs.append((p, d))
    return procs


def find_leader(procs: list[tuple[subprocess.Popen, str]], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _p, d in procs:
            try:
                c = ch.BlockingChannel(d, timeout=2)
                st = c.admin({"op": "status"})["status"]
                c.close()
            except OSError:
                continue
            if st["role"] == "leader":
                return d
        time.sleep(0.1)
    raise RuntimeError("no leader elected")


async def drive(
    data_dir: str, seconds: float, window: int, size: int, conns: int, readers: int = 0
) -> tuple[int, list[float], int]:
    loop = asyncio.get_running_loop()
    payloads = [entry_data(i, size) for i in range(256)]
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    committed = 0
    state = {"next": 1, "measuring": False, "stop": False}
    protos: list[ch.FrameProtocol] = []

    def send_one(proto: ch.FrameProtocol) -> None:
        rid = state["next"]
        state["next"] += 1
        sent_at[rid] = time.perf_counter()
        proto.send(ch.request_frame(ch.PROPOSE, rid, payloads[rid & 255]))

    def on_frames(proto: ch.FrameProtocol, frames: list[tuple[int, bytes]]) -> None:
        nonlocal committed
        now = time.perf_counter()
        n = 0
        for kind, body in frames:
            if kind == ch.COMMITTED:
                for rid in ch.parse_ids(body):
                    t = sent_at.pop(rid)
                    if state["measuring"]:
                        latencies.append(now - t)
                        committed += 1
                    n += 1
            elif kind == ch.FAILED:
                raise SystemExit(f"proposals failed: reason {body[0]}")
        if not state["stop"]:
            for _ in range(n):
                send_one(proto)

    fanned = [0]

    def on_fanout(proto: ch.FrameProtocol, frames: list[tuple[int, bytes]]) -> None:
        if state["measuring"]:
            fanned[0] += sum(1 for kind, _ in frames if kind == ch.ENTRY)

    path = ch.socket_path(data_dir)
    for _ in range(readers):  # like sibling workers: every committed entry comes to them
        reader = ch.FrameProtocol(on_fanout)
        await loop.create_unix_connection(lambda r=reader: r, path)
        reader.send(ch.hello_frame(0, True))
        protos.append(reader)
    for _ in range(conns):
        proto = ch.FrameProtocol(on_frames)
        await loop.create_unix_connection(lambda p=proto: p, path)
        proto.send(ch.hello_frame(0, False))
        protos.append(proto)
    proposers = protos[readers:]
    for i in range(window):
        send_one(proposers[i % conns])
    await asyncio.sleep(1.0)  # warm-up
    state["measuring"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    elapsed = time.perf_counter() - t0
    state["stop"] = True
    await asyncio.sleep(0.5)
    for p in protos:
        p.close()
    return int(committed / elapsed), latencies, int(fanned[0] / elapsed / max(1, readers))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def run(members: int, args: argparse.Namespace) -> dict:
    root = tempfile.mkdtemp(prefix="raftbench-")
    procs = start_cluster(root, members, args.durability)
    try:
        leader = find_leader(procs)
        import uvloop

        rate, lat, fanout = uvloop.run(
            drive(leader, args.seconds, args.window, args.size, args.conns, args.fanout_readers)
        )
        return {"members": members, "commits_per_s": rate, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                "fanout_per_reader": fanout}
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--window", type=int, default=4096, help="outstanding proposals (concurrent proposers)")
    ap.add_argument("--conns", type=int, default=4, help="channel connections the proposers share")
    ap.add_argument("--size", type=int, default=100, help="entry size in bytes")
    ap.add_argument("--members", default="1,3")
    ap.add_argument("--durability", default="sync", choices=("sync", "async"))
    ap.add_argument("--fanout-readers", type=int, default=0,
                    help="extra channel connections receiving every committed entry (worker fan-out)")
    args = ap.parse_args()
    for m in (int(x) for x in args.members.split(",")):
        r = run(m, args)
        print(
            f"members={r['members']} durability={args.durability} entry={args.size}B window={args.window}: "
            f"{r['commits_per_s']:,} commits/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
            + (f"  fan-out {r['fanout_per_reader']:,} entries/s per reader" if args.fanout_readers else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
