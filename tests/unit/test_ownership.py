"""raftmq.workers.ownership: which worker owns a client id."""

from __future__ import annotations

import collections

from raftmq.workers.ownership import assign_client_id, owner_of


def test_one_worker_owns_everything() -> None:
    assert {owner_of(f"c{i}", 1) for i in range(100)} == {0}


def test_stable_across_processes() -> None:
    """The same id maps to the same worker in every process and release (not hash())."""
    assert [owner_of(c, 4) for c in ("sensor-1", "sensor-2", "", "\u00e9t\u00e9")] == \
        [owner_of(c, 4) for c in ("sensor-1", "sensor-2", "", "\u00e9t\u00e9")]
    assert [owner_of(f"client-{i}", 2) for i in range(8)] == [1, 0, 1, 1, 0, 0, 1, 0]


def test_sequential_ids_spread_evenly() -> None:
    """Ids that differ in one character (client-1, client-2, ...) must not pile up
    on one worker (plain CRC-32 modulo a power of two would)."""
    for workers in (2, 3, 4, 8):
        counts = collections.Counter(owner_of(f"client-{i}", workers) for i in range(4000))
        assert set(counts) == set(range(workers))
        assert max(counts.values()) < 1.2 * 4000 / workers


def test_assigned_ids_belong_to_the_asking_worker() -> None:
    for workers in (2, 4):
        for worker in range(workers):
            client_id = assign_client_id(worker, workers)
            assert client_id.startswith("auto-") and owner_of(client_id, workers) == worker
