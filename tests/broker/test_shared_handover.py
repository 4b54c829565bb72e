"""Shared subscriptions: a member's unacknowledged messages when its session ends.

MQTT 5 §4.8.2: "If the Client's Session terminates before the Client reconnects,
the Server SHOULD send the Application Message to another Client that is
subscribed to the same Shared Subscription."  raftmq does, for the messages the
member has in flight without an acknowledgement (QoS 1 PUBACK, QoS 2 PUBREC) and
for those still queued for it: when a clean-session member leaves (DISCONNECT
or a lost connection) and when a persistent member's session expires.  With
several workers the group spans the node (workers/mesh.py): the messages go to
a member in the same worker if one is connected, else to one in a sibling.

Mosquitto 2.0.11 does not: the messages of a member that leaves are dropped
(checked with the script of ``test_clean_member_leaving_hands_its_messages_over``:
the other member got only its own share).  So those tests run against raftmq
only; the differential tests check what both brokers do the same: a persistent
member that is only offline keeps its messages and gets them again when it
returns, and a QoS 2 message the leaving member has acknowledged with PUBREC is
its own (not given to another member).

The members are real paho-mqtt clients; ``hold=True`` switches paho's automatic
acknowledgements off (sessionclients.py), so its messages stay unacknowledged.
"""

from __future__ import annotations

import time

import pytest

from raftmq.workers.ownership import owner_of
from support.helpers import unique
from support.sessionclients import Mq

pytestmark = pytest.mark.timeout(90)

N = 8


def owned(prefix: str, worker: int, workers: int) -> str:
    """A fresh client id owned by ``worker`` of ``workers`` (the member's worker)."""
    while True:
        client_id = unique(prefix)
        if owner_of(client_id, workers) == worker:
            return client_id


def collect(client: Mq, into: list[bytes], count: int, timeout: float) -> list[bytes]:
    """Wait until ``into`` holds ``count`` payloads (or the time is up)."""
    deadline = time.monotonic() + timeout
    while len(into) < count and time.monotonic() < deadline:
        into += client.payloads(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
    return into


def publish_all(broker, topic: str, qos: int = 1, n: int = N) -> list[bytes]:
    pub = Mq(broker, unique("sh-pub"))
    payloads = [f"m{i}".encode() for i in range(n)]
    for p in payloads:
        pub.publish(topic, p, qos)
    pub.disconnect()
    return payloads


def _group(broker, workers: int, holder_kw: dict, qos: int = 1):
    """A holder (worker 0) and a taker (the last worker) in one share group."""
    topic = unique("sh/") + "/x"
    group = unique("g")
    holder = Mq(broker, owned("sh-hold", 0, workers), hold=True, **holder_kw)
    taker = Mq(broker, owned("sh-take", workers - 1, workers))
    for c in (holder, taker):
        c.subscribe(f"$share/{group}/{topic}", qos)
    return topic, holder, taker


def _spread(holder: Mq, taker: Mq, sent: list[bytes], held_max: int) -> tuple[list, list]:
    """Both got some; the holder at most ``held_max`` (its window), not acknowledged."""
    taken: list[bytes] = []
    held: list[bytes] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not held or not taken):
        held += holder.payloads(timeout=0.1)
        taken += taker.payloads(timeout=0.1)
    time.sleep(0.3)  # everything the broker will send now has arrived
    held += holder.payloads()
    taken += taker.payloads()
    assert held and taken, (held, taken)
    assert len(held) <= held_max
    return held, taken


@pytest.mark.parametrize("workers", [1, 2])
def test_clean_member_leaving_hands_its_messages_over(raftmq_factory, workers) -> None:
    """Clean start, expiry 0, DISCONNECT: the session ends.  Its in-flight messages
    (Receive Maximum 2, none acknowledged) and those queued behind them go to the
    other member, each once."""
    b = raftmq_factory(workers=workers)
    topic, holder, taker = _group(b, workers, {"receive_max": 2})
    sent = publish_all(b, topic)
    held, taken = _spread(holder, taker, sent, held_max=2)
    assert len(taken) < N - 2, "the holder was given too few messages to have queued ones"
    holder.disconnect()
    collect(taker, taken, N, timeout=10)
    assert sorted(taken) == sorted(sent), f"held {held}"
    taker.disconnect()


