"""One node, several workers, one broker: publisher and subscriber on different workers.

Every client id is chosen with ``owner_of`` so that the clients of a test live
on the workers the test wants, and the broker log ("... on worker K.") is
checked to confirm it.  Where it matters which worker *accepted* the TCP
connection (takeover, session resume, hand-off), the connection is opened until
the kernel gives it to the worker that does not own the id (nodeprobe).
"""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from nodeprobe import (
    accepting_worker,
    assert_placed,
    owned_id,
    placements,
    raw_over,
    socket_on_worker,
    worker_pids,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from raftmq.workers.ownership import owner_of
from support.helpers import Paho, connected, unique
from support.mqttraw import DISCONNECT, PUBACK, PUBLISH, Closed, Will, sub_options
from support.mqttraw import connect as connect_packet

pytestmark = pytest.mark.timeout(120)

PAIRS = [(0, 1), (1, 0)]  # (subscriber's worker, publisher's worker)


def _pair(node, sub_w: int, pub_w: int, version: int, workers: int = 2, **kw):
    sid, pid = owned_id(sub_w, workers, "sub"), owned_id(pub_w, workers, "pub")
    sub, pub = Paho(node, sid, version, **kw), Paho(node, pid, version, **kw)
    assert_placed(node, sid, sub_w)
    assert_placed(node, pid, pub_w)
    return sub, pub


def _publish_props() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k1", "v1"), ("k2", "v2"), ("k1", "v3")]
    props.ContentType = "application/x-raftmq-test"
    props.ResponseTopic = "reply/to/me"
    props.CorrelationData = b"\x00\x01corr\xff"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 120
    return props


# -- QoS 0 / 1 / 2 ----------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_qos_across_workers(node2, qos, version):
    for sub_w, pub_w in PAIRS:
        topic = unique("xw/qos/")
        sub, pub = _pair(node2, sub_w, pub_w, version)
        with sub, pub:
            # The SUBACK leaves the subscriber's worker only once the sibling
            # knows the interest: a publish right after it must arrive.
            sub.subscribe(topic, 2)
            pub.publish(topic, b"across-%d" % qos, qos)
            msg = sub.get()
            assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, b"across-%d" % qos, qos, False)
            # Downgraded to the subscription's QoS across workers too.
            low = unique("xw/qos-low/")
            sub.subscribe(low, 0)
            pub.publish(low, b"low", qos)
            msg = sub.get()
            assert (msg.topic, msg.payload, msg.qos) == (low, b"low", 0)
            assert sub.messages.empty()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_v5_properties_kept_across_workers(node2, qos):
    for sub_w, pub_w in PAIRS:
        topic = unique("xw/props/")
        sub, pub = _pair(node2, sub_w, pub_w, 5)
        with sub, pub:
            sub.subscribe(topic, 2)
            pub.publish(topic, b"\xe2\x82\xac utf-8", qos, properties=_publish_props())
            msg = sub.get()
            assert (msg.payload, msg.qos) == (b"\xe2\x82\xac utf-8", qos)
            p = msg.properties
            assert p.UserProperty == [("k1", "v1"), ("k2", "v2"), ("k1", "v3")]
            assert p.ContentType == "application/x-raftmq-test"
            assert p.ResponseTopic == "reply/to/me"
            assert p.CorrelationData == b"\x00\x01corr\xff"
            assert p.PayloadFormatIndicator == 1
            # The remaining lifetime: at most what was sent, not reset and not lost.
            assert 110 <= p.MessageExpiryInterval <= 120


@pytest.mark.parametrize("version", [4, 5])
def test_retain_flag_across_workers(node2, version):
    for sub_w, pub_w in PAIRS:
        topic = unique("xw/rflag/")
        sub, pub = _pair(node2, sub_w, pub_w, version)
        with sub, pub:
            if version == 5:
                sub.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
                other = unique("xw/rflag-norap/")
                sub.subscribe(other, 1)
            else:
                sub.subscribe(topic, 1)
            pub.publish(topic, b"kept", 1, retain=True)
            msg = sub.get()
            # A live delivery: retain only with Retain As Published (MQTT 5), else 0.
            assert (msg.payload, msg.retain) == (b"kept", version == 5)
            if version == 5:
                pub.publish(other, b"live", 1, retain=True)
                msg = sub.get()
                assert (msg.payload, msg.retain) == (b"live", False)
            pub.publish(topic, b"", 1, retain=True)  # clean up the retained message
            sub.get()


