"""The replicated state machine: committed Raft entries applied to LMDB tables.

Theory of operation
-------------------
Every durable change of broker state is an op (state/entries.py); a Raft log
entry carries a batch of ops.  ``apply`` runs committed entries, in log order,
against the tables of DESIGN.md §3 (layout in state/tables.py) inside ONE LMDB
write transaction that also records the applied index and term.  So after a
crash the tables and the applied index always agree: entries at or below the
applied index are skipped, the next one resumes at applied + 1, and no entry is
applied twice or skipped (Raft §5.3 state machine safety needs exactly this).

``apply`` is deterministic: it reads no clock and no randomness and depends only
on the tables and the entries, so every member (and a member rebuilt from a
snapshot plus the tail of the log) ends with byte-identical tables.  An op that
cannot be applied (a malformed batch, a dynsec change the dynsec module
rejects) is reported in the results and changes nothing -- it must not raise,
or the node would fail on the same entry at every restart.

Hot path: op headers are read with ``rawops.iter_raw_ops`` and message bytes are
stored as they are (no ``Message`` objects); ``load`` decodes them once at
start-up for a broker worker.

Deferred queue rows (``defer_queue_ops=N``, the raft process's setting): a
durable QoS 1 delivery is QueueAdd, maybe QueueUpdate, then QueueRemove a few
milliseconds later -- three B-tree writes (and their pages in the next fsync)
for a row that lives only briefly.  With deferral the queue ops change an
in-memory map ``key -> row | None (delete)`` instead, and a row added and
removed while deferred never reaches the table.  Raft allows the tables to lag
the log (the log holds every committed entry; after a crash the entries after
the applied index are applied again), so the invariant stays simple:
META_APPLIED names the entry the tables are at, and the map holds the net
effect of the entries after it, all of which carried only queue ops (and MeshMarks).  The map
is written (in key order) before any op that writes a table directly (so every
applied index describes the tables), once the tables lag N entries or the map
holds ``_MAX_DEFERRED_ROWS`` keys, by ``flush()``, and by ``load()``.  An
aborted write transaction puts the map back as that transaction found it
(``txn_aborted``).  The written tables are byte-identical to applying each
entry at once (tests/state/test_machine.py checks it against the model).

Op semantics (one paragraph each in state/entries.py):

* SessionPut: put the session row; with ``clean`` first drop the client's
  subscriptions, queue, QoS 2 receive state and will.
* SessionExpiry: change the expiry interval of an existing session.
* SessionOffline: record when an existing session went offline (its row's
  ``disconnected_at``; SessionPut writes the row without it).
* SessionDelete: drop everything of the client.
* SubAdd / SubRemove, WillSet / WillDelete, RetainSet / RetainDelete,
  Qos2InAdd / Qos2InRemove: put / delete one row.
* QueueAdd: one queue row per delivery (state SENT if it has a packet id, else
  QUEUED), each with its own copy of the message.
* QueueUpdate: rewrite the packet id and state of an existing row.
* QueueRemove: delete the row.
* MeshMark: put the receiver's applied-frame mark for one sibling in the meta
  table (``tables.mesh_mark_key``).  With deferral it waits with the queue rows
  (its deferred key is ``_META_ROW`` + the meta key, which no queue key starts
  with): a worker adds one to every batch of forwarded messages, which would
  otherwise make every such entry write the tables directly.
* Dynsec: ``document = apply_dynsec(document, change)``: by default
  ``raftmq.dynsec.commands.apply_change`` (pluggable for tests; the document is
  the Mosquitto dynamic-security.json form, stored as sorted-key JSON).

Conf-change entries: ``on_conf_change(entry)`` (the raft process passes one that
calls the core's ``apply_conf_change``) returns the new membership, stored in
the meta table at that index; it is what ``LmdbStorage.initial_state`` reports
after a restart.  The state package does not import the raft package
(DESIGN.md §7), so entries are duck-typed (``index``, ``term``, ``kind``,
``data``).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import lmdb
import orjson

from raftmq.state import tables as T
from raftmq.state.entries import (
    QUEUED,
    SENT,
    LoadedState,
    QueuedMessage,
    SessionRecord,
    decode_message,
)
from raftmq.state.rawops import (
    C_QUEUE_ADD,
    C_QUEUE_REMOVE,
    C_QUEUE_UPDATE,
    COMPACT,
    MalformedBatch,
    iter_raw_ops,
    message_topic,
)

log = logging.getLogger("raftmq.state")

# Entry kinds, as raft/types.py numbers them (NORMAL = 0, CONF_CHANGE = 1).
KIND_CONF_CHANGE = 1

# Op tags, as state/entries.py numbers them (part of the on-disk format).
_NOOP, _SESSION_PUT, _SESSION_EXPIRY, _SESSION_DELETE, _SUB_ADD, _SUB_REMOVE = 0, 1, 2, 3, 4, 5
_WILL_SET, _WILL_DELETE, _RETAIN_SET, _RETAIN_DELETE, _QUEUE_ADD, _QUEUE_UPDATE = 6, 7, 8, 9, 10, 11
_QUEUE_REMOVE, _QOS2_IN_ADD, _QOS2_IN_REMOVE, _DYNSEC = 12, 13, 14, 15
_SESSION_OFFLINE = 16
_MESH_MARK = 17
# Prefix of a deferred meta-table row among the deferred queue rows: a queue key
# starts with a client key, 0x00 (u16 length <= 200) or 0xFFFF (hashed).
_META_ROW = b"\xfe"


class LogEntry(Protocol):
    term: int
    index: int
    data: bytes
    kind: int


class ApplyGapError(RuntimeError):
    """An entry beyond applied index + 1 was offered: applying it would skip entries."""


class SnapshotFormatError(ValueError):
    """Snapshot data that is not ours, truncated, or fails its checksum."""


DynsecApply = Callable[[dict[str, Any] | None, dict[str, Any]], dict[str, Any]]
"""``apply_dynsec(document, change) -> new document``; must not modify ``document``
and must be deterministic (a password's salt is chosen by the proposer)."""


def default_apply_dynsec(document: dict[str, Any] | None, change: dict[str, Any]) -> dict[str, Any]:
    """Fallback when raftmq.dynsec is not importable: whole-document replacement
    only, ``{"replace": {...}}`` (or ``{"op": "replace", "document": {...}}``)."""
    if isinstance(change.get("replace"), dict):
        return change["replace"]
    if change.get("op") == "replace" and isinstance(change.get("document"), dict):
        return change["document"]
    raise ValueError(f"unsupported dynsec change {sorted(change)!r}")


def _find_apply_dynsec() -> DynsecApply:
    """The dynsec library's pure ``apply_change(document, change) -> document``."""
    try:
        from raftmq.dynsec.commands import apply_change
    except ImportError:
        return default_apply_dynsec
    return apply_change


# Queue op tags, JSON and compact form (state/entries.py), -> the op kind.
_QUEUE_KIND = {
    _QUEUE_ADD: _QUEUE_ADD, _QUEUE_UPDATE: _QUEUE_UPDATE, _QUEUE_REMOVE: _QUEUE_REMOVE,
    C_QUEUE_ADD: _QUEUE_ADD, C_QUEUE_UPDATE: _QUEUE_UPDATE, C_QUEUE_REMOVE: _QUEUE_REMOVE,
}
# Deferred queue rows beyond this many are written at the end of the transaction.
_MAX_DEFERRED_ROWS = 8192

_UNLOADED = object()
_NO_TXN = object()  # no write transaction has touched the deferred state
_SNAP_MAGIC = b"RMQSNAP1"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class StateMachine:
    """The tables of DESIGN.md §3 in an LMDB environment; see the module doc.

    ``backing`` is the node's ``LmdbStorage`` (the machine attaches itself to
    it, so ``storage.save(..., committed=...)`` applies in the log's
    transaction and ``storage.snapshot()`` serializes the tables) or a bare
    ``lmdb.Environment`` (a worker's read-only view, tools, tests).
    """

    def __init__(
        self,
        backing: Any,
        *,
        apply_dynsec: DynsecApply | None = None,
        on_conf_change: Callable[[LogEntry], Any] | None = None,
        defer_queue_ops: int = 0,
    ) -> None:
        if isinstance(backing, lmdb.Environment):
            self.env = backing
            storage = None
        else:
            self.env = backing.env
            storage = backing
        self.apply_dynsec = apply_dynsec or _find_apply_dynsec()
        self.on_conf_change = on_conf_change
        self._dynsec_doc: Any = _UNLOADED  # the document while apply_in runs
        self._dynsec_dirty = False
        # Deferred queue ops (see "Deferred queue rows" in the module doc).
        # ``_defer`` bounds how many entries the tables may lag behind the
        # entries folded in (0: apply everything at once, the default).
        self._defer = defer_queue_ops
        self._rows: dict[bytes, bytes | None] = {}  # queue key -> row, None = delete
        self._fresh: set[bytes] = set()  # keys of _rows known absent from the table
        self._folded: tuple[int, int] | None = None  # last entry folded in, when ahead of the table
        self._table_applied: tuple[int, int] = (0, 0)  # what META_APPLIED says (valid while _folded)
        self._saved: Any = _NO_TXN  # the deferred state as the current write txn found it
        # client key -> highest seq its queue rows may have in the table (see _absent)
        self._top_seq: dict[bytes, int] = {}
        readonly = self.env.flags()["readonly"]
        if readonly:
            dbs = {name: self.env.open_db(name, create=False) for name in T.MACHINE_DBS}
        else:
            with self.env.begin(write=True) as txn:
                dbs = {name: self.env.open_db(name, txn=txn) for name in T.MACHINE_DBS}
        self._dbs = dbs
        self.db_sessions = dbs[T.DB_SESSIONS]
        self.db_subs = dbs[T.DB_SUBS]
        self.db_wills = dbs[T.DB_WILLS]
        self.db_retained = dbs[T.DB_RETAINED]
        self.db_queues = dbs[T.DB_QUEUES]
        self.db_qos2_in = dbs[T.DB_QOS2_IN]
        self.db_dynsec = dbs[T.DB_DYNSEC]
        self.db_meta = dbs[T.DB_META]
        if storage is not None:
            storage.machine = self

    # -- meta ------------------------------------------------------------------------

    def applied(self) -> tuple[int, int]:
        """(index, term) of the last applied entry; (0, 0) if none."""
        with self.env.begin() as txn:
            return T.parse_applied_row(txn.get(T.META_APPLIED, db=self.db_meta))

    def applied_in(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """``applied`` as seen by the caller's transaction."""
        return T.parse_applied_row(txn.get(T.META_APPLIED, db=self.db_meta))

    def applied_index(self) -> int:
        return self.applied()[0]

    def conf_state(self) -> tuple[list[int], list[int]]:
        """(voters, learners) as of the applied index."""
        with self.env.begin() as txn:
            return T.parse_conf_state_row(txn.get(T.META_CONF_STATE, db=self.db_meta))

    @property
    def cluster_id(self) -> str | None:
        with self.env.begin() as txn:
            b = txn.get(T.META_CLUSTER_ID, db=self.db_meta)
        return b.decode() if b is not None else None

    def set_cluster_id(self, cluster_id: str) -> None:
        """Recorded once when a cluster is created; carried by snapshots."""
        with self.env.begin(write=True) as txn:
            txn.put(T.META_CLUSTER_ID, cluster_id.encode(), db=self.db_meta)

    # -- apply -----------------------------------------------------------------------

    def apply(self, entries: Sequence[LogEntry]) -> list[tuple[int, Any]]:
        """Apply committed entries in one write transaction (with the applied index).

        Returns ``(index, result)`` for each entry applied now (entries at or
        below the applied index are skipped): result is None, or the list of
        per-op error strings, or the new membership of a conf change.
        Raises ApplyGapError if an entry would skip some.
        """
        return self._write(lambda txn: self.apply_in(txn, entries))

    def flush(self) -> None:
        """Write the deferred queue rows: afterwards the tables (and META_APPLIED)
        are at the last entry applied.  A no-op when nothing is deferred."""
        if self._folded is not None:
            self._write(self.flush_in)

    def flush_in(self, txn: lmdb.Transaction) -> None:
        """``flush`` inside the caller's write transaction."""
        if self._folded is None:
            return
        self._begin_deferred()
        if self._rows:
            self._flush_rows(txn)
        txn.put(T.META_APPLIED, T.applied_row(*self._folded), db=self.db_meta)
        self._table_applied, self._folded = self._folded, None

    @property
    def deferred(self) -> int:
        """Queue rows waiting in memory (0 when the tables are current)."""
        return len(self._rows)

    def last_applied(self) -> int:
        """The last entry applied, deferred rows included (``applied_index`` is
        what the tables hold; they agree unless rows are deferred)."""
        return self._folded[0] if self._folded is not None else self.applied_index()

    def _write(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        try:
            with self.env.begin(write=True) as txn:
                out = fn(txn)
        except BaseException:
            self.txn_aborted()
            raise
        self.txn_committed()
        return out

    def _begin_deferred(self) -> None:
        """Remember the deferred state as this write transaction finds it."""
        if self._saved is not _NO_TXN:
            return  # already remembered by an earlier call in the same transaction
        self._saved = (dict(self._rows), set(self._fresh), self._folded, self._table_applied) \
            if self._folded is not None else None

    def txn_committed(self) -> None:
        """The caller's write transaction (given to ``apply_in`` etc.) committed."""
        self._saved = _NO_TXN

    def txn_aborted(self) -> None:
        """The caller's write transaction was aborted (LmdbStorage retries a full
        map): the deferred rows go back to what that transaction found, as the
        tables did."""
        saved, self._saved = self._saved, _NO_TXN
        if saved is _NO_TXN:
            return
        if saved is None:
            self._rows, self._fresh, self._folded = {}, set(), None
        else:
            self._rows, self._fresh, self._folded, self._table_applied = saved

    def apply_in(self, txn: lmdb.Transaction, entries: Sequence[LogEntry]) -> list[tuple[int, Any]]:
        """``apply`` inside the caller's write transaction (LmdbStorage.save).

        With deferral on, queue rows may stay in memory (see the module doc);
        the caller must call ``txn_aborted`` if ``txn`` is not committed.
        """
        self._begin_deferred()
        if self._folded is not None:
            applied, applied_term = self._folded
            table_applied = self._table_applied
        else:
            applied, applied_term = T.parse_applied_row(txn.get(T.META_APPLIED, db=self.db_meta))
            table_applied = (applied, applied_term)
        found = table_applied
        rows = self._rows
        results: list[tuple[int, Any]] = []
        # The dynsec document is read at most once and written at most once per
        # call, however many Dynsec ops the entries carry (an import is many).
        self._dynsec_doc: Any = _UNLOADED
        self._dynsec_dirty = False
        for e in entries:
            index = e.index
            if index <= applied:
                continue
            if index != applied + 1:
                raise ApplyGapError(f"entry {index} offered after applied index {applied}")
            direct = True
            if e.kind == KIND_CONF_CHANGE:
                if rows:
                    self._flush_rows(txn)
                result = self._apply_conf_change(txn, e)
            elif e.data:
                result, direct = self._apply_batch(txn, index, e.data)
            else:
                result, direct = None, False  # a new leader's empty entry (Raft §8)
            results.append((index, result))
            applied, applied_term = index, e.term
            if direct and rows:
                # This entry changed tables directly: the deferred rows of the
                # entries before it must be in the tables too, or no applied
                # index would describe them.
                self._flush_rows(txn)
            if not rows:
                table_applied = (index, e.term)
        if rows and (applied - table_applied[0] >= self._defer or len(rows) >= _MAX_DEFERRED_ROWS):
            self._flush_rows(txn)
            table_applied = (applied, applied_term)
        if self._dynsec_dirty:
            doc = orjson.dumps(self._dynsec_doc, option=orjson.OPT_SORT_KEYS)
            txn.put(T.DYNSEC_DOCUMENT, doc, db=self.db_dynsec)
        self._dynsec_doc = _UNLOADED
        if table_applied != found:
            txn.put(T.META_APPLIED, T.applied_row(*table_applied), db=self.db_meta)
        self._table_applied = table_applied
        self._folded = (applied, applied_term) if rows else None
        return results

    def _absent(self, txn: lmdb.Transaction, key: bytes) -> bool:
        """Whether queue ``key`` is not in the table.  A session's seqs only grow,
        so a seq above the highest one the table holds for that client needs no
        lookup (the highest is read once per client and raised as rows are
        written; deletes leave it high, which only costs a lookup)."""
        ck = key[:-8]
        top = self._top_seq.get(ck)
        if top is None:
            if len(self._top_seq) >= _MAX_DEFERRED_ROWS:
                self._top_seq.clear()
            top = self._top_seq[ck] = self._table_top_seq(txn, ck)
        if int.from_bytes(key[-8:], "big") > top:
            return True
        return txn.get(key, db=self.db_queues) is None

    def _table_top_seq(self, txn: lmdb.Transaction, ck: bytes) -> int:
        """The highest seq the queue table holds for client key ``ck``, -1 if none."""
        cur = txn.cursor(db=self.db_queues)
        if cur.set_range(ck + b"\xff" * 8):
            if cur.key()[:-8] == ck:
                return T.key_seq(cur.key(), len(ck))
            if not cur.prev():
                return -1
        elif not cur.last():
            return -1
        k = cur.key()
        return T.key_seq(k, len(ck)) if len(k) == len(ck) + 8 and k[: len(ck)] == ck else -1

    def _flush_rows(self, txn: lmdb.Transaction) -> None:
        """Write the deferred queue rows into ``txn`` (in key order: neighbouring
        puts land on the same pages) and forget them."""
        rows = self._rows
        put, delete, db = txn.put, txn.delete, self.db_queues
        top_seq = self._top_seq
        for key in sorted(rows):
            row = rows[key]
            if key[0] == 0xFE:  # _META_ROW: a MeshMark
                put(key[1:], row, db=self.db_meta)
                continue
            if row is None:
                delete(key, db=db)
            else:
                put(key, row, db=db)
                ck = key[:-8]
                top = top_seq.get(ck)
                if top is not None:
                    seq = int.from_bytes(key[-8:], "big")
                    if seq > top:
                        top_seq[ck] = seq
        rows.clear()
        self._fresh.clear()

    def _apply_conf_change(self, txn: lmdb.Transaction, e: LogEntry) -> Any:
        if self.on_conf_change is None:
            log.warning("conf change at %d applied without on_conf_change: membership not recorded", e.index)
            return None
        cs = self.on_conf_change(e)
        voters, learners = getattr(cs, "voters", ()), getattr(cs, "learners", ())
        txn.put(T.META_CONF_STATE, T.conf_state_row(voters, learners), db=self.db_meta)
        return cs

    def _apply_batch(self, txn: lmdb.Transaction, index: int, data: bytes) -> tuple[list[str] | None, bool]:
        """Apply one entry's ops; (errors, whether a table was written directly)."""
        errors: list[str] | None = None
        put, get, delete = txn.put, txn.get, txn.delete
        ck_of = T.client_key
        seq_key = T.seq_key
        queue_row = T.queue_row
        db_queues = self.db_queues
        rows, fresh = self._rows, self._fresh
        defer = self._defer
        direct = False
        try:
            for tag, f, msg in iter_raw_ops(data):
                if defer and tag & COMPACT:
                    # The ops of every durable delivery, deferred: the row
                    # changes in memory; a delivery whose add and remove both
                    # land here never touches the table.
                    if tag == C_QUEUE_REMOVE:
                        key = f[0]
                        if key in fresh:
                            del rows[key]
                            fresh.discard(key)
                        else:
                            rows[key] = None
                        continue
                    if tag == C_QUEUE_ADD:
                        for key, packet_id, qos, sub_ids in f[0]:
                            if key not in rows and self._absent(txn, key):
                                fresh.add(key)
                            rows[key] = queue_row(packet_id, SENT if packet_id else QUEUED, qos, sub_ids, msg)
                        continue
                    if tag == C_QUEUE_UPDATE:
                        key = f[0]
                        row = rows[key] if key in rows else get(key, db=db_queues)
                        if row is not None:
                            rows[key] = f[1] + row[3:]
                        continue
                if tag == _NOOP:
                    continue
                if tag == _MESH_MARK:
                    key = T.mesh_mark_key(f[0], f[1])
                    if defer:
                        rows[_META_ROW + key] = T.mesh_mark_row(f[2], f[3])
                        continue
                    direct = True
                    put(key, T.mesh_mark_row(f[2], f[3]), db=self.db_meta)
                    continue
                kind = _QUEUE_KIND.get(tag)
                if kind is not None:
                    # The queue ops of every durable delivery: first the table
                    # keys (cut out of a compact op, built for the JSON form).
                    if kind == _QUEUE_ADD:
                        dels = f[0] if tag & COMPACT else [
                            (seq_key(ck_of(cid), seq), packet_id, qos, sub_ids)
                            for cid, seq, packet_id, qos, sub_ids in f[0]
                        ]
                    elif tag & COMPACT:
                        key = f[0]
                        prefix = f[1] if kind == _QUEUE_UPDATE else None
                    else:
                        key = seq_key(ck_of(f[0]), f[1])
                        prefix = T.QUEUE_STATE.pack(f[2], f[3]) if kind == _QUEUE_UPDATE else None
                    if defer:
                        # Deferred: the row changes in memory; a delivery whose
                        # add and remove both land here never touches the table.
                        if kind == _QUEUE_ADD:
                            for key, packet_id, qos, sub_ids in dels:
                                if key not in rows and self._absent(txn, key):
                                    fresh.add(key)
                                rows[key] = queue_row(packet_id, SENT if packet_id else QUEUED, qos, sub_ids, msg)
                        elif kind == _QUEUE_REMOVE:
                            if key in fresh:
                                del rows[key]
                                fresh.discard(key)
                            else:
                                rows[key] = None
                        else:
                            row = rows[key] if key in rows else get(key, db=db_queues)
                            if row is not None:
                                rows[key] = prefix + row[3:]
                        continue
                    direct = True
                    if rows:
                        self._flush_rows(txn)
                    if kind == _QUEUE_ADD:
                        for key, packet_id, qos, sub_ids in dels:
                            put(key, queue_row(packet_id, SENT if packet_id else QUEUED, qos, sub_ids, msg), db=db_queues)
                    elif kind == _QUEUE_REMOVE:
                        delete(key, db=db_queues)
                    else:
                        row = get(key, db=db_queues)
                        if row is not None:
                            put(key, prefix + row[3:], db=db_queues)
                    continue
                # A direct write sees the tables as of this op: the rows
                # deferred before it (in this entry too) go in first.
                direct = True
                if rows:
                    self._flush_rows(txn)
                if tag == _QOS2_IN_ADD:
                    fwd = orjson.dumps(f[2]) if len(f) > 2 and f[2] else b""
                    put(T.qos2_key(ck_of(f[0]), f[1]), fwd, db=self.db_qos2_in)
                elif tag == _QOS2_IN_REMOVE:
                    delete(T.qos2_key(ck_of(f[0]), f[1]), db=self.db_qos2_in)
                elif tag == _SESSION_PUT:
                    cid, protocol_version, expiry, clean, username = f
                    ck = ck_of(cid)
                    if clean:
                        self._drop_client_rows(txn, ck)
                    put(ck, T.session_row(cid, protocol_version, expiry, username), db=self.db_sessions)
                elif tag == _SESSION_EXPIRY:
                    ck = ck_of(f[0])
                    row = get(ck, db=self.db_sessions)
                    if row is not None:
                        cid, protocol_version, _, username, offline = T.parse_session_row(row)
                        put(ck, T.session_row(cid, protocol_version, f[1], username, offline),
                            db=self.db_sessions)
                elif tag == _SESSION_OFFLINE:
                    ck = ck_of(f[0])
                    row = get(ck, db=self.db_sessions)
                    if row is not None:
                        cid, protocol_version, expiry, username, _ = T.parse_session_row(row)
                        put(ck, T.session_row(cid, protocol_version, expiry, username, f[1]),
                            db=self.db_sessions)
                elif tag == _SESSION_DELETE:
                    ck = ck_of(f[0])
                    self._drop_client_rows(txn, ck)
                    delete(ck, db=self.db_sessions)
                elif tag == _SUB_ADD:
                    cid, topic_filter, options, sub_id = f
                    key = ck_of(cid) + T.filter_key(topic_filter)
                    put(key, T.sub_row(options, sub_id, topic_filter), db=self.db_subs)
                elif tag == _SUB_REMOVE:
                    delete(ck_of(f[0]) + T.filter_key(f[1]), db=self.db_subs)
                elif tag == _WILL_SET:
                    ck = ck_of(f[0])
                    if len(msg):
                        put(ck, T.will_row(f[1], msg), db=self.db_wills)
                    else:
                        delete(ck, db=self.db_wills)
                elif tag == _WILL_DELETE:
                    delete(ck_of(f[0]), db=self.db_wills)
                elif tag == _RETAIN_SET:
                    if len(msg):
                        put(T.topic_key(message_topic(msg)), msg, db=self.db_retained)
                elif tag == _RETAIN_DELETE:
                    delete(T.topic_key(f[0]), db=self.db_retained)
                elif tag == _DYNSEC:
                    err = self._apply_dynsec(txn, f[0])
                    if err is not None:
                        errors = (errors or []) + [err]
                else:
                    errors = (errors or []) + [f"unknown op tag {tag}"]
                    log.error("entry %d: unknown op tag %d ignored", index, tag)
        except (MalformedBatch, ValueError, TypeError, IndexError, struct.error) as exc:
            # Deterministic on every member: the same bytes fail the same way.
            # A batch that does not parse applies nothing (iter_raw_ops checks
            # it whole); an op that fails later leaves the ops before it
            # applied (a well-formed proposer never gets here).
            log.error("entry %d: malformed op batch: %s", index, exc)
            errors = (errors or []) + [f"malformed: {exc}"]
        return errors, direct

    def _drop_client_rows(self, txn: lmdb.Transaction, ck: bytes) -> None:
        """Delete every subscription, queued message and QoS 2 state of a client, and its will."""
        for name in T.PER_CLIENT_DBS:
            cur = txn.cursor(db=self._dbs[name])
            if cur.set_range(ck):
                while cur.key()[: len(ck)] == ck and len(cur.key()) > len(ck):
                    if not cur.delete():
                        break
        txn.delete(ck, db=self.db_wills)

    def _apply_dynsec(self, txn: lmdb.Transaction, change: dict[str, Any]) -> str | None:
        if self._dynsec_doc is _UNLOADED:
            raw = txn.get(T.DYNSEC_DOCUMENT, db=self.db_dynsec)
            self._dynsec_doc = orjson.loads(raw) if raw is not None else None
        try:
            # apply_dynsec returns a new document and leaves its argument alone,
            # so a rejected change leaves the current one intact.
            new = self.apply_dynsec(self._dynsec_doc, change)
        except Exception as exc:  # noqa: BLE001 - a rejected change is a result, not a crash
            return f"dynsec: {exc}"
        self._dynsec_doc = new
        self._dynsec_dirty = True
        return None

    # -- load --------------------------------------------------------------------------

    def load(self) -> LoadedState:
        """Everything a broker worker rebuilds at start-up, from one read transaction
        (deferred queue rows are written first)."""
        self.flush()
        with self.env.begin() as txn:
            return self._load_in(txn)

    def _load_in(self, txn: lmdb.Transaction) -> LoadedState:
        state = LoadedState()
        by_ck: dict[bytes, SessionRecord] = {}
        for ck, row in txn.cursor(db=self.db_sessions):
            cid, protocol_version, expiry, username, offline = T.parse_session_row(row)
            rec = SessionRecord(cid, protocol_version, expiry, username, disconnected_at=offline)
            by_ck[ck] = rec
            state.sessions[cid] = rec
        for key, row in txn.cursor(db=self.db_subs):
            rec = by_ck.get(key[: T.client_key_len(key)])
            if rec is not None:
                options, sub_id, topic_filter = T.parse_sub_row(row)
                rec.subscriptions[topic_filter] = (options, sub_id)
        for ck, row in txn.cursor(db=self.db_wills):
            rec = by_ck.get(ck)
            if rec is not None:
                delay, msg = T.parse_will_row(row)
                rec.will = (delay, decode_message(msg))
        for key, row in txn.cursor(db=self.db_queues):
            n = T.client_key_len(key)
            rec = by_ck.get(key[:n])
            if rec is not None:
                packet_id, state_, qos, sub_ids, msg = T.parse_queue_row(row)
                rec.queue.append(
                    QueuedMessage(T.key_seq(key, n), packet_id, state_, qos, sub_ids, decode_message(msg))
                )
        for key, row in txn.cursor(db=self.db_qos2_in):
            n = T.client_key_len(key)
            rec = by_ck.get(key[:n])
            if rec is not None:
                packet_id = T.key_packet_id(key, n)
                rec.qos2_in.add(packet_id)
                if row:
                    rec.qos2_forwards[packet_id] = orjson.loads(row)
        for _, row in txn.cursor(db=self.db_retained):
            msg = decode_message(row)
            state.retained[msg.topic] = msg
        raw = txn.get(T.DYNSEC_DOCUMENT, db=self.db_dynsec)
        state.dynsec = orjson.loads(raw) if raw is not None else None
        cur = txn.cursor(db=self.db_meta)
        if cur.set_range(T.META_MESH):
            for key, row in cur.iternext():
                if not key.startswith(T.META_MESH):
                    break
                state.mesh_marks[T.parse_mesh_mark_key(key)] = T.parse_mesh_mark_row(row)
        return state

    def dynsec_document(self) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            raw = txn.get(T.DYNSEC_DOCUMENT, db=self.db_dynsec)
        return orjson.loads(raw) if raw is not None else None

    # -- snapshots ----------------------------------------------------------------------
    #
    # Format: magic, u32 header length, orjson header {"index", "term", "voters",
    # "learners"}, then per table of tables.MACHINE_DBS: u32 name length, name,
    # u64 row count, rows (u32 key length, key, u32 value length, value) in key
    # order; finally u32 crc32 of everything before it.  Key order and sorted
    # JSON make it a pure function of the tables: equal tables, equal bytes.

    def snapshot_data(self) -> bytes:
        """All tables and the applied index, from one read transaction."""
        return self.snapshot_with_meta()[4]

    def snapshot_with_meta(self) -> tuple[int, int, list[int], list[int], bytes]:
        """(applied index, its term, voters, learners, snapshot data), consistent."""
        with self.env.begin() as txn:
            index, term = T.parse_applied_row(txn.get(T.META_APPLIED, db=self.db_meta))
            voters, learners = T.parse_conf_state_row(txn.get(T.META_CONF_STATE, db=self.db_meta))
            head = orjson.dumps({"index": index, "term": term, "voters": voters, "learners": learners})
            parts = [_SNAP_MAGIC, _U32.pack(len(head)), head]
            for name in T.MACHINE_DBS:
                rows: list[bytes] = []
                count = 0
                for key, value in txn.cursor(db=self._dbs[name]):
                    rows += (_U32.pack(len(key)), key, _U32.pack(len(value)), value)
                    count += 1
                parts += (_U32.pack(len(name)), name, _U64.pack(count))
                parts += rows
        body = b"".join(parts)
        return index, term, voters, learners, body + _U32.pack(zlib.crc32(body))

    def restore(self, data: bytes) -> tuple[int, int]:
        """Replace all tables by a snapshot's, atomically; returns its (index, term)."""
        return self._write(lambda txn: self.restore_in(txn, data))

    def restore_in(self, txn: lmdb.Transaction, data: bytes) -> tuple[int, int]:
        """``restore`` inside the caller's write transaction (LmdbStorage.save)."""
        # The snapshot is ahead of everything applied here (Raft §7): deferred
        # rows of earlier entries are superseded by its tables.
        self._begin_deferred()
        self._rows, self._fresh, self._folded = {}, set(), None
        self._top_seq.clear()
        mv = memoryview(data)
        if len(mv) < len(_SNAP_MAGIC) + 8 or bytes(mv[: len(_SNAP_MAGIC)]) != _SNAP_MAGIC:
            raise SnapshotFormatError("not a raftmq state snapshot")
        (crc,) = _U32.unpack_from(mv, len(mv) - 4)
        if zlib.crc32(mv[:-4]) != crc:
            raise SnapshotFormatError("snapshot checksum mismatch")
        pos = len(_SNAP_MAGIC)
        (hlen,) = _U32.unpack_from(mv, pos)
        pos += 4
        head = orjson.loads(mv[pos : pos + hlen])
        pos += hlen
        seen = set()
        try:
            for _ in T.MACHINE_DBS:
                (nlen,) = _U32.unpack_from(mv, pos)
                pos += 4
                name = bytes(mv[pos : pos + nlen])
                pos += nlen
                if name not in self._dbs or name in seen:
                    raise SnapshotFormatError(f"unknown table {name!r} in snapshot")
                seen.add(name)
                (count,) = _U64.unpack_from(mv, pos)
                pos += 8
                items = []
                for _ in range(count):
                    (klen,) = _U32.unpack_from(mv, pos)
                    key = bytes(mv[pos + 4 : pos + 4 + klen])
                    pos += 4 + klen
                    (vlen,) = _U32.unpack_from(mv, pos)
                    items.append((key, bytes(mv[pos + 4 : pos + 4 + vlen])))
                    pos += 4 + vlen
                db = self._dbs[name]
                txn.drop(db, delete=False)
                if items:
                    txn.cursor(db=db).putmulti(items, append=True)
        except struct.error as exc:
            raise SnapshotFormatError(f"truncated snapshot: {exc}") from exc
        if pos != len(mv) - 4:
            raise SnapshotFormatError("trailing bytes in snapshot")
        return head["index"], head["term"]


def load_state(path: str) -> LoadedState:
    """A broker worker's start-up read of a node's tables (read-only, another process)."""
    env = T.open_environment(path, readonly=True)
    try:
        try:
            machine = StateMachine(env)
        except lmdb.NotFoundError:  # the raft process has not created the tables yet
            return LoadedState()
        return machine.load()
    finally:
        env.close()
