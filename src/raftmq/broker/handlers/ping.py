"""PINGREQ -> PINGRESP [MQTT-3.12.4-1]."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raftmq.broker.protocol import Connection
    from raftmq.broker.server import Broker

PINGRESP = b"\xd0\x00"


def handle_pingreq(broker: Broker, conn: Connection, p: Any) -> None:
    conn.write(PINGRESP)
