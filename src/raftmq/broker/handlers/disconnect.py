"""DISCONNECT from the client (MQTT 5 §3.14, 3.1.1 §3.14)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from raftmq._codec import MQTTError
from raftmq.logsetup import info as log_info
from raftmq.state.entries import SessionExpiry

if TYPE_CHECKING:
    from raftmq._codec import Disconnect
    from raftmq.broker.protocol import Connection
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.broker")

RC_NORMAL = 0x00
RC_PROTOCOL_ERROR = 0x82


def handle_disconnect(broker: Broker, conn: Connection, p: Disconnect) -> None:
    session = conn.session
    reason = p.reason_code or 0
    props = p.properties or {}
    expiry = props.get("session_expiry_interval")
    if expiry is not None:
        if session.expiry_interval == 0 and expiry != 0:
            # [MQTT-3.14.2-2]: from 0 at CONNECT to non-zero here is a protocol error.
            raise MQTTError(RC_PROTOCOL_ERROR, "session expiry set after CONNECT with 0")
        if expiry != session.expiry_interval:
            session.expiry_interval = expiry
            if session.durable:
                broker.commit([SessionExpiry(session.client_id, expiry)], None)
    # Only a normal disconnection (0x00, and every 3.x DISCONNECT) discards the
    # will [MQTT-3.14.4-3]; 0x04 asks for it, and so does any error reason: a
    # client closing "without first sending a DISCONNECT with Reason Code 0x00"
    # gets its will published (MQTT 5 §3.1.2.5).
    conn.graceful = reason == RC_NORMAL
    log_info(log, "Client %s disconnected.", conn.client_id)
    conn.close()