@pytest.mark.parametrize("workers", [1, 2])
def test_clean_member_whose_connection_drops_hands_its_messages_over(raftmq_factory,
                                                                     workers) -> None:
    """MQTT 3.1.1 clean session, the TCP connection lost without DISCONNECT."""
    b = raftmq_factory(workers=workers, max_inflight_messages=2)
    topic = unique("sh/") + "/y"
    group = unique("g")
    holder = Mq(b, owned("sh-hold", 0, workers), version=4, hold=True)
    taker = Mq(b, owned("sh-take", workers - 1, workers), version=4)
    for c in (holder, taker):
        c.subscribe(f"$share/{group}/{topic}", 1)
    sent = publish_all(b, topic)
    held, taken = _spread(holder, taker, sent, held_max=2)
    holder.drop()
    collect(taker, taken, N, timeout=10)
    assert sorted(taken) == sorted(sent), f"held {held}"
    taker.disconnect()


@pytest.mark.waits
@pytest.mark.parametrize("workers", [1, 2])
def test_persistent_member_hands_its_messages_over_when_its_session_expires(
        raftmq_factory, workers) -> None:
    """Session expiry 2 s: while the session lives its messages wait for it; when
    it expires they go to the other member."""
    b = raftmq_factory(workers=workers)
    topic, holder, taker = _group(b, workers, {"receive_max": 2, "expiry": 2})
    sent = publish_all(b, topic)
    held, taken = _spread(holder, taker, sent, held_max=2)
    mine = len(taken)
    holder.disconnect()  # DISCONNECT 0x00: the session stays for 2 s
    gone = time.monotonic()
    time.sleep(0.8)
    taken += taker.payloads()
    assert len(taken) == mine, "handed over before the session ended"
    collect(taker, taken, N, timeout=8)
    assert sorted(taken) == sorted(sent), f"held {held}"
    assert time.monotonic() - gone >= 1.9
    taker.disconnect()


def test_only_messages_of_the_shared_subscription_are_handed_over(raftmq_factory) -> None:
    """The leaving member also has a normal subscription matching the topic: its
    copies from that subscription are its own (not the group's) and are not
    given to the other member, who gets each message once."""
    b = raftmq_factory(workers=1)
    topic, holder, taker = _group(b, 1, {})
    holder.subscribe(topic.rsplit("/", 1)[0] + "/#", 1)
    sent = publish_all(b, topic)
    held: list[bytes] = []
    collect(holder, held, N + 1, timeout=5)  # all N normal copies, and its group share
    taken = collect(taker, [], 1, timeout=5)
    time.sleep(0.3)
    taken += taker.payloads()
    holder.disconnect()
    collect(taker, taken, N, timeout=10)
    time.sleep(0.5)
    taken += taker.payloads()
    assert sorted(taken) == sorted(sent)


def test_member_of_two_groups_hands_each_message_to_its_own_group(raftmq_factory) -> None:
    b = raftmq_factory(workers=1)
    topic = unique("sh/") + "/z"
    g1, g2 = unique("ga"), unique("gb")
    holder = Mq(b, unique("sh-hold"), hold=True)
    holder.subscribe(f"$share/{g1}/{topic}", 1)
    holder.subscribe(f"$share/{g2}/{topic}", 1)
    t1, t2 = Mq(b, unique("sh-t1")), Mq(b, unique("sh-t2"))
    t1.subscribe(f"$share/{g1}/{topic}", 1)
    t2.subscribe(f"$share/{g2}/{topic}", 1)
    sent = publish_all(b, topic)
    collect(holder, [], N, timeout=5)  # half of each group's messages
    time.sleep(0.3)
    holder.disconnect()
    for t in (t1, t2):
        got = collect(t, [], N, timeout=10)
        time.sleep(0.3)
        got += t.payloads()
        assert sorted(got) == sorted(sent)
        t.disconnect()


