"""Micro-benchmark of the Raft core alone: propose -> ready -> advance, in-process.

``python -m raftmq.sim.bench_core [--entries N] [--batch B] [--size S]``

Every node has a MemoryStorage; messages are delivered by direct ``step``
calls; no I/O, so this is the ceiling the raft process's Python overhead
allows (the real process adds LMDB writes, fsync and sockets). Reported for
one member and three members, proposing with ``propose_many`` (group commit
as the raft process does it) and with one ``propose`` per entry.
"""

from __future__ import annotations

import argparse
import random
import time

from raftmq.raft.core import Config, RawNode
from raftmq.raft.storage import MemoryStorage
from raftmq.raft.types import ConfState, HardState, Role, Snapshot, SnapshotMeta


class InProcessCluster:
    def __init__(self, n: int) -> None:
        ids = tuple(range(1, n + 1))
        self.storage: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RawNode] = {}
        for i in ids:
            st = MemoryStorage()
            st.apply_snapshot(Snapshot(SnapshotMeta(1, 1, ConfState(ids)), b""))
            st.set_hard_state(HardState(1, 0, 1))
            self.storage[i] = st
            self.nodes[i] = RawNode(Config(id=i), st, random.Random(i))
        self.applied = dict.fromkeys(ids, 0)
        self.nodes[1].campaign()
        self.pump()
        assert self.nodes[1].role == Role.LEADER

    def pump(self) -> None:
        nodes, storage, applied = self.nodes, self.storage, self.applied
        moved = True
        while moved:
            moved = False
            for i, node in nodes.items():
                if not node.has_ready():
                    continue
                moved = True
                rd = node.ready()
                st = storage[i]
                if rd.hard_state is not None:
                    st.set_hard_state(rd.hard_state)
                st.append(rd.entries)
                applied[i] += len(rd.committed_entries)
                node.advance(rd)
                for m in rd.messages:
                    nodes[m.dst].step(m)


def bench(n: int, entries: int, batch: int, size: int, single: bool) -> float:
    c = InProcessCluster(n)
    leader = c.nodes[1]
    data = b"x" * size
    datas = [data] * batch
    base = dict(c.applied)
    t0 = time.perf_counter()
    done = 0
    while done < entries:
        if single:
            for _ in range(batch):
                leader.propose(data)
        else:
            leader.propose_many(datas)
        done += batch
        c.pump()
    dt = time.perf_counter() - t0
    assert all(c.applied[i] - base[i] == done for i in c.nodes), (c.applied, base, done)
    return done / dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m raftmq.sim.bench_core")
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args(argv)
    for n in (1, 3):
        for single in (False, True):
            rate = bench(n, args.entries, args.batch, args.size, single)
            how = "propose() x batch" if single else "propose_many(batch)"
            print(f"{n} member(s), {how:20s} batch={args.batch} size={args.size}: "
                  f"{rate:,.0f} entries/s committed and applied on every member")


if __name__ == "__main__":
    main()
