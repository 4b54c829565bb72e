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

import queue
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from durable_node import DurableNode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from raftmq.state import tables as T
from raftmq.state.entries import SessionExpiry, SessionOffline, SessionPut, encode_ops
from raftmq.state.machine import StateMachine

pytestmark = [pytest.mark.timeout(120), pytest.mark.waits]


class Mq:
    """A paho-mqtt client (5.0 or 3.1.1) with bounded waits."""

    def __init__(self, port: int, client_id: str, *, version: int = 5, clean: bool = True,
                 expiry: int | None = None, will: tuple[str, bytes, int] | None = None) -> None:
        if version == 5:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv311, clean_session=clean)
        self.messages: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        acks: queue.Queue[bool] = queue.Queue()
        self.subacks: queue.Queue[object] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, p: acks.put(flags.session_present)
        self.client.on_message = lambda c, u, m: self.messages.put(
            (time.monotonic(), m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        if will is not None:
            topic, payload, delay = will
            wprops = Properties(PacketTypes.WILLMESSAGE)
            wprops.WillDelayInterval = delay
            self.client.will_set(topic, payload, 1, False, wprops)
        kw: dict = {}
        if version == 5:
            props = Properties(PacketTypes.CONNECT)
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            kw = {"clean_start": clean, "properties": props}
        self.client.connect("127.0.0.1", port, 60, **kw)
        self.client.loop_start()
        self.present = acks.get(timeout=10)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos)
        self.subacks.get(timeout=10)

    def disconnect(self, with_will: bool = False) -> None:
        if with_will:  # DISCONNECT 0x04: the session goes offline, its will stays pending
            self.client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        else:
            self.client.disconnect()
        self.client.loop_stop()

    def abandon(self) -> None:
        """The node died under it: stop the network loop (no reconnects)."""
        self.client.loop_stop()


def session_present(port: int, client_id: str, version: int = 5) -> bool:
    """Connect without clean start, read Session Present, leave with a DISCONNECT
    that keeps the session as long as before (the check restarts its clock)."""
    c = Mq(port, client_id, version=version, clean=False, expiry=300)
    c.disconnect()
    return c.present


def until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def _node(root: Path, extra: str = "") -> DurableNode:
    root.mkdir(parents=True, exist_ok=True)
    node = DurableNode(root)
    if extra:  # top-level keys go before the [[listener]] table
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace("[[listener]]", extra + "\n[[listener]]", 1))
    return node


@pytest.fixture
def make_node(tmp_path: Path):
    made: list[DurableNode] = []

    def make(extra: str = "") -> DurableNode:
        node = _node(tmp_path / f"n{len(made)}", extra)
        made.append(node)
        node.start()
        return node

    yield make
    for node in made:
        node.close()


def test_offline_session_expires_at_disconnect_plus_interval_across_kill9(make_node) -> None:
    node = make_node()
    short = Mq(node.port, "clk-short", expiry=7)
    short.subscribe("clk/a")
    short.disconnect()
    t0 = time.monotonic()
    keep = Mq(node.port, "clk-keep", expiry=300)
    keep.subscribe("clk/a")
    keep.disconnect()
    until(t0 + 2.5)
    node.kill9()
    node.start()
    # Expires at t0 + 7; counted from the restart (>= t0 + 2.5) it would live
    # until t0 + 9.5 or later.
    until(t0 + 8.0)
    assert not session_present(node.port, "clk-short"), "expiry restarted at the restart"
    assert session_present(node.port, "clk-keep")


def test_session_expired_while_the_node_was_down_ends_at_restart_with_its_will(make_node) -> None:
    node = make_node()
    watcher = Mq(node.port, "clk-watch", expiry=300)
    watcher.subscribe("clk/will/+")
    watcher.disconnect()  # its persistent session queues the will while it is away
    dying = Mq(node.port, "clk-dying", expiry=4, will=("clk/will/dying", b"gone", 100))
    dying.disconnect(with_will=True)  # will pending: published when the session ends
    t0 = time.monotonic()
    time.sleep(0.5)  # the broker has handled the DISCONNECT
    node.kill9()
    until(t0 + 5.0)  # down past the session's end
    node.start()
    restarted = time.monotonic()
    watcher = Mq(node.port, "clk-watch", clean=False, expiry=300)
    _at, topic, payload = watcher.messages.get(timeout=10)
    # Before the fix: published 4 s after the restart, when the session expired again.
    assert (topic, payload) == ("clk/will/dying", b"gone")
    assert _at - restarted < 3.0, f"will published {_at - restarted:.1f} s after the restart"
    assert not session_present(node.port, "clk-dying")
    watcher.disconnect()


def test_will_delay_counts_from_disconnect_across_kill9(make_node) -> None:
    node = make_node()
    watcher = Mq(node.port, "clk-watch2", expiry=300)
    watcher.subscribe("clk/will2/+")
    dying = Mq(node.port, "clk-dying2", expiry=300, will=("clk/will2/dying", b"late", 9))
    dying.disconnect(with_will=True)
    t0 = time.monotonic()
    until(t0 + 2.0)
    node.kill9()
    watcher.abandon()
    node.start()
    restarted = time.monotonic()
    assert restarted < t0 + 8.0, "the node took too long to restart for this test"
    watcher = Mq(node.port, "clk-watch2", clean=False, expiry=300)
    at, topic, payload = watcher.messages.get(timeout=15)
    assert (topic, payload) == ("clk/will2/dying", b"late")
    # Due at t0 + 9 (upkeep tick 0.5 s); from the restart it would be >= t0 + 11.
    assert t0 + 8.5 <= at <= t0 + 10.4, f"will at t0 + {at - t0:.1f} s"
    watcher.disconnect()


def test_session_connected_at_the_crash_counts_from_the_first_restart(make_node) -> None:
    """The rule for a session whose client was connected when the node died: the
    restart counts as its disconnect, once -- a second crash soon after does not
    give it a fresh interval again."""
    node = make_node()
    online = Mq(node.port, "clk-online", expiry=8)
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
    assert not session_present(node.port, "clk-online"), "the second restart restarted the clock"


def test_online_session_is_not_expired_by_the_crash_itself(make_node) -> None:
    node = make_node()
    online = Mq(node.port, "clk-online2", expiry=6)
    online.subscribe("clk/c")
    node.kill9()
    online.abandon()
    until(time.monotonic() + 1.0)
    node.start()
    r1 = time.monotonic()
    until(r1 + 3.0)  # within its interval counted from the restart
    assert session_present(node.port, "clk-online2")


def test_persistent_client_expiration_counts_from_disconnect_across_kill9(make_node) -> None:
    """``persistent_client_expiration`` (MQTT 3.1.1 sessions, Mosquitto's option;
    raftmq also takes plain seconds) counts from the disconnect too."""
    node = make_node('persistent_client_expiration = 9')
    old = Mq(node.port, "clk-v4-old", version=4, clean=False)
    old.subscribe("clk/d")
    old.disconnect()
    t0 = time.monotonic()
    until(t0 + 4.0)
    recent = Mq(node.port, "clk-v4-recent", version=4, clean=False)
    recent.subscribe("clk/d")
    recent.disconnect()
    t1 = time.monotonic()
    node.kill9()
    node.start()
    until(t0 + 9.8)  # old: gone at t0 + 9 (from the restart: >= t0 + 13); recent: until t1 + 9
    assert not session_present(node.port, "clk-v4-old", version=4)
    assert time.monotonic() < t1 + 8.5, "too slow to tell the sessions apart"
    assert session_present(node.port, "clk-v4-recent", version=4)


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
