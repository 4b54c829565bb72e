"""Fixtures for the ``mode = "dynsec-sync"`` tests: real 3-node clusters of ``raftmq serve``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ha"))

from dsync_harness import DsyncCluster  # noqa: E402
from ha_harness import cluster_factory, pytest_runtest_makereport  # noqa: E402, F401


@pytest.fixture
def dsync_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., DsyncCluster]]:
    yield from cluster_factory(DsyncCluster, tmp_path, request)
