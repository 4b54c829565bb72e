"""Failover time of ``mode = "ha"``: kill -9 of the leader -> a client served by the new leader.

    python bench/ha_failover.py [--rounds 7] [--workers 1] [--election-ticks 30]

Three real ``raftmq serve`` nodes on loopback (tests/ha/ha_harness.py).  Each
round: a persistent MQTT 5 session is parked on the leader, the leader's
supervisor is killed with SIGKILL, and the clock runs until the same client
id is connected again (session present) to whichever node it is referred to
(following the CONNACK Server Reference); then the killed node is started
again and the cluster settles before the next round.  Prints each round and
the median / min / max.  The figure includes the election timeout
(election_ticks x tick_ms 10 ms, randomized up to twice that), the worker
restart on the new leader and the state load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "ha")]

from ha_harness import HaCluster  # noqa: E402
from test_ha import follow  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--election-ticks", type=int, default=30)
    args = parser.parse_args()
    times = []
    with tempfile.TemporaryDirectory(prefix="ha-bench-") as tmp:
        cluster = HaCluster(Path(tmp), 3, workers=args.workers, election_ticks=args.election_ticks)
        try:
            cluster.start()
            for i in range(args.rounds):
                leader = cluster.serving(timeout=60)
                c, _, _ = follow(cluster, "bench-session", clean=i == 0, expiry=3600)
                c.close()
                t0 = time.monotonic()
                leader.kill9()
                c, node, refused = follow(cluster, "bench-session", clean=False, expiry=3600, timeout=60)
                dt = time.monotonic() - t0
                assert c.session_present
                c.close()
                times.append(dt)
                print(f"round {i + 1}: node {leader.id} killed -> served by node {node.id} in "
                      f"{dt:.3f} s ({refused} refusals on the way)", flush=True)
                leader.start()
                leader.wait_listening()
                time.sleep(1.0)  # let it catch up before the next kill
        finally:
            cluster.close()
    print(f"failover (kill -9 -> served): median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f}, max {max(times):.3f}, n={len(times)}, workers={args.workers}, "
          f"election_ticks={args.election_ticks} x 10 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