# -- differential: what Mosquitto does the same ----------------------------------------


@pytest.mark.parametrize("kind", ["raftmq", "mosquitto"])
def test_offline_persistent_member_keeps_its_messages(kind, broker_factory) -> None:
    """The session did not end: nothing goes to the other member; the member gets
    its unacknowledged messages again when it comes back."""
    b = broker_factory(kind)
    topic = unique("sh/") + "/p"
    group = unique("g")
    hold_id = unique("sh-hold")
    holder = Mq(b, hold_id, hold=True, clean=False, expiry=300)
    taker = Mq(b, unique("sh-take"))
    for c in (holder, taker):
        c.subscribe(f"$share/{group}/{topic}", 1)
    sent = publish_all(b, topic)
    held, taken = _spread(holder, taker, sent, held_max=N)
    holder.drop()
    time.sleep(1.0)
    taken += taker.payloads()
    assert len(taken) + len(held) == N
    back = Mq(b, hold_id, clean=False, expiry=300)
    assert back.present
    again = collect(back, [], len(held), timeout=5)
    assert sorted(again) == sorted(held)
    assert sorted(taken + again) == sorted(sent)
    back.disconnect()
    taker.disconnect()


@pytest.mark.parametrize("kind", ["raftmq", "mosquitto"])
def test_qos2_message_acknowledged_with_pubrec_stays_with_the_leaving_member(
        kind, broker_factory) -> None:
    """PUBREC passed the message to the member (MQTT 5 §4.3.3): it is not handed
    over when the member's session ends before PUBCOMP (paho sends PUBREC at
    once and, with manual acknowledgements, holds PUBCOMP)."""
    b = broker_factory(kind)
    topic = unique("sh/") + "/q2"
    group = unique("g")
    holder = Mq(b, unique("sh-hold"), hold=True)
    taker = Mq(b, unique("sh-take"))
    for c in (holder, taker):
        c.subscribe(f"$share/{group}/{topic}", 2)
    sent = publish_all(b, topic, qos=2)
    held, taken = _spread(holder, taker, sent, held_max=N)
    time.sleep(0.3)  # PUBREC, PUBREL passed
    holder.disconnect()
    time.sleep(1.0)
    taken += taker.payloads()
    assert sorted(taken + held) == sorted(sent)
    taker.disconnect()


@pytest.mark.waits
@pytest.mark.parametrize("workers", [1, 2])
def test_persistent_member_restored_after_a_restart_hands_over_when_it_expires(
        raftmq_factory, workers) -> None:
    """The member's in-flight and queued messages come back from the store after a
    clean restart (which does not say by which subscription they came: the
    member's one matching group is taken); when its session expires -- 5 s after
    its disconnect, not after the restart -- they go to the other member."""
    b = raftmq_factory(workers=workers)
    topic = unique("sh/") + "/r"
    share = f"$share/{unique('g')}/{topic}"
    holder = Mq(b, owned("sh-hold", 0, workers), hold=True, clean=False, expiry=5,
                receive_max=2)
    taker = Mq(b, owned("sh-take", workers - 1, workers))
    for c in (holder, taker):
        c.subscribe(share, 1)
    sent = publish_all(b, topic)
    held, taken = _spread(holder, taker, sent, held_max=2)
    holder.drop()
    gone = time.monotonic()
    taker.disconnect()
    time.sleep(0.3)
    b.stop()
    b.start()
    taker = Mq(b, owned("sh-take", workers - 1, workers))
    taker.subscribe(share, 1)
    rest = collect(taker, [], N - len(taken), timeout=12)
    assert sorted(taken + rest) == sorted(sent), f"held {held}"
    assert time.monotonic() - gone < 5 + 3.0, "expired later than 5 s after the disconnect"
    taker.disconnect()
