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

from ha_harness import HOST, HaCluster  # noqa: E402
from test_ha import follow  # noqa: E402

from support.mqttraw import Closed, RawClient  # noqa: E402


def raw_follow(cluster: HaCluster, client_id: str, killed: int, timeout: float = 60.0
               ) -> tuple[float, int, int]:
    """Reconnect a persistent MQTT 5 session with a raw client (no client-side
    threads or back-off in the figure): follow the Server Reference, else try the
    next node every 20 ms; never the node just killed (its children outlive
    the supervisor by a few milliseconds: PR_SET_PDEATHSIG is asynchronous).
    (seconds, serving node id, refusals on the way)."""
    t0 = time.monotonic()
    nodes = [n for n in cluster.nodes.values() if n.id != killed]
    address, i, refused = nodes[0].address, 0, 0
    while time.monotonic() - t0 < timeout:
        host, port = address.rsplit(":", 1)
        if cluster.by_address(address).id == killed:
            time.sleep(0.02)
            address = nodes[i % len(nodes)].address
            i += 1
            continue
        try:
            c = RawClient(HOST, int(port), 5, timeout=2)
            ack = c.connect(client_id, clean=False, props={"session_expiry_interval": 3600})
            c.close()
        except (OSError, Closed, TimeoutError):
            ack = None
        if ack is not None and ack.reason == 0:
            assert ack.session_present
            return time.monotonic() - t0, cluster.by_address(address).id, refused
        if ack is not None:
            refused += 1
            ref = ack.props.get("server_reference")
            if ack.reason == 0x9C and ref:
                address = ref
                continue
        time.sleep(0.02)
        i += 1
        address = nodes[i % len(nodes)].address
    raise AssertionError("no node served the session")


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
                if leader.health_leader() != 200:
                    # On a loaded machine a late heartbeat can start an election
                    # between two rounds: then the node killed would not be the
                    # one serving, and the figure would be meaningless.
                    print(f"round {i + 1}: leadership moved before the kill; again", flush=True)
                    continue
                leader.proc.kill()  # SIGKILL of the supervisor: its children die with it
                dt, node_id, refused = raw_follow(cluster, "bench-session", leader.id)
                moved = [n.id for n in cluster.nodes.values() if n.id not in (leader.id, node_id)
                         and n.health_leader() == 200]
                leader.kill9()  # reaps it
                print(f"round {i + 1}: node {leader.id} killed -> served by node {node_id} in "
                      f"{dt:.3f} s ({refused} refusals on the way)", flush=True)
                if moved:
                    print("  (not counted: the service had moved meanwhile)")
                else:
                    times.append(dt)
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
