"""CONNECT: validate, authenticate, open or resume the session, CONNACK.

A flat run of checks in the order of the standard (MQTT 5 §3.1.4, 3.1.1
§3.1.4); each refusal is a CONNACK with the version's code and a close.
Takeover and resume happen only after authentication (as in Mosquitto's
``connect__on_authorised``).
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from raftmq._codec import Connack, MQTTError
from raftmq._trie import valid_topic_name
from raftmq.broker.auth import ACCESS_SUBSCRIBE
from raftmq.broker.session import EXPIRY_NEVER
from raftmq.logsetup import info as log_info
from raftmq.state.entries import Message, SessionPut, SubRemove, WillDelete, WillSet

if TYPE_CHECKING:
    from raftmq._codec import Connect
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

# The protocol level as Mosquitto's log line shows it ("p2" for 3.1.1).
_LOG_PROTOCOL = {3: 1, 4: 2, 5: 5}

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


def handle_connect(broker: Broker, conn: Connection, p: Connect) -> None:
    if conn.state != 0:
        # A second CONNECT is a protocol error [MQTT-3.1.0-2].
        raise MQTTError(RC_PROTOCOL_ERROR, "second CONNECT")
    config = broker.config
    version = p.protocol_version
    conn.version = version
    refusal = broker.ha_refusal
    if refusal is not None:
        # mode = "ha", this worker does not serve (raftmq.cluster.ha): 0x9C with
        # the leader as Server Reference, or 0x88 while no leader is known.
        # mode = "dynsec-sync": 0x88 while the node is outside a working majority.
        log.info("Client %s:%d refused: this node does not serve clients now (cluster role).", *conn.peer)
        return refuse(conn, *refusal)
    raw = conn.raw_head  # what a hand-off would pass on (empty with one worker)
    conn.raw_head = b""
    props = p.properties or {}
    v5 = version == 5

    # -- client identifier [MQTT-3.1.3-5 .. 9] --------------------------------
    client_id = p.client_id
    assigned = None
    if not client_id:
        if version == 3:
            return refuse(conn, RC_CLIENT_ID_NOT_VALID)  # 3.1 needs 1..23 characters
        if not config.allow_zero_length_clientid:
            return refuse(conn, RC_CLIENT_ID_NOT_VALID)
        if version == 4 and not p.clean_start:
            # 3.1.1: a zero-length id requires CleanSession=1 [MQTT-3.1.3-8].
            return refuse(conn, RC_CLIENT_ID_NOT_VALID)
        client_id = assigned = f"auto-{uuid.uuid4()}" if broker.mesh is None \
            else broker.mesh.assign_client_id()
    elif broker.mesh is not None:
        owner = broker.mesh.owner_of(client_id)
        if owner != broker.worker_id:
            return _hand_off(broker, conn, owner, raw)

    # -- MQTT 5 CONNECT properties -------------------------------------------
    if v5:
        if props.get("authentication_method") is not None:
            # No enhanced authentication method is supported: 0x8C [MQTT-4.12.0-1].
            return refuse(conn, RC_BAD_AUTH_METHOD)
        conn.client_receive_max = props.get("receive_maximum", 65535)
        conn.client_max_packet = props.get("maximum_packet_size", conn.client_max_packet)
        conn.client_alias_max = props.get("topic_alias_maximum", 0)
        if conn.client_alias_max:
            conn.alias_out = {}
        conn.problem_info = props.get("request_problem_information", 1) != 0
        expiry = props.get("session_expiry_interval", 0)
    elif p.clean_start:
        expiry = 0  # 3.x clean session: the session ends with the connection
    else:
        expiry = config.persistent_client_expiration or EXPIRY_NEVER

    # -- keep alive (MQTT 5 §3.2.2.3.14 Server Keep Alive) -------------------------
    keepalive = p.keepalive
    server_keepalive = None
    if v5 and config.max_keepalive and (keepalive > config.max_keepalive or keepalive == 0):
        # The broker imposes its own keep alive [MQTT-3.2.2-21]; like Mosquitto
        # a client asking for none (0) gets max_keepalive too.  A 3.x client
        # cannot be told, and Mosquitto accepts it with its own value.
        keepalive = server_keepalive = config.max_keepalive

    # -- will -----------------------------------------------------------------
    will = None
    if p.will_topic is not None:
        if not valid_topic_name(p.will_topic):
            if v5:
                return refuse(conn, RC_TOPIC_NAME_INVALID)
            return conn.close()
        if p.will_retain and not config.retain_available:
            if v5:
                return refuse(conn, RC_RETAIN_NOT_SUPPORTED)  # [MQTT-3.2.2-13]
            return conn.close()
        wprops = dict(p.will_properties) if p.will_properties else {}
        delay = wprops.pop("will_delay_interval", 0)
        if wprops.get("payload_format_indicator") == 1:
            try:
                p.will_payload.decode("utf-8")
            except UnicodeDecodeError:
                return refuse(conn, RC_PAYLOAD_FORMAT_INVALID)  # [MQTT-3.1.3-11]
        # A will's Message Expiry Interval stays in its properties: it counts
        # from when the will is published (will.will_to_publish), not from now.
        will = (delay, Message(p.will_topic, bytes(p.will_payload or b""), p.will_qos,
                               bool(p.will_retain), wprops or None, 0))

    # -- authentication ---------------------------------------------------------
    username = p.username
    identity = getattr(conn, "cert_identity", None)
    if identity is not None:
        # use_identity_as_username / use_subject_as_username (broker/tls.py): as
        # Mosquitto, the certificate names the user, the CONNECT's user name and
        # password are ignored and no password check is made; ACLs see the name.
        if not identity:
            log.info("Client %s:%d refused: no usable client certificate (%s).", conn.peer[0],
                     conn.peer[1], client_id)
            return refuse(conn, RC_BAD_USER_PASS)
        username = identity
    else:
        rc = broker.auth.authenticate(client_id, username, p.password)
        if rc != 0:
            log.info("Client %s:%d refused: not authorised (%s).", conn.peer[0], conn.peer[1],
                     client_id)
            return refuse(conn, rc if rc >= 0x80 else RC_NOT_AUTHORIZED)

    # -- accepted: take over / resume / create the session ------------------------
    conn.client_id = client_id
    conn.username = username
    conn.keepalive = keepalive
    conn.will = will
    conn.clean_start = bool(p.clean_start)
    conn.state = 1
    ops: list = []
    if broker.mesh is not None and broker.mesh.colocate is not None:
        broker.mesh.colocate.before_connect(client_id)  # connected on a sibling: kicked there
    session, present = broker.attach_session(conn, client_id, version, expiry, bool(p.clean_start),
                                             username, ops)
    if session.persistent:
        ops.append(SessionPut(client_id, version, expiry, bool(p.clean_start), username))
        session.durable = True
        if will is not None:
            ops.append(WillSet(client_id, will[0], will[1]))
        elif present:
            ops.append(WillDelete(client_id))
    if present and broker.acl_enabled and session.subscriptions:
        # A resumed session keeps only the subscriptions its client may still
        # make (Mosquitto re-checks them at CONNECT; spec/dynsec.md §7).
        for topic_filter, sub in list(session.subscriptions.items()):
            if not broker.acl_check(conn, ACCESS_SUBSCRIBE, topic_filter, sub.qos, False):
                broker.router.unsubscribe(session, topic_filter)
                if session.durable:
                    ops.append(SubRemove(client_id, topic_filter))

    cprops = None
    if v5:
        cprops = dict(broker.connack_properties)
        if assigned is not None:
            cprops["assigned_client_identifier"] = assigned
        if server_keepalive is not None:
            cprops["server_keep_alive"] = server_keepalive
    connack = Connack(present, 0, cprops or None).encode(version)

    log_info(log, "New client connected from %s:%d as %s (p%d, c%d, k%d%s)%s.", conn.peer[0],
             conn.peer[1], client_id, _LOG_PROTOCOL.get(version, version),
             1 if p.clean_start else 0, keepalive,
             f", u'{username}'" if username is not None else "",
             f" on worker {broker.worker_id}" if broker.mesh is not None else "")

    def send_connack() -> None:
        if conn.state != 1 or session.conn is not conn:
            return
        conn.write(connack)
        conn.online = True
        if session.inflight or session.queue:
            # [MQTT-4.4.0-1]: resend unacknowledged PUBLISH / PUBREL, then what is queued.
            broker.router.resume(session)

    if ops:
        broker.commit(ops, send_connack)
    else:
        broker.after_commit(send_connack)
