"""Fixtures of the cross-worker tests: raftmq nodes with 2 and 4 workers.

``node2`` / ``node4`` are shared by the tests of a module (they use unique
topics and client ids); a test after which the node is no longer running gets
an error, and the next test a fresh node.  Tests that kill or stop a node make
their own with ``raftmq_factory``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.brokers import BrokerProcess


@pytest.fixture(scope="module")
def _nodes() -> Iterator[dict[int, BrokerProcess]]:
    running: dict[int, BrokerProcess] = {}
    yield running
    for b in running.values():
        b.stop()


def _shared_node(workers: int, nodes: dict[int, BrokerProcess],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    b = nodes.get(workers)
    if b is None or not b.alive():
        b = BrokerProcess("raftmq", tmp_path_factory.mktemp(f"node{workers}w"),
                          {"workers": workers}).start()
        nodes[workers] = b
    yield b
    if not b.alive():
        del nodes[workers]
        b.stop()
        pytest.fail(f"the {workers}-worker node exited during this test "
                    f"(status {b.proc.returncode}):\n{b.log_tail()}")


@pytest.fixture
def node2(_nodes: dict[int, BrokerProcess],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    yield from _shared_node(2, _nodes, tmp_path_factory)


@pytest.fixture
def node4(_nodes: dict[int, BrokerProcess],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    yield from _shared_node(4, _nodes, tmp_path_factory)
