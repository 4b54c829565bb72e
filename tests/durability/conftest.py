"""Fixtures for the crash tests of a standalone node (see durable_node.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from durable_node import DurableNode


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., DurableNode]]:
    made: list[DurableNode] = []

    def make(**kwargs: object) -> DurableNode:
        node = DurableNode(tmp_path, **kwargs)
        made.append(node)
        node.start()
        return node

    yield make
    for node in made:
        node.close()
