"""Fixtures for the ``mode = "ha"`` tests: real 3-node clusters of ``raftmq serve``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ha_harness import HaCluster  # noqa: E402


@pytest.fixture
def ha_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., HaCluster]]:
    made: list[HaCluster] = []

    def make(n: int = 3, **kw: object) -> HaCluster:
        cluster = HaCluster(tmp_path, n, **kw)  # type: ignore[arg-type]
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None)
    for cluster in made:
        cluster.close()
        if failed is not None and failed.failed:
            print(cluster.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
