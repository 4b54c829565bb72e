"""The uvloop adapter: one ``Connection`` per TCP client.

It does as little as possible: ``data_received`` feeds the Cython parser and
hands every packet of the read to ``dispatch.handle_packets``; everything the
broker sends to the client is appended to ``out`` and written with ONE
``transport.write`` per connection per event-loop turn (``Broker._flush``,
scheduled with ``loop.call_soon`` the first time a connection becomes dirty in
a turn) -- not one system call per packet (issue 2, point 7).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from raftmq._codec import Disconnect, MQTTError, Parser, encode_publish
from raftmq.broker import dispatch
from raftmq.broker.dispatch import handle_packets

if TYPE_CHECKING:
    from raftmq.broker.server import Broker
    from raftmq.broker.session import Outgoing, Session
    from raftmq.state.entries import Message

log = logging.getLogger("raftmq.broker")

# Connection states.
NEW = 0  # accepted, no CONNECT yet
CONNECTED = 1  # CONNECT accepted (CONNACK may still wait for the store)
CLOSING = 2  # closing: nothing more is read or written

_NO_ALIASES: dict[str, int] = {}  # shared, never written (see handle_connect)

# Highest packet size the protocol can express (MQTT 5 §2.1.4, 256 MB).
PROTOCOL_MAX_PACKET = 268435455


def _known_protocol_name(data: bytes) -> bool:
    """Whether a CONNECT's bytes name MQTT ("MQTT" or 3.1's "MQIsdp")."""
    pos = 1
    while pos < len(data) and data[pos] & 0x80:  # skip the Remaining Length
        pos += 1
    pos += 1
    name_len = int.from_bytes(data[pos:pos + 2], "big")
    return data[pos + 2:pos + 2 + name_len] in (b"MQTT", b"MQIsdp")


class Connection(asyncio.Protocol):
    __slots__ = ("broker", "transport", "parser", "state", "out", "dirty", "session", "client_id",
                 "username", "version", "keepalive", "peer", "rx_bytes", "rx_seen", "rx_seen_at",
                 "accepted_at", "will", "graceful", "client_receive_max", "client_max_packet",
                 "client_alias_max", "alias_in", "qos1_in_pending", "problem_info", "paused",
                 "clean_start", "alias_out", "next_alias_out", "online", "raw_head", "acl_topic",
                 "acl_receive")

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        max_packet = broker.config.max_packet_size or PROTOCOL_MAX_PACKET
        self.parser = Parser(max_packet, True)
        self.state = NEW
        self.out: list[bytes] = []
        self.dirty = False
        self.session: Session | None = None
        self.client_id = ""
        self.username: str | None = None
        self.version = 4
        self.keepalive = 0
        self.peer = ("?", 0)
        self.rx_bytes = 0  # bytes received, for keepalive sweeps
        self.rx_seen = -1
        self.rx_seen_at = 0.0
        self.accepted_at = 0.0
        self.will: tuple[int, Message] | None = None
        self.graceful = False  # DISCONNECT 0x00 received: discard the will
        self.client_receive_max = 65535
        self.client_max_packet = PROTOCOL_MAX_PACKET
        self.client_alias_max = 0
        self.alias_in: dict[int, str] | None = None  # created on first use
        self.alias_out: dict[str, int] = _NO_ALIASES  # own dict once client_alias_max > 0
        self.next_alias_out = 1
        self.qos1_in_pending = 0  # QoS 1 PUBLISHes received whose PUBACK waits for the store
        self.problem_info = True
        self.paused = False
        self.clean_start = True
        # CONNACK written: messages may be delivered (none may precede CONNACK,
        # which can wait for the store) [MQTT-3.2.0-1].
        self.online = False
        # Bytes read before CONNECT was handled, kept only when the node has
        # sibling workers: they travel with a hand-off (raftmq.workers.handoff).
        self.raw_head = b""
        # The last topic this client was allowed to publish to, and that topic's
        # publish_client_receive decisions (handle_publish, Broker.acl_caches_current).
        self.acl_topic: str | None = None
        self.acl_receive: dict | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
        self.accepted_at = self.rx_seen_at = self.broker.loop.time()
        transport.set_write_buffer_limits(high=16 * 1024 * 1024)
        # (No "New connection from" line: a log line costs about a third of
        # accepting a client; "New client connected" follows CONNECT.)
        self.broker.on_connection_made(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == CLOSING:
            return
        broker = self.broker
        n = len(data)
        self.rx_bytes += n
        broker.stats.bytes_received += n
        broker._in_read = True
        if state == NEW and broker.handoff is not None:
            self.raw_head += data
        try:
            packets = self.parser.feed(data)
        except MQTTError as e:
            # Packets parsed before the bad one are handled first, in order.
            if e.packets:
                dispatch.handle_packets(broker, self, e.packets)
            if self.state == NEW and e.reason_code == 0x84 and not _known_protocol_name(data):
                # [MQTT-3.1.2-1]: not MQTT at all: close without a CONNACK (as Mosquitto).
                self.close()
            else:
                dispatch.protocol_error(self, e.reason_code, str(e))
            broker.flush_ops()
            broker.end_read()
            return
        if packets:
            handle_packets(broker, self, packets)
            # (flush_ops and end_read's per-turn case inlined: this runs once per
            # read, and a read is often one message.)
            if broker.pending_ops or broker._pending_actions:
                broker.flush_ops()
        if broker._per_turn:
            broker._in_read = False
            broker._reads += 1
        else:
            broker.end_read()

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSING
        self.online = False
        self.broker.on_connection_lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # -- output -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes for this turn's single write."""
        if self.state == CLOSING:
            return
        self.out.append(data)
        if not self.dirty:
            self.dirty = True
            self.broker.mark_dirty(self)

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

    def close(self) -> None:
        """Flush what is queued and close (the will is sent unless DISCONNECT 0x00 came)."""
        if self.state == CLOSING or self.transport is None:
            return
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out.clear()
        self.state = CLOSING
        self.online = False
        self.transport.close()

    def disconnect(self, reason_code: int) -> None:
        """MQTT 5: DISCONNECT with ``reason_code`` then close; 3.x: just close."""
        if self.state == CLOSING:
            return
        if self.version == 5 and self.state == CONNECTED:
            self.write(Disconnect(reason_code, None).encode(5))
        self.close()

    def label(self) -> str:
        return self.client_id or f"{self.peer[0]}:{self.peer[1]}"
