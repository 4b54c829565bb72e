"""State-machine entries: every change of durable broker state as one discrete operation.

Theory of operation
-------------------
The broker never writes durable state directly.  Each change a client could find
again after a crash or failover (DESIGN.md §2 "what must be a proposal") is
expressed as one of the operations below, handed to a ``Store`` (state/store.py)
in a batch, and acknowledged to the client only when the store says the batch is
committed.  The operations mirror Mosquitto's persistence events
(``plugin_persist__handle_<object>_<add|update|delete>``): a session, a
subscription, a queued message, a retained message, a will, QoS 2 receive state,
a dynamic-security change.

The same operations are Raft log entries: ``encode_ops``/``decode_ops`` turn a
batch into bytes and back.  Applying the same entries in the same order always
gives the same tables (state/machine.py), so everything here is plain data:
no clocks, no randomness; times are absolute milliseconds chosen by the
proposer (e.g. a message's expiry time).

Wire format of one batch:  u32 count, then per op: u8 tag, u32 header length,
orjson header (a list of the op's scalar fields), u32 message length, message
bytes (0 when the op has no message).  A message: u16 topic length, topic
(UTF-8), u8 flags (qos | retain << 2), u64 expiry_at_ms, u32 properties length,
properties (orjson, only for MQTT 5 properties; ``correlation_data`` travels as a
latin-1 string), payload (rest).

Compact queue ops: QueueAdd, QueueUpdate and QueueRemove -- the ops of every
durable delivery -- are written with tag | 0x80 and a fixed binary header
instead (when every client id is at most 200 bytes of UTF-8): each delivery's
client id as the queue table keys it (u16 BE length + UTF-8) followed by the
big-endian u64 seq, so the state machine cuts the table key out of the entry
instead of decoding and re-encoding it.  QueueRemove: u8 tag, key.  QueueUpdate:
u8 tag, key, u16 BE packet id, u8 state.  QueueAdd: u8 tag, u16 BE count, per
delivery key, u16 BE packet id, u8 qos, u16 BE n, n x u32 BE subscription ids;
then u32 LE message length, message.  state/rawops.py reads both forms.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import orjson

from raftmq.state.rawops import iter_raw_ops, plain_fields

# ---------------------------------------------------------------------------
# The application message as it is stored (queues, retained, wills).


@dataclass(slots=True)
class Message:
    """One application message.

    ``properties`` holds MQTT 5 PUBLISH properties by name, as the codec gives
    them ("payload_format_indicator", "content_type", "response_topic",
    "correlation_data" (bytes), "user_property" (list of (key, value))),
    never "topic_alias" or "subscription_identifier" (those are per delivery).
    ``expiry_at`` is the absolute time in ms since the epoch at which the
    message expires, 0 for never (message expiry interval, MQTT 5 §3.3.2.3.3).
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] | None = None
    expiry_at: int = 0


_MSG_HEAD = struct.Struct("<H")
_MSG_MID = struct.Struct("<BQI")


def encode_properties(props: dict[str, Any] | None) -> bytes:
    """MQTT 5 properties as stored and sent between workers: JSON, with the
    bytes of Correlation Data carried as latin-1 text (b"" for none)."""
    if not props:
        return b""
    if "correlation_data" in props:
        props = dict(props)
        props["correlation_data"] = props["correlation_data"].decode("latin-1")
    return orjson.dumps(props)


def decode_properties(blob: bytes) -> dict[str, Any]:
    """The inverse of ``encode_properties`` (a non-empty blob)."""
    props = orjson.loads(blob)
    if "correlation_data" in props:
        props["correlation_data"] = props["correlation_data"].encode("latin-1")
    if "user_property" in props:
        props["user_property"] = [tuple(kv) for kv in props["user_property"]]
    return props


def encode_message(m: Message) -> bytes:
    topic = m.topic.encode()
    props = encode_properties(m.properties)
    return b"".join(
        (
            _MSG_HEAD.pack(len(topic)),
            topic,
            _MSG_MID.pack(m.qos | (m.retain << 2), m.expiry_at, len(props)),
            props,
            m.payload,
        )
    )


def decode_message(b: bytes | memoryview) -> Message:
    b = bytes(b)
    (tlen,) = _MSG_HEAD.unpack_from(b, 0)
    pos = 2
    topic = b[pos : pos + tlen].decode()
    pos += tlen
    flags, expiry_at, plen = _MSG_MID.unpack_from(b, pos)
    pos += _MSG_MID.size
    props = None
    if plen:
        props = decode_properties(b[pos : pos + plen])
        pos += plen
    return Message(topic, b[pos:], flags & 3, bool(flags & 4), props, expiry_at)


