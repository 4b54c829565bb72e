"""AUTH: raftmq supports no enhanced authentication method.

A client that did not send an Authentication Method in CONNECT must not send
AUTH [MQTT-4.12.0-2]... and a CONNECT with a method was refused with 0x8C, so
any AUTH received here is a protocol error (MQTT 5 §4.12).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raftmq._codec import MQTTError

if TYPE_CHECKING:
    from raftmq.broker.protocol import Connection
    from raftmq.broker.server import Broker

RC_PROTOCOL_ERROR = 0x82


def handle_auth(broker: Broker, conn: Connection, p: Any) -> None:
    raise MQTTError(RC_PROTOCOL_ERROR, "AUTH without an authentication method")
