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


# -- the hold: a candidate with PUBACKs still owed is held, then moved ----------


class _Transport:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0


def _held_setup():
    from raftmq.broker.protocol import CONNECTED

    waiting: list = []  # after_commit actions: run when the test says "committed"
    soon: list = []
    session = SimpleNamespace(subscriptions={}, inflight={}, queue=[], qos2_in=set(), unwritten=0,
                              durable=False, expiry_interval=0)
    conn = SimpleNamespace(state=CONNECTED, online=True, paused=False, transport=_Transport(),
                           out=[], dirty=False, qos1_in_pending=3, session=session,
                           parser=SimpleNamespace(buffered=0, error=None))
    session.conn = conn
    timers: list = []
    broker = SimpleNamespace(sessions={"pub": session}, _stopping=False, debug=False,
                             after_commit=waiting.append, _flush=lambda: None,
                             loop=SimpleNamespace(
                                 call_soon=lambda f, *a: soon.append((f, a)),
                                 call_later=lambda d, f, *a: timers.append((f, a))
                                 or SimpleNamespace(cancel=lambda: None)))
    mesh = SimpleNamespace(index=0, colocate=None, load_per_worker=lambda: {0: 400, 1: 200},
                           connected_per_worker=lambda: {0: 10, 1: 10})
    c = co.Colocate(broker, mesh, SimpleNamespace(on_moved=None))  # type: ignore[arg-type]
    moves: list = []
    c.move = lambda conn, dest: moves.append((conn, dest)) or True  # type: ignore[method-assign]
    c.timers = timers  # type: ignore[attr-defined]
    return c, conn, waiting, soon, moves


def test_a_publisher_owed_pubacks_is_held_then_moved_once_they_are_written() -> None:
    c, conn, waiting, soon, moves = _held_setup()
    c._hold([("pub", 1)], 100.0)
    assert not conn.transport.reading and moves == []  # held, not moved while owed
    conn.qos1_in_pending = 0  # the commit came: its PUBACKs were written ...
    waiting.pop()()  # ... and after them the hold's own action
    f, args = soon.pop()
    f(*args)
    assert moves == [(conn, 1)]


def test_a_held_publisher_still_owed_reads_on() -> None:
    c, conn, waiting, soon, moves = _held_setup()
    c._hold([("pub", 1)], 100.0)
    waiting.pop()()
    f, args = soon.pop()
    f(*args)  # still 3 PUBACKs owed (a later commit): it stays, reading again
    assert moves == [] and conn.transport.reading


def test_a_hold_that_waits_too_long_is_given_up() -> None:
    """The commit does not come within HOLD_MAX (the raft process restarting):
    the candidate reads on and stays; the late commit then moves nothing."""
    c, conn, waiting, soon, moves = _held_setup()
    c._hold([("pub", 1)], 100.0)
    (f, args), = c.timers  # type: ignore[attr-defined]
    f(*args)
    assert conn.transport.reading and c._pending_round is None
    conn.qos1_in_pending = 0
    waiting.pop()()
    assert soon == [] and moves == []