# ---------------------------------------------------------------------------
# Operations.  Tags are part of the on-disk format: never renumber.

# Subscription options packed as in the MQTT 5 SUBSCRIBE options byte:
#   bits 0-1 maximum QoS, bit 2 no local, bit 3 retain as published,
#   bits 4-5 retain handling.


def pack_sub_options(qos: int, no_local: bool, retain_as_published: bool, retain_handling: int) -> int:
    return qos | (no_local << 2) | (retain_as_published << 3) | (retain_handling << 4)


def unpack_sub_options(o: int) -> tuple[int, bool, bool, int]:
    return o & 3, bool(o & 4), bool(o & 8), (o >> 4) & 3


@dataclass(slots=True)
class SessionPut:
    """A persistent session is created or resumed (CONNECT accepted).

    ``clean``: the session starts empty (clean start / clean session) -- any
    stored subscriptions, queued messages and QoS 2 state of the id are dropped.
    """

    TAG = 1
    client_id: str
    protocol_version: int
    expiry_interval: int
    clean: bool
    username: str | None = None


@dataclass(slots=True)
class SessionExpiry:
    """The session expiry interval changed (MQTT 5 DISCONNECT may change it)."""

    TAG = 2
    client_id: str
    expiry_interval: int


@dataclass(slots=True)
class SessionDelete:
    """The session ended (expired, clean disconnect of a non-persistent one, taken over clean)."""

    TAG = 3
    client_id: str


@dataclass(slots=True)
class SubAdd:
    TAG = 4
    client_id: str
    topic_filter: str  # as the client sent it, "$share/group/..." included
    options: int  # pack_sub_options()
    subscription_id: int = 0  # MQTT 5 subscription identifier, 0 = none


@dataclass(slots=True)
class SubRemove:
    TAG = 5
    client_id: str
    topic_filter: str


@dataclass(slots=True)
class WillSet:
    """The will of a persistent session (published when the session ends or after its delay)."""

    TAG = 6
    client_id: str
    delay_interval: int
    message: Message | None = None


@dataclass(slots=True)
class WillDelete:
    TAG = 7
    client_id: str


@dataclass(slots=True)
class RetainSet:
    TAG = 8
    message: Message | None = None  # message.topic is the key


@dataclass(slots=True)
class RetainDelete:
    TAG = 9
    topic: str


@dataclass(slots=True)
class QueueAdd:
    """One message queued for (or in flight to) one or more persistent sessions.

    ``deliveries``: per session ``[client_id, seq, packet_id, qos, subscription_ids]``.
    ``seq`` orders a session's queue (chosen by the proposer, strictly increasing
    per session); ``packet_id`` is 0 while the message waits, or the packet id it
    was sent with when it goes out at once; ``qos`` is the granted delivery QoS.
    """

    TAG = 10
    deliveries: list[list[Any]]
    message: Message | None = None


# Delivery states of a queued message.
QUEUED = 0  # waiting, not yet sent
SENT = 1  # PUBLISH sent with packet_id, awaiting PUBACK / PUBREC
PUBREC_RECEIVED = 2  # QoS 2: PUBREL sent, awaiting PUBCOMP


@dataclass(slots=True)
class QueueUpdate:
    TAG = 11
    client_id: str
    seq: int
    packet_id: int
    state: int  # QUEUED / SENT / PUBREC_RECEIVED


@dataclass(slots=True)
class QueueRemove:
    """Delivery finished (PUBACK, PUBCOMP), or the message expired or was dropped."""

    TAG = 12
    client_id: str
    seq: int


@dataclass(slots=True)
class Qos2InAdd:
    """QoS 2 PUBLISH received and routed; PUBREC may now be sent.

    ``forwards``: with sibling workers, where the message went (workers/mesh.py):
    ``[incarnation, [[sibling, seq, assigned share groups or None], ...]]``."""

    TAG = 13
    client_id: str
    packet_id: int
    forwards: list | None = None


@dataclass(slots=True)
class Qos2InRemove:
    """PUBREL received; PUBCOMP may now be sent."""

    TAG = 14
    client_id: str
    packet_id: int


