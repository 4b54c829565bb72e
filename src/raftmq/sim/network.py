"""A simulated packet network between Raft nodes.

Fault model (all decided by the network's own seeded RNG):
* each message is lost with probability ``loss``, duplicated with
  probability ``duplicate`` (the copy gets its own delay);
* each copy is delayed uniformly in [delay_min, delay_max] steps, so messages
  are reordered whenever their delays differ;
* partitions block directed links: ``isolate`` (one node cut off both ways),
  ``split`` (two random halves), ``asymmetric`` (random one-way links: a can
  reach b but not b->a). A blocked link drops what is *delivered* while it
  is blocked, as a clogged route would.
Messages to nodes that are down are dropped at delivery.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

from raftmq.raft.types import Message


class Network:
    def __init__(self, rng: random.Random, loss: float, duplicate: float,
                 delay_min: int, delay_max: int) -> None:
        self.rng = rng
        self.loss = loss
        self.duplicate = duplicate
        self.delay_min = delay_min
        self.delay_max = delay_max
        self._queue: list[tuple[int, int, Message]] = []
        self._seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.partition_desc = ""
        self.sent = self.dropped = self.delivered = 0

    def send(self, now: int, m: Message) -> bool:
        """Queue ``m``; False if it was lost on the way."""
        self.sent += 1
        if self.rng.random() < self.loss:
            self.dropped += 1
            return False
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            at = now + self.rng.randint(self.delay_min, self.delay_max)
            self._seq += 1
            heapq.heappush(self._queue, (at, self._seq, m))
        return True

    def deliver_due(self, now: int, deliver: Callable[[Message], bool]) -> list[Message]:
        """Deliver every message due at ``now``; ``deliver`` returns False if
        the destination is down. Returns the messages dropped (blocked/down)."""
        dropped = []
        q = self._queue
        while q and q[0][0] <= now:
            _, _, m = heapq.heappop(q)
            if (m.src, m.dst) in self.blocked or not deliver(m):
                self.dropped += 1
                dropped.append(m)
            else:
                self.delivered += 1
        return dropped

    # -- partitions -----------------------------------------------------------------

    def partition(self, ids: list[int]) -> None:
        rng = self.rng
        mode = rng.choice(("isolate", "split", "asymmetric"))
        blocked: set[tuple[int, int]] = set()
        if mode == "isolate":
            x = rng.choice(ids)
            for y in ids:
                if y != x:
                    blocked.add((x, y))
                    blocked.add((y, x))
            desc = f"isolate {x}"
        elif mode == "split":
            shuffled = list(ids)
            rng.shuffle(shuffled)
            k = rng.randint(1, len(ids) - 1)
            a, b = sorted(shuffled[:k]), sorted(shuffled[k:])
            for x in a:
                for y in b:
                    blocked.add((x, y))
                    blocked.add((y, x))
            desc = f"split {a} | {b}"
        else:
            for x in ids:
                for y in ids:
                    if x != y and rng.random() < 0.3:
                        blocked.add((x, y))
            desc = "asymmetric " + " ".join(f"{x}-x->{y}" for x, y in sorted(blocked))
        self.blocked = blocked
        self.partition_desc = desc

    def heal(self) -> None:
        self.blocked = set()
        self.partition_desc = ""
