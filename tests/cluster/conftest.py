"""Fixtures for the real-process cluster tests (see raft_harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from raft_harness import RaftCluster


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., RaftCluster]]:
    made: list[RaftCluster] = []

    def make(n: int = 3, **config: object) -> RaftCluster:
        cluster = RaftCluster(tmp_path, n, **config)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.close()