@dataclass(slots=True)
class Dynsec:
    """One dynamic-security change, as produced by raftmq.dynsec (a JSON-able dict)."""

    TAG = 15
    change: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SessionOffline:
    """A persistent session lost its connection at ``disconnected_at`` (ms since
    the epoch, read by the proposer): its expiry and will delay count from then,
    also after a restart of the broker.  A SessionPut (it connects again) clears it."""

    TAG = 16
    client_id: str
    disconnected_at: int


@dataclass(slots=True)
class MeshMark:
    """Worker ``receiver`` of this node has applied every frame that incarnation
    ``incarnation`` of its sibling worker ``sender`` sent it, up to sequence
    number ``seq`` (workers/mesh.py).  Proposed in the same batch as the queue
    writes those frames caused, so a restarted receiver knows which frames the
    sibling sends again (they were not acknowledged) it must not apply twice."""

    TAG = 17
    receiver: int
    sender: int
    incarnation: int
    seq: int


@dataclass(slots=True)
class Noop:
    """Appended by a new leader; also used to force a commit (barrier)."""

    TAG = 0


Op = (
    SessionPut | SessionExpiry | SessionDelete | SubAdd | SubRemove | WillSet | WillDelete
    | RetainSet | RetainDelete | QueueAdd | QueueUpdate | QueueRemove | Qos2InAdd
    | Qos2InRemove | Dynsec | Noop | SessionOffline | MeshMark
)

OP_TYPES: dict[int, type] = {
    t.TAG: t
    for t in (
        Noop, SessionPut, SessionExpiry, SessionDelete, SubAdd, SubRemove, WillSet,
        WillDelete, RetainSet, RetainDelete, QueueAdd, QueueUpdate, QueueRemove,
        Qos2InAdd, Qos2InRemove, Dynsec, SessionOffline, MeshMark,
    )
}

def _header_getter(cls: type) -> Callable[[Any], list[Any]]:
    """The op's scalar fields (all but ``message``) as a list, looked up once per type."""
    names = [f for f in cls.__slots__ if f != "message"]
    if not names:
        return lambda op: []
    get = attrgetter(*names)
    if len(names) == 1:
        return lambda op: [get(op)]
    return lambda op: list(get(op))


# encode_ops is on the path of every durable change: no per-op reflection there.
_HEADER_FIELDS: dict[int, Callable[[Any], list[Any]]] = {
    tag: _header_getter(cls) for tag, cls in OP_TYPES.items()
}

_U32 = struct.Struct("<I")
_OP_HEAD = struct.Struct("<BI")
_COMPACT = 0x80
_INLINE_MAX = 200  # = tables._INLINE_MAX (tests/state checks the keys agree)
_C_REMOVE = struct.Struct(">BH")  # tag, client id length; then id, u64 seq
_C_SEQ = struct.Struct(">Q")
_C_UPDATE_TAIL = struct.Struct(">QHB")  # seq, packet id, state
_C_ADD_HEAD = struct.Struct(">BH")  # tag, number of deliveries
_C_ADD_ONE = struct.Struct(">BHH")  # tag, 1 delivery, its client id length
_BE16 = struct.Struct(">H")
_C_ADD_TAIL = struct.Struct(">QHBH")  # seq, packet id, qos, number of subscription ids
_QUEUE_REMOVE_TAG, _QUEUE_UPDATE_TAG, _QUEUE_ADD_TAG = QueueRemove.TAG, QueueUpdate.TAG, QueueAdd.TAG


