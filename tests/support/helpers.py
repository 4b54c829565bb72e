"""Small helpers shared by the protocol tests."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from support.brokers import BrokerProcess
from support.mqttraw import RawClient

_counter = itertools.count()


def unique(prefix: str = "t") -> str:
    """A topic / client id no other test (or earlier run) uses."""
    return f"{prefix}{os.getpid()}x{next(_counter)}"


def raw(broker: BrokerProcess, version: int = 4, timeout: float = 5.0) -> RawClient:
    return RawClient(broker.host, broker.port, version, timeout)


def connected(broker: BrokerProcess, client_id: str = "", version: int = 4, **kw: Any) -> RawClient:
    """A raw client with an accepted CONNECT."""
    c = raw(broker, version)
    ack = c.connect(client_id or unique("c"), **kw)
    assert ack.reason == 0, ack
    return c


def assert_serves(broker: BrokerProcess) -> None:
    """Another client can still connect, subscribe and get a message (the broker survived)."""
    topic = unique("alive/")
    with connected(broker) as sub, connected(broker) as pub:
        sub.subscribe(1, [(topic, 1)])
        pub.publish(topic, b"still here", qos=1, pid=7)
        got = sub.recv_publish()
        assert (got.topic, got.payload) == (topic, b"still here")


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Paho:
    """A paho-mqtt 2.x client with a message queue and bounded waits."""

    def __init__(self, broker: BrokerProcess, client_id: str = "", version: int = 4,
                 clean: bool = True, **connect_kw: Any) -> None:
        protocol = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}[version]
        kw: dict[str, Any] = {"client_id": client_id or unique("paho"), "protocol": protocol}
        if version != 5:
            kw["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
        if version == 5:
            connect_kw.setdefault("clean_start", clean)
        self._connect(broker.host, broker.port, True, **connect_kw)

    def _connect(self, host: str, port: int, check: bool, **connect_kw: Any) -> None:
        """Queue what arrives, connect ``self.client``, wait for the CONNACK
        (``self.rc``; asserted a success when ``check``)."""
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put((flags, rc, props))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.connect(host, port, keepalive=30, **connect_kw)
        self.client.loop_start()
        flags, rc, _props = self.connack.get(timeout=5)
        self.rc = rc
        if check:
            assert not rc.is_failure, rc
        self.session_present = flags.session_present

    def subscribe(self, topic: str, qos: int = 0, **kw: Any) -> Any:
        self.client.subscribe(topic, qos, **kw)
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                **kw: Any) -> None:
        info = self.client.publish(topic, payload, qos, retain, **kw)
        info.wait_for_publish(timeout=5)
        assert info.is_published()

    def get(self, timeout: float = 3.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Paho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
