"""Binary encoding of Raft messages for the peer transport.

``encode(msg) -> bytes`` and ``decode(buf) -> Message`` are exact inverses.
Framing (length prefix), authentication and the splitting of large SNAP
messages into chunks are the transport's job; this module encodes one whole
message. All integers are big-endian.

Layout::

    header   B type | Q src | Q dst | Q term | Q log_term | Q index | Q commit
             | B reject | Q reject_hint | I len(context) | I n_entries | B has_snapshot
    context  bytes
    entries  n x (Q term | Q index | B kind | I len(data) | data)
    snapshot Q index | Q term | H n_voters | n x Q | H n_learners | n x Q
             | Q len(data) | data
"""

from __future__ import annotations

import struct

from raftmq.raft.types import (
    ConfState,
    Entry,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

_HDR = struct.Struct(">BQQQQQQBQIIB")
_ENT = struct.Struct(">QQBI")
_SNAP = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


class DecodeError(ValueError):
    """The bytes are not a well-formed Raft message."""


def encode(m: Message) -> bytes:
    snap = m.snapshot
    parts = [
        _HDR.pack(int(m.type), m.src, m.dst, m.term, m.log_term, m.index, m.commit,
                  1 if m.reject else 0, m.reject_hint, len(m.context), len(m.entries),
                  0 if snap is None else 1),
        m.context,
    ]
    pack = _ENT.pack
    for e in m.entries:
        parts.append(pack(e.term, e.index, e.kind, len(e.data)))
        parts.append(e.data)
    if snap is not None:
        meta = snap.meta
        cs = meta.conf_state
        parts.append(_SNAP.pack(meta.index, meta.term, len(cs.voters)))
        parts.extend(_U64.pack(v) for v in cs.voters)
        parts.append(_U16.pack(len(cs.learners)))
        parts.extend(_U64.pack(v) for v in cs.learners)
        parts.append(_U64.pack(len(snap.data)))
        parts.append(snap.data)
    return b"".join(parts)


def decode(buf: bytes | bytearray | memoryview) -> Message:
    buf = bytes(buf)
    try:
        (mtype, src, dst, term, log_term, index, commit, reject, reject_hint,
         ctx_len, n_ents, has_snap) = _HDR.unpack_from(buf, 0)
        pos = _HDR.size
        context = buf[pos : pos + ctx_len]
        if len(context) != ctx_len:
            raise DecodeError("truncated context")
        pos += ctx_len
        entries = []
        unpack = _ENT.unpack_from
        esize = _ENT.size
        for _ in range(n_ents):
            et, ei, ek, dl = unpack(buf, pos)
            pos += esize
            data = buf[pos : pos + dl]
            if len(data) != dl:
                raise DecodeError("truncated entry")
            pos += dl
            entries.append(Entry(et, ei, data, ek))
        snapshot = None
        if has_snap:
            si, st, nv = _SNAP.unpack_from(buf, pos)
            pos += _SNAP.size
            voters = struct.unpack_from(f">{nv}Q", buf, pos)
            pos += 8 * nv
            (nl,) = _U16.unpack_from(buf, pos)
            pos += 2
            learners = struct.unpack_from(f">{nl}Q", buf, pos)
            pos += 8 * nl
            (dl,) = _U64.unpack_from(buf, pos)
            pos += 8
            data = buf[pos : pos + dl]
            if len(data) != dl:
                raise DecodeError("truncated snapshot")
            pos += dl
            snapshot = Snapshot(SnapshotMeta(si, st, ConfState(tuple(voters), tuple(learners))), data)
        if pos != len(buf):
            raise DecodeError(f"{len(buf) - pos} trailing bytes")
        return Message(MessageType(mtype), src=src, dst=dst, term=term, log_term=log_term,
                       index=index, entries=entries, commit=commit, reject=bool(reject),
                       reject_hint=reject_hint, snapshot=snapshot, context=context)
    except (struct.error, ValueError) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(str(e)) from e
