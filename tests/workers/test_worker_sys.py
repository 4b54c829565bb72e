"""$SYS counters of a multi-worker node are node totals, whichever worker publishes them."""

from __future__ import annotations

import time

import pytest
from nodeprobe import assert_placed, owned_id

from support.helpers import Paho, connected
from support.mqttraw import PUBLISH, SUBACK, RawClient, subscribe

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


def _latest(watcher: RawClient, topics: set[str], want: dict[str, bytes],
            timeout: float = 8.0) -> dict[str, bytes]:
    """The latest value of each of ``topics`` until they equal ``want`` (or timeout)."""
    values: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in watcher.collect(0.3):
            if p.topic in topics:
                values[p.topic] = p.payload
        if all(values.get(t) == v for t, v in want.items()):
            break
    return values


def test_subscription_publish_session_and_retained_totals(raftmq_factory):
    node = raftmq_factory(workers=2, sys_interval=1)
    base = "xw/systotals"
    want = {
        # 4 subscriptions of the watcher + 2 on worker 0 + 3 on worker 1
        "$SYS/broker/subscriptions/count": b"9",
        # 4 PUBLISH from worker 0's client, 6 from worker 1's
        "$SYS/broker/publish/messages/received": b"10",
        # one offline persistent session owned by each worker
        "$SYS/broker/clients/disconnected": b"2",
    }
    retained = "$SYS/broker/retained messages/count"
    # The $SYS topics are retained messages too, all of them once the first
    # intervals have passed: the count before ours.
    time.sleep(2.5)
    watcher = connected(node, owned_id(1, 2, "systot"))
    # A live $SYS PUBLISH may overtake the SUBACK (its subscription is in the
    # trie before the sibling worker has acknowledged it): keep what comes first.
    watcher.send(subscribe(1, [(t, 0) for t in (*want, retained)]))
    early = []
    while (p := watcher.recv(3.0)).type != SUBACK:
        assert p.type == PUBLISH, p
        early.append(p)
    try:
        seen = [p.payload for p in early + watcher.collect(1.5) if p.topic == retained]
        before = int(seen[-1])
        # Every worker keeps every retained message: 3 more, not 6.
        want[retained] = b"%d" % (before + 3)
        for w, subs in ((0, 2), (1, 3)):
            with connected(node, owned_id(w, 2, "sysoff"), clean=False) as c:
                c.subscribe(1, [(f"{base}/{w}/{i}", 1) for i in range(subs)])
                c.disconnect()
        for w, count in ((0, 4), (1, 6)):
            with connected(node, owned_id(w, 2, "syspub")) as c:
                for i in range(count):
                    c.publish(f"{base}/p/{w}/{i}", b"x", 0, retain=(w == 0 and i < 3))
                c.no_publish_pending(0)
        got = _latest(watcher, set(want), want)
        assert got == want
    finally:
        watcher.close()