def _collect_until(client: Paho, count: int, timeout: float) -> list[mqtt.MQTTMessage]:
    out: list[mqtt.MQTTMessage] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        try:
            out.append(client.get(timeout=max(0.01, deadline - time.monotonic())))
        except Exception:
            break
    return out


@pytest.mark.parametrize("version", [4, 5])
def test_order_per_publisher_and_topic_across_workers(node2, version):
    """500 messages on each of three topics, one per QoS, interleaved.  (MQTT
    orders per topic and QoS: a QoS 2 message may overtake a QoS 0 one.)"""
    n = 500
    sub, pub = _pair(node2, 0, 1, version)
    base = unique("xw/order/")
    topics = {f"{base}/q{q}": q for q in (0, 1, 2)}
    with sub, pub:
        sub.subscribe(f"{base}/#", 2)
        infos = []
        for i in range(n):
            for t, q in topics.items():
                infos.append(pub.client.publish(t, b"%d" % i, qos=q))
        for info in infos:
            info.wait_for_publish(timeout=30)
        got = _collect_until(sub, n * len(topics), 30)
    per_topic: dict[str, list[int]] = {t: [] for t in topics}
    for m in got:
        assert m.qos == topics[m.topic]
        per_topic[m.topic].append(int(m.payload))
    for t in topics:
        assert per_topic[t] == list(range(n)), (t, len(per_topic[t]), per_topic[t][:20])


