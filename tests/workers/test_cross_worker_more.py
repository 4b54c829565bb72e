"""More of "the node behaves like one broker": the corners of cross-worker routing.

Subscription interest kept right through unsubscribe / clean start / overlap,
wildcards and $-topics, large payloads over the mesh and through the hand-off,
topic aliases, QoS 2 exactly once with a retransmitted PUBLISH, retained wills,
retained messages and $SYS after a worker restart, shared groups when a
member's worker dies.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from nodeprobe import (
    assert_placed,
    owned_id,
    raw_over,
    socket_on_worker,
    wait_log,
    worker_pids,
)

from support.helpers import Paho, connected, unique, wait_for
from support.mqttraw import (
    CONNACK,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
    Will,
    sub_options,
    unsubscribe,
)
from support.mqttraw import PUBLISH as PUBLISH_T
from support.mqttraw import connect as connect_packet
from support.mqttraw import publish as publish_packet
from support.mqttraw import subscribe as subscribe_packet

pytestmark = pytest.mark.timeout(120)


def _roundtrip(sub, pub, topic: str, payload: bytes) -> None:
    pub.publish(topic, payload, 1, pid=77)
    assert pub.expect(PUBACK).pid == 77
    got = sub.recv_publish(5)
    assert (got.topic, got.payload) == (topic, payload)


def test_interest_kept_through_unsubscribe_and_overlap(node2):
    """Two clients of worker 0 share a filter; one unsubscribes, one starts
    clean, one resubscribes: what worker 1 forwards follows every step."""
    base = unique("xw/interest/")
    f = f"{base}/#"
    a_id, b_id = owned_id(0, 2, "ia"), owned_id(0, 2, "ib")
    pub = connected(node2, owned_id(1, 2, "ip"))
    a = connected(node2, a_id, clean=False)
    b = connected(node2, b_id)
    with pub, b:
        a.subscribe(1, [(f, 1)])
        a.subscribe(2, [(f, 1)])  # the same filter again replaces, it does not add
        b.subscribe(1, [(f, 1)])
        _roundtrip(b, pub, f"{base}/1", b"one")
        assert a.recv_publish().payload == b"one"
        # a unsubscribes once: b still gets everything.
        a.send(unsubscribe(3, [f]))
        a.expect(UNSUBACK)
        _roundtrip(b, pub, f"{base}/2", b"two")
        assert a.no_publish_pending(0.2)
        # a resubscribes, then comes back with a clean session: its subscription
        # goes, b's stays.
        a.subscribe(4, [(f, 1)])
        _roundtrip(a, pub, f"{base}/3", b"three")
        assert b.recv_publish().payload == b"three"
        a.close()
        a = connected(node2, a_id, clean=True)
        _roundtrip(b, pub, f"{base}/4", b"four")
        assert a.no_publish_pending(0.2)
        a.close()
        _roundtrip(b, pub, f"{base}/5", b"five")
        # b unsubscribes: nothing for anyone; then b subscribes again: flows again.
        b.send(unsubscribe(2, [f]))
        b.expect(UNSUBACK)
        pub.publish(f"{base}/6", b"six", 1, pid=6)
        assert pub.expect(PUBACK).pid == 6
        assert b.no_publish_pending(0.2)
        b.subscribe(3, [(f, 1)])
        _roundtrip(b, pub, f"{base}/7", b"seven")


def test_wildcards_and_dollar_topics_across_workers(node2):
    base = unique("xw/wild/")
    sub_id = owned_id(0, 2, "wsub")
    with connected(node2, sub_id) as sub, connected(node2, owned_id(1, 2, "wpub")) as pub:
        sub.subscribe(1, [(f"{base}/+/x", 1), ("#", 1)])
        pub.publish(f"{base}/a/x", b"plus", 1, pid=1)
        pub.expect(PUBACK)
        got = sub.drain_publishes()
        # Overlapping subscriptions of one client: one copy (3.1.1), or one per
        # subscription -- never a copy per worker.
        assert 1 <= len(got) <= 2 and {p.payload for p in got} == {b"plus"}, got
        # '#' does not match a topic starting with '$' ([MQTT-4.7.2-1]).
        dollar = f"${base.replace('/', '_')}/y"
        pub.publish(dollar, b"dollar", 1, pid=2)
        pub.expect(PUBACK)
        assert sub.no_publish_pending(0.3)
        sub.subscribe(2, [(f"{dollar[:-2]}/+", 1)])
        pub.publish(dollar, b"dollar", 1, pid=3)
        pub.expect(PUBACK)
        assert sub.recv_publish().payload == b"dollar"


@pytest.mark.parametrize("size", [65_536, 300_000, 3_000_000])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_large_payload_across_workers(node2, size, qos):
    topic = unique("xw/big/")
    payload = os.urandom(size)
    sub, pub = (Paho(node2, owned_id(w, 2, n), 5) for w, n in ((0, "bsub"), (1, "bpub")))
    with sub, pub:
        sub.subscribe(topic, 2)
        pub.publish(topic, payload, qos)
        msg = sub.get(timeout=10)
        assert (len(msg.payload), msg.payload == payload, msg.qos) == (size, True, qos)


def test_connect_with_a_large_will_through_the_other_worker(node2):
    """One CONNECT bigger than the hand-off datagram limit (256 KB): a will with
    300 KB of MQTT 5 user properties, accepted by the worker that does not own
    the id."""
    pids = worker_pids(node2, 2)
    topic = unique("xw/bigwill/")
    cid = owned_id(0, 2, "bigwill")
    pairs = [(f"k{i}", "v" * 3000) for i in range(100)]
    with Paho(node2, owned_id(1, 2, "bwsub"), 5) as sub:
        sub.subscribe(topic, 1)
        c = raw_over(socket_on_worker(node2, 1, pids), 5)
        ack = c.connect(cid, will=Will(topic, b"big will", qos=1, props={"user_property": pairs}))
        assert ack.reason == 0, f"refused: {ack}\n{node2.log_tail(10)}"
        assert_placed(node2, cid, 0)
        c.close()
        msg = sub.get(timeout=5)
        assert msg.payload == b"big will" and len(msg.properties.UserProperty) == 100


def test_connect_pipelined_with_a_large_publish_through_the_other_worker(node2):
    """CONNECT, SUBSCRIBE and a 1 MB PUBLISH sent at once, before the CONNACK
    (allowed, [MQTT-3.1.4]), on a connection the non-owner accepted."""
    pids = worker_pids(node2, 2)
    topic = unique("xw/pipelined/")
    cid = owned_id(0, 2, "pipe")
    payload = os.urandom(1_000_000)
    c = raw_over(socket_on_worker(node2, 1, pids), 4)
    with c:
        c.send(connect_packet(cid) + subscribe_packet(1, [(topic, 1)])
               + publish_packet(topic, payload, 1, pid=2))
        ack = c.recv(10)
        assert ack.type == CONNACK and ack.reason == 0, f"{ack}\n{node2.log_tail(10)}"
        assert_placed(node2, cid, 0)
        got = [c.recv(10) for _ in range(3)]
        kinds = sorted(p.type for p in got)
        assert kinds == [PUBLISH_T, PUBACK, SUBACK], got
        echoed = next(p for p in got if p.type == PUBLISH_T)
        assert echoed.payload == payload


def test_topic_alias_publish_across_workers(node2):
    topic = unique("xw/alias/")
    with connected(node2, owned_id(0, 2, "asub"), version=5) as sub, \
            connected(node2, owned_id(1, 2, "apub"), version=5) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b"first", 1, pid=1, props={"topic_alias": 3})
        assert pub.expect(PUBACK).pid == 1
        pub.publish("", b"second", 1, pid=2, props={"topic_alias": 3})
        assert pub.expect(PUBACK).pid == 2
        got = [sub.recv_publish(), sub.recv_publish()]
        assert [(p.topic, p.payload) for p in got] == [(topic, b"first"), (topic, b"second")]
        assert all("topic_alias" not in p.props for p in got)


def test_qos2_retransmitted_publish_delivered_once_across_workers(node2):
    topic = unique("xw/q2dup/")
    with connected(node2, owned_id(0, 2, "q2sub")) as sub, \
            connected(node2, owned_id(1, 2, "q2pub")) as pub:
        sub.subscribe(1, [(topic, 2)])
        pub.publish(topic, b"once", 2, pid=9)
        assert pub.expect(PUBREC).pid == 9
        pub.publish(topic, b"once", 2, pid=9, dup=True)
        assert pub.expect(PUBREC).pid == 9
        pub.ack(PUBREL, 9)
        assert pub.expect(PUBCOMP).pid == 9
        got = sub.recv_publish()
        assert (got.payload, got.qos) == (b"once", 2)
        p = sub.expect(PUBREL)
        sub.ack(PUBCOMP, p.pid)
        assert sub.no_publish_pending(0.3), "QoS 2 message delivered twice"


@pytest.mark.parametrize("version", [4, 5])
def test_retained_will_visible_on_the_other_worker(node2, version):
    topic = unique("xw/rwill/")
    dying = connected(node2, owned_id(0, 2, "rwill"), version=version,
                      will=Will(topic, b"last words", qos=1, retain=True))
    dying.close()
    time.sleep(0.3)
    sid = owned_id(1, 2, "rwsub")
    with connected(node2, sid, version=version) as sub:
        assert_placed(node2, sid, 1)
        sub.subscribe(1, [(topic, sub_options(1))])
        got = sub.recv_publish(5)
        assert (got.payload, got.retain) == (b"last words", True)
    with connected(node2, owned_id(1, 2, "rwclr")) as c:
        c.publish(topic, b"", 1, retain=True, pid=1)
        c.expect(PUBACK)


# -- with a worker restart ----------------------------------------------------------


def _kill(node, worker: int, workers: int = 2) -> int:
    pids = worker_pids(node, workers)
    start = len(node.log_path.read_text(errors="replace"))
    os.kill(pids[worker], signal.SIGKILL)
    wait_log(node, rf"Child raftmq-worker-{worker} \(pid {pids[worker]}\) exited with signal SIGKILL",
             start, 10)
    return start


def _wait_restarted(node, worker: int, start: int) -> None:
    wait_log(node, rf"Child raftmq-worker-{worker} restarted", start, 15)
    worker_pids(node, 2)
    # Serving again: a client it owns connects.
    assert wait_for(lambda: _can_connect(node, owned_id(worker, 2, "probe")), 10)


def _can_connect(node, cid: str) -> bool:
    try:
        with connected(node, cid):
            return True
    except (AssertionError, OSError, Exception):
        return False


def test_retained_changed_while_a_worker_is_down(raftmq_factory):
    """Retained messages set and cleared on worker 1 while worker 0 is dead are
    what worker 0 serves after its restart."""
    node = raftmq_factory(workers=2)
    kept, cleared, fresh = (unique(f"xw/rdown/{n}/") for n in ("kept", "cleared", "fresh"))
    with connected(node, owned_id(1, 2, "rset")) as c:
        for i, t in enumerate((kept, cleared)):
            c.publish(t, b"before", 1, retain=True, pid=i + 1)
            c.expect(PUBACK)
    start = _kill(node, 0)
    with connected(node, owned_id(1, 2, "rset")) as c:
        c.publish(cleared, b"", 1, retain=True, pid=1)
        c.expect(PUBACK)
        c.publish(fresh, b"while down", 1, retain=True, pid=2)
        c.expect(PUBACK)
        c.publish(kept, b"replaced while down", 1, retain=True, pid=3)
        c.expect(PUBACK)
    _wait_restarted(node, 0, start)
    sid = owned_id(0, 2, "rget")
    with connected(node, sid) as s:
        assert_placed(node, sid, 0)
        s.subscribe(1, [(kept, 1), (cleared, 1), (fresh, 1)])
        got = {p.topic: p.payload for p in s.drain_publishes()}
        assert got == {kept: b"replaced while down", fresh: b"while down"}, got


@pytest.mark.waits
def test_sys_connected_after_a_worker_dies(raftmq_factory):
    node = raftmq_factory(workers=2, sys_interval=1)
    watch_id = owned_id(1, 2, "syswatch")
    watch = connected(node, watch_id)
    watch.subscribe(1, [("$SYS/broker/clients/connected", 0)])
    doomed = [connected(node, owned_id(0, 2, "sysdoomed")) for _ in range(3)]
    others = [connected(node, owned_id(1, 2, "sysother")) for _ in range(2)]
    try:
        def last_value(want: bytes, timeout: float) -> bytes | None:
            value = None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for p in watch.collect(0.3):
                    value = p.payload
                if value == want:
                    break
            return value

        assert last_value(b"6", 8) == b"6"
        start = _kill(node, 0)
        _wait_restarted(node, 0, start)
        # The dead worker's 3 clients are gone: 1 watcher + 2 others.
        assert last_value(b"3", 8) == b"3"
    finally:
        for c in (watch, *doomed, *others):
            c.close()


def test_shared_group_member_worker_dies(raftmq_factory):
    """A share group with members on both workers: worker 0 dies (its members
    with it); QoS 1 messages published meanwhile all reach the member left."""
    node = raftmq_factory(workers=2)
    topic = unique("xw/sharedie/")
    group = unique("g")
    m0 = connected(node, owned_id(0, 2, "sd0"))
    m1 = connected(node, owned_id(1, 2, "sd1"))
    for m in (m0, m1):
        m.subscribe(1, [(f"$share/{group}/{topic}", 1)])
    with m1, connected(node, owned_id(1, 2, "sdpub")) as pub:
        _kill(node, 0)
        m0.close()
        for i in range(40):
            pub.publish(topic, b"%d" % i, 1, pid=i + 1)
            assert pub.expect(PUBACK, 5).pid == i + 1
        got = sorted(int(p.payload) for p in m1.drain_publishes(first=5))
        assert got == list(range(40)), f"{40 - len(got)} lost: {sorted(set(range(40)) - set(got))}"
