"""Fixtures for the ``mode = "ha"`` tests: real 3-node clusters of ``raftmq serve``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ha_harness import (  # noqa: E402, F401
    HaCluster,
    cluster_factory,
    pytest_runtest_makereport,
)


@pytest.fixture
def ha_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., HaCluster]]:
    yield from cluster_factory(HaCluster, tmp_path, request)
