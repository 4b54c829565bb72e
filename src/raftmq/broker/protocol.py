"""The uvloop adapter: one ``Connection`` per TCP client.

Its state and its per-read work are compiled (ext/connection.pyx, the cdef
class ``raftmq._connection.Connection``): ``data_received`` feeds the Cython
parser and hands every packet of the read to ``dispatch.handle_packets``, which
routes the common QoS 0 PUBLISH itself; everything the broker sends to the
client is appended to ``out`` and written with ONE ``transport.write`` per
connection per event-loop turn (``Broker._flush``, scheduled with
``loop.call_soon`` the first time a connection becomes dirty in a turn) -- not
one system call per packet (issue 2, point 7).  This class adds what is not
per message: the asyncio callbacks, MQTT 5 encoding with properties and topic
aliases, close and disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from raftmq._codec import Disconnect, encode_publish
from raftmq._connection import (  # noqa: F401 (re-exported: the states are used everywhere)
    CLOSING,
    CONNECTED,
    NEW,
    PROTOCOL_MAX_PACKET,
)
from raftmq._connection import Connection as ConnectionCore
from raftmq.broker import dispatch  # noqa: F401 (installs the packet handlers in the core)

if TYPE_CHECKING:
    from raftmq.broker.session import Outgoing
    from raftmq.state.entries import Message

log = logging.getLogger("raftmq.broker")

__all__ = ["CLOSING", "CONNECTED", "NEW", "PROTOCOL_MAX_PACKET", "Connection"]


class Connection(ConnectionCore, asyncio.Protocol):
    """One TCP client: the compiled core's state and read path, plus the rest."""

    __slots__ = ()

    # -- asyncio.Protocol (connection_made, connection_lost and close are the
    # compiled core's) ---------------------------------------------------------

    def eof_received(self) -> bool:
        return False  # close the transport

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # -- output -------------------------------------------------------------

    def send_packet(self, packet: Any) -> None:
        self.write(packet.encode(self.version))

    def send_outgoing(self, out: Outgoing, dup: bool = False) -> bool:
        """Write one queued/in-flight message as a PUBLISH; False if it was too big for the client."""
        msg = out.message
        if self.version == 5:
            data = self.encode_publish_v5(msg, out.qos, out.retain, dup, out.packet_id, out.sub_ids)
        else:
            data = encode_publish(msg.topic, msg.payload, out.qos, out.retain, dup, out.packet_id,
                                  None, self.version)
        if data is None or len(data) > self.client_max_packet:
            # [MQTT-3.1.2-25]: never send a packet above the client's Maximum
            # Packet Size; the message is discarded as if delivered.
            self.broker.stats.publish_dropped += 1
            return False
        self.write(data)
        self.broker.stats.publish_sent += 1
        return True

    def encode_publish_v5(self, msg: Message, qos: int, retain: bool, dup: bool, packet_id: int,
                          sub_ids: list[int] | None) -> bytes | None:
        """A PUBLISH for this MQTT 5 client; None if the message expired or the
        packet would exceed the client's Maximum Packet Size [MQTT-3.1.2-25].

        Topic aliases toward the client (MQTT 5 §3.3.2.3.4): when it announced a
        Topic Alias Maximum, each new topic gets the next alias while there are
        free ones; later messages to that topic are sent with an empty topic.
        """
        props = self.publish_properties(msg, sub_ids)
        if props is None:
            return None
        topic = msg.topic
        new_alias = 0
        if self.client_alias_max:
            alias = self.alias_out.get(topic)
            if alias is not None:
                props["topic_alias"] = alias
                topic = ""
            elif self.next_alias_out <= self.client_alias_max:
                new_alias = props["topic_alias"] = self.next_alias_out
        data = encode_publish(topic, msg.payload, qos, retain, dup, packet_id, props or None, 5)
        if len(data) > self.client_max_packet:
            return None
        if new_alias:
            self.alias_out[topic] = new_alias
            self.next_alias_out = new_alias + 1
        return data

    def publish_properties(self, msg: Message, sub_ids: list[int] | None) -> dict | None:
        """MQTT 5 PUBLISH properties of one delivery; None when the message has expired."""
        props = dict(msg.properties) if msg.properties else {}
        if msg.expiry_at:
            # MQTT 5 §3.3.2.3.3: the receiver gets the remaining lifetime.
            remaining = math.ceil((msg.expiry_at - time.time() * 1000) / 1000)
            if remaining <= 0:
                return None
            props["message_expiry_interval"] = remaining
        if sub_ids:
            props["subscription_identifier"] = sub_ids
        return props

    def disconnect(self, reason_code: int) -> None:
        """MQTT 5: DISCONNECT with ``reason_code`` then close; 3.x: just close."""
        if self.state == CLOSING:
            return
        if self.version == 5 and self.state == CONNECTED:
            self.write(Disconnect(reason_code, None).encode(5))
        self.close()

    def label(self) -> str:
        return self.client_id or f"{self.peer[0]}:{self.peer[1]}"
