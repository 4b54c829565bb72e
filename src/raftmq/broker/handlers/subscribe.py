"""SUBSCRIBE and UNSUBSCRIBE (MQTT 5 §3.8, §3.10; 3.1.1 §3.8, §3.10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raftmq._codec import MQTTError, Suback, Unsuback
from raftmq._trie import parse_shared, valid_topic_filter
from raftmq.broker.auth import ACCESS_SUBSCRIBE, ACCESS_UNSUBSCRIBE
from raftmq.broker.session import Subscription
from raftmq.state.entries import SubAdd, SubRemove, pack_sub_options

if TYPE_CHECKING:
    from raftmq._codec import Subscribe, Unsubscribe
    from raftmq.broker.protocol import Connection
    from raftmq.broker.server import Broker

RC_FAILURE_V3 = 0x80
RC_UNSPECIFIED = 0x80
RC_MALFORMED = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_NOT_AUTHORIZED = 0x87
RC_NO_SUBSCRIPTION_EXISTED = 0x11


def _subscription_id(props: dict | None) -> int:
    if not props:
        return 0
    sid = props.get("subscription_identifier", 0)
    if isinstance(sid, list):
        sid = sid[0] if sid else 0
    if sid == 0 and "subscription_identifier" in props:
        raise MQTTError(RC_PROTOCOL_ERROR, "subscription identifier 0")  # [MQTT-3.8.2-?]
    return sid


def handle_subscribe(broker: Broker, conn: Connection, p: Subscribe) -> None:
    session = conn.session
    v5 = conn.version == 5
    sub_id = _subscription_id(p.properties) if v5 else 0
    auth = broker.auth
    codes: list[int] = []
    ops: list = []
    retained_for: list[tuple[Subscription, bool]] = []  # (subscription, is new)
    for topic_filter, qos, no_local, rap, rh in p.subscriptions:
        group, match_filter = parse_shared(topic_filter)
        if not valid_topic_filter(topic_filter) or (group is not None and not match_filter):
            # Like Mosquitto: an invalid filter is a malformed packet (5.0
            # DISCONNECT 0x81, 3.x close) rather than a SUBACK 0x8F.
            raise MQTTError(RC_MALFORMED, f"invalid topic filter {topic_filter!r}")
        if group is not None and no_local:
            # No Local on a shared subscription is a protocol error [MQTT-3.8.3-4].
            raise MQTTError(RC_PROTOCOL_ERROR, "no local on a shared subscription")
        if broker.acl_enabled and not auth.acl_check(conn, ACCESS_SUBSCRIBE, topic_filter, qos, False):
            codes.append(RC_NOT_AUTHORIZED if v5 else RC_FAILURE_V3)
            continue
        granted = min(qos, 2)
        if not v5:
            no_local, rap, rh = False, False, 0
        sub = Subscription(topic_filter, granted, bool(no_local), bool(rap), rh, sub_id, group,
                           match_filter)
        is_new = broker.router.subscribe(session, sub)
        codes.append(granted)
        if session.durable:
            ops.append(SubAdd(session.client_id, topic_filter,
                              pack_sub_options(granted, bool(no_local), bool(rap), rh), sub_id))
        # Retained messages on subscribe (MQTT 5 §3.3.1.3): not for shared
        # subscriptions [MQTT-3.8.4-?]; Retain Handling 0 always, 1 only if new, 2 never.
        if group is None and (rh == 0 or (rh == 1 and is_new)):
            retained_for.append((sub, is_new))
    suback = Suback(p.packet_id, codes, None).encode(conn.version)

    def send_suback() -> None:
        if conn.state != 1:
            return
        conn.write(suback)
        for sub, _ in retained_for:
            broker.router.send_retained(session, sub)

    if ops:
        broker.commit(ops, send_suback)
    else:
        broker.after_commit(send_suback)


def handle_unsubscribe(broker: Broker, conn: Connection, p: Unsubscribe) -> None:
    session = conn.session
    v5 = conn.version == 5
    auth = broker.auth
    codes: list[int] = []
    ops: list = []
    for topic_filter in p.topic_filters:
        if not valid_topic_filter(topic_filter):
            raise MQTTError(RC_MALFORMED, f"invalid topic filter {topic_filter!r}")
        if broker.acl_enabled and not auth.acl_check(conn, ACCESS_UNSUBSCRIBE, topic_filter, 0, False):
            codes.append(RC_NOT_AUTHORIZED)
            continue
        if broker.router.unsubscribe(session, topic_filter):
            codes.append(0)
            if session.durable:
                ops.append(SubRemove(session.client_id, topic_filter))
        else:
            codes.append(RC_NO_SUBSCRIPTION_EXISTED)
    unsuback = Unsuback(p.packet_id, codes if v5 else [], None).encode(conn.version)
    if ops:
        broker.commit(ops, lambda: conn.write(unsuback))
    else:
        broker.after_commit(lambda: conn.write(unsuback))
