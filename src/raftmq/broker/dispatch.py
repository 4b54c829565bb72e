"""Packet dispatch: the one place that maps packet types to handlers and
errors to DISCONNECT reason codes (in the manner of Mosquitto's
``handle__packet``).

``handle_packets`` (the loop over one read's packets) is compiled with the
connection (ext/connection.pyx): it handles the common QoS 0 PUBLISH itself and
calls ``HANDLERS`` for every other packet, in order.

Handlers (broker/handlers/<packet>.py) raise ``MQTTError(reason_code, why)``
for a protocol violation of the client; ``handle_packets`` turns it into the
standard's reaction: MQTT 5 DISCONNECT with that reason code then close
[MQTT-4.13.1-1], MQTT 3.x close.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from raftmq._codec import (
    Auth,
    Connect,
    Disconnect,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Unsubscribe,
)
from raftmq._connection import install
from raftmq.broker.handlers.auth import handle_auth
from raftmq.broker.handlers.connect import handle_connect
from raftmq.broker.handlers.disconnect import handle_disconnect
from raftmq.broker.handlers.ping import handle_pingreq
from raftmq.broker.handlers.publish import (
    handle_puback,
    handle_pubcomp,
    handle_publish,
    handle_pubrec,
    handle_pubrel,
)
from raftmq.broker.handlers.subscribe import handle_subscribe, handle_unsubscribe

if TYPE_CHECKING:
    from raftmq.broker.protocol import Connection

log = logging.getLogger("raftmq.broker")

# Reason codes (MQTT 5 §2.4) used by the broker.
RC_MALFORMED = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_IMPLEMENTATION_SPECIFIC = 0x83

HANDLERS: dict[type, Any] = {
    Publish: handle_publish,
    Puback: handle_puback,
    Pubrec: handle_pubrec,
    Pubrel: handle_pubrel,
    Pubcomp: handle_pubcomp,
    Subscribe: handle_subscribe,
    Unsubscribe: handle_unsubscribe,
    Pingreq: handle_pingreq,
    Disconnect: handle_disconnect,
    Auth: handle_auth,
    Connect: handle_connect,
}


def protocol_error(conn: Connection, reason_code: int, why: str) -> None:
    """React to a protocol violation: 5.0 DISCONNECT(reason) and close; 3.x close."""
    if conn.state == 2:
        return
    log.info("Client %s disconnected due to protocol error (0x%02x %s).", conn.label(),
             reason_code, why)
    if conn.state == 0:
        # Before CONNACK a server must not send DISCONNECT [MQTT-3.2.0-2]
        # (a CONNECT the parser refused gets its CONNACK from the parser's code).
        from raftmq.broker.handlers.connect import refuse_unparsable_connect

        refuse_unparsable_connect(conn, reason_code)
        return
    conn.disconnect(reason_code)


install(HANDLERS, protocol_error)
