"""Layout of the state-machine tables in LMDB: database names, key and row encodings.

Theory of operation
-------------------
The replicated state machine (state/machine.py, DESIGN.md §3) keeps each table
as one LMDB named database in the same environment as the Raft log
(raft/lmdb_storage.py), so that applying an entry and advancing the applied
index happen in one write transaction.

LMDB keys are at most 511 bytes and are compared bytewise, while an MQTT client
id or topic may be up to 65,535 bytes ([MQTT-1.5.4]).  Keys therefore use:

* ``client_key(cid)``: ``u16 length + UTF-8`` for ids up to ``_INLINE_MAX``
  bytes, else ``0xFFFF + blake2b-256(id)``.  The length prefix makes the key of
  one client never a prefix of another's, so "all rows of client X" is one
  prefix range in every per-client table.
* ``filter_key(f)``: the same scheme for a topic filter inside a subscription key.
* ``topic_key(t)``: the topic bytes themselves (keeps retained messages in
  topic order) or ``0xFF + blake2b-256`` when too long; a UTF-8 string never
  contains the byte 0xFF, so the two forms cannot collide.

Every row also carries the full strings, so a hashed key never loses data.
Integers in keys are big-endian so that LMDB's bytewise order is numeric order.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from typing import Any

import lmdb
import orjson

MAX_DBS = 16
DEFAULT_MAP_SIZE = 8 << 30  # virtual address space only; the file grows as needed


def open_environment(
    path: str, map_size: int = DEFAULT_MAP_SIZE, sync: bool = True, readonly: bool = False
) -> lmdb.Environment:
    """Open (creating if needed: 0700 directory, 0600 files) a node's LMDB environment.

    The raft process opens it read-write (raft/lmdb_storage.py); broker workers
    open it ``readonly=True`` to load the tables, which LMDB allows from any
    number of processes while one writes.  Open an environment at most once per
    process (an LMDB rule).
    """
    if not readonly:
        os.makedirs(path, mode=0o700, exist_ok=True)
    env = lmdb.open(
        path,
        map_size=map_size,
        max_dbs=MAX_DBS,
        subdir=True,
        readonly=readonly,
        create=not readonly,
        sync=sync,
        metasync=sync,
        mode=0o600,
        readahead=False,
    )
    if not readonly:
        # lmdb.open honours the umask; make sure nothing is wider than 0600.
        for name in ("data.mdb", "lock.mdb"):
            p = os.path.join(path, name)
            if os.path.exists(p):
                os.chmod(p, 0o600)
    return env


# Named databases.  Names are part of the on-disk format: never rename.
DB_SESSIONS = b"sessions"  # client_key -> session row
DB_SUBS = b"subs"  # client_key + filter_key -> subscription row
DB_WILLS = b"wills"  # client_key -> will row
DB_RETAINED = b"retained"  # topic_key -> encoded message (entries.encode_message)
DB_QUEUES = b"queues"  # client_key + u64 seq -> queue row
DB_QOS2_IN = b"qos2_in"  # client_key + u16 packet id -> b"" or orjson of Qos2InAdd.forwards
DB_DYNSEC = b"dynsec"  # DYNSEC_DOCUMENT -> orjson of the Mosquitto document
DB_META = b"meta"  # META_* -> machine metadata

# Tables whose content a snapshot carries, in snapshot order.
MACHINE_DBS: tuple[bytes, ...] = (
    DB_SESSIONS, DB_SUBS, DB_WILLS, DB_RETAINED, DB_QUEUES, DB_QOS2_IN, DB_DYNSEC, DB_META,
)
# Tables holding rows of one client, each keyed by client_key + suffix.
PER_CLIENT_DBS: tuple[bytes, ...] = (DB_SUBS, DB_QUEUES, DB_QOS2_IN)

DYNSEC_DOCUMENT = b"document"
META_APPLIED = b"applied"  # u64 index, u64 term of the last applied entry
META_CONF_STATE = b"conf_state"  # orjson {"voters": [...], "learners": [...]}
META_CLUSTER_ID = b"cluster_id"  # UTF-8
META_MESH = b"mesh/"  # + u16 receiver + u16 sender -> u64 incarnation, u64 seq (MeshMark)

_INLINE_MAX = 200  # longest client id / filter kept verbatim in a key
_TOPIC_INLINE_MAX = 300
_HASHED = b"\xff\xff"

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_APPLIED = struct.Struct(">QQ")


def _digest(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=32).digest()


@functools.lru_cache(maxsize=1 << 16)  # the same few ids recur in every batch
def client_key(client_id: str) -> bytes:
    b = client_id.encode()
    if len(b) <= _INLINE_MAX:
        return _U16.pack(len(b)) + b
    return _HASHED + _digest(b)


def filter_key(topic_filter: str) -> bytes:
    b = topic_filter.encode()
    if len(b) <= _INLINE_MAX:
        return _U16.pack(len(b)) + b
    return _HASHED + _digest(b)


def topic_key(topic: str | bytes) -> bytes:
    b = topic.encode() if isinstance(topic, str) else topic
    if len(b) <= _TOPIC_INLINE_MAX:
        return b
    return b"\xff" + _digest(b)


def client_key_len(key: bytes) -> int:
    """Length of the client_key at the start of a per-client table key."""
    if key[:2] == _HASHED:
        return 34
    return 2 + _U16.unpack_from(key, 0)[0]


def seq_key(ck: bytes, seq: int) -> bytes:
    return ck + _U64.pack(seq)


def key_seq(key: bytes, ck_len: int) -> int:
    return _U64.unpack_from(key, ck_len)[0]


def qos2_key(ck: bytes, packet_id: int) -> bytes:
    return ck + _U16.pack(packet_id)


def key_packet_id(key: bytes, ck_len: int) -> int:
    return _U16.unpack_from(key, ck_len)[0]


# ---------------------------------------------------------------------------
# Rows.


def session_row(client_id: str, protocol_version: int, expiry_interval: int, username: str | None,
                disconnected_at: int = 0) -> bytes:
    """``disconnected_at``: ms since the epoch when the session last went offline
    (entries.SessionOffline), 0 while it is connected; a connected session's
    row keeps the 4-field form of rows written before the field existed."""
    if disconnected_at:
        return orjson.dumps([client_id, protocol_version, expiry_interval, username, disconnected_at])
    return orjson.dumps([client_id, protocol_version, expiry_interval, username])


def parse_session_row(b: bytes) -> tuple[str, int, int, str | None, int]:
    """(client id, protocol version, expiry interval, user name, disconnected_at)."""
    fields = orjson.loads(b)
    return fields[0], fields[1], fields[2], fields[3], fields[4] if len(fields) > 4 else 0


_SUB = struct.Struct(">BI")


def sub_row(options: int, subscription_id: int, topic_filter: str) -> bytes:
    return _SUB.pack(options, subscription_id) + topic_filter.encode()


def parse_sub_row(b: bytes) -> tuple[int, int, str]:
    options, sub_id = _SUB.unpack_from(b, 0)
    return options, sub_id, bytes(b[_SUB.size :]).decode()


_WILL = struct.Struct(">I")


def will_row(delay_interval: int, message_bytes: bytes | memoryview) -> bytes:
    return _WILL.pack(delay_interval) + message_bytes


def parse_will_row(b: bytes) -> tuple[int, memoryview]:
    (delay,) = _WILL.unpack_from(b, 0)
    return delay, memoryview(b)[_WILL.size :]


# Queue row: u16 packet id, u8 state, u8 qos, u16 n, n x u32 subscription ids, message.
_QUEUE_HEAD = struct.Struct(">HBBH")
QUEUE_STATE = struct.Struct(">HB")  # the (packet id, state) prefix a QueueUpdate rewrites


def queue_row(packet_id: int, state: int, qos: int, subscription_ids: list[int], message_bytes: bytes | memoryview) -> bytes:
    n = len(subscription_ids)
    head = _QUEUE_HEAD.pack(packet_id, state, qos, n)
    if n:
        head += struct.pack(f">{n}I", *subscription_ids)
    return head + message_bytes


def parse_queue_row(b: bytes) -> tuple[int, int, int, list[int], memoryview]:
    packet_id, state, qos, n = _QUEUE_HEAD.unpack_from(b, 0)
    pos = _QUEUE_HEAD.size
    sub_ids = list(struct.unpack_from(f">{n}I", b, pos)) if n else []
    pos += 4 * n
    return packet_id, state, qos, sub_ids, memoryview(b)[pos:]


def mesh_mark_key(receiver: int, sender: int) -> bytes:
    return META_MESH + _U16.pack(receiver) + _U16.pack(sender)


def parse_mesh_mark_key(key: bytes) -> tuple[int, int]:
    n = len(META_MESH)
    return _U16.unpack_from(key, n)[0], _U16.unpack_from(key, n + 2)[0]


def mesh_mark_row(incarnation: int, seq: int) -> bytes:
    return _U64.pack(incarnation) + _U64.pack(seq)


def parse_mesh_mark_row(b: bytes) -> tuple[int, int]:
    return _U64.unpack_from(b, 0)[0], _U64.unpack_from(b, 8)[0]


def applied_row(index: int, term: int) -> bytes:
    return _APPLIED.pack(index, term)


def parse_applied_row(b: bytes | None) -> tuple[int, int]:
    if b is None:
        return 0, 0
    return _APPLIED.unpack(b)


def conf_state_row(voters: Any, learners: Any) -> bytes:
    return orjson.dumps({"voters": sorted(voters), "learners": sorted(learners)})


def parse_conf_state_row(b: bytes | None) -> tuple[list[int], list[int]]:
    if b is None:
        return [], []
    d = orjson.loads(b)
    return list(d["voters"]), list(d["learners"])
