"""The Raft log as the core sees it: stable storage + an unstable tail.

``RaftLog`` = entries already persisted (read through ``Storage``) followed by
``unstable`` entries (appended in memory, handed to the application in a Ready,
dropped from here once ``advance`` says they are durable), optionally preceded
by an unstable snapshot received from a leader (Raft §7).

Invariants: ``applied <= committed <= last_index()``; a committed entry is
never overwritten (asserted, Raft §5.4 Leader Completeness / State Machine
Safety would be broken otherwise).
"""

from __future__ import annotations

from raftmq.raft.storage import CompactedError, Storage, UnavailableError, limit_size
from raftmq.raft.types import Entry, Snapshot


class RaftLog:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        # Unstable tail: entries[i] has index offset + i.
        self.unstable: list[Entry] = []
        self.unstable_snapshot: Snapshot | None = None
        self.offset = storage.last_index() + 1
        first = storage.first_index()
        self.committed = first - 1
        self.applied = first - 1

    # -- indices -------------------------------------------------------------------

    def first_index(self) -> int:
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.meta.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        if self.unstable:
            return self.offset + len(self.unstable) - 1
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.meta.index
        return self.storage.last_index()

    def last_term(self) -> int:
        return self.term(self.last_index())

    def term(self, i: int) -> int:
        """Term of entry i. Raises CompactedError / UnavailableError."""
        if i >= self.offset:
            k = i - self.offset
            if k < len(self.unstable):
                return self.unstable[k].term
            raise UnavailableError(i)
        snap = self.unstable_snapshot
        if snap is not None:
            if i == snap.meta.index:
                return snap.meta.term
            if i < snap.meta.index:
                raise CompactedError(i)
            raise UnavailableError(i)
        return self.storage.term(i)

    def term_or_zero(self, i: int) -> int:
        try:
            return self.term(i)
        except (CompactedError, UnavailableError):
            return 0

    def match_term(self, i: int, t: int) -> bool:
        try:
            return self.term(i) == t
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: "If the logs have last entries with different terms, then
        the log with the later term is more up-to-date. If the logs end with the
        same term, then whichever log is longer is more up-to-date." """
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    # -- reading -------------------------------------------------------------------

    def slice(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi), at most max_bytes (but at least one)."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        off = self.offset
        if hi <= off:
            return self.storage.entries(lo, hi, max_bytes)
        if lo >= off:
            return limit_size(self.unstable[lo - off : hi - off], max_bytes)
        stored = self.storage.entries(lo, off, max_bytes)
        if len(stored) < off - lo:
            return stored  # size limit hit inside storage
        rest = limit_size(self.unstable[: hi - off], None)
        if max_bytes is not None:
            used = sum(e.size() for e in stored)
            out = list(stored)
            for e in rest:
                used += e.size()
                if used > max_bytes:
                    break
                out.append(e)
            return out
        return stored + rest

    def entries_from(self, lo: int, max_bytes: int | None) -> list[Entry]:
        last = self.last_index()
        if lo > last:
            return []
        return self.slice(lo, last + 1, max_bytes)

    def snapshot(self) -> Snapshot:
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot
        return self.storage.snapshot()

    # -- writing ---------------------------------------------------------------------

    def append(self, entries: list[Entry]) -> int:
        """Append (truncating a conflicting unstable/stable suffix). Returns last index."""
        if not entries:
            return self.last_index()
        after = entries[0].index - 1
        assert after >= self.committed, f"after({after}) is out of range [committed({self.committed})]"
        self._truncate_and_append(entries)
        return self.last_index()

    def _truncate_and_append(self, entries: list[Entry]) -> None:
        first_new = entries[0].index
        off = self.offset
        if first_new == off + len(self.unstable):
            self.unstable.extend(entries)  # the common case: straight append
        elif first_new <= off:
            # Replace everything unstable; storage keeps entries < first_new,
            # the application overwrites the rest from Ready.entries.
            self.offset = first_new
            self.unstable = list(entries)
        else:
            keep = self.slice(off, first_new)
            self.unstable = keep + list(entries)

    def find_conflict(self, entries: list[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or that we lack),
        0 if all present (Raft §5.3: "If an existing entry conflicts with a new one
        (same index but different terms)")."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest (i, term(i)) with i <= index and term(i) <= term: where a log
        whose entry ``index`` has term ``term`` may match ours (reject hint)."""
        while index > 0:
            try:
                t = self.term(index)
            except CompactedError:
                return index, 0
            except UnavailableError:
                index = self.last_index()
                continue
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def maybe_append(
        self, index: int, log_term: int, committed: int, entries: list[Entry]
    ) -> int | None:
        """AppendEntries receiver (Figure 2, rules 2-5). Returns the last new
        index, or None if the consistency check fails."""
        if not self.match_term(index, log_term):
            return None  # rule 2: no entry at prevLogIndex whose term matches
        last_new = index + len(entries)
        if entries:
            # Fast path: entries start right after our last entry.
            if entries[0].index == self.last_index() + 1:
                self.append(entries)
            else:
                ci = self.find_conflict(entries)
                if ci:
                    # Rule 3: delete the conflicting entry and all that follow;
                    # rule 4: append new entries not already in the log.
                    assert ci > self.committed, (
                        f"entry {ci} conflicts with committed entry [committed({self.committed})]"
                    )
                    self.append(entries[ci - entries[0].index :])
        # Rule 5: commitIndex = min(leaderCommit, index of last new entry).
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, to: int) -> None:
        if to > self.committed:
            assert to <= self.last_index(), (
                f"commit {to} out of range [last index {self.last_index()}]"
            )
            self.committed = to

    def maybe_commit(self, index: int, term: int) -> bool:
        """Raft §5.4.2: a leader commits by counting replicas only entries of its
        current term; earlier entries are committed indirectly."""
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, i: int) -> None:
        assert self.applied <= i <= self.committed, (self.applied, i, self.committed)
        self.applied = i

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to ``index`` (of ``term``) are durable: drop them from unstable,
        unless they were replaced meanwhile."""
        k = index - self.offset
        if k < 0 or k >= len(self.unstable):
            return
        if self.unstable[k].term != term:
            return
        del self.unstable[: k + 1]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.unstable_snapshot is not None and self.unstable_snapshot.meta.index == index:
            self.unstable_snapshot = None

    def restore(self, snap: Snapshot) -> None:
        """Discard the log and start from a snapshot (Raft §7, InstallSnapshot
        receiver rule 7)."""
        self.committed = snap.meta.index
        self.unstable_snapshot = snap
        self.unstable = []
        self.offset = snap.meta.index + 1

    def stable_last_index(self) -> int:
        """Last index known durable (not in unstable)."""
        if self.unstable_snapshot is not None:
            return -1  # nothing is appliable until the snapshot is persisted
        return self.offset - 1
