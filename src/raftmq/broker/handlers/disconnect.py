"""DISCONNECT from the client (MQTT 5 §3.14, 3.1.1 §3.14).

``handle_disconnect(broker, conn, p)`` is compiled with the connection
(ext/connection.pyx, "DISCONNECT"): a connect storm's clients each end with one.
"""

from __future__ import annotations

from raftmq._connection import handle_disconnect

__all__ = ["RC_NORMAL", "RC_PROTOCOL_ERROR", "handle_disconnect"]

RC_NORMAL = 0x00
RC_PROTOCOL_ERROR = 0x82
