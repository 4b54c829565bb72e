"""Real client libraries and tools against the broker: paho-mqtt 2.x (3.1, 3.1.1, 5.0) and
mosquitto_pub / mosquitto_sub."""

from __future__ import annotations

import shutil
import subprocess

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from support.helpers import Paho, unique

TOOL_TIMEOUT = 10


@pytest.mark.parametrize("version", [3, 4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_roundtrip(broker, version, qos):
    topic = unique("paho/")
    with Paho(broker, version=version) as sub, Paho(broker, version=version) as pub:
        sub.subscribe(topic, qos)
        for i in range(5):
            pub.publish(topic, f"m{i}".encode(), qos)
        got = [sub.get() for _ in range(5)]
        assert [m.payload for m in got] == [f"m{i}".encode() for i in range(5)]
        assert all(m.qos == qos and m.topic == topic for m in got)


def test_paho_v5_properties(broker):
    topic = unique("paho/")
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "text/plain"
    props.ResponseTopic = "answer/here"
    props.CorrelationData = b"cd"
    props.UserProperty = [("a", "1"), ("b", "2")]
    with Paho(broker, version=5) as sub, Paho(broker, version=5) as pub:
        sub.subscribe(topic, 1)
        pub.publish(topic, b"p", 1, properties=props)
        m = sub.get()
        assert m.properties.ContentType == "text/plain"
        assert m.properties.ResponseTopic == "answer/here"
        assert m.properties.CorrelationData == b"cd"
        assert m.properties.UserProperty == [("a", "1"), ("b", "2")]


def test_paho_persistent_session_311(broker):
    cid, topic = unique("pp"), unique("paho/")
    with Paho(broker, cid, clean=False) as s:
        s.subscribe(topic, 1)
    with Paho(broker) as p:
        p.publish(topic, b"stored", 1)
    with Paho(broker, cid, clean=False) as s:
        assert s.session_present
        assert s.get().payload == b"stored"


def test_paho_retained_and_will(broker):
    topic, will_topic = unique("paho/"), unique("pwill/")
    with Paho(broker) as p:
        p.publish(topic, b"kept", 1, retain=True)
    with Paho(broker) as watcher:
        watcher.subscribe(topic, 1)
        m = watcher.get()
        assert (m.payload, m.retain) == (b"kept", True)
        watcher.subscribe(will_topic, 1)
        dying = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("dying"))
        dying.will_set(will_topic, b"dead", 1)
        dying.connect(broker.host, broker.port, keepalive=30)
        dying.loop(timeout=1.0)
        dying.socket().close()  # abrupt: no DISCONNECT
        assert watcher.get(timeout=5).payload == b"dead"


need_tools = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto-clients not installed",
)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)


@need_tools
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub_sub_persistent(broker, version):
    """mosquitto_sub -c makes a persistent subscription and exits (-E); messages published
    with mosquitto_pub wait for it; a second mosquitto_sub -c with the same id gets them."""
    topic, cid = unique("tool/"), unique("tsub")
    base = ["-h", broker.host, "-p", str(broker.port), "-V", version]
    session = ["-c", "-i", cid, "-q", "1"] + (["-x", "60"] if version == "mqttv5" else [])
    r = _run(["mosquitto_sub", *base, *session, "-t", topic, "-E"])
    assert r.returncode == 0, r.stderr
    for i in range(3):
        r = _run(["mosquitto_pub", *base, "-t", topic, "-q", "1", "-m", f"hello {i}"])
        assert r.returncode == 0, r.stderr
    r = _run(["mosquitto_sub", *base, *session, "-t", topic, "-C", "3", "-W", "5", "-v"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{topic} hello {i}" for i in range(3)]


@need_tools
def test_mosquitto_sub_gets_retained(broker):
    topic = unique("tool/")
    port = str(broker.port)
    r = _run(["mosquitto_pub", "-h", broker.host, "-p", port, "-t", topic, "-r", "-q", "1",
              "-m", "retained value"])
    assert r.returncode == 0, r.stderr
    r = _run(["mosquitto_sub", "-h", broker.host, "-p", port, "-t", topic, "-C", "1", "-W", "5",
              "-F", "%r %t %p"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"1 {topic} retained value"


@need_tools
def test_mosquitto_sub_sys_version(make_broker):
    b = make_broker(sys_interval=1)
    r = _run(["mosquitto_sub", "-h", b.host, "-p", str(b.port), "-t", "$SYS/broker/version",
              "-C", "1", "-W", "5"])
    assert r.returncode == 0, r.stderr
    assert " version " in r.stdout
