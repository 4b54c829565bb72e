"""Locust scenarios for an MQTT broker (raftmq or Mosquitto).

    locust -f bench/locustfile.py --headless -u 100 -r 10 -t 1m --host 127.0.0.1:1883

Each simulated user is one paho-mqtt client: it connects (clean session),
subscribes to its own topic ``bench/locust/<n>`` and then publishes to it,
so every message makes the round trip publisher → broker → subscriber.  What
locust's statistics show, by request type:

  CONNECT      CONNECT sent → CONNACK received
  SUBSCRIBE    SUBSCRIBE sent → SUBACK received (also UNSUBSCRIBE → UNSUBACK)
  PUBLISH      QoS 0: written to the socket; QoS 1: PUBACK received
  DELIVER      end-to-end latency: the payload carries the send time, taken
               again when the message comes back from the broker

A refused or lost connection, a refused subscription or a publish not
acknowledged within --mqtt-timeout counts as a failure.

Options (after locust's own): --mqtt-qos 0|1|2 (default: tasks mix 0 and 1),
--mqtt-payload BYTES (64), --mqtt-version 3.1.1|5 (3.1.1), --mqtt-timeout S (5),
--mqtt-topic-prefix (bench/locust).
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
import time

import paho.mqtt.client as mqtt
from locust import User, between, events, task
from locust.exception import StopUser

_user_numbers = itertools.count()
_TS = struct.Struct("!Q")  # send time, ns since the epoch, at the start of the payload


@events.init_command_line_parser.add_listener
def _add_mqtt_options(parser) -> None:
    parser.add_argument("--mqtt-qos", type=int, choices=[0, 1, 2], default=None,
                        help="QoS of every publish (default: a mix of 0 and 1)")
    parser.add_argument("--mqtt-payload", type=int, default=64, help="payload bytes (>= 8)")
    parser.add_argument("--mqtt-version", choices=["3.1.1", "5"], default="3.1.1")
    parser.add_argument("--mqtt-timeout", type=float, default=5.0,
                        help="seconds to wait for CONNACK / SUBACK / PUBACK")
    parser.add_argument("--mqtt-topic-prefix", default="bench/locust")


def _parse_host(host: str | None) -> tuple[str, int]:
    host = (host or "127.0.0.1:1883").removeprefix("mqtt://").removeprefix("tcp://").rstrip("/")
    name, _, port = host.rpartition(":")
    if not name:
        return port or "127.0.0.1", 1883
    return name, int(port)


class MQTTClient:
    """A paho-mqtt client whose operations are timed and reported to locust."""

    def __init__(self, environment, client_id: str, version: str, timeout: float) -> None:
        self.environment = environment
        self.timeout = timeout
        protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            clean_session=True if protocol == mqtt.MQTTv311 else None,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_ack
        self.client.on_unsubscribe = self._on_ack
        self.client.on_disconnect = self._on_disconnect
        self._connected = threading.Event()
        self._connect_rc = None
        self._acks: dict[int, threading.Event] = {}
        self._ack_codes: dict[int, list] = {}
        self.expect_disconnect = False

    # ---- reporting

    def _fire(self, request_type: str, name: str, started: float, length: int = 0,
              exception: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length, exception=exception, context={},
        )

    # ---- paho callbacks (run in paho's network thread / greenlet)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connect_rc = reason_code
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.expect_disconnect:
            self.environment.events.request.fire(
                request_type="CONNECT", name="connection lost", response_time=0, response_length=0,
                exception=ConnectionError(f"disconnected: {reason_code}"), context={},
            )

    def _on_ack(self, client, userdata, mid, reason_codes, properties) -> None:
        self._ack_codes[mid] = list(reason_codes)
        event = self._acks.get(mid)
        if event:
            event.set()

    def _on_message(self, client, userdata, message) -> None:
        payload = message.payload
        if len(payload) < _TS.size:
            return
        (sent_ns,) = _TS.unpack_from(payload)
        latency_ms = (time.time_ns() - sent_ns) / 1e6
        self.environment.events.request.fire(
            request_type="DELIVER", name=f"qos{message.qos}", response_time=max(latency_ms, 0.0),
            response_length=len(payload), exception=None, context={},
        )

    # ---- operations

    def connect(self, host: str, port: int, keepalive: int = 60) -> None:
        started = time.perf_counter()
        try:
            self.client.connect(host, port, keepalive)
            self.client.loop_start()
            if not self._connected.wait(self.timeout):
                raise TimeoutError(f"no CONNACK within {self.timeout} s")
            if self._connect_rc is not None and self._connect_rc.is_failure:
                raise ConnectionRefusedError(f"CONNACK refused: {self._connect_rc}")
        except Exception as exc:
            self._fire("CONNECT", "connect", started, exception=exc)
            raise
        self._fire("CONNECT", "connect", started)

    def _wait_ack(self, kind: str, name: str, mid: int, started: float) -> None:
        event = self._acks[mid]
        try:
            if not event.wait(self.timeout):
                raise TimeoutError(f"no {kind} ack within {self.timeout} s")
            codes = self._ack_codes.pop(mid, [])
            if any(getattr(c, "is_failure", False) for c in codes):
                raise PermissionError(f"{kind} refused: {codes}")
            self._fire(kind, name, started)
        except Exception as exc:
            self._fire(kind, name, started, exception=exc)
        finally:
            self._acks.pop(mid, None)

    def subscribe(self, topic: str, qos: int) -> None:
        started = time.perf_counter()
        event = threading.Event()
        rc, mid = self.client.subscribe(topic, qos)
        # The SUBACK may have been handled already: _on_ack stores the codes
        # before it looks for the event, so checking them after registering
        # the event misses nothing.
        self._acks[mid] = event
        if mid in self._ack_codes:
            event.set()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._fire("SUBSCRIBE", f"subscribe qos{qos}", started, exception=ConnectionError(str(rc)))
            return
        self._wait_ack("SUBSCRIBE", f"subscribe qos{qos}", mid, started)

    def unsubscribe(self, topic: str) -> None:
        started = time.perf_counter()
        event = threading.Event()
        rc, mid = self.client.unsubscribe(topic)
        self._acks[mid] = event
        if mid in self._ack_codes:
            event.set()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._fire("SUBSCRIBE", "unsubscribe", started, exception=ConnectionError(str(rc)))
            return
        self._wait_ack("SUBSCRIBE", "unsubscribe", mid, started)

    def publish(self, topic: str, size: int, qos: int) -> None:
        started = time.perf_counter()
        payload = _TS.pack(time.time_ns()) + b"x" * max(size - _TS.size, 0)
        try:
            info = self.client.publish(topic, payload, qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(mqtt.error_string(info.rc))
            info.wait_for_publish(self.timeout)
            if not info.is_published():
                raise TimeoutError(f"publish qos{qos} not completed within {self.timeout} s")
        except Exception as exc:
            self._fire("PUBLISH", f"qos{qos}", started, len(payload), exc)
            return
        self._fire("PUBLISH", f"qos{qos}", started, len(payload))

    def disconnect(self) -> None:
        self.expect_disconnect = True
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


class MQTTUser(User):
    """Base class: a locust user holding one MQTT connection (``self.mqtt``)."""

    abstract = True

    def __init__(self, environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        self.qos_option = getattr(opts, "mqtt_qos", None)
        self.payload_size = max(getattr(opts, "mqtt_payload", 64), _TS.size)
        self.topic_prefix = getattr(opts, "mqtt_topic_prefix", "bench/locust")
        self.number = next(_user_numbers)
        client_id = f"locust-{os.getpid()}-{self.number}"
        self.mqtt = MQTTClient(environment, client_id, getattr(opts, "mqtt_version", "3.1.1"),
                               getattr(opts, "mqtt_timeout", 5.0))

    def on_start(self) -> None:
        host, port = _parse_host(self.host)
        try:
            self.mqtt.connect(host, port)
        except Exception as exc:
            raise StopUser() from exc

    def on_stop(self) -> None:
        self.mqtt.disconnect()


class RoundTripUser(MQTTUser):
    """Subscribes to its own topic and publishes to it: every publish is a round trip."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        super().on_start()
        self.topic = f"{self.topic_prefix}/{self.number}"
        self.mqtt.subscribe(self.topic, 1 if self.qos_option is None else self.qos_option)

    @task(6)
    def publish_qos0(self) -> None:
        self.mqtt.publish(self.topic, self.payload_size, 0 if self.qos_option is None else self.qos_option)

    @task(3)
    def publish_qos1(self) -> None:
        self.mqtt.publish(self.topic, self.payload_size, 1 if self.qos_option is None else self.qos_option)

    @task(1)
    def resubscribe(self) -> None:
        """SUBSCRIBE/UNSUBSCRIBE churn on a second topic (the subscription tree changes under load)."""
        extra = f"{self.topic_prefix}/extra/{self.number}"
        self.mqtt.subscribe(extra, 0)
        self.mqtt.unsubscribe(extra)
