"""Co-location's load rule (raftmq.workers.colocate.Colocate._balanced): a
publisher moves to the worker of its subscriber while that worker has room,
by CPU, and not onto a worker that would become the busy one."""

from __future__ import annotations

from types import SimpleNamespace

from raftmq.workers import colocate as co


def _colocate() -> co.Colocate:
    mesh = SimpleNamespace(index=0, colocate=None)
    handoff = SimpleNamespace(on_moved=None)
    return co.Colocate(SimpleNamespace(), mesh, handoff)  # type: ignore[arg-type]


def test_moves_while_the_target_has_room() -> None:
    c = _colocate()
    # we use 60 % of a core over 10 connections (6 % each); the target 30 %
    assert c._balanced({0: 600, 1: 300}, {0: 10, 1: 10}, 1) == 60
    # a busy target that stays no busier than us after the move: still fine
    assert c._balanced({0: 900, 1: 750}, {0: 10, 1: 10}, 1) == 90


def test_refuses_a_target_that_would_become_the_busy_one() -> None:
    c = _colocate()
    assert c._balanced({0: 300, 1: 680}, {0: 10, 1: 10}, 1) is None  # 710 >= BUSY, > 270 + MARGIN
    # hysteresis: refused until below RELEASE (or no busier than us) ...
    assert c._balanced({0: 300, 1: 600}, {0: 10, 1: 10}, 1) is None
    assert c._balanced({0: 300, 1: 500}, {0: 10, 1: 10}, 1) == 30
    # ... and a refused target that became the idler one is asked again
    c._balanced({0: 300, 1: 680}, {0: 10, 1: 10}, 1)
    assert c._balanced({0: 700, 1: 650}, {0: 10, 1: 10}, 1) == 70


def test_connection_cap_whatever_the_load() -> None:
    c = _colocate()
    # idle workers: locality wins, up to CAP_RATIO x ours + CAP_SLACK connections there
    assert c._balanced({0: 0, 1: 0}, {0: 5, 1: 19}, 1) == 0  # 20 <= 4 * 3 + 8
    assert c._balanced({0: 0, 1: 0}, {0: 5, 1: 20}, 1) is None
