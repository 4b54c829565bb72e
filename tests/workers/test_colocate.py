"""Connection co-location (raftmq.workers.colocate): a publisher whose messages
all go to one sibling worker is moved there, socket and MQTT state, and keeps
publishing with nothing lost or reordered.

Where a connection lives is read from /proc (nodeprobe.accepting_worker: the
worker whose fd table holds the broker side of the client's TCP connection);
the broker also logs each move ("Client ID moved from worker S to worker X")
at debug level, which the test brokers run with (-v).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from nodeprobe import accepting_worker, log_text, owned_id, worker_pids

from support.brokers import BrokerProcess
from support.helpers import Paho, unique
from support.mqttraw import CONNACK, DISCONNECT, PUBACK, PUBLISH, Closed, RawClient, Will

pytestmark = pytest.mark.timeout(120)

RATE = 0.01  # seconds between messages (100 msg/s: a window holds >= MIN_MESSAGES)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    b = BrokerProcess("raftmq", tmp_path_factory.mktemp("coloc"),
                      {"workers": 2, "sys_interval": 1}).start()
    yield b
    b.stop()


def _moved(node: BrokerProcess, cid: str, mark: int, src: int = 1, dst: int = 0):
    """A test: the log says, after character ``mark``, that ``cid`` moved."""
    rx = re.compile(rf"Client {re.escape(cid)} moved from worker {src} to worker {dst}\b")
    return lambda: rx.search(log_text(node), mark)


def _raw(node: BrokerProcess, cid: str, version: int, **kw) -> RawClient:
    c = RawClient(node.host, node.port, version)
    ack = c.connect(cid, **kw)
    assert ack.type == CONNACK and ack.reason == 0, ack
    return c


class _Publisher:
    """Publishes numbered messages (QoS 0 or 1) and checks every PUBACK."""

    def __init__(self, client: RawClient, topic: str, qos: int, alias: bool = False) -> None:
        self.c, self.topic, self.qos, self.alias = client, topic, qos, alias
        self.n = 0
        self.pid = 0

    def one(self) -> None:
        self.n += 1
        props = None
        topic = self.topic
        if self.alias:
            # The alias is set by the first message and used alone after it.
            props = {"topic_alias": 1}
            if self.n > 1:
                topic = ""
        kw = {}
        if self.qos:
            self.pid = self.pid % 65535 + 1
            kw["pid"] = self.pid
        self.c.publish(topic, b"%d" % self.n, self.qos, props=props, **kw)
        if self.qos:
            ack = self.c.expect(PUBACK)
            assert ack.pid == self.pid, ack

    def until(self, done, timeout: float = 12.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "no move in time"
            self.one()
            time.sleep(RATE)

    def more(self, count: int) -> None:
        for _ in range(count):
            self.one()
            time.sleep(RATE / 2)


def _payloads_until(sub: Paho, payload: bytes, timeout: float = 5.0) -> list[bytes]:
    """What ``sub`` receives up to ``payload`` (earlier numbered messages first)."""
    seen: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] != payload:
        seen.append(sub.get(timeout=max(0.1, deadline - time.monotonic())).payload)
    return seen


def _sys_values(node: BrokerProcess, topics: list[str], settle: float = 2.5) -> dict[str, int]:
    """The retained $SYS values of ``topics`` after ``settle`` seconds (they are
    published every second, STATS every 0.5 s)."""
    time.sleep(settle)
    with Paho(node, owned_id(0, 2, "sysread"), 4) as r:  # on worker 0 in every reading
        for t in topics:
            r.subscribe(t, 0)
        out: dict[str, int] = {}
        deadline = time.monotonic() + 3
        while len(out) < len(topics) and time.monotonic() < deadline:
            try:
                m = r.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            out[m.topic] = int(m.payload)
    return out


def _received_in_order(sub: Paho, count: int, timeout: float = 10.0) -> list[int]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(int(sub.get(timeout=max(0.1, deadline - time.monotonic())).payload))
        except Exception:  # noqa: BLE001 - queue.Empty: compared below
            break
    return got


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1])
def test_publisher_moves_to_its_subscriber(node, version, qos):
    pids = worker_pids(node, 2)
    topic = unique("coloc/pair/")
    sid, pid_ = owned_id(0, 2, "csub"), owned_id(1, 2, "cpub")
    mark = len(log_text(node))
    with Paho(node, sid, version) as sub:
        sub.subscribe(topic, qos)
        c = _raw(node, pid_, version)
        with c:
            assert accepting_worker(node, c.sock, pids) == 1
            p = _Publisher(c, topic, qos, alias=version == 5)
            p.until(_moved(node, pid_, mark))
            before = p.n
            p.more(200)
            assert accepting_worker(node, c.sock, pids) == 0
            got = _received_in_order(sub, p.n)
            assert got == list(range(1, p.n + 1)), (before, got[:5], len(got))


def test_publisher_with_messages_always_in_flight_moves(node):
    """A QoS 1 publisher that keeps 20 messages in flight, to a persistent
    subscriber: every PUBACK waits for a commit (and, across workers, for the
    sibling), so there is never a moment with nothing owed to it.  It is held
    (not read) until what it is owed is written, then moves; every PUBACK
    comes, in order, and the subscriber gets every message once, in order."""
    pids = worker_pids(node, 2)
    topic = unique("coloc/inflight/")
    sid, pid_ = owned_id(0, 2, "fsub"), owned_id(1, 2, "fpub")
    mark = len(log_text(node))
    window, extra = 20, 300
    with Paho(node, sid, 4, clean=False) as sub:
        sub.subscribe(topic, 1)
        c = _raw(node, pid_, 4)
        with c:
            assert accepting_worker(node, c.sock, pids) == 1
            moved = _moved(node, pid_, mark)
            sent = acked = 0
            total = None
            deadline = time.monotonic() + 20
            while total is None or acked < total:
                assert time.monotonic() < deadline, ("no move in time", sent, acked)
                while sent - acked < window and (total is None or sent < total):
                    sent += 1
                    c.publish(topic, b"%d" % sent, 1, pid=(sent - 1) % 65535 + 1)
                ack = c.expect(PUBACK)
                acked += 1
                assert ack.pid == (acked - 1) % 65535 + 1, (ack, acked)
                if total is None and moved():
                    total = sent + extra
            assert accepting_worker(node, c.sock, pids) == 0
            got = _received_in_order(sub, total)
            assert got == list(range(1, total + 1)), (len(got), got[:5])
    with Paho(node, sid, 4, clean=True):
        pass  # ends the persistent session


def test_moved_client_takeover_and_sys(node):
    """A moved connection (3.1.1 and 5.0) is taken over by a new CONNECT with its
    id (5.0: DISCONNECT 0x8E), whatever worker accepts it; the clients
    connected count follows."""
    pids = worker_pids(node, 2)
    for version, clean in ((4, True), (4, False), (5, True), (5, False)):
        topic = unique("coloc/take/")
        sid, cid = owned_id(0, 2, "tsub"), owned_id(1, 2, "tpub")
        mark = len(log_text(node))
        with Paho(node, sid, 4) as sub:
            sub.subscribe(topic, 0)
            c = _raw(node, cid, version)
            p = _Publisher(c, topic, 0)
            p.until(_moved(node, cid, mark))
            assert accepting_worker(node, c.sock, pids) == 0
            kw = {"clean": clean}
            if version == 5 and not clean:
                kw["props"] = {"session_expiry_interval": 60}
            new = RawClient(node.host, node.port, version)
            with new:
                ack = new.connect(cid, **kw)
                assert ack.reason == 0 and not ack.session_present, ack
                # The old connection is closed, as taken over.
                try:
                    pkt = c.recv(3)
                    assert version == 5 and pkt.type == DISCONNECT and pkt.reason == 0x8E, pkt
                    with pytest.raises(Closed):
                        c.recv(3)
                except Closed:
                    assert version == 4
                c.close()
                assert accepting_worker(node, new.sock, pids) == 1
                # The new one works.
                new.publish(topic, b"after")
                assert _payloads_until(sub, b"after")[-1] == b"after"
                new.disconnect()
                if version == 5 and not clean:
                    # Its persistent session: ended with a clean connection.
                    again = _raw(node, cid, 5, props={"session_expiry_interval": 0})
                    again.disconnect()
                    again.close()


def test_sys_counts_follow_a_move(node):
    """$SYS clients connected: the node total stays, the per-worker counts
    move with the connection, the moved counter counts it."""
    topics = ["$SYS/broker/clients/connected", "$SYS/broker/workers/0/clients/connected",
              "$SYS/broker/workers/1/clients/connected", "$SYS/broker/clients/moved"]
    topic = unique("coloc/sys/")
    sid, cid = owned_id(0, 2, "ysub"), owned_id(1, 2, "ypub")
    mark = len(log_text(node))
    with Paho(node, sid, 4) as sub:
        sub.subscribe(topic, 0)
        c = _raw(node, cid, 4)
        with c:
            before = _sys_values(node, topics)
            p = _Publisher(c, topic, 0)
            p.until(_moved(node, cid, mark))
            after = _sys_values(node, topics)
            # (the reader itself is one more client in both readings)
            assert after[topics[0]] == before[topics[0]], (before, after)
            assert after[topics[1]] == before[topics[1]] + 1, (before, after)
            assert after[topics[2]] == before[topics[2]] - 1, (before, after)
            assert after[topics[3]] == before[topics[3]] + 1, (before, after)


def test_will_of_moved_client_once(node):
    pids = worker_pids(node, 2)
    topic, wtopic = unique("coloc/will/"), unique("coloc/will-msg/")
    sid, cid = owned_id(0, 2, "wsub"), owned_id(1, 2, "wpub")
    mark = len(log_text(node))
    with Paho(node, sid, 4) as sub:
        sub.subscribe(topic, 0)
        sub.subscribe(wtopic, 1)
        c = _raw(node, cid, 5, will=Will(wtopic, b"gone", 1))
        p = _Publisher(c, topic, 0)
        p.until(_moved(node, cid, mark))
        assert accepting_worker(node, c.sock, pids) == 0
        c.close()  # abnormal: no DISCONNECT
        seen = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                msg = sub.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if msg.topic == wtopic:
                seen.append(msg.payload)
        assert seen == [b"gone"]


def test_never_moves_with_subscription_or_inflight(node):
    """A publisher holding a subscription, or one with an unacknowledged QoS 1
    message to it, stays where it is."""
    pids = worker_pids(node, 2)
    topic = unique("coloc/stay/")
    sid, cid = owned_id(0, 2, "ssub"), owned_id(1, 2, "spub")
    mark = len(log_text(node))
    with Paho(node, sid, 4) as sub:
        sub.subscribe(topic, 0)
        c = _raw(node, cid, 4)
        with c:
            c.subscribe(1, [(unique("coloc/own/"), 0)])
            p = _Publisher(c, topic, 0)
            p.more(400)  # 2 s at 200 msg/s: several windows
            time.sleep(1.5)
            assert f"Client {cid} moved" not in log_text(node)[mark:]
            assert accepting_worker(node, c.sock, pids) == 1
    # In flight toward it: a QoS 1 message it does not acknowledge.
    sid2, cid2 = owned_id(0, 2, "isub"), owned_id(1, 2, "ipub")
    topic2, back = unique("coloc/stay2/"), unique("coloc/back/")
    with Paho(node, sid2, 4) as sub2, Paho(node, owned_id(0, 2, "iback"), 4) as feeder:
        sub2.subscribe(topic2, 0)
        c = _raw(node, cid2, 4)
        with c:
            c.subscribe(1, [(back, 1)])
            c.send(b"")  # (keep the socket as is)
            feeder.publish(back, b"unacked", 1)
            got = c.recv(3)
            assert got.type == PUBLISH and got.qos == 1
            # (never acknowledged)
            p = _Publisher(c, topic2, 0)
            p.more(400)
            time.sleep(1.5)
            assert f"Client {cid2} moved" not in log_text(node)[mark:]
            assert accepting_worker(node, c.sock, pids) == 1


def test_load_rule_keeps_publishers_off_a_busier_worker(node):
    """Worker 0 holds clearly more connections than worker 1: a publisher on 1
    whose subscriber is on 0 stays on 1."""
    pids = worker_pids(node, 2)
    topic = unique("coloc/load/")
    idle = [_raw(node, owned_id(0, 2, "idle"), 4) for _ in range(24)]
    try:
        time.sleep(1.5)  # the STATS frames carry the new counts
        sid, cid = owned_id(0, 2, "lsub"), owned_id(1, 2, "lpub")
        mark = len(log_text(node))
        with Paho(node, sid, 4) as sub:
            sub.subscribe(topic, 0)
            c = _raw(node, cid, 4)
            with c:
                p = _Publisher(c, topic, 0)
                p.more(500)
                time.sleep(1.5)
                assert f"Client {cid} moved" not in log_text(node)[mark:]
                assert accepting_worker(node, c.sock, pids) == 1
                assert _received_in_order(sub, p.n) == list(range(1, p.n + 1))
    finally:
        for c in idle:
            c.close()


def test_colocate_off_never_moves(tmp_path):
    b = BrokerProcess("raftmq", tmp_path, {"workers": 2, "colocate": False}).start()
    try:
        pids = worker_pids(b, 2)
        topic = unique("coloc/off/")
        with Paho(b, owned_id(0, 2, "osub"), 4) as sub:
            sub.subscribe(topic, 0)
            c = _raw(b, owned_id(1, 2, "opub"), 4)
            with c:
                p = _Publisher(c, topic, 0)
                p.more(600)
                time.sleep(1.5)
                assert " moved from worker" not in log_text(b)
                assert accepting_worker(b, c.sock, pids) == 1
                assert _received_in_order(sub, p.n) == list(range(1, p.n + 1))
    finally:
        b.stop()


def test_kill_target_right_after_move(tmp_path):
    """kill -9 of the worker a connection just moved to: the client is
    disconnected, reconnects with the same id on its owner, and works."""
    b = BrokerProcess("raftmq", tmp_path, {"workers": 2}).start()
    try:
        pids = worker_pids(b, 2)
        topic = unique("coloc/kill/")
        cid = owned_id(1, 2, "kpub")
        with Paho(b, owned_id(0, 2, "ksub"), 4) as sub:
            sub.subscribe(topic, 0)
            c = _raw(b, cid, 4)
            p = _Publisher(c, topic, 0)
            p.until(_moved(b, cid, 0))
            os.kill(pids[0], signal.SIGKILL)
            # The connection died with worker 0 (its publishes fail or it reads EOF).
            closed = False
            for _ in range(300):
                try:
                    p.one()
                    c.recv(0.02)
                except TimeoutError:
                    continue
                except (Closed, OSError):
                    closed = True
                    break
            assert closed
            c.close()
        worker_pids(b, 2)  # worker 0 is back
        deadline = time.monotonic() + 15
        while True:
            try:
                again = _raw(b, cid, 4)
                break
            except (AssertionError, Closed, OSError):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with again, Paho(b, owned_id(0, 2, "ksub2"), 4) as sub2:
            sub2.subscribe(topic, 0)
            again.publish(topic, b"back")
            assert sub2.get(timeout=5).payload == b"back"
    finally:
        b.stop()


def test_fan_in_does_not_pile_onto_one_worker(node):
    """20 publishers on worker 1, one subscriber on worker 0: at this light load
    locality wins and most move, but the connection cap of the load rule stops
    the moves while worker 1 still holds some of them (the CPU part of the
    rule: tests/unit/test_colocate_rule.py)."""
    pids = worker_pids(node, 2)
    topic = unique("coloc/fanin/")
    mark = len(log_text(node))
    with Paho(node, owned_id(0, 2, "fsub"), 4) as sub:
        sub.subscribe(topic, 0)
        pubs = [_raw(node, owned_id(1, 2, "fpub"), 4) for _ in range(20)]
        try:
            for _ in range(250):  # 5 s at 50 msg/s each
                for c in pubs:
                    c.publish(topic, b"x")
                time.sleep(0.02)
            # The last window's decision may still move some (up to WINDOW plus a
            # tick after the last message): read placement and log until they agree.
            time.sleep(1.5)
            deadline = time.monotonic() + 5
            while True:
                where = [accepting_worker(node, c.sock, pids) for c in pubs]
                moved = len(re.findall(r"Client fpub\S* moved from worker 1 to worker 0",
                                       log_text(node)[mark:]))
                if where.count(0) == moved or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert where.count(0) == moved >= 1, (where, moved)
            # Without the cap all 20 would move.  With it 16 do when these are the
            # only clients of the node; a client of an earlier test still counted
            # on either worker (the rule counts every connected client, a sibling's
            # as of its last STATS) shifts that by one or two.
            assert where.count(1) >= 2, where
        finally:
            for c in pubs:
                c.close()
