"""CONNECT: validate, authenticate, open or resume the session, CONNACK.

A flat run of checks in the order of the standard (MQTT 5 §3.1.4, 3.1.1
§3.1.4); each refusal is a CONNACK with the version's code and a close.
Takeover and resume happen only after authentication (as in Mosquitto's
``connect__on_authorised``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from raftmq._codec import Connack
from raftmq._connection import handle_connect as compiled_handle_connect
from raftmq._connection import install_connect

if TYPE_CHECKING:
    from raftmq.broker.protocol import Connection
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.broker")

# MQTT 5 CONNACK reason codes (§3.2.2.2).
RC_UNSPECIFIED = 0x80
RC_MALFORMED = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_VERSION = 0x84
RC_CLIENT_ID_NOT_VALID = 0x85
RC_BAD_USER_PASS = 0x86
RC_NOT_AUTHORIZED = 0x87
RC_SERVER_UNAVAILABLE = 0x88
RC_BAD_AUTH_METHOD = 0x8C
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_TOO_LARGE = 0x95
RC_PAYLOAD_FORMAT_INVALID = 0x99
RC_RETAIN_NOT_SUPPORTED = 0x9A
RC_QOS_NOT_SUPPORTED = 0x9B

# MQTT 3.1.1 CONNACK return codes (§3.2.2.3) for each 5.0 reason code.
V3_RETURN_CODE = {
    0x00: 0,
    RC_UNSUPPORTED_VERSION: 1,
    RC_CLIENT_ID_NOT_VALID: 2,
    RC_SERVER_UNAVAILABLE: 3,
    0x9C: 3,
    0x9D: 3,
    RC_BAD_USER_PASS: 4,
    RC_NOT_AUTHORIZED: 5,
}

# Topic Alias Maximum the broker announces (MQTT 5 §3.2.2.3.8); Mosquitto uses 10.
TOPIC_ALIAS_MAXIMUM = 10


def refuse(conn: Connection, reason_code: int, properties: dict | None = None) -> None:
    """CONNACK with a refusal, then close [MQTT-3.2.2-6, MQTT-3.2.2-7]."""
    if conn.version == 5:
        conn.write(Connack(False, reason_code, properties).encode(5))
    else:
        conn.write(Connack(False, V3_RETURN_CODE.get(reason_code, 5), None).encode(conn.version))
    conn.close()


def refuse_unparsable_connect(conn: Connection, reason_code: int) -> None:
    """The parser refused the CONNECT itself: only an unsupported protocol
    version is answered (return code 1 / reason 0x84, [MQTT-3.1.2-2]); anything
    else closes the connection silently."""
    if reason_code == RC_UNSUPPORTED_VERSION:
        version = getattr(conn.parser, "protocol_version", 4) or 4
        # A 5.0-style CONNACK only to a client that spoke 5; otherwise 3.1.1's.
        conn.version = 5 if version == 5 else 4
        log.info("Client %s:%d refused: unsupported protocol version.", *conn.peer)
        refuse(conn, RC_UNSUPPORTED_VERSION)
    else:
        conn.close()


def _hand_off(broker: Broker, conn: Connection, owner: int, raw: bytes) -> None:
    """The client id belongs to sibling worker ``owner``: pass the connection
    on, untouched (raftmq.workers.handoff), or refuse it if that worker is down."""
    if not broker.handoff.hand_off(conn, owner, raw):
        log.info("Client %s:%d refused: worker %d is not available.", conn.peer[0], conn.peer[1],
                 owner)
        return refuse(conn, RC_SERVER_UNAVAILABLE)
    stats = broker.stats
    stats.connections -= 1  # counted again by the owner
    stats.bytes_received -= len(raw)
    stats.messages_received -= 1
    conn.state = 2  # CLOSING: nothing more is read, handled or written here


# handle_connect(broker, conn, p): compiled with the connection
# (ext/connection.pyx, "CONNECT"): a connect storm is one CONNECT per read.
handle_connect = compiled_handle_connect
install_connect(refuse, _hand_off)
