"""The storage interface the Raft core reads from, and an in-memory one.

The core only *reads* stable storage (through ``Storage``); the application
*writes* it from each ``Ready`` (entries, hard state, snapshot) before calling
``advance``. ``MemoryStorage`` is the reference implementation: the simulation
uses one per node as its "disk" and the unit tests use it directly; the raft
process uses the LMDB implementation (raft/lmdb_storage.py) with the same
contracts.

Layout: storage holds a snapshot (possibly empty: index 0, term 0) followed by
the entries ``first_index() .. last_index()``; ``first_index() ==
snapshot.index + 1``. ``term(first_index() - 1)`` is the snapshot's term, so the
core can always check the previous entry of the first stored one (Raft §5.3
consistency check across a compaction point, §7).
"""

from __future__ import annotations

from typing import Protocol

from raftmq.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta


class StorageError(Exception):
    pass


class CompactedError(StorageError):
    """The requested index is below the first available index (compacted into
    the snapshot): the leader must send a snapshot instead (Raft §7)."""


class UnavailableError(StorageError):
    """The requested index is above the last index stored."""


class SnapshotOutOfDateError(StorageError):
    """A snapshot older than the one already held was offered."""


class SnapshotTemporarilyUnavailableError(StorageError):
    """``snapshot()`` cannot produce one right now; the core retries later."""


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted HardState and the membership at restart (from the
        latest snapshot plus conf changes applied after it, as far as the
        application tracks them; the core replays committed conf changes it
        hands out again via Ready)."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi). Raise CompactedError if lo < first_index(),
        UnavailableError if hi > last_index() + 1. With ``max_bytes``, return
        at least one entry and stop before the total size exceeds it."""
        ...

    def term(self, index: int) -> int:
        """Term of entry ``index``, for first_index()-1 <= index <= last_index().
        Raise CompactedError below, UnavailableError above."""
        ...

    def first_index(self) -> int:
        """Index of the first entry that may be in storage (snapshot.index + 1)."""
        ...

    def last_index(self) -> int:
        """Index of the last entry in storage (snapshot.index if none)."""
        ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (to send to a follower that needs
        compacted entries). May raise SnapshotTemporarilyUnavailableError."""
        ...


def bootstrap(voters: tuple[int, ...], learners: tuple[int, ...] = ()) -> tuple[Snapshot, HardState]:
    """What a brand-new cluster member stores before its first start, so that
    all initial members agree on the configuration without a log entry (as
    etcd's bootstrap): an empty snapshot at index 1, term 1 holding the
    membership, and HardState(term=1, vote=0, commit=1). A node *added* later
    starts from empty storage instead and receives a snapshot from the leader.
    """
    snap = Snapshot(SnapshotMeta(1, 1, ConfState(tuple(sorted(voters)), tuple(sorted(learners)))), b"")
    return snap, HardState(1, 0, 1)


def limit_size(entries: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix (at least one entry) whose total size <= max_bytes."""
    if max_bytes is None or len(entries) <= 1:
        return entries
    total = 0
    for i, e in enumerate(entries):
        total += len(e.data) + 24
        if total > max_bytes and i > 0:
            return entries[:i]
    return entries


class MemoryStorage:
    """``Storage`` in memory, plus the writers the application calls.

    ``_ents[0]`` is a dummy entry holding the snapshot's index and term, so
    ``_ents[i - offset]`` is entry i where offset = ``_ents[0].index``.
    """

    def __init__(self) -> None:
        self.hard_state = HardState()
        self._snapshot = Snapshot()
        self._ents: list[Entry] = [Entry(term=0, index=0)]

    # -- Storage ---------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        hs = self.hard_state
        return HardState(hs.term, hs.vote, hs.commit), self._snapshot.meta.conf_state

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        return limit_size(self._ents[lo - offset : hi - offset], max_bytes)

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError(index)
        if index - offset >= len(self._ents):
            raise UnavailableError(index)
        return self._ents[index - offset].term

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- writers (the application, from Ready) ------------------------------------

    def set_hard_state(self, hs: HardState) -> None:
        self.hard_state = HardState(hs.term, hs.vote, hs.commit)

    def append(self, entries: list[Entry]) -> None:
        """Append, replacing any stored entries with index >= entries[0].index.
        Entries already compacted are skipped."""
        if not entries:
            return
        first = self.first_index()
        last_new = entries[-1].index
        if last_new < first:
            return
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        n = len(self._ents)
        if offset == n:
            self._ents.extend(entries)
        elif offset < n:
            del self._ents[offset:]
            self._ents.extend(entries)
        else:
            raise AssertionError(
                f"missing log entry [last: {self.last_index()}, append at: {entries[0].index}]"
            )

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log by ``snap`` (a follower receiving InstallSnapshot)."""
        if snap.meta.index < self._snapshot.meta.index:
            raise SnapshotOutOfDateError(snap.meta.index)
        self._snapshot = snap
        self._ents = [Entry(term=snap.meta.term, index=snap.meta.index)]

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the state machine as of applied ``index``; call
        ``compact(index)`` afterwards to drop the entries it covers."""
        if index <= self._snapshot.meta.index:
            raise SnapshotOutOfDateError(index)
        if index > self.last_index():
            raise UnavailableError(index)
        term = self.term(index)
        self._snapshot = Snapshot(SnapshotMeta(index, term, conf_state), data)
        return self._snapshot

    def compact(self, index: int) -> None:
        """Drop entries up to and including ``index`` (keeping its term as the
        dummy). The core notices through first_index() and sends snapshots to
        followers that need what is gone (Raft §7)."""
        offset = self._ents[0].index
        if index <= offset:
            raise CompactedError(index)
        if index > self.last_index():
            raise UnavailableError(index)
        i = index - offset
        dummy = Entry(term=self._ents[i].term, index=index)
        self._ents = [dummy, *self._ents[i + 1 :]]

    def copy(self) -> MemoryStorage:
        """An independent copy (the simulation's 'what survived the crash')."""
        other = MemoryStorage()
        other.hard_state = HardState(self.hard_state.term, self.hard_state.vote, self.hard_state.commit)
        other._snapshot = self._snapshot
        other._ents = list(self._ents)
        return other
