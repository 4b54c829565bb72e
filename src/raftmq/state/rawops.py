"""Walk an encoded op batch without building op or Message objects.

The state machine stores message bytes as they arrive (queues, retained,
wills), so on its hot path it needs each op's tag, its scalar fields and a view
of its message bytes -- not a decoded ``Message``.  ``iter_raw_ops`` reads the
batch format documented in state/entries.py (u32 count; per op: u8 tag, u32
header length, orjson header, u32 message length, message bytes) and yields
``(tag, fields, message)`` where ``fields`` is the op's header list (its slots
in declaration order, "message" excluded) and ``message`` a memoryview of the
encoded message (empty when none).

tests/state/test_machine.py checks it against ``entries.decode_ops`` for every
op type, so a change of the entries format cannot go unnoticed.

Compact queue ops (tag | 0x80, see state/entries.py) carry their keys in table
form, so they are yielded pre-cut: ``fields`` is ``(key,)`` for QueueRemove,
``(key, state)`` for QueueUpdate (``state``: the 3-byte packet id + state
prefix of a queue row) and ``([(key, packet_id, qos, sub_ids), ...],)`` for
QueueAdd, where ``key`` is the queue table key (client key + u64 seq).
``plain_fields`` turns them back into the header list of the JSON form.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import orjson

_U32 = struct.Struct("<I")
_OP_HEAD = struct.Struct("<BI")
_TOPIC_LEN = struct.Struct("<H")
_BE16 = struct.Struct(">H")
_BE64 = struct.Struct(">Q")
_ADD_TAIL = struct.Struct(">8xHBH")  # (seq), packet id, qos, number of subscription ids

COMPACT = 0x80
INLINE_MAX = 200  # = tables._INLINE_MAX: the longest client id a table key holds verbatim
C_QUEUE_ADD, C_QUEUE_UPDATE, C_QUEUE_REMOVE = 10 | COMPACT, 11 | COMPACT, 12 | COMPACT


class MalformedBatch(ValueError):
    """The entry data is not a well-formed op batch."""


def iter_raw_ops(data: bytes | memoryview) -> Iterator[tuple[int, Any, memoryview]]:
    data = bytes(data)
    mv = memoryview(data)
    empty = mv[0:0]
    end = len(data)
    be16 = _BE16.unpack_from
    try:
        (n,) = _U32.unpack_from(data, 0)
        pos = 4
        for _ in range(n):
            tag = data[pos]
            if tag == C_QUEUE_REMOVE:
                # u8 tag, client key (u16 BE length + UTF-8), u64 BE seq
                kend = pos + 11 + _inline(be16(data, pos + 1)[0])
                if kend > end:
                    raise MalformedBatch("op beyond the end of the batch")
                yield tag, (data[pos + 1 : kend],), empty
                pos = kend
            elif tag == C_QUEUE_UPDATE:
                # ... then u16 BE packet id, u8 state: a queue row's prefix
                kend = pos + 11 + _inline(be16(data, pos + 1)[0])
                if kend + 3 > end:
                    raise MalformedBatch("op beyond the end of the batch")
                yield tag, (data[pos + 1 : kend], data[kend : kend + 3]), empty
                pos = kend + 3
            elif tag == C_QUEUE_ADD:
                # u8 tag, u16 count, per delivery: client key, u64 seq, u16
                # packet id, u8 qos, u16 n, n x u32 subscription ids (all BE);
                # then u32 LE message length, message
                count = be16(data, pos + 1)[0]
                pos += 3
                deliveries = []
                for _ in range(count):
                    kend = pos + 2 + _inline(be16(data, pos)[0])
                    packet_id, qos, nsub = _ADD_TAIL.unpack_from(data, kend)
                    key = data[pos : kend + 8]
                    pos = kend + 13
                    if nsub:
                        deliveries.append((key, packet_id, qos, list(struct.unpack_from(f">{nsub}I", data, pos))))
                        pos += 4 * nsub
                    else:
                        deliveries.append((key, packet_id, qos, []))
                (mlen,) = _U32.unpack_from(data, pos)
                pos += 4
                mend = pos + mlen
                if mend > end:
                    raise MalformedBatch("message beyond the end of the batch")
                yield tag, (deliveries,), mv[pos:mend]
                pos = mend
            else:
                _tag, hlen = _OP_HEAD.unpack_from(data, pos)
                pos += 5
                hend = pos + hlen
                if hend > end:
                    raise MalformedBatch("op header beyond the end of the batch")
                fields = orjson.loads(mv[pos:hend])
                (mlen,) = _U32.unpack_from(data, hend)
                pos = hend + 4
                mend = pos + mlen
                if mend > end:
                    raise MalformedBatch("message beyond the end of the batch")
                yield tag, fields, mv[pos:mend]
                pos = mend
    except (struct.error, IndexError, orjson.JSONDecodeError) as exc:
        raise MalformedBatch(str(exc)) from exc


def _inline(n: int) -> int:
    # Only client ids kept verbatim in table keys travel in compact form
    # (tables.client_key hashes longer ones).
    if n > INLINE_MAX:
        raise MalformedBatch("client key too long for a compact op")
    return n


def split_queue_key(key: bytes) -> tuple[str, int]:
    """(client id, seq) of a compact op's queue key (an inline client key)."""
    n = _BE16.unpack_from(key, 0)[0]
    return key[2 : 2 + n].decode(), _BE64.unpack_from(key, 2 + n)[0]


def plain_fields(tag: int, fields: Any) -> tuple[int, list[Any]]:
    """A compact op's (tag, header list) as the JSON form has them."""
    if tag == C_QUEUE_REMOVE:
        return tag & ~COMPACT, list(split_queue_key(fields[0]))
    if tag == C_QUEUE_UPDATE:
        packet_id, state = struct.unpack(">HB", fields[1])
        return tag & ~COMPACT, [*split_queue_key(fields[0]), packet_id, state]
    if tag == C_QUEUE_ADD:
        return tag & ~COMPACT, [[[*split_queue_key(k), pid, qos, subs] for k, pid, qos, subs in fields[0]]]
    return tag, fields


def message_topic(message: bytes | memoryview) -> bytes:
    """The topic (UTF-8 bytes) of an encoded message (entries.encode_message)."""
    (tlen,) = _TOPIC_LEN.unpack_from(message, 0)
    return bytes(message[2 : 2 + tlen])
