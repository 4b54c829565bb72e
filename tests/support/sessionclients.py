"""A paho-mqtt client for the session tests (restart clocks, shared hand-over,
session clocks across a kill -9).

``Mq(broker, client_id, ...)`` connects to ``broker.host``:``broker.port`` (MQTT 5 by default, or 3.1.1) and runs
paho's network loop; ``hold=True`` turns paho's automatic acknowledgements off,
so QoS 1/2 messages stay unacknowledged (in flight) at the broker for as long as
the test wants -- a real client that is slow to acknowledge.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


class Mq:
    def __init__(self, broker: Any, client_id: str, *, version: int = 5, clean: bool = True,
                 expiry: int | None = None, receive_max: int | None = None,
                 hold: bool = False, will: tuple[str, bytes, int] | None = None) -> None:
        if version == 5:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv311, clean_session=clean)
        if hold:
            self.client.manual_ack_set(True)
        self.messages: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        acks: queue.Queue[bool] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, p: acks.put(flags.session_present)
        self.client.on_message = lambda c, u, m: self.messages.put(
            (time.monotonic(), m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        if will is not None:  # (topic, payload, Will Delay Interval)
            topic, payload, delay = will
            wprops = Properties(PacketTypes.WILLMESSAGE)
            wprops.WillDelayInterval = delay
            self.client.will_set(topic, payload, 1, False, wprops)
        kw: dict[str, Any] = {}
        if version == 5:
            props = Properties(PacketTypes.CONNECT)
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            if receive_max is not None:
                props.ReceiveMaximum = receive_max
            kw = {"clean_start": clean, "properties": props}
        self.client.connect(broker.host, broker.port, 60, **kw)
        self.client.loop_start()
        self.present = acks.get(timeout=10)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos)
        rcs = self.subacks.get(timeout=10)
        assert not rcs[0].is_failure, rcs

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def payloads(self, timeout: float = 0.0) -> list[bytes]:
        """What arrived so far (waiting up to ``timeout`` for the first one)."""
        out = []
        try:
            out.append(self.messages.get(timeout=timeout)[2] if timeout else
                       self.messages.get_nowait()[2])
            while True:
                out.append(self.messages.get_nowait()[2])
        except queue.Empty:
            return out

    def disconnect(self, with_will: bool = False) -> None:
        if with_will:
            self.client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        else:
            self.client.disconnect()
        self.client.loop_stop()

    def abandon(self) -> None:
        """The broker died under it: stop the network loop (no reconnects)."""
        self.client.loop_stop()

    def drop(self) -> None:
        """Close the TCP connection without DISCONNECT (a network failure)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def session_present(broker: Any, client_id: str, version: int = 5) -> bool:
    """Connect without clean start, read Session Present, DISCONNECT (keeping the
    session, for 300 s in MQTT 5: the check restarts its clock)."""
    c = Mq(broker, client_id, version=version, clean=False, expiry=300)
    c.disconnect()
    return c.present


def until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))
