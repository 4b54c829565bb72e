"""Fixtures for the ``mode = "dynsec-sync"`` tests: real 3-node clusters of ``raftmq serve``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ha"))

from dsync_harness import DsyncCluster  # noqa: E402


@pytest.fixture
def dsync_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., DsyncCluster]]:
    made: list[DsyncCluster] = []

    def make(n: int = 3, **kw: object) -> DsyncCluster:
        cluster = DsyncCluster(tmp_path, n, **kw)  # type: ignore[arg-type]
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
