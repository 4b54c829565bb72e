"""PUBLISH and its acknowledgements, both directions.

Incoming (client -> broker), MQTT 5 §4.3:
  QoS 0: route.  QoS 1: route, PUBACK.  QoS 2: route and remember the packet id
  (``session.qos2_in``), PUBREC; a duplicate PUBLISH with a remembered id is not
  routed again; PUBREL forgets the id, PUBCOMP.  (Method B of the standard:
  the message is delivered onwards at PUBLISH time.)
  Acks whose state must be durable (the message was queued for a persistent
  session or retained, QoS 2 receive state of a persistent session) are
  written from the store's ``done`` (Broker.commit).  With sibling workers the
  forwards of a QoS 2 message of a persistent session leave only once its
  batch is written to the store (workers/mesh.py, "Exactly once").

Outgoing (broker -> client): PUBACK / PUBREC / PUBCOMP from the subscriber
move its in-flight messages along (router.py owns the queue and window).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from raftmq._codec import MQTTError, Puback, Pubcomp, Pubrec, Pubrel
from raftmq._connection import check_topic_name, publish_acl
from raftmq.state.entries import PUBREC_RECEIVED, Message, Qos2InAdd, Qos2InRemove, QueueUpdate

if TYPE_CHECKING:
    from raftmq._codec import Publish
    from raftmq.broker.protocol import Connection
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.broker")

RC_NO_MATCHING_SUBSCRIBERS = 0x10
RC_NOT_AUTHORIZED = 0x87
RC_PACKET_ID_NOT_FOUND = 0x92
RC_PROTOCOL_ERROR = 0x82
RC_RECEIVE_MAXIMUM_EXCEEDED = 0x93
RC_TOPIC_ALIAS_INVALID = 0x94
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_TOO_LARGE = 0x95
RC_PAYLOAD_FORMAT_INVALID = 0x99
RC_RETAIN_NOT_SUPPORTED = 0x9A


def ack_bytes(kind: int, packet_id: int) -> bytes:
    """PUBACK (0x40) / PUBREC (0x50) / PUBREL (0x62) / PUBCOMP (0x70) with reason 0 and
    no properties: the same 4 bytes in 3.1, 3.1.1 and 5.0 (§3.4.2.1)."""
    return bytes((kind, 2, packet_id >> 8, packet_id & 0xFF))


def _ack_with_reason(conn: Connection, qos: int, packet_id: int, reason: int) -> None:
    """PUBACK / PUBREC carrying a failure reason (5.0) or a plain ack (3.x, which has none)."""
    if conn.version == 5:
        cls = Puback if qos == 1 else Pubrec
        conn.write(cls(packet_id, reason, None).encode(5))
    else:
        conn.write(ack_bytes(0x40 if qos == 1 else 0x50, packet_id))


def handle_publish(broker: Broker, conn: Connection, p: Publish) -> None:
    topic = p.topic
    qos = p.qos
    props = p.properties
    session = conn.session
    v5 = conn.version == 5
    stats = broker.stats
    stats.publish_received += 1

    if props:
        props = dict(props)
        alias = props.pop("topic_alias", None)
        if alias is not None:
            # MQTT 5 §3.3.2.3.4: 0 and values above our Topic Alias Maximum are errors.
            if alias == 0 or alias > broker.topic_alias_maximum:
                raise MQTTError(RC_TOPIC_ALIAS_INVALID, "topic alias out of range")  # [MQTT-3.3.2-8]
            if topic:
                if conn.alias_in is None:
                    conn.alias_in = {}
                conn.alias_in[alias] = topic
            else:
                topic = conn.alias_in.get(alias) if conn.alias_in is not None else None
                if topic is None:
                    raise MQTTError(RC_PROTOCOL_ERROR, "unknown topic alias")
    check_topic_name(topic)

    packet_id = p.packet_id
    if qos:
        if qos == 2 and packet_id in session.qos2_in:
            # Duplicate of a QoS 2 message already routed: acknowledge only
            # (must not be delivered onwards twice, MQTT 5 §4.3.3) -- and not
            # before the first one's PUBREC, which may wait for the store.
            mesh = broker.mesh
            again = mesh.forwards_again(conn.client_id, packet_id) if mesh is not None else None
            if again is not None:
                # Routed by this worker's previous process, which may have died
                # before its forwards left: the siblings apply what they lack.
                mesh.forward_again(_resent_message(topic, p, props), conn.client_id, again)
            pubrec = ack_bytes(0x50, packet_id)
            broker.after_commit(lambda: conn.write(pubrec))
            return
        # Receive Maximum of the broker [MQTT-3.3.4-9]: too many unacknowledged QoS>0.
        if v5 and len(session.qos2_in) + conn.qos1_in_pending >= broker.receive_maximum:
            raise MQTTError(RC_RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded")

    if p.retain and not broker.config.retain_available:
        raise MQTTError(RC_RETAIN_NOT_SUPPORTED, "retain not supported")  # [MQTT-3.3.1-?]

    payload = p.payload
    limit = broker.config.message_size_limit
    if limit and len(payload) > limit:
        log.info("Dropped too large PUBLISH from %s (q%d, %s, %d bytes).", conn.client_id, qos,
                 topic, len(payload))
        stats.publish_dropped += 1
        if qos:
            _ack_with_reason(conn, qos, packet_id, RC_PACKET_TOO_LARGE)
        return

    expiry_at = 0
    if props:
        if props.get("payload_format_indicator") == 1:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                # [MQTT-3.3.2-4]: PUBACK/PUBREC 0x99 (QoS 0: dropped).
                stats.publish_dropped += 1
                if qos:
                    _ack_with_reason(conn, qos, packet_id, RC_PAYLOAD_FORMAT_INVALID)
                return
        interval = props.pop("message_expiry_interval", None)
        if interval is not None:
            expiry_at = int(time.time() * 1000) + interval * 1000
        props.pop("subscription_identifier", None)
        if not props:
            props = None

    if broker.debug:
        log.debug("Received PUBLISH from %s (d%d, q%d, r%d, m%d, '%s', ... (%d bytes))",
                  conn.client_id, p.dup, qos, p.retain, packet_id, topic, len(payload))

    dollar = topic[0] == "$"
    refused = dollar and topic.startswith("$SYS")
    acl_receive = None  # False: refused; else this topic's current receive decisions, if cached
    if broker.acl_enabled and not refused:
        acl_receive = publish_acl(broker, conn, topic, qos, p.retain)
        refused = acl_receive is False
    if refused:
        # $SYS belongs to the broker (Mosquitto refuses client publishes there too).
        # 5.0: the ack tells why; 3.x: acknowledged and dropped (Mosquitto).
        if qos:
            _ack_with_reason(conn, qos, packet_id, RC_NOT_AUTHORIZED)
        return

    message = Message(topic, payload, qos, p.retain, props, expiry_at)
    if qos == 0 and not dollar:
        # (Most such messages never get here: the compiled core routes them itself,
        # raftmq._connection.handle_packets.)
        broker.router.route(message, conn.client_id, None, True, acl_receive)
        return
    on_accepted_publish(broker, conn, message, packet_id)


def _resent_message(topic: str, p: Publish, props: dict | None) -> Message:
    """The Message of a resent QoS 2 PUBLISH (``props``: topic alias taken out)."""
    expiry_at = 0
    if props:
        props = dict(props)
        interval = props.pop("message_expiry_interval", None)
        if interval is not None:
            expiry_at = int(time.time() * 1000) + interval * 1000
        props.pop("subscription_identifier", None)
    return Message(topic, p.payload, p.qos, p.retain, props or None, expiry_at)


def on_accepted_publish(broker: Broker, conn: Connection, message: Message, packet_id: int) -> None:
    """A valid, authorised PUBLISH: hand it to ``$CONTROL``, or retain and route
    it; then acknowledge (from the store's ``done`` when it changed durable state)."""
    topic = message.topic
    qos = message.qos
    session = conn.session
    v5 = conn.version == 5
    if topic.startswith("$CONTROL/"):
        handler = broker.control_handlers.get(topic)
        if handler is not None:
            handler(conn, message)
        if qos:
            conn.write(ack_bytes(0x40 if qos == 1 else 0x50, packet_id))
            if qos == 2:
                session.qos2_add(packet_id)
        return

    if qos == 0:
        broker.router.route(message, conn.client_id, None)
        return

    ops: list = []
    mesh = broker.mesh
    forwards = None
    if qos == 2 and mesh is not None and session.durable:
        # Where it is forwarded goes with its receive state (workers/mesh.py,
        # "Exactly once").
        mesh.start_capture()
        try:
            delivered = broker.router.route(message, conn.client_id, ops)
        finally:
            forwards = mesh.end_capture()
    else:
        delivered = broker.router.route(message, conn.client_id, ops)
    if not delivered and broker.mesh is not None:
        delivered = broker.mesh.matched
    if qos == 1:
        if delivered or not v5:
            ack = ack_bytes(0x40, packet_id)
        else:
            # MQTT 5 §3.4.2.1 "No matching subscribers" (as Mosquitto answers).
            ack = Puback(packet_id, RC_NO_MATCHING_SUBSCRIBERS, None).encode(5)
    else:
        ack = ack_bytes(0x50, packet_id)
        session.qos2_add(packet_id)
        if session.durable:
            ops.append(Qos2InAdd(conn.client_id, packet_id, forwards))
            if forwards is not None:
                # Its forwards leave only after this batch is with the raft
                # process: exactly once across our death (workers/mesh.py).
                mesh.store_first = True
    # With sibling workers, the ack also waits until they processed what this
    # message was forwarded to them for (a persistent session there queued it).
    if ops or (broker.mesh is not None and broker.mesh.gating()):
        if qos == 1:
            conn.qos1_in_pending += 1

        def send_ack() -> None:
            if qos == 1:
                conn.qos1_in_pending -= 1
            conn.write(ack)

        broker.commit(ops, send_ack)
    elif broker.outstanding_batches:
        broker.after_commit(lambda: conn.write(ack))
    else:
        conn.write(ack)


def handle_pubrel(broker: Broker, conn: Connection, p: Pubrel) -> None:
    session = conn.session
    packet_id = p.packet_id
    if packet_id in session.qos2_in:
        session.qos2_in.discard(packet_id)
        if broker.mesh is not None:
            broker.mesh.forwards_again(conn.client_id, packet_id)  # forget them
        ack = ack_bytes(0x70, packet_id)
        if session.durable:
            broker.commit([Qos2InRemove(conn.client_id, packet_id)], lambda: conn.write(ack))
        elif broker.outstanding_batches:
            broker.after_commit(lambda: conn.write(ack))
        else:
            conn.write(ack)
    elif conn.version == 5:
        conn.write(Pubcomp(packet_id, RC_PACKET_ID_NOT_FOUND, None).encode(5))
    else:
        conn.write(ack_bytes(0x70, packet_id))


def handle_puback(broker: Broker, conn: Connection, p: Puback) -> None:
    session = conn.session
    out = session.inflight.get(p.packet_id)
    if out is None or out.qos != 1:
        return  # unknown packet id: nothing to do (MQTT 5 §4.3.2)
    broker.router.delivery_done(session, out)


def handle_pubrec(broker: Broker, conn: Connection, p: Pubrec) -> None:
    session = conn.session
    packet_id = p.packet_id
    out = session.inflight.get(packet_id)
    if out is None or out.qos != 2:
        if conn.version == 5:
            conn.write(Pubrel(packet_id, RC_PACKET_ID_NOT_FOUND, None).encode(5))
        else:
            conn.write(ack_bytes(0x62, packet_id))
        return
    if conn.version == 5 and p.reason_code >= 0x80:
        # A failed PUBREC ends the exchange (MQTT 5 §4.3.3): nothing more is sent.
        broker.router.delivery_done(session, out)
        return
    if out.state == PUBREC_RECEIVED:
        conn.write(ack_bytes(0x62, packet_id))
        return
    out.state = PUBREC_RECEIVED
    pubrel = ack_bytes(0x62, packet_id)
    if session.durable:
        broker.commit([QueueUpdate(session.client_id, out.seq, packet_id, PUBREC_RECEIVED)],
                      lambda: conn.write(pubrel))
    else:
        conn.write(pubrel)


def handle_pubcomp(broker: Broker, conn: Connection, p: Pubcomp) -> None:
    session = conn.session
    out = session.inflight.get(p.packet_id)
    if out is None or out.qos != 2:
        return
    broker.router.delivery_done(session, out)
