"""Safety invariants of Raft (Figure 3 of the paper), checked as the run goes.

* Election Safety: at most one leader per term.
* Log Matching: if two logs contain an entry with the same index and term,
  the logs are identical up to that index. Checked inductively on every
  persisted entry: (index, term) must always come with the same payload and
  the same term at index - 1.
* Leader Completeness: a leader's log holds every committed entry (of earlier
  terms); checked when a node is first seen leading a term.
* State Machine Safety: every node applies, at each index, the same entry:
  all applied sequences are prefixes of one canonical history (as
  TigerBeetle's state checker does).
"""

from __future__ import annotations

from raftmq.raft.log import RaftLog
from raftmq.raft.storage import CompactedError, UnavailableError
from raftmq.raft.types import Entry


class Violation(Exception):
    """A safety property does not hold."""


class SafetyChecker:
    def __init__(self) -> None:
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.entries: dict[tuple[int, int], tuple[bytes, int, int]] = {}
        self.canonical: dict[int, tuple[int, bytes, int]] = {}  # index -> (term, data, kind)
        self.max_applied = 0
        self.leaders_checked: set[tuple[int, int]] = set()

    def observe_leader(self, node: int, term: int, log: RaftLog) -> None:
        prev = self.leaders.get(term)
        if prev is None:
            self.leaders[term] = node
        elif prev != node:
            raise Violation(f"election safety: nodes {prev} and {node} both leader in term {term}")
        if (node, term) not in self.leaders_checked:
            self.leaders_checked.add((node, term))
            self._check_leader_completeness(node, term, log)

    def _check_leader_completeness(self, node: int, term: int, log: RaftLog) -> None:
        first = log.first_index()
        last = log.last_index()
        for index in range(max(first, 1), self.max_applied + 1):
            want = self.canonical.get(index)
            if want is None:
                continue
            if index > last:
                raise Violation(
                    f"leader completeness: leader {node} of term {term} lacks committed "
                    f"entry {index} (last index {last})"
                )
            got = log.term(index)
            if got != want[0]:
                raise Violation(
                    f"leader completeness: leader {node} of term {term} has term {got} at "
                    f"committed index {index}, committed term {want[0]}"
                )

    def observe_persisted(self, node: int, entries: list[Entry], prev_term: int) -> None:
        entries_map = self.entries
        for e in entries:
            key = (e.index, e.term)
            val = (e.data, e.kind, prev_term)
            old = entries_map.get(key)
            if old is None:
                entries_map[key] = val
            elif old != val:
                raise Violation(
                    f"log matching: node {node} persisted entry {key} with "
                    f"(data={e.data[:40]!r}, kind={e.kind}, prev term={prev_term}), "
                    f"elsewhere (data={old[0][:40]!r}, kind={old[1]}, prev term={old[2]})"
                )
            prev_term = e.term

    def observe_apply(self, node: int, e: Entry) -> None:
        want = self.canonical.get(e.index)
        got = (e.term, e.data, e.kind)
        if want is None:
            self.canonical[e.index] = got
            if e.index > self.max_applied:
                self.max_applied = e.index
        elif want != got:
            raise Violation(
                f"state machine safety: node {node} applied {got!r:.120} at index {e.index}, "
                f"canonical {want!r:.120}"
            )


def term_at(log: RaftLog, index: int) -> int | None:
    try:
        return log.term(index)
    except (CompactedError, UnavailableError):
        return None