def test_order_per_publisher_four_workers(node4):
    """Three publishers on workers 0, 1, 2 publish concurrently to one topic;
    subscribers on worker 3 and on worker 0 see each publisher's order."""
    n = 300
    topic = unique("xw/order4/")
    subs = {w: Paho(node4, owned_id(w, 4, "sub4-"), 5) for w in (3, 0)}
    pubs = {w: Paho(node4, owned_id(w, 4, "pub4-"), 5) for w in (0, 1, 2)}
    for w, c in (*subs.items(), *pubs.items()):
        assert_placed(node4, c.client._client_id.decode(), w)
    try:
        for s in subs.values():
            s.subscribe(topic, 1)

        def run(w: int, c: Paho) -> None:
            infos = [c.client.publish(topic, b"%d:%d" % (w, i), qos=1) for i in range(n)]
            for info in infos:
                info.wait_for_publish(timeout=30)

        threads = [threading.Thread(target=run, args=item) for item in pubs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        for sw, s in subs.items():
            got = _collect_until(s, 3 * n, 30)
            seqs: dict[int, list[int]] = {0: [], 1: [], 2: []}
            for m in got:
                w, i = m.payload.split(b":")
                seqs[int(w)].append(int(i))
            for w, seq in seqs.items():
                assert seq == list(range(n)), (f"subscriber on {sw}, publisher on {w}", len(seq))
    finally:
        for c in (*subs.values(), *pubs.values()):
            c.close()


# -- retained -------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_retained_set_on_one_worker_seen_and_cleared_from_another(node2, version):
    topic = unique("xw/retained/")
    a_id, b_id = owned_id(0, 2, "ra"), owned_id(1, 2, "rb")
    with Paho(node2, a_id, version) as a:
        assert_placed(node2, a_id, 0)
        kw = {"properties": _publish_props()} if version == 5 else {}
        a.publish(topic, b"retained on A", 1, retain=True, **kw)
    with Paho(node2, b_id, version) as b:
        assert_placed(node2, b_id, 1)
        b.subscribe(topic, 1)
        msg = b.get()
        assert (msg.payload, msg.retain, msg.qos) == (b"retained on A", True, 1)
        if version == 5:
            assert msg.properties.UserProperty == [("k1", "v1"), ("k2", "v2"), ("k1", "v3")]
            assert msg.properties.ContentType == "application/x-raftmq-test"
        # Replaced on B, then cleared on B.
        b.publish(topic, b"replaced on B", 1, retain=True)
        b.get()
    a_check = connected(node2, owned_id(0, 2, "rchk"))
    with a_check:
        a_check.subscribe(1, [(topic, 1)])
        got = a_check.recv_publish()
        assert (got.payload, got.retain) == (b"replaced on B", True)
    with Paho(node2, owned_id(1, 2, "rb"), version) as b:
        b.publish(topic, b"", 1, retain=True)
    a_id2 = owned_id(0, 2, "ra")
    with connected(node2, a_id2, version=version) as a:
        assert_placed(node2, a_id2, 0)
        a.subscribe(1, [(topic, 1)])
        assert a.no_publish_pending(0.3), "the retained message cleared on worker 1 is still on worker 0"


# -- wills ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_will_published_across_workers(node2, version):
    for will_w, sub_w in PAIRS:
        topic = unique("xw/will/")
        sid, wid = owned_id(sub_w, 2, "wsub"), owned_id(will_w, 2, "will")
        with Paho(node2, sid, version) as sub:
            assert_placed(node2, sid, sub_w)
            sub.subscribe(topic, 2)
            props = {"user_property": [("why", "gone")], "content_type": "text/x-will"} \
                if version == 5 else None
            dying = connected(node2, wid, version=version,
                              will=Will(topic, b"died on %d" % will_w, qos=1, props=props))
            assert_placed(node2, wid, will_w)
            assert sub.messages.empty()
            dying.close()  # no DISCONNECT
            msg = sub.get(timeout=5)
            assert (msg.topic, msg.payload, msg.qos) == (topic, b"died on %d" % will_w, 1)
            if version == 5:
                assert msg.properties.UserProperty == [("why", "gone")]
                assert msg.properties.ContentType == "text/x-will"


@pytest.mark.waits
def test_will_delay_across_workers(node2):
    topic = unique("xw/willdelay/")
    sid, wid = owned_id(1, 2, "wdsub"), owned_id(0, 2, "wd")
    with Paho(node2, sid, 5) as sub:
        sub.subscribe(topic, 1)
        assert_placed(node2, sid, 1)
        dying = connected(node2, wid, version=5, clean=False,
                          props={"session_expiry_interval": 30},
                          will=Will(topic, b"late", qos=1, props={"will_delay_interval": 2}))
        assert_placed(node2, wid, 0)
        closed_at = time.monotonic()
        dying.close()
        msg = sub.get(timeout=8)
        waited = time.monotonic() - closed_at
        assert msg.payload == b"late"
        assert waited >= 1.5, f"will delay 2 s, the will came after {waited:.2f} s"


@pytest.mark.waits
def test_will_delay_cancelled_by_reconnect_through_the_other_worker(node2):
    """The client comes back within its will delay on a connection that worker 1
    accepted and handed to the owner, worker 0: no will."""
    pids = worker_pids(node2, 2)
    topic = unique("xw/willcancel/")
    sid, wid = owned_id(1, 2, "wcsub"), owned_id(0, 2, "wc")
    with Paho(node2, sid, 5) as sub:
        sub.subscribe(topic, 1)
        will = Will(topic, b"should not come", qos=1, props={"will_delay_interval": 3})
        dying = connected(node2, wid, version=5, clean=False,
                          props={"session_expiry_interval": 30}, will=will)
        dying.close()
        time.sleep(0.5)
        back = raw_over(socket_on_worker(node2, 1, pids), 5)
        with back:
            ack = back.connect(wid, clean=False, props={"session_expiry_interval": 30})
            assert ack.reason == 0 and ack.session_present
            assert placements(node2)[wid] == [0, 0]
            with pytest.raises(queue.Empty):
                got = sub.get(timeout=4.5)
                pytest.fail(f"will published although the client came back: {got.payload!r}")
            back.disconnect()


# -- shared subscriptions -----------------------------------------------------------


def _share_members(node, workers: int, per_worker: int, group: str, topic: str):
    members = []
    for w in range(workers):
        for _ in range(per_worker):
            cid = owned_id(w, workers, "share")
            c = Paho(node, cid, 5)
            assert_placed(node, cid, w)
            c.subscribe(f"$share/{group}/{topic}", 1)
            members.append((w, c))
    return members


def _drain_members(members, expected: int, timeout: float = 20.0) -> dict[int, list[bytes]]:
    """Worker -> payloads its members got, until ``expected`` in all (+ a quiet period)."""
    got: dict[int, list[bytes]] = {}
    deadline = time.monotonic() + timeout
    total = 0
    quiet_until = None
    while time.monotonic() < deadline:
        progressed = False
        for w, c in members:
            while not c.messages.empty():
                got.setdefault(w, []).append(c.messages.get().payload)
                total += 1
                progressed = True
        if total >= expected:
            quiet_until = quiet_until or time.monotonic() + 0.5
            if time.monotonic() > quiet_until:
                break
        if not progressed:
            time.sleep(0.02)
    return got


def test_shared_subscription_spans_two_workers(node2):
    topic = unique("xw/shared/")
    group = unique("g")
    members = _share_members(node2, 2, 2, group, topic)
    pubs = {w: Paho(node2, owned_id(w, 2, "spub"), 5) for w in (0, 1)}
    try:
        n = 100
        for i in range(n):
            for w, p in pubs.items():
                p.client.publish(topic, b"%d-%d" % (w, i), qos=1)
        for p in pubs.values():
            p.client.publish(topic, b"end", qos=1).wait_for_publish(timeout=20)
        got = _drain_members(members, 2 * n + 2)
        every = [x for payloads in got.values() for x in payloads]
        expected = sorted([b"%d-%d" % (w, i) for w in (0, 1) for i in range(n)] + [b"end", b"end"])
        assert sorted(every) == expected, "each message must reach exactly one member node-wide"
        assert set(got) == {0, 1} and all(len(v) >= 10 for v in got.values()), \
            {w: len(v) for w, v in got.items()}
    finally:
        for c in (*pubs.values(), *(c for _, c in members)):
            c.close()


def test_shared_subscription_members_only_on_the_sibling(node2):
    """Every member on worker 1, publisher on worker 0: once each, not zero, not twice;
    a plain subscriber beside the group still gets every message."""
    topic = unique("xw/shared1/")
    group = unique("g")
    members = [(1, Paho(node2, owned_id(1, 2, "sh1"), 5)) for _ in range(2)]
    for _, c in members:
        c.subscribe(f"$share/{group}/{topic}", 1)
    plain = Paho(node2, owned_id(1, 2, "plain"), 5)
    plain.subscribe(topic, 1)
    pub = Paho(node2, owned_id(0, 2, "sh1pub"), 5)
    try:
        n = 50
        for i in range(n):
            pub.client.publish(topic, b"%d" % i, qos=1)
        pub.client.publish(topic, b"end", qos=1).wait_for_publish(timeout=20)
        got = _drain_members(members, n + 1)
        every = sorted(x for v in got.values() for x in v)
        assert every == sorted([b"%d" % i for i in range(n)] + [b"end"])
        assert [m.payload for m in _collect_until(plain, n + 1, 10)] == \
            [b"%d" % i for i in range(n)] + [b"end"]
    finally:
        for c in (pub, plain, *(c for _, c in members)):
            c.close()


def test_shared_subscription_spans_four_workers(node4):
    topic = unique("xw/shared4/")
    group = unique("g")
    members = _share_members(node4, 4, 1, group, topic)
    pub = Paho(node4, owned_id(2, 4, "s4pub"), 5)
    try:
        n = 200
        for i in range(n):
            pub.client.publish(topic, b"%d" % i, qos=1)
        pub.client.publish(topic, b"end", qos=1).wait_for_publish(timeout=20)
        got = _drain_members(members, n + 1)
        every = sorted(x for v in got.values() for x in v)
        assert every == sorted([b"%d" % i for i in range(n)] + [b"end"])
        assert set(got) == {0, 1, 2, 3}, {w: len(v) for w, v in got.items()}
    finally:
        for c in (pub, *(c for _, c in members)):
            c.close()


# -- takeover -------------------------------------------------------------------------


@pytest.mark.parametrize("owner", [0, 1])
def test_takeover_through_the_other_worker_v5(node2, owner):
    pids = worker_pids(node2, 2)
    cid = owned_id(owner, 2, "take")
    first = connected(node2, cid, version=5)
    second = raw_over(socket_on_worker(node2, 1 - owner, pids), 5)
    with first, second:
        ack = second.connect(cid)
        assert ack.reason == 0
        p = first.recv(5)
        assert p.type == DISCONNECT and p.reason == 0x8E, p
        with pytest.raises(Closed):
            first.recv(5)
        assert placements(node2)[cid] == [owner, owner]
        # The new connection is the live one.
        topic = unique("xw/take/")
        second.subscribe(1, [(topic, 1)])
        with Paho(node2, owned_id(1 - owner, 2, "takepub"), 5) as pub:
            pub.publish(topic, b"to the new one", 1)
        assert second.recv_publish().payload == b"to the new one"


def test_takeover_through_the_other_worker_v311_keeps_session(node2):
    pids = worker_pids(node2, 2)
    cid = owned_id(0, 2, "take311")
    topic = unique("xw/take311/")
    first = connected(node2, cid, version=4, clean=False)
    first.subscribe(1, [(topic, 1)])
    second = raw_over(socket_on_worker(node2, 1, pids), 4)
    with first, second:
        ack = second.connect(cid, clean=False)
        assert ack.reason == 0 and ack.session_present
        with pytest.raises(Closed):
            first.recv(5)
        with Paho(node2, owned_id(1, 2, "take311pub"), 4) as pub:
            pub.publish(topic, b"session kept", 1)
        assert second.recv_publish().payload == b"session kept"
        second.disconnect()
    with connected(node2, cid, version=4, clean=True):
        pass  # drop the session


# -- session resume -------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_session_resume_across_workers(node2, version):
    """Persistent session owned by worker 0; QoS 1 published from worker 1 while
    offline; the client reconnects through a connection worker 1 accepted."""
    pids = worker_pids(node2, 2)
    cid = owned_id(0, 2, "resume")
    topic = unique("xw/resume/")
    props = {"session_expiry_interval": 300} if version == 5 else None
    with connected(node2, cid, version=version, clean=False, props=props) as c:
        c.subscribe(1, [(topic, 1)])
        c.disconnect()
    n = 40
    with Paho(node2, owned_id(1, 2, "rpub"), version) as pub:
        for i in range(n):
            pub.publish(topic, b"%d" % i, 1)
    c = raw_over(socket_on_worker(node2, 1, pids), version)
    with c:
        ack = c.connect(cid, clean=False, props=props)
        assert ack.reason == 0 and ack.session_present
        got = [c.recv_publish(5) for _ in range(n)]
        assert [p.payload for p in got] == [b"%d" % i for i in range(n)]
        assert all(p.qos == 1 for p in got)
        assert c.no_publish_pending(0.2)
        # In flight: delivered, never acknowledged, then the connection drops.
        with Paho(node2, owned_id(1, 2, "rpub"), version) as pub:
            for i in range(n, n + 5):
                pub.publish(topic, b"%d" % i, 1)
        inflight = [c.recv_publish(5, auto_ack=False) for _ in range(5)]
        assert [p.payload for p in inflight] == [b"%d" % i for i in range(n, n + 5)]
        assert not any(p.dup for p in inflight)
    c2 = raw_over(socket_on_worker(node2, 1, pids), version)
    with c2:
        ack = c2.connect(cid, clean=False, props=props)
        assert ack.reason == 0 and ack.session_present
        again = [c2.recv_publish(5, auto_ack=False) for _ in range(5)]
        assert [(p.payload, p.pid, p.dup) for p in again] == \
            [(p.payload, p.pid, True) for p in inflight]
        for p in again:
            c2.ack(PUBACK, p.pid)
        assert c2.no_publish_pending(0.3)
        c2.disconnect()
    assert set(placements(node2)[cid]) == {0}
    with connected(node2, cid, version=version, clean=True):
        pass


# -- no local, subscription identifiers ------------------------------------------------


def test_no_local_across_workers(node2):
    topic = unique("xw/nolocal/")
    a_id, b_id = owned_id(0, 2, "nla"), owned_id(1, 2, "nlb")
    with connected(node2, a_id, version=5) as a, connected(node2, b_id, version=5) as b:
        assert_placed(node2, a_id, 0)
        assert_placed(node2, b_id, 1)
        a.subscribe(1, [(topic, sub_options(1, no_local=True))])
        b.subscribe(1, [(topic, sub_options(1))])
        a.publish(topic, b"from a", 1, pid=1)
        assert a.expect(PUBACK).pid == 1
        assert b.recv_publish().payload == b"from a"
        assert a.no_publish_pending(0.3), "no local: a got its own message back"
        # No Local is about the client, not the worker: b's message reaches a.
        b.publish(topic, b"from b", 1, pid=2)
        assert a.recv_publish().payload == b"from b"
        own = [b.recv(), b.recv()]  # b's PUBACK and its own copy (b has no No Local)
        assert sorted((p.type, p.payload) for p in own) == [(PUBLISH, b"from b"), (PUBACK, b"")]


def test_subscription_identifiers_across_workers(node2):
    base = unique("xw/subid/")
    a_id, b_id, pub_id = owned_id(0, 2, "sia"), owned_id(1, 2, "sib"), owned_id(1, 2, "sip")
    with connected(node2, a_id, version=5) as a, connected(node2, b_id, version=5) as b, \
            connected(node2, pub_id, version=5) as pub:
        a.subscribe(1, [(f"{base}/+/x", 1)], {"subscription_identifier": 7})
        a.subscribe(2, [(f"{base}/#", 1)], {"subscription_identifier": 9})
        b.subscribe(1, [(f"{base}/#", 1)], {"subscription_identifier": 5})
        pub.publish(f"{base}/a/x", b"both", 1, pid=1)
        assert pub.expect(PUBACK).pid == 1
        got = a.drain_publishes()
        ids = set()
        for p in got:
            assert p.payload == b"both"
            sids = p.props.get("subscription_identifier", [])
            assert sids, p
            ids.update(sids if isinstance(sids, list) else [sids])
        assert ids == {7, 9}, got
        pub.publish(f"{base}/b/y", b"one", 1, pid=2)
        p = a.recv_publish()
        sids = p.props.get("subscription_identifier")
        assert (p.payload, sids if isinstance(sids, list) else [sids]) == (b"one", [9])
        assert b.recv_publish().props.get("subscription_identifier") in (5, [5])


# -- connection hand-off --------------------------------------------------------------


@pytest.mark.parametrize("acceptor", [0, 1])
def test_handoff_moves_the_socket_to_the_owner(node2, acceptor):
    pids = worker_pids(node2, 2)
    owner = 1 - acceptor
    s = socket_on_worker(node2, acceptor, pids)
    cid = owned_id(owner, 2, "hand")
    c = raw_over(s, 5)
    with c:
        assert c.connect(cid).reason == 0
        assert_placed(node2, cid, owner)
        # The broker side of this very TCP connection now lives in the owner.
        assert accepting_worker(node2, s, pids) == owner
        topic = unique("xw/hand/")
        c.subscribe(1, [(topic, 1)])
        with Paho(node2, owned_id(acceptor, 2, "handpub"), 5) as pub:
            pub.publish(topic, b"through", 1)
        assert c.recv_publish().payload == b"through"


@pytest.mark.parametrize("workers", [2, 4])
def test_many_concurrent_connects_are_handed_to_their_owners(node2, node4, workers):
    node = node2 if workers == 2 else node4
    pids = worker_pids(node, workers)
    n = 40
    socks = []
    for _ in range(n):
        c = raw_over(socket.create_connection((node.host, node.port), timeout=5), 4)
        socks.append(c)
    acceptors = [accepting_worker(node, c.sock, pids) for c in socks]
    ids = [f"rnd-{uuid.uuid4()}" for _ in range(n)]
    for c, cid in zip(socks, ids, strict=True):  # every CONNECT out before any CONNACK is read
        c.send(connect_packet(cid, version=4))
    try:
        for c, cid in zip(socks, ids, strict=True):
            p = c.recv(10)
            assert p.reason == 0, (cid, p)
        placed = placements(node)
        for cid in ids:
            assert placed.get(cid) == [owner_of(cid, workers)], (cid, placed.get(cid))
        handed = [cid for cid, a in zip(ids, acceptors, strict=True) if a != owner_of(cid, workers)]
        assert handed, f"no connection was accepted by a worker other than its owner: {acceptors}"
        assert len(set(acceptors)) > 1, f"the kernel gave every connection to one worker: {acceptors}"
        for c, cid in zip(socks, ids, strict=True):
            assert accepting_worker(node, c.sock, pids) == owner_of(cid, workers)
    finally:
        for c in socks:
            c.close()
