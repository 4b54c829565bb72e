"""Every knob of one simulation run, drawn from the seed ("swarm testing").

One seed decides everything: cluster size (unless fixed on the command line),
fault rates, delays, clock skew, the Raft flow-control limits. Different seeds
thus explore different corners (a seed with no loss and long partitions, one
with heavy duplication and tiny messages, ...). All knobs are printed first so
a failure report is self-contained.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass


@dataclass(slots=True, frozen=True)
class Options:
    seed: int
    nodes: int
    """Initial voters (ids 1..nodes); ids above are spares that may be added."""
    steps: int
    """Length of the fault phase in time units (a node ticks about every 10)."""
    liveness_budget: int
    """Time units the healed cluster has to elect a leader and converge."""
    # network (units: time steps)
    loss: float
    duplicate: float
    delay_min: int
    delay_max: int
    partition_rate: float
    """Probability per step that a partition starts (when none is active)."""
    partition_len_max: int
    # disk
    disk_delay_max: int
    """A Ready takes 0..disk_delay_max steps to persist; a crash loses it."""
    leader_early_send: bool
    """Send a leader's APP/HEARTBEAT/SNAP when the Ready is taken, before its
    own write completes (thesis §10.2.1), as the raft process does."""
    # nodes
    crash_rate: float
    leader_crash_rate: float
    """Probability per step that the current leader crashes (the hard case)."""
    new_leader_crash: float
    """Probability that a newly elected leader crashes within a few message
    delays, before it replicated much (Figure 8-style histories)."""
    restart_delay_max: int
    tick_min: int
    tick_max: int
    """Each node ticks every tick_len steps, tick_len in [tick_min, tick_max] (clock skew)."""
    # operations
    conf_change_rate: float
    transfer_rate: float
    snapshot_rate: float
    client_count: int
    client_rate: float
    """Probability per step that an idle client starts an operation."""
    client_timeout: int
    keys: int
    read_index_ratio: float
    """Fraction of gets served through ReadIndex (the rest go through the log)."""
    # raft
    election_tick: int
    max_size_per_msg: int
    max_inflight_msgs: int

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def swarm(seed: int, nodes: int | None = None, steps: int | None = None) -> Options:
    rng = random.Random(seed ^ 0x5EED_0F_0F7)
    return Options(
        seed=seed,
        nodes=nodes if nodes is not None else rng.choice((3, 3, 5)),
        steps=steps if steps is not None else 4000,
        liveness_budget=4000,
        loss=rng.choice((0.0, 0.01, 0.05, 0.1, 0.2)),
        duplicate=rng.choice((0.0, 0.01, 0.05)),
        delay_min=1,
        delay_max=rng.choice((2, 5, 15, 30)),
        partition_rate=rng.choice((0.0, 0.001, 0.003)),
        partition_len_max=rng.choice((100, 300, 800)),
        disk_delay_max=rng.choice((0, 2, 6)),
        leader_early_send=rng.random() < 0.5,
        crash_rate=rng.choice((0.0, 0.0005, 0.002)),
        leader_crash_rate=rng.choice((0.0, 0.0, 0.001, 0.003)),
        new_leader_crash=rng.choice((0.0, 0.0, 0.1, 0.3)),
        restart_delay_max=rng.choice((50, 300, 1000)),
        tick_min=rng.choice((8, 10)),
        tick_max=rng.choice((10, 12, 14)),
        conf_change_rate=rng.choice((0.0, 0.002, 0.005)),
        transfer_rate=rng.choice((0.0, 0.001, 0.003)),
        snapshot_rate=rng.choice((0.0, 0.002, 0.01)),
        client_count=rng.choice((2, 3, 4)),
        client_rate=rng.choice((0.05, 0.2)),
        client_timeout=rng.choice((200, 500)),
        keys=rng.choice((1, 2, 3)),
        read_index_ratio=rng.choice((0.0, 0.5, 1.0)),
        election_tick=10,
        max_size_per_msg=rng.choice((1, 64, 512, 1 << 20)),
        max_inflight_msgs=rng.choice((1, 4, 64)),
    )
