"""The Raft log, hard state and snapshot metadata in LMDB (DESIGN.md §4, issue 3 point 2).

Theory of operation
-------------------
One LMDB environment per node holds everything durable: the Raft log, the hard
state, the snapshot metadata, and the state-machine tables (state/tables.py),
each in its own named database.  The raft process is the only writer.

``LmdbStorage`` implements the core's read-only ``Storage`` protocol
(raft/storage.py) and adds the writer the raft process calls once per
``Ready``::

    results = storage.save(rd.hard_state, rd.entries, rd.snapshot,
                           committed=rd.committed_entries)

``save`` is *one* LMDB write transaction -- hard state, new entries (replacing
any conflicting suffix, Raft §5.3), an installed snapshot (restoring the
attached state machine), and the application of committed entries to the state
machine -- committed with *one* fsync.  This is group commit: a Ready carrying
thousands of proposals costs one fsync.  Because the log, the tables and the
applied index change in the same transaction, a crash at any instant leaves
either all of a Ready or none of it (LMDB commits are atomic: the new root page
is written only after the data pages are synced).

Each log entry is stored under its big-endian u64 index with a CRC-32 over
(index, term, kind, data).  Every read verifies it; a mismatch raises
``CorruptLogError(index)`` and the entry is never returned, so a corrupt entry
can never be applied or replicated.

Snapshots: with a state machine attached (``StateMachine(storage)`` attaches
itself), ``snapshot()`` serializes the tables at the applied index in one read
transaction -- no copy of the state is kept in the log database; ``compact(i)``
(i <= applied index) only drops log entries and remembers (i, term(i)).
Without a state machine (tests, tools) snapshots given to ``save`` or
``create_snapshot`` are stored whole, as ``MemoryStorage`` does.

Files are created 0600 in a 0700 directory: the log holds every client's
messages.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lmdb
import orjson

from raftmq.raft.storage import (
    CompactedError,
    SnapshotOutOfDateError,
    StorageError,
    UnavailableError,
    limit_size,
)
from raftmq.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from raftmq.state import tables
from raftmq.state.tables import open_environment

if TYPE_CHECKING:
    from raftmq.state.machine import StateMachine

DB_LOG = b"log"  # u64 BE index -> entry row
DB_RAFT = b"raft"  # KEY_* -> raft metadata
KEY_HARD_STATE = b"hard_state"
KEY_COMPACTED = b"compacted"  # u64 index, u64 term of the last compacted entry
KEY_SNAPSHOT = b"snapshot"  # stored snapshot (no state machine attached)

DEFAULT_MAP_SIZE = tables.DEFAULT_MAP_SIZE

_KEY = struct.Struct(">Q")
_ENTRY_HEAD = struct.Struct("<IQB")  # crc32, term, kind; then data
_CRC_HEAD = struct.Struct("<QQB")  # index, term, kind: what the crc covers before data
_HARD_STATE = struct.Struct("<QQQI")  # term, vote, commit, crc32
_COMPACTED = struct.Struct("<QQ")
_TAIL_CACHE = 16384  # recent Entry objects kept for the leader's AppendEntries
_TERM_CACHE = 1 << 20  # terms of recent entries kept for term()


class CorruptLogError(StorageError):
    """A stored log entry (or the hard state) fails its checksum or is out of place.

    Never swallowed: the node must stop rather than apply or replicate garbage.
    ``index`` is the log index (0 for the hard state).
    """

    def __init__(self, index: int, reason: str = "checksum mismatch") -> None:
        super().__init__(f"corrupt raft log entry {index}: {reason}")
        self.index = index


def encode_entry(e: Entry) -> bytes:
    """The stored row of an entry: crc32, term, kind, data."""
    data = e.data
    crc = zlib.crc32(data, zlib.crc32(_CRC_HEAD.pack(e.index, e.term, e.kind)))
    return _ENTRY_HEAD.pack(crc, e.term, e.kind) + data


def decode_entry(index: int, row: bytes) -> Entry:
    """Verify and decode a stored row; raises CorruptLogError."""
    if len(row) < _ENTRY_HEAD.size:
        raise CorruptLogError(index, "truncated row")
    crc, term, kind = _ENTRY_HEAD.unpack_from(row, 0)
    data = row[_ENTRY_HEAD.size :]
    if zlib.crc32(data, zlib.crc32(_CRC_HEAD.pack(index, term, kind))) != crc:
        raise CorruptLogError(index)
    return Entry(term, index, data, kind)


def _encode_hard_state(hs: HardState) -> bytes:
    body = _HARD_STATE.pack(hs.term, hs.vote, hs.commit, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _decode_hard_state(b: bytes) -> HardState:
    if len(b) != _HARD_STATE.size:
        raise CorruptLogError(0, "hard state of the wrong size")
    term, vote, commit, crc = _HARD_STATE.unpack(b)
    if zlib.crc32(b[:-4]) != crc:
        raise CorruptLogError(0, "hard state checksum mismatch")
    return HardState(term, vote, commit)


def _encode_conf_state(cs: ConfState) -> bytes:
    return tables.conf_state_row(cs.voters, cs.learners)


def _decode_conf_state(b: bytes | None) -> ConfState:
    voters, learners = tables.parse_conf_state_row(b)
    return ConfState(tuple(voters), tuple(learners))


class LmdbStorage:
    """Raft ``Storage`` on LMDB plus the writer of each ``Ready`` (see module doc).

    ``sync=False`` skips the fsync at each commit (``durability = "async"``);
    call ``sync()`` to force one.  A crash of the *process* then loses nothing
    (the pages are in the OS cache), but a crash of the *machine* may lose the
    commits since the last ``sync()`` and, as LMDB documents for MDB_NOSYNC,
    may even leave the environment corrupt.  ``sync=True`` (the default) has
    neither risk: LMDB syncs the data pages before the meta page that makes
    them visible.
    """

    def __init__(self, path: str, map_size: int = DEFAULT_MAP_SIZE, sync: bool = True) -> None:
        self.path = path
        self.env = open_environment(path, map_size, sync)
        self._sync = sync
        with self.env.begin(write=True) as txn:
            self.db_log = self.env.open_db(DB_LOG, txn=txn)
            self.db_raft = self.env.open_db(DB_RAFT, txn=txn)
            self.db_meta = self.env.open_db(tables.DB_META, txn=txn)
        self.machine: StateMachine | None = None
        self._snapshot_cache: Snapshot | None = None
        # Reader slots of processes that died (a kill -9'd worker) pin old pages
        # and make the file grow: free them now; the raft process may call
        # reader_check() again from time to time.
        self.env.reader_check()
        self._load()

    # -- start-up --------------------------------------------------------------

    def _load(self) -> None:
        with self.env.begin() as txn:
            hs = txn.get(KEY_HARD_STATE, db=self.db_raft)
            self._hard_state = _decode_hard_state(hs) if hs is not None else HardState()
            comp = txn.get(KEY_COMPACTED, db=self.db_raft)
            self._snap_index, self._snap_term = _COMPACTED.unpack(comp) if comp else (0, 0)
            cur = txn.cursor(db=self.db_log)
            if cur.last():
                last = _KEY.unpack(cur.key())[0]
                last_entry = decode_entry(last, cur.value())
                cur.first()
                first = _KEY.unpack(cur.key())[0]
                count = txn.stat(self.db_log)["entries"]
                if first != self._snap_index + 1 or count != last - first + 1:
                    raise CorruptLogError(
                        first, f"log not contiguous: {count} entries in [{first}, {last}], "
                        f"compacted up to {self._snap_index}"
                    )
                self._last = last
                tail = [last_entry]
            else:
                self._last = self._snap_index
                tail = []
        if self._hard_state.commit > self._last:
            # commit and entries are saved in one transaction: a commit index
            # beyond the log means the log lost entries.
            raise CorruptLogError(self._last + 1, f"missing, hard state commit is {self._hard_state.commit}")
        # In-memory caches: terms of [_terms_lo, _last], Entry objects of [_tail_lo, _last].
        self._tail: list[Entry] = tail
        self._tail_lo = self._last + 1 - len(tail)
        self._terms: list[int] = [e.term for e in tail]
        self._terms_lo = self._tail_lo

    # -- Storage protocol --------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        hs = self._hard_state
        return HardState(hs.term, hs.vote, hs.commit), self.conf_state()

    def conf_state(self) -> ConfState:
        """Membership as of the applied index (or the stored snapshot), else empty."""
        with self.env.begin() as txn:
            b = txn.get(tables.META_CONF_STATE, db=self.db_meta)
            if b is None and self.machine is None:
                snap = txn.get(KEY_SNAPSHOT, db=self.db_raft)
                if snap is not None:
                    return _unpack_snapshot(snap).meta.conf_state
        return _decode_conf_state(b)

    def first_index(self) -> int:
        return self._snap_index + 1

    def last_index(self) -> int:
        return self._last

    def term(self, index: int) -> int:
        if index >= self._terms_lo:
            if index > self._last:
                raise UnavailableError(index)
            return self._terms[index - self._terms_lo]
        if index == self._snap_index:
            return self._snap_term
        if index < self._snap_index:
            raise CompactedError(index)
        with self.env.begin() as txn:
            row = txn.get(_KEY.pack(index), db=self.db_log)
        if row is None:
            raise CorruptLogError(index, "missing")
        return decode_entry(index, row).term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        if lo <= self._snap_index:
            raise CompactedError(lo)
        if hi > self._last + 1:
            raise UnavailableError(hi)
        if lo >= hi:
            return []
        if lo >= self._tail_lo:
            return limit_size(self._tail[lo - self._tail_lo : hi - self._tail_lo], max_bytes)
        out: list[Entry] = []
        size = 0
        full = False
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db_log)
            if not cur.set_key(_KEY.pack(lo)):
                raise CorruptLogError(lo, "missing")
            expect = lo
            for key, row in cur:
                index = _KEY.unpack(key)[0]
                if index >= hi:
                    break
                if index != expect:
                    raise CorruptLogError(expect, "missing")
                e = decode_entry(index, row)
                size += len(e.data) + 24
                if max_bytes is not None and size > max_bytes and out:
                    full = True
                    break
                out.append(e)
                expect += 1
        if not full and len(out) < hi - lo:
            raise CorruptLogError(expect, "missing")
        return out

    def snapshot(self) -> Snapshot:
        if self.machine is None:
            with self.env.begin() as txn:
                b = txn.get(KEY_SNAPSHOT, db=self.db_raft)
            return _unpack_snapshot(b) if b is not None else Snapshot()
        applied = self.machine.applied_index()
        cached = self._snapshot_cache
        if cached is not None and cached.meta.index == applied:
            return cached
        index, term, voters, learners, data = self.machine.snapshot_with_meta()
        if index == 0:
            return Snapshot()
        snap = Snapshot(SnapshotMeta(index, term, ConfState(tuple(voters), tuple(learners))), data)
        self._snapshot_cache = snap
        return snap

    # -- writers -------------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        hs = self._hard_state
        return HardState(hs.term, hs.vote, hs.commit)

    def save(
        self,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
        committed: Sequence[Entry] = (),
    ) -> list[Any]:
        """Persist one Ready in one write transaction and one fsync; see module doc.

        Order inside the transaction: ``snapshot`` (replaces the whole log and,
        with a state machine attached, its tables), then ``entries`` (replacing
        stored entries with index >= entries[0].index; entries at or below the
        compaction point are skipped), then ``hard_state``, then ``committed``
        entries applied to the attached state machine (the ones it already
        applied are skipped, so replaying a Ready is harmless).
        Returns the state machine's results for ``committed`` (empty without).
        """
        if committed and self.machine is None:
            raise StorageError("committed entries given but no state machine is attached")
        return self._grow_on_full(self._save_once, hard_state, entries, snapshot, committed)

    def _grow_on_full(self, fn: Any, *args: Any) -> Any:
        """Run a write; if the map is full, double it and run it again (the
        failed transaction was aborted, so nothing of it is left)."""
        while True:
            try:
                return fn(*args)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _save_once(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        committed: Sequence[Entry],
    ) -> list[Any]:
        machine = self.machine
        if machine is None:
            return self._save_txn(hard_state, entries, snapshot, committed)
        try:
            results = self._save_txn(hard_state, entries, snapshot, committed)
        except BaseException:
            machine.txn_aborted()  # its deferred rows follow the aborted tables
            raise
        machine.txn_committed()
        return results

    def _save_txn(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        committed: Sequence[Entry],
    ) -> list[Any]:
        snap_index, snap_term, last = self._snap_index, self._snap_term, self._last
        results: list[Any] = []
        with self.env.begin(write=True) as txn:
            if snapshot is not None and not snapshot.is_empty():
                meta = snapshot.meta
                if meta.index < snap_index:
                    raise SnapshotOutOfDateError(meta.index)
                if self.machine is not None and meta.index < self.machine.applied_in(txn)[0]:
                    # Installing it would roll the tables back (Raft §7: a snapshot
                    # never replaces state the node already has).
                    raise SnapshotOutOfDateError(meta.index)
                txn.drop(self.db_log, delete=False)
                snap_index, snap_term, last = meta.index, meta.term, meta.index
                txn.put(KEY_COMPACTED, _COMPACTED.pack(snap_index, snap_term), db=self.db_raft)
                if self.machine is not None:
                    got = self.machine.restore_in(txn, snapshot.data)
                    if got != (meta.index, meta.term):
                        raise StorageError(f"snapshot data is at {got}, its metadata says {(meta.index, meta.term)}")
                else:
                    txn.put(KEY_SNAPSHOT, _pack_snapshot(snapshot), db=self.db_raft)
            if entries:
                if entries[0].index <= snap_index:
                    entries = [e for e in entries if e.index > snap_index]
                if entries:
                    first_new = entries[0].index
                    if first_new > last + 1:
                        raise StorageError(f"missing log entries: last {last}, append at {first_new}")
                    cur = txn.cursor(db=self.db_log)
                    if first_new <= last:
                        # Raft §5.3: a conflicting suffix is deleted before appending.
                        if cur.set_key(_KEY.pack(first_new)):
                            while cur.delete():
                                pass
                    pack, enc = _KEY.pack, encode_entry
                    cur.putmulti([(pack(e.index), enc(e)) for e in entries], append=True)
                    last = entries[-1].index
            if hard_state is not None:
                txn.put(KEY_HARD_STATE, _encode_hard_state(hard_state), db=self.db_raft)
            if committed:
                results = self.machine.apply_in(txn, committed)  # type: ignore[union-attr]
        # Committed (and fsynced, with sync=True): now the caches may follow.
        if hard_state is not None:
            self._hard_state = HardState(hard_state.term, hard_state.vote, hard_state.commit)
        if snap_index != self._snap_index:
            self._snap_index, self._snap_term = snap_index, snap_term
            self._tail, self._terms = [], []
            self._tail_lo = self._terms_lo = snap_index + 1
            self._snapshot_cache = None
        self._last = last
        if entries:
            self._cache_append(list(entries))
        return results

    def _cache_append(self, entries: list[Entry]) -> None:
        first_new = entries[0].index
        # Tail of Entry objects: truncate at first_new, extend, bound.
        if first_new < self._tail_lo or first_new > self._tail_lo + len(self._tail):
            self._tail, self._tail_lo = [], first_new
        else:
            del self._tail[first_new - self._tail_lo :]
        self._tail.extend(entries)
        if len(self._tail) > _TAIL_CACHE:
            drop = len(self._tail) - _TAIL_CACHE // 2
            del self._tail[:drop]
            self._tail_lo += drop
        # Terms.
        if first_new < self._terms_lo or first_new > self._terms_lo + len(self._terms):
            self._terms, self._terms_lo = [], first_new
        else:
            del self._terms[first_new - self._terms_lo :]
        self._terms.extend(e.term for e in entries)
        if len(self._terms) > _TERM_CACHE:
            drop = len(self._terms) - _TERM_CACHE // 2
            del self._terms[:drop]
            self._terms_lo += drop

    def set_hard_state(self, hs: HardState) -> None:
        self.save(hard_state=hs)

    def append(self, entries: Sequence[Entry]) -> None:
        self.save(entries=entries)

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log (and the attached machine's tables) by ``snap``."""
        self.save(snapshot=snap)

    def set_conf_state(self, cs: ConfState) -> None:
        """Record the initial membership of a new cluster (bootstrap); later
        changes are recorded by the state machine as it applies conf changes."""
        with self.env.begin(write=True) as txn:
            txn.put(tables.META_CONF_STATE, _encode_conf_state(cs), db=self.db_meta)

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Store a snapshot blob (only without a state machine: with one,
        ``snapshot()`` is always produced from the tables)."""
        if self.machine is not None:
            raise StorageError("snapshots come from the attached state machine")
        current = self.snapshot().meta.index
        if index <= current:
            raise SnapshotOutOfDateError(index)
        if index > self._last:
            raise UnavailableError(index)
        snap = Snapshot(SnapshotMeta(index, self.term(index), conf_state), data)
        with self.env.begin(write=True) as txn:
            txn.put(KEY_SNAPSHOT, _pack_snapshot(snap), db=self.db_raft)
        return snap

    def compact(self, index: int) -> None:
        """Drop entries up to and including ``index`` (Raft §7 log compaction).

        ``index`` must be covered by a snapshot: with a state machine, at most
        its applied index; without, at most the stored snapshot's index.
        """
        if index <= self._snap_index:
            raise CompactedError(index)
        if index > self._last:
            raise UnavailableError(index)
        covered = self.machine.applied_index() if self.machine is not None else self.snapshot().meta.index
        if index > covered:
            raise StorageError(f"compact({index}) beyond the snapshot/applied index {covered}")
        term = self.term(index)
        self._grow_on_full(self._compact_once, index, term)
        self._snap_index, self._snap_term = index, term
        if self._tail_lo <= index:
            del self._tail[: index + 1 - self._tail_lo]
            self._tail_lo = index + 1
        if self._terms_lo <= index:
            del self._terms[: index + 1 - self._terms_lo]
            self._terms_lo = index + 1

    def _compact_once(self, index: int, term: int) -> None:
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self.db_log)
            if cur.first():
                stop = _KEY.pack(index)
                while cur.key() <= stop:
                    if not cur.delete():
                        break
            txn.put(KEY_COMPACTED, _COMPACTED.pack(index, term), db=self.db_raft)

    def reader_check(self) -> int:
        """Free the reader slots of dead processes; returns how many."""
        return self.env.reader_check()

    def sync(self) -> None:
        """Force an fsync (needed only with ``sync=False``)."""
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> LmdbStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pack_snapshot(s: Snapshot) -> bytes:
    head = orjson.dumps(
        [s.meta.index, s.meta.term, list(s.meta.conf_state.voters), list(s.meta.conf_state.learners)]
    )
    body = struct.pack("<I", len(head)) + head + s.data
    return struct.pack("<I", zlib.crc32(body)) + body


def _unpack_snapshot(b: bytes) -> Snapshot:
    (crc,) = struct.unpack_from("<I", b, 0)
    body = b[4:]
    if zlib.crc32(body) != crc:
        raise CorruptLogError(0, "stored snapshot checksum mismatch")
    (hlen,) = struct.unpack_from("<I", body, 0)
    index, term, voters, learners = orjson.loads(body[4 : 4 + hlen])
    meta = SnapshotMeta(index, term, ConfState(tuple(voters), tuple(learners)))
    return Snapshot(meta, body[4 + hlen :])
