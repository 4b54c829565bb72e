"""Supervision of a multi-worker node: kill -9 of one worker under QoS 1 load,
SIGTERM of the whole node.

The issue: "kill -9 a worker under QoS 1 load: no acknowledged message lost,
the worker comes back, its clients resume", and "SIGTERM stops everything
cleanly without losing an acknowledged message".  The clients are paho-mqtt
with its automatic reconnect (loop_start): the one whose worker was killed
retries (refused while its owner is down) until the restarted worker serves it.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from nodeprobe import assert_placed, owned_id, placements, wait_log, worker_pids
from paho.mqtt.enums import MessageState
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from raftmq.workers.ownership import owner_of
from support.brokers import BrokerProcess
from support.helpers import Paho, connected, unique, wait_for

pytestmark = pytest.mark.timeout(150)


class _Client(mqtt.Client):
    """paho-mqtt 2.2 with its QoS 2 sender fixed for a refused reconnect.

    On each reconnect paho turns an outgoing QoS 2 message waiting for PUBCOMP
    into "resend PUBREL" -- and anything else into "publish".  When that attempt
    is refused (as it is while the client's owner worker restarts) the next one
    finds "resend PUBREL" and re-publishes, with DUP 0, a message it had already
    released: a new message for any broker (MQTT 3.1.1 §4.3.3: the sender "MUST
    NOT re-send the PUBLISH once it has sent the corresponding PUBREL").  Seen
    here as the publisher's worker's QoS 2 duplicates: the broker had committed
    the PUBREL."""

    def _messages_reconnect_reset_out(self) -> None:
        with self._out_message_mutex:
            for m in self._out_messages.values():
                if m.state == MessageState.MQTT_MS_RESEND_PUBREL:
                    m.state = MessageState.MQTT_MS_WAIT_FOR_PUBCOMP
        super()._messages_reconnect_reset_out()


class Durable:
    """A paho client with a persistent session that reconnects by itself and
    records what it got and which of its QoS 1 publishes were acknowledged."""

    def __init__(self, node: BrokerProcess, client_id: str, version: int) -> None:
        protocol = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        kw = {} if version == 5 else {"clean_session": False}
        self.client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                              protocol=protocol, **kw)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.lock = threading.Lock()
        self.received: list[bytes] = []
        self.trace: list[tuple[bytes, int, bool, int]] = []  # payload, mid, dup, connect #
        self.acked_mids: set[int] = set()
        self.connects = 0
        self.refusals = 0
        self.online = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.online.clear()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        connect_kw: dict = {}
        if version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
            connect_kw = {"clean_start": False, "properties": props}
        self.client.connect(node.host, node.port, keepalive=10, **connect_kw)
        self.client.loop_start()
        assert self.online.wait(10), "no CONNACK"

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        if rc.is_failure:
            self.refusals += 1
            return
        self.connects += 1
        self.online.set()

    def _on_message(self, client, userdata, msg) -> None:
        payload = msg.payload.split(b" ", 1)[0]  # the message number (then padding)
        with self.lock:
            self.received.append(payload)
            self.trace.append((payload, msg.mid, bool(msg.dup), self.connects))

    def _on_publish(self, client, userdata, mid, rc, props) -> None:
        if not rc.is_failure:
            with self.lock:
                self.acked_mids.add(mid)

    def got(self) -> set[bytes]:
        with self.lock:
            return set(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _raft_pid(node: BrokerProcess) -> int:
    m = re.search(r"raft process (\d+)", node.log_path.read_text(errors="replace"))
    assert m is not None, node.log_tail()
    return int(m.group(1))


# Padding of the messages published around a kill in the window: big enough
# that a worker's proposals for the two or three of them it takes in while the
# raft process is paused outgrow a unix socket's buffer (net.core.wmem_default,
# 208 KiB here).
BIG = 128 * 1024


def _kill_in_window(node: BrokerProcess, kill_worker: int, victim: int,
                    big: threading.Event, big_flowing: Callable[[], bool]) -> None:
    """kill -9 ``victim`` inside the window where exactly once is at stake, every
    time rather than by luck, by pausing the raft process (SIGSTOP) meanwhile:

    - the subscriber's worker (0): while the raft process is paused it takes in
      forwarded messages and proposes their queue writes; paused in turn, it
      cannot see them committed once the raft process resumes, nor acknowledge
      them to worker 1, which sends them again to its restarted process.
    - the publisher's worker (1): while the raft process is paused it forwards
      big messages to worker 0 and proposes their receive state (and the queue
      writes of its own subscriber, ``ksub1``) -- more than the channel's socket
      buffer holds; it dies with the forwards out and its batches not committed,
      and the publisher sends the messages again to its restarted process."""
    raft = _raft_pid(node)
    if kill_worker == 1:
        big.set()
        # Big ones in flight (paho's window is refilled with them) when it pauses.
        assert wait_for(big_flowing, 10), "no big message acknowledged"
    os.kill(raft, signal.SIGSTOP)
    try:
        time.sleep(0.5)
        if kill_worker == 0:
            os.kill(victim, signal.SIGSTOP)
            os.kill(raft, signal.SIGCONT)
            time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
    finally:
        os.kill(raft, signal.SIGCONT)
        big.clear()


def _load(node: BrokerProcess, kill_worker: int, version: int, qos: int = 1,
          in_window: bool = False) -> None:
    pids = worker_pids(node, 2)
    topic = unique("xw/kill/")
    sid, pid = owned_id(0, 2, "ksub"), owned_id(1, 2, "kpub")
    sub = Durable(node, sid, version)
    sub.client.subscribe(topic, qos)
    assert wait_for(lambda: bool(placements(node).get(sid)), 5)
    subs = [sub]
    if in_window:
        # A subscriber in the publisher's worker too: its deliveries share the
        # publisher's batches.
        local = Durable(node, owned_id(1, 2, "ksub1"), version)
        local.client.subscribe(topic, qos)
        subs.append(local)
    pub = Durable(node, pid, version)
    assert_placed(node, sid, 0)
    assert_placed(node, pid, 1)
    time.sleep(0.3)  # the SUBACK came back (the paho subscribe is asynchronous)
    sent: dict[int, bytes] = {}  # mid -> payload
    big_mids: set[int] = set()
    n = 2500
    stop = threading.Event()
    big = threading.Event()

    def publish() -> None:
        for i in range(n):
            if stop.is_set():
                return
            if not pub.online.is_set():
                # paho 2.2 resends its in-flight messages after the CONNACK; a
                # publish() from this thread meanwhile makes it exceed the
                # broker's Receive Maximum (0x93, disconnected, again and again).
                pub.online.wait(30)
                time.sleep(0.5)
            payload = b"%d" % i
            padded = big.is_set()
            info = pub.client.publish(topic, payload + b" " + b"x" * BIG if padded else payload,
                                      qos=qos)
            with pub.lock:
                sent[info.mid] = payload
                if padded:
                    big_mids.add(info.mid)
            time.sleep(0.002)

    log_start = len(node.log_path.read_text(errors="replace"))
    t = threading.Thread(target=publish)
    t.start()
    try:
        assert wait_for(lambda: len(pub.acked_mids) >= 400, 30), "no QoS 1 flow before the kill"
        victim = pids[kill_worker]
        if in_window:
            def big_flowing() -> bool:
                with pub.lock:
                    return len(big_mids & pub.acked_mids) >= 2

            _kill_in_window(node, kill_worker, victim, big, big_flowing)
        else:
            os.kill(victim, signal.SIGKILL)
        wait_log(node, rf"Child raftmq-worker-{kill_worker} \(pid {victim}\) exited with "
                 rf"signal SIGKILL; restarting", log_start, 10)
        wait_log(node, rf"Child raftmq-worker-{kill_worker} restarted \(pid \d+\)", log_start, 15)
        t.join(60)
        assert not t.is_alive()
        # Every publish is acknowledged in the end (the publisher resends what was
        # in flight if its worker died) ...
        assert wait_for(lambda: len(pub.acked_mids) >= len(sent), 40), \
            f"{len(sent) - len(pub.acked_mids)} of {len(sent)} publishes never acknowledged"
        with pub.lock:
            acked = {sent[m] for m in pub.acked_mids}
        # ... and every acknowledged one reaches the subscribers at least once.
        for s in subs:
            assert wait_for(lambda s=s: acked <= s.got(), 40), (
                f"{len(acked - s.got())} acknowledged messages lost for "
                f"{s.client._client_id.decode()}, e.g. "
                f"{sorted(acked - s.got(), key=int)[:10]}:\n{node.log_tail(30)}")
        if qos == 2:
            time.sleep(0.5)  # a duplicate still on its way
            for s in subs:
                with s.lock:
                    counts: dict[bytes, int] = {}
                    for payload in s.received:
                        counts[payload] = counts.get(payload, 0) + 1
                twice = sorted((p for p, n in counts.items() if n > 1), key=int)
                assert not twice, (
                    f"QoS 2 delivered more than once to {s.client._client_id.decode()}: "
                    f"{len(twice)} messages, e.g. (payload, packet id, dup, connection #): "
                    f"{[t for t in s.trace if t[0] in twice[:5]]}")
        # The clients of the dead worker came back to it (the owner).
        moved = sid if kill_worker == 0 else pid
        assert len(placements(node)[moved]) >= 2, placements(node)[moved]
        assert set(placements(node)[moved]) == {kill_worker}
        assert worker_pids(node, 2)[kill_worker] != victim
    finally:
        stop.set()
        t.join(10)
        for s in subs:
            s.close()
        pub.close()


@pytest.mark.parametrize("version", [4, 5])
def test_kill9_subscribers_worker_under_qos1_load(raftmq_factory, version):
    _load(raftmq_factory(workers=2), 0, version)


@pytest.mark.parametrize("version", [4, 5])
def test_kill9_publishers_worker_under_qos1_load(raftmq_factory, version):
    _load(raftmq_factory(workers=2), 1, version)


@pytest.mark.parametrize("kill_worker", [0, 1])
def test_kill9_under_qos2_load_exactly_once(raftmq_factory, kill_worker):
    """QoS 2 (MQTT 3.1.1 paho, which keeps its incoming QoS 2 state across
    reconnects of a persistent session), the kill in the window where a
    duplicate can arise: every PUBCOMPed message arrives, none twice -- in the
    other worker's subscriber and in the publisher's worker's own.

    Without the MeshMark (workers/mesh.py) the subscriber's restarted worker
    takes the frames its sibling sends again for new messages: every run."""
    _load(raftmq_factory(workers=2), kill_worker, 4, qos=2, in_window=True)


def test_sigterm_stops_two_workers_cleanly_and_keeps_acknowledged(raftmq_factory):
    node = raftmq_factory(workers=2)
    pids = worker_pids(node, 2)
    topic = unique("xw/term/")
    sid = owned_id(0, 2, "tsub")
    with connected(node, sid, version=4, clean=False) as c:
        c.subscribe(1, [(topic, 1)])
        c.disconnect()
    online = [Paho(node, owned_id(w, 2, "term"), 5) for w in (0, 1)]
    with Paho(node, owned_id(1, 2, "tpub"), 4) as pub:
        for i in range(20):
            pub.publish(topic, b"%d" % i, 1)  # waits for the PUBACK
    started = time.monotonic()
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    status = node.proc.wait(12)
    took = time.monotonic() - started
    for c in online:
        c.client.loop_stop()
    assert status == 0, node.log_tail()
    assert took < 10, f"SIGTERM took {took:.1f} s"
    log = node.log_path.read_text(errors="replace")
    assert "Supervisor stopped." in log
    assert "killing it" not in log
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the supervisor"
    # Nothing acknowledged was lost: a restart on the same data finds the queue.
    (node.workdir / "raftmq.log").rename(node.workdir / "first-run.log")
    again = BrokerProcess("raftmq", node.workdir, {"workers": 2}).start()
    try:
        with connected(again, sid, version=4, clean=False) as c:
            got = [c.recv_publish(5).payload for _ in range(20)]
            assert got == [b"%d" % i for i in range(20)]
            assert_placed(again, sid, 0)
    finally:
        assert again.stop() == 0


def test_persistent_sessions_survive_a_change_of_worker_count(raftmq_factory):
    """Ownership is a hash modulo the worker count: a node restarted with 4
    workers (then 1) must find every persistent session, queue and retained
    message under its new owner."""
    node = raftmq_factory(workers=2)
    topic = unique("xw/count/")
    ids = [owned_id(w % 2, 2, f"cnt{w}") for w in range(8)]
    for cid in ids:
        with connected(node, cid, version=4, clean=False) as c:
            c.subscribe(1, [(f"{topic}/{cid}", 1)])
            c.disconnect()
    with Paho(node, owned_id(1, 2, "cntpub"), 4) as pub:
        pub.publish(f"{topic}/retained", b"kept", 1, retain=True)
        for i in range(3):
            for cid in ids:
                pub.publish(f"{topic}/{cid}", b"%d" % i, 1)
    assert node.stop() == 0
    workdir = node.workdir
    rounds = 0
    for workers, expect in ((4, [b"0", b"1", b"2"]), (1, [b"3"])):
        rounds += 1
        (workdir / "raftmq.log").rename(workdir / f"run{rounds}.log")
        again = BrokerProcess("raftmq", workdir, {"workers": workers}).start()
        try:
            if workers == 1:
                with Paho(again, "cntpub2", 4) as pub:
                    for cid in ids:
                        pub.publish(f"{topic}/{cid}", b"3", 1)
            for cid in ids:
                with connected(again, cid, version=4, clean=False) as c:
                    got = [c.recv_publish(5).payload for _ in expect]
                    assert got == expect, (workers, cid, got)
                    assert c.no_publish_pending(0.1)
                    c.disconnect()
                if workers > 1:
                    assert_placed(again, cid, owner_of(cid, workers))
            with connected(again, owned_id(0, workers, "cntret")) as c:
                c.subscribe(1, [(f"{topic}/retained", 1)])
                assert c.recv_publish(5).payload == b"kept"
        finally:
            assert again.stop() == 0
