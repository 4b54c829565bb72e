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
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import orjson

_U32 = struct.Struct("<I")
_OP_HEAD = struct.Struct("<BI")
_TOPIC_LEN = struct.Struct("<H")


class MalformedBatch(ValueError):
    """The entry data is not a well-formed op batch."""


def iter_raw_ops(data: bytes | memoryview) -> Iterator[tuple[int, list[Any], memoryview]]:
    mv = memoryview(data)
    end = len(mv)
    try:
        (n,) = _U32.unpack_from(mv, 0)
        pos = 4
        for _ in range(n):
            tag, hlen = _OP_HEAD.unpack_from(mv, pos)
            pos += 5
            hend = pos + hlen
            if hend > end:
                raise MalformedBatch("op header beyond the end of the batch")
            fields = orjson.loads(mv[pos:hend])
            (mlen,) = _U32.unpack_from(mv, hend)
            pos = hend + 4
            mend = pos + mlen
            if mend > end:
                raise MalformedBatch("message beyond the end of the batch")
            yield tag, fields, mv[pos:mend]
            pos = mend
    except (struct.error, orjson.JSONDecodeError) as exc:
        raise MalformedBatch(str(exc)) from exc


def message_topic(message: bytes | memoryview) -> bytes:
    """The topic (UTF-8 bytes) of an encoded message (entries.encode_message)."""
    (tlen,) = _TOPIC_LEN.unpack_from(message, 0)
    return bytes(message[2 : 2 + tlen])