def _compact(op: Any) -> bytes | None:
    """The compact form of a queue op, or None when it has none (a long
    client id, a value out of the binary fields' range)."""
    tag = op.TAG
    try:
        if tag == _QUEUE_REMOVE_TAG:
            cid = op.client_id.encode()
            if len(cid) > _INLINE_MAX:
                return None
            return _C_REMOVE.pack(tag | _COMPACT, len(cid)) + cid + _C_SEQ.pack(op.seq)
        if tag == _QUEUE_UPDATE_TAG:
            cid = op.client_id.encode()
            if len(cid) > _INLINE_MAX:
                return None
            return b"".join((
                _C_REMOVE.pack(tag | _COMPACT, len(cid)), cid,
                _C_UPDATE_TAIL.pack(op.seq, op.packet_id, op.state),
            ))
        deliveries = op.deliveries
        mb = encode_message(op.message) if op.message is not None else b""
        if len(deliveries) == 1:  # the usual case: one persistent subscriber
            cid_s, seq, packet_id, qos, sub_ids = deliveries[0]
            cid = cid_s.encode()
            if len(cid) > _INLINE_MAX:
                return None
            return b"".join((
                _C_ADD_ONE.pack(tag | _COMPACT, 1, len(cid)), cid,
                _C_ADD_TAIL.pack(seq, packet_id, qos, len(sub_ids)),
                struct.pack(f">{len(sub_ids)}I", *sub_ids) if sub_ids else b"",
                _U32.pack(len(mb)), mb,
            ))
        parts = [_C_ADD_HEAD.pack(tag | _COMPACT, len(deliveries))]
        for cid_s, seq, packet_id, qos, sub_ids in deliveries:
            cid = cid_s.encode()
            if len(cid) > _INLINE_MAX:
                return None
            parts += (_BE16.pack(len(cid)), cid, _C_ADD_TAIL.pack(seq, packet_id, qos, len(sub_ids)))
            if sub_ids:
                parts.append(struct.pack(f">{len(sub_ids)}I", *sub_ids))
        parts += (_U32.pack(len(mb)), mb)
        return b"".join(parts)
    except (struct.error, TypeError, ValueError):
        return None


# The ops the other workers of the node must see when one worker commits them
# (the raft process fans them out, raftmq.raft.channel ENTRY): dynamic-security
# changes, which every worker's authentication and ACLs follow.  Everything
# else a worker commits is its own (its sessions, its queues) or reaches its
# siblings over the mesh (forwarded and retained messages), so a batch without
# them is proposed PROPOSE_LOCAL and no sibling decodes it (encode_batch).
NODE_WIDE_TAGS = frozenset({Dynsec.TAG})


def encode_ops(ops: list[Op]) -> bytes:
    return encode_batch(ops)[0]


def encode_batch(ops: list[Op]) -> tuple[bytes, bool]:
    """The encoded batch, and whether some op of it is one every worker of the
    node must see (NODE_WIDE_TAGS), found in the same pass."""
    parts = [_U32.pack(len(ops))]
    wide = False
    for op in ops:
        tag = op.TAG
        if _QUEUE_ADD_TAG <= tag <= _QUEUE_REMOVE_TAG:
            b = _compact(op)
            if b is not None:
                parts.append(b)
                continue
        elif tag in NODE_WIDE_TAGS:
            wide = True
        head = orjson.dumps(_HEADER_FIELDS[tag](op))
        msg = getattr(op, "message", None)
        mb = encode_message(msg) if msg is not None else b""
        parts += (_OP_HEAD.pack(tag, len(head)), head, _U32.pack(len(mb)), mb)
    return b"".join(parts), wide


def decode_ops(b: bytes | memoryview) -> list[Op]:
    ops: list[Op] = []
    for tag, fields, mv in iter_raw_ops(b):
        if tag & _COMPACT:
            tag, fields = plain_fields(tag, fields)
        op = OP_TYPES[tag](*fields)
        if len(mv):
            op.message = decode_message(mv)
        ops.append(op)
    return ops


# ---------------------------------------------------------------------------
# What a store hands back at start-up: the tables, as the broker rebuilds them.


@dataclass(slots=True)
class QueuedMessage:
    seq: int
    packet_id: int
    state: int
    qos: int
    subscription_ids: list[int]
    message: Message


@dataclass(slots=True)
class SessionRecord:
    client_id: str
    protocol_version: int
    expiry_interval: int
    username: str | None = None
    # topic filter -> (packed options, subscription id)
    subscriptions: dict[str, tuple[int, int]] = field(default_factory=dict)
    will: tuple[int, Message] | None = None  # (delay interval, message)
    queue: list[QueuedMessage] = field(default_factory=list)  # ordered by seq
    qos2_in: set[int] = field(default_factory=set)
    # ms since the epoch when it went offline (SessionOffline); 0: it was
    # connected when the broker stopped.
    disconnected_at: int = 0
    qos2_forwards: dict[int, list] = field(default_factory=dict)  # Qos2InAdd.forwards


@dataclass(slots=True)
class LoadedState:
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    retained: dict[str, Message] = field(default_factory=dict)
    dynsec: dict[str, Any] | None = None  # Mosquitto dynamic-security.json document
    # (receiver, sender) worker indexes -> (sender incarnation, seq): MeshMark
    mesh_marks: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
