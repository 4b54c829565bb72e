"""Session expiry and will delay keep counting across a kill -9 of a durable node.

MQTT 5 §3.1.2.11.2: a session expires Session Expiry Interval seconds after its
network connection closed; §3.1.3.2.2: the will is published Will Delay Interval
seconds after that, or when the session ends if that is earlier.  A restart of
the broker does not move those instants: the disconnect time is recorded
durably (state entry SessionOffline, wall clock of the proposer) and the clocks
resume from it.  A session whose client was connected when the node died has no
disconnect time: the restart counts as its disconnect (README "Session expiry
across restarts"), recorded at once, so that a second crash does not restart
its clocks again.

The node is the real thing (durable_node.py: supervisor, raft process, LMDB,
durability = "sync"); the clients are paho-mqtt.  Each check is timed so that
the pre-fix behaviour (clocks restarting from the full interval at the restart)
fails it: the instants tested are at least 2 s away from where that would put
them.
"""

from __future__ import annotations

import time

import pytest

from raftmq.state import tables as T
from raftmq.state.entries import SessionExpiry, SessionOffline, SessionPut, encode_ops
from raftmq.state.machine import StateMachine
from support.sessionclients import Mq, session_present, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.waits]


def test_offline_session_expires_at_disconnect_plus_interval_across_kill9(node_factory) -> None:
    node = node_factory()
    short = Mq(node, "clk-short", expiry=7)
    short.subscribe("clk/a")
    short.disconnect()
    t0 = time.monotonic()
    keep = Mq(node, "clk-keep", expiry=300)
    keep.subscribe("clk/a")
    keep.disconnect()
    until(t0 + 2.5)
    node.kill9()
    node.start()
    # Expires at t0 + 7; counted from the restart (>= t0 + 2.5) it would live
    # until t0 + 9.5 or later.
    until(t0 + 8.0)
    assert not session_present(node, "clk-short"), "expiry restarted at the restart"
    assert session_present(node, "clk-keep")


def test_session_expired_while_the_node_was_down_ends_at_restart_with_its_will(node_factory) -> None:
    node = node_factory()
    watcher = Mq(node, "clk-watch", expiry=300)
    watcher.subscribe("clk/will/+")
    watcher.disconnect()  # its persistent session queues the will while it is away
    dying = Mq(node, "clk-dying", expiry=4, will=("clk/will/dying", b"gone", 100))
    dying.disconnect(with_will=True)  # will pending: published when the session ends
    t0 = time.monotonic()
    time.sleep(0.5)  # the broker has handled the DISCONNECT
    node.kill9()
    until(t0 + 5.0)  # down past the session's end
    node.start()
    restarted = time.monotonic()
    watcher = Mq(node, "clk-watch", clean=False, expiry=300)
    _at, topic, payload = watcher.messages.get(timeout=10)
    # Before the fix: published 4 s after the restart, when the session expired again.
    assert (topic, payload) == ("clk/will/dying", b"gone")
    assert _at - restarted < 3.0, f"will published {_at - restarted:.1f} s after the restart"
    assert not session_present(node, "clk-dying")
    watcher.disconnect()


def test_will_delay_counts_from_disconnect_across_kill9(node_factory) -> None:
    node = node_factory()
    watcher = Mq(node, "clk-watch2", expiry=300)
    watcher.subscribe("clk/will2/+")
    dying = Mq(node, "clk-dying2", expiry=300, will=("clk/will2/dying", b"late", 9))
    dying.disconnect(with_will=True)
    t0 = time.monotonic()
    until(t0 + 2.0)
    node.kill9()
    watcher.abandon()
    node.start()
    restarted = time.monotonic()
    assert restarted < t0 + 8.0, "the node took too long to restart for this test"
    watcher = Mq(node, "clk-watch2", clean=False, expiry=300)
    at, topic, payload = watcher.messages.get(timeout=15)
    assert (topic, payload) == ("clk/will2/dying", b"late")
    # Due at t0 + 9 (upkeep tick 0.5 s); from the restart it would be >= t0 + 11.
    assert t0 + 8.5 <= at <= t0 + 10.4, f"will at t0 + {at - t0:.1f} s"
    watcher.disconnect()


