"""python -m raftmq.sim --seeds N [--seed S] [--nodes 3|5] [--steps K] [-v]

Runs seeds S, S+1, ..., S+N-1 (S random when not given) and prints, for each,
the seed and every knob first; on a violation it prints the reproduction
command and exits 1. A seed may be given as a hex string (a commit hash): its
first 16 hex digits are the seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from raftmq.sim.options import swarm
from raftmq.sim.simulator import run_seed


def parse_seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return int(text[:16], 16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftmq.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds to run")
    ap.add_argument("--seed", type=parse_seed, default=None, help="first seed")
    ap.add_argument("--nodes", type=int, choices=(3, 5), default=None)
    ap.add_argument("--steps", type=int, default=None, help="fault-phase length")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every event")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(name)s %(message)s", stream=sys.stdout)
    first = args.seed if args.seed is not None else int.from_bytes(os.urandom(6), "big")
    started = time.monotonic()
    for seed in range(first, first + args.seeds):
        opts = swarm(seed, args.nodes, args.steps)
        print(f"SEED={seed} {opts.describe()}", flush=True)
        res = run_seed(opts)
        if not res.ok:
            repro = f"python -m raftmq.sim --seed {seed}"
            if args.nodes is not None:
                repro += f" --nodes {args.nodes}"
            if args.steps is not None:
                repro += f" --steps {args.steps}"
            print(f"VIOLATION seed={seed}: {res.error}", flush=True)
            print(f"reproduce this failure with: {repro} -v", flush=True)
            return 1
        print(f"  ok {res.stats}", flush=True)
    print(f"{args.seeds} seeds passed in {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
