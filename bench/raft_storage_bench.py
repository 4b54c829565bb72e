"""Micro-benchmark of the LMDB Raft log and the state machine (issue 3, point 2 and 4).

    python bench/raft_storage_bench.py [--batches 200] [--batch 1000] [--size 100] [--dir /tmp/x]

Measures, each on a fresh environment:
  save       LmdbStorage.save() of ``--batch``-entry batches of ``--size``-byte
             entries plus a hard state, fsync on every save (group commit).
  apply      StateMachine.apply() of batches whose entries each carry one
             QueueAdd (one delivery, ``--size``-byte payload): the common
             durable op of a QoS 1 stream.
  save+apply the raft process's loop with one member: each save() appends a
             batch and applies the previous batch in the same transaction.
Prints entries/s and save latency p50/p99.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from raftmq.raft.lmdb_storage import LmdbStorage  # noqa: E402
from raftmq.raft.types import Entry, HardState  # noqa: E402
from raftmq.state.entries import Message, QueueAdd, SessionPut, encode_ops  # noqa: E402
from raftmq.state.machine import StateMachine  # noqa: E402


def queue_entry_data(i: int, size: int) -> bytes:
    return encode_ops([QueueAdd([[f"client-{i % 100}", i, 0, 1, []]], Message(f"bench/{i % 100}", b"x" * size, 1))])


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def bench_save(path: str, batches: int, batch: int, size: int) -> dict:
    s = LmdbStorage(path)
    payload = os.urandom(size)
    lat = []
    idx = 1
    t0 = time.perf_counter()
    for _ in range(batches):
        es = [Entry(1, i, payload) for i in range(idx, idx + batch)]
        t = time.perf_counter()
        s.save(HardState(1, 1, idx - 1), es, None)
        lat.append(time.perf_counter() - t)
        idx += batch
    dt = time.perf_counter() - t0
    s.close()
    return {"entries_per_s": batches * batch / dt, "save_p50_ms": pct(lat, 0.5) * 1e3, "save_p99_ms": pct(lat, 0.99) * 1e3}


def bench_apply(path: str, batches: int, batch: int, size: int) -> dict:
    s = LmdbStorage(path)
    m = StateMachine(s)
    m.apply([Entry(1, 1, encode_ops([SessionPut(f"client-{c}", 5, 3600, True) for c in range(100)]))])
    data = [queue_entry_data(i, size) for i in range(batch)]
    idx = 2
    total = 0.0
    for _ in range(batches):
        es = [Entry(1, idx + k, data[k]) for k in range(batch)]
        t = time.perf_counter()
        m.apply(es)
        total += time.perf_counter() - t
        idx += batch
    s.close()
    return {"entries_per_s": batches * batch / total}


def bench_save_apply(path: str, batches: int, batch: int, size: int) -> dict:
    s = LmdbStorage(path)
    StateMachine(s)
    s.save(HardState(1, 1, 0), [Entry(1, 1, encode_ops([SessionPut(f"client-{c}", 5, 3600, True) for c in range(100)]))], None)
    data = [queue_entry_data(i, size) for i in range(batch)]
    pending = s.entries(1, 2)
    idx = 2
    lat = []
    t0 = time.perf_counter()
    for _ in range(batches):
        es = [Entry(1, idx + k, data[k]) for k in range(batch)]
        t = time.perf_counter()
        s.save(HardState(1, 1, idx - 1), es, None, committed=pending)
        lat.append(time.perf_counter() - t)
        pending = es
        idx += batch
    dt = time.perf_counter() - t0
    s.close()
    return {"entries_per_s": batches * batch / dt, "save_p50_ms": pct(lat, 0.5) * 1e3, "save_p99_ms": pct(lat, 0.99) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="runs per benchmark; the median is printed")
    ap.add_argument("--dir", default=None, help="where to put the LMDB files (default: a temp dir)")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="raftmq-bench-", dir=args.dir)
    try:
        print(f"batches={args.batches} batch={args.batch} entry payload={args.size} B, fsync per save")
        for name, fn in (("save", bench_save), ("apply", bench_apply), ("save+apply", bench_save_apply)):
            runs = []
            for r in range(args.repeat):
                path = os.path.join(base, f"{name}-{r}")
                runs.append(fn(path, args.batches, args.batch, args.size))
                shutil.rmtree(path)
            mid = sorted(runs, key=lambda x: x["entries_per_s"])[len(runs) // 2]
            extra = "".join(f"  {k}={v:.2f}" for k, v in mid.items() if k != "entries_per_s")
            spread = statistics.pstdev([x["entries_per_s"] for x in runs])
            print(f"{name:11s} {mid['entries_per_s']:>12,.0f} entries/s (±{spread:,.0f}){extra}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