def test_session_connected_at_the_crash_counts_from_the_first_restart(node_factory) -> None:
    """The rule for a session whose client was connected when the node died: the
    restart counts as its disconnect, once -- a second crash soon after does not
    give it a fresh interval again."""
    node = node_factory()
    online = Mq(node, "clk-online", expiry=8)
    online.subscribe("clk/b")
    node.kill9()
    online.abandon()
    node.start()
    r1 = time.monotonic()
    until(r1 + 2.5)
    node.kill9()
    node.start()
    r2 = time.monotonic()
    # Expires at r1 + 8; counted from the second restart it would live to r2 + 8 >= r1 + 10.5.
    until(max(r1 + 9.0, r2 + 0.5))
    assert not session_present(node, "clk-online"), "the second restart restarted the clock"


def test_online_session_is_not_expired_by_the_crash_itself(node_factory) -> None:
    node = node_factory()
    online = Mq(node, "clk-online2", expiry=6)
    online.subscribe("clk/c")
    node.kill9()
    online.abandon()
    until(time.monotonic() + 1.0)
    node.start()
    r1 = time.monotonic()
    until(r1 + 3.0)  # within its interval counted from the restart
    assert session_present(node, "clk-online2")


def test_persistent_client_expiration_counts_from_disconnect_across_kill9(node_factory) -> None:
    """``persistent_client_expiration`` (MQTT 3.1.1 sessions, Mosquitto's option;
    raftmq also takes plain seconds) counts from the disconnect too."""
    node = node_factory(extra='persistent_client_expiration = 9')
    old = Mq(node, "clk-v4-old", version=4, clean=False)
    old.subscribe("clk/d")
    old.disconnect()
    t0 = time.monotonic()
    until(t0 + 4.0)
    recent = Mq(node, "clk-v4-recent", version=4, clean=False)
    recent.subscribe("clk/d")
    recent.disconnect()
    t1 = time.monotonic()
    node.kill9()
    node.start()
    until(t0 + 9.8)  # old: gone at t0 + 9 (from the restart: >= t0 + 13); recent: until t1 + 9
    assert not session_present(node, "clk-v4-old", version=4)
    assert time.monotonic() < t1 + 8.5, "too slow to tell the sessions apart"
    assert session_present(node, "clk-v4-recent", version=4)


# -- the state entry itself ------------------------------------------------------------


class _Entry:
    def __init__(self, index: int, ops: list) -> None:
        self.index, self.term, self.kind, self.data = index, 1, 0, encode_ops(ops)


def test_session_offline_entry_is_kept_by_expiry_changes_and_cleared_by_reconnect(tmp_path) -> None:
    machine = StateMachine(T.open_environment(str(tmp_path / "db")))
    machine.apply([_Entry(1, [SessionPut("a", 5, 60, True, None)])])
    assert machine.load().sessions["a"].disconnected_at == 0
    machine.apply([_Entry(2, [SessionOffline("a", 1_700_000_000_123),
                              SessionOffline("nobody", 5)])])
    rec = machine.load().sessions["a"]
    assert (rec.expiry_interval, rec.disconnected_at) == (60, 1_700_000_000_123)
    assert "nobody" not in machine.load().sessions
    machine.apply([_Entry(3, [SessionExpiry("a", 30)])])
    rec = machine.load().sessions["a"]
    assert (rec.expiry_interval, rec.disconnected_at) == (30, 1_700_000_000_123)
    machine.apply([_Entry(4, [SessionPut("a", 5, 30, False, None)])])  # it connected again
    assert machine.load().sessions["a"].disconnected_at == 0
