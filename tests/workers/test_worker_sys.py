"""$SYS counters of a multi-worker node are node totals, whichever worker publishes them."""

from __future__ import annotations

import time

import pytest
from nodeprobe import assert_placed, owned_id

from support.helpers import Paho, connected
from support.mqttraw import RawClient

pytestmark = [pytest.mark.waits, pytest.mark.timeout(60)]

CONNECTED = "$SYS/broker/clients/connected"


def _wait_value(watchers: dict[int, RawClient], topic: str, want: bytes,
                timeout: float = 8.0) -> dict[int, list[bytes]]:
    """Values of ``topic`` seen by each watcher until every one has seen ``want``
    last (or ``timeout``)."""
    seen: dict[int, list[bytes]] = {w: [] for w in watchers}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w, c in watchers.items():
            for p in c.collect(0.2):
                if p.topic == topic:
                    seen[w].append(p.payload)
        if all(v and v[-1] == want for v in seen.values()):
            break
    return seen


def test_clients_connected_counts_every_worker(raftmq_factory):
    node = raftmq_factory(workers=2, sys_interval=1)
    watchers = {}
    for w in (0, 1):
        cid = owned_id(w, 2, "sysw")
        watchers[w] = connected(node, cid)
        assert_placed(node, cid, w)
        watchers[w].subscribe(1, [(CONNECTED, 0)])
    clients = []
    try:
        for w, count in ((0, 3), (1, 2)):
            for _ in range(count):
                cid = owned_id(w, 2, "sysc")
                clients.append(Paho(node, cid, 4))
                assert_placed(node, cid, w)
        # 2 watchers + 5 clients; a worker counting only its own would say 4 or 3.
        seen = _wait_value(watchers, CONNECTED, b"7")
        assert all(v and v[-1] == b"7" for v in seen.values()), seen
        for c in clients[3:]:  # the two on worker 1 leave
            c.close()
        seen = _wait_value(watchers, CONNECTED, b"5")
        assert all(v and v[-1] == b"5" for v in seen.values()), seen
    finally:
        for c in clients:
            c.close()
        for c in watchers.values():
            c.close()
