"""$SYS/broker/... topics as Mosquitto publishes them, every sys_interval seconds."""

from __future__ import annotations

import re

import pytest

from support.helpers import connected, unique
from support.mqttraw import PUBACK

pytestmark = pytest.mark.waits  # every test waits for $SYS intervals

# The topics Mosquitto 2.0 publishes that the issue names (version, uptime, clients, messages
# and bytes, publish counters, subscriptions, retained count, load averages).
REQUIRED = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/clients/total",
    "$SYS/broker/clients/maximum",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
    "$SYS/broker/publish/messages/received",
    "$SYS/broker/publish/messages/sent",
    "$SYS/broker/subscriptions/count",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/load/messages/received/1min",
    "$SYS/broker/load/messages/sent/1min",
    "$SYS/broker/load/connections/5min",
    "$SYS/broker/load/bytes/received/15min",
]
NUMBER = re.compile(rb"^\d+(\.\d+)?$")


@pytest.fixture
def sys_broker(make_broker):
    return make_broker(sys_interval=1)


def _sys_values(broker, seconds: float = 2.5) -> dict[str, bytes]:
    """The latest value of every $SYS topic seen within ``seconds``."""
    with connected(broker) as c:
        c.subscribe(1, [("$SYS/#", 0)])
        return {p.topic: p.payload for p in c.collect(seconds)}


def test_sys_topics_published(sys_broker):
    values = _sys_values(sys_broker)
    missing = [t for t in REQUIRED if t not in values]
    assert not missing, f"missing $SYS topics: {missing}"
    assert values["$SYS/broker/version"].startswith(b"raftmq version") or \
        values["$SYS/broker/version"].startswith(b"mosquitto version")
    assert re.match(rb"^\d+ seconds$", values["$SYS/broker/uptime"])
    for t in REQUIRED[2:]:
        assert NUMBER.match(values[t]), (t, values[t])


def test_sys_counters_follow_activity(sys_broker):
    topic = unique("sysact/")
    with connected(sys_broker) as s1, connected(sys_broker) as s2:
        s1.subscribe(1, [(topic, 1), (topic + "/x", 0)])
        s2.subscribe(1, [(topic, 1)])
        with connected(sys_broker) as p:
            for i in range(10):
                p.publish(topic, b"x", qos=1, pid=i + 1, retain=(i == 0))
                p.expect(PUBACK)
        s1.drain_publishes(0.3)
        s2.drain_publishes(0.3)
        values = _sys_values(sys_broker, 2.5)
        assert int(values["$SYS/broker/clients/connected"]) >= 3  # s1, s2 and the $SYS reader
        assert int(values["$SYS/broker/subscriptions/count"]) >= 4
        assert int(values["$SYS/broker/retained messages/count"]) >= 1
        assert int(values["$SYS/broker/publish/messages/received"]) >= 5  # Mosquitto counted 9 of 10
        assert int(values["$SYS/broker/publish/messages/sent"]) >= 20
        assert int(values["$SYS/broker/messages/received"]) >= 10
        assert int(values["$SYS/broker/bytes/received"]) > 0
        assert int(values["$SYS/broker/clients/maximum"]) >= 3


def test_sys_uptime_advances(sys_broker):
    with connected(sys_broker) as c:
        c.subscribe(1, [("$SYS/broker/uptime", 0)])
        seen = [int(p.payload.split()[0]) for p in c.collect(3.2)]
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] > seen[0]


def test_sys_disabled_with_interval_zero(make_broker):
    b = make_broker(sys_interval=0)
    with connected(b) as c:
        c.subscribe(1, [("$SYS/broker/uptime", 0), ("$SYS/broker/clients/connected", 0)])
        assert c.nothing_for(1.5)


def test_client_cannot_publish_into_sys(sys_broker):
    """Mosquitto ignores client PUBLISHes to $SYS/...: subscribers do not see them."""
    with connected(sys_broker) as c, connected(sys_broker) as p:
        c.subscribe(1, [("$SYS/broker/fake", 0)])
        p.publish("$SYS/broker/fake", b"spoof", qos=1, pid=1)
        p.expect(PUBACK)
        assert c.no_publish_pending()
