# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Walk an encoded op batch without building op or Message objects (compiled;
raftmq.state.rawops is its Python face).

The state machine stores message bytes as they arrive (queues, retained,
wills), so on its hot path -- every entry the raft process applies -- it needs
each op's tag, its scalar fields and a view of its message bytes, not a
decoded ``Message``.  ``iter_raw_ops`` reads the batch format documented in
state/entries.py (u32 count; per op: u8 tag, u32 header length, orjson
header, u32 message length, message bytes) and returns ``(tag, fields,
message)`` triples where ``fields`` is the op's header list (its slots in
declaration order, "message" excluded) and ``message`` a memoryview of the
encoded message (empty when none).

The whole batch is checked before anything is returned: a malformed batch
raises MalformedBatch and none of its ops is applied.

Compact queue ops (tag | 0x80, see state/entries.py) carry their keys in table
form, so they come pre-cut: ``fields`` is ``(key,)`` for QueueRemove,
``(key, state)`` for QueueUpdate (``state``: the 3-byte packet id + state
prefix of a queue row) and ``([(key, packet_id, qos, sub_ids), ...],)`` for
QueueAdd, where ``key`` is the queue table key (client key + u64 seq).
``plain_fields`` turns them back into the header list of the JSON form.

tests/state/test_machine.py checks it against ``entries.decode_ops`` for every
op type, so a change of the entries format cannot go unnoticed.
"""

import struct

import orjson

from libc.stdint cimport uint8_t, uint32_t

COMPACT = 0x80
INLINE_MAX = 200  # = tables._INLINE_MAX: the longest client id a table key holds verbatim
C_QUEUE_ADD, C_QUEUE_UPDATE, C_QUEUE_REMOVE = 10 | COMPACT, 11 | COMPACT, 12 | COMPACT

DEF _INLINE_MAX = 200
DEF _C_ADD = 138
DEF _C_UPDATE = 139
DEF _C_REMOVE = 140

_BE16 = struct.Struct(">H")
_BE64 = struct.Struct(">Q")
_TOPIC_LEN = struct.Struct("<H")


class MalformedBatch(ValueError):
    """The entry data is not a well-formed op batch."""


cdef inline uint32_t _be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint32_t _le32(const uint8_t* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline Py_ssize_t _key_end(const uint8_t* p, Py_ssize_t at, Py_ssize_t end) except -1:
    """The end of the inline client key at ``at`` (u16 BE length + UTF-8)."""
    if at + 2 > end:
        raise MalformedBatch("op beyond the end of the batch")
    cdef Py_ssize_t n = _be16(p + at)
    # Only client ids kept verbatim in table keys travel in compact form
    # (tables.client_key hashes longer ones).
    if n > _INLINE_MAX:
        raise MalformedBatch("client key too long for a compact op")
    return at + 2 + n


cpdef list iter_raw_ops(data):
    cdef bytes b = data if type(data) is bytes else bytes(data)
    cdef const uint8_t* p = b
    cdef Py_ssize_t end = len(b)
    cdef Py_ssize_t pos, kend, hend, mend, count, nsub, i, j, k
    cdef uint32_t n, mlen, hlen
    cdef int tag
    mv = memoryview(b)
    empty = mv[0:0]
    cdef list out = []
    cdef list deliveries, subs
    if end < 4:
        raise MalformedBatch("batch shorter than its count")
    n = _le32(p)
    pos = 4
    for i in range(n):
        if pos >= end:
            raise MalformedBatch("op beyond the end of the batch")
        tag = p[pos]
        if tag == _C_REMOVE:
            # u8 tag, client key (u16 BE length + UTF-8), u64 BE seq
            kend = _key_end(p, pos + 1, end) + 8
            if kend > end:
                raise MalformedBatch("op beyond the end of the batch")
            out.append((tag, (b[pos + 1:kend],), empty))
            pos = kend
        elif tag == _C_UPDATE:
            # ... then u16 BE packet id, u8 state: a queue row's prefix
            kend = _key_end(p, pos + 1, end) + 8
            if kend + 3 > end:
                raise MalformedBatch("op beyond the end of the batch")
            out.append((tag, (b[pos + 1:kend], b[kend:kend + 3]), empty))
            pos = kend + 3
        elif tag == _C_ADD:
            # u8 tag, u16 count, per delivery: client key, u64 seq, u16
            # packet id, u8 qos, u16 n, n x u32 subscription ids (all BE);
            # then u32 LE message length, message
            if pos + 3 > end:
                raise MalformedBatch("op beyond the end of the batch")
            count = _be16(p + pos + 1)
            pos += 3
            deliveries = []
            for j in range(count):
                kend = _key_end(p, pos, end)
                if kend + 13 > end:
                    raise MalformedBatch("op beyond the end of the batch")
                nsub = _be16(p + kend + 11)
                subs = []
                if nsub:
                    if kend + 13 + 4 * nsub > end:
                        raise MalformedBatch("op beyond the end of the batch")
                    for k in range(nsub):
                        subs.append(_be32(p + kend + 13 + 4 * k))
                deliveries.append((b[pos:kend + 8], _be16(p + kend + 8), p[kend + 10], subs))
                pos = kend + 13 + 4 * nsub
            if pos + 4 > end:
                raise MalformedBatch("message beyond the end of the batch")
            mlen = _le32(p + pos)
            pos += 4
            mend = pos + mlen
            if mend > end:
                raise MalformedBatch("message beyond the end of the batch")
            out.append((tag, (deliveries,), mv[pos:mend]))
            pos = mend
        else:
            if pos + 5 > end:
                raise MalformedBatch("op header beyond the end of the batch")
            hlen = _le32(p + pos + 1)
            pos += 5
            hend = pos + hlen
            if hend + 4 > end:
                raise MalformedBatch("op header beyond the end of the batch")
            try:
                fields = orjson.loads(mv[pos:hend])
            except orjson.JSONDecodeError as exc:
                raise MalformedBatch(str(exc)) from exc
            mlen = _le32(p + hend)
            pos = hend + 4
            mend = pos + mlen
            if mend > end:
                raise MalformedBatch("message beyond the end of the batch")
            out.append((tag, fields, mv[pos:mend]))
            pos = mend
    return out


def split_queue_key(key: bytes) -> tuple:
    """(client id, seq) of a compact op's queue key (an inline client key)."""
    n = _BE16.unpack_from(key, 0)[0]
    return key[2 : 2 + n].decode(), _BE64.unpack_from(key, 2 + n)[0]


def plain_fields(tag: int, fields) -> tuple:
    """A compact op's (tag, header list) as the JSON form has them."""
    if tag == C_QUEUE_REMOVE:
        return tag & ~COMPACT, list(split_queue_key(fields[0]))
    if tag == C_QUEUE_UPDATE:
        packet_id, state = struct.unpack(">HB", fields[1])
        return tag & ~COMPACT, [*split_queue_key(fields[0]), packet_id, state]
    if tag == C_QUEUE_ADD:
        return tag & ~COMPACT, [[[*split_queue_key(k), pid, qos, subs] for k, pid, qos, subs in fields[0]]]
    return tag, fields


def message_topic(message) -> bytes:
    """The topic (UTF-8 bytes) of an encoded message (entries.encode_message)."""
    (tlen,) = _TOPIC_LEN.unpack_from(message, 0)
    return bytes(message[2 : 2 + tlen])
