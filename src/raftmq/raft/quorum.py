"""What the leader knows about each member: replication progress and quorums.

``Progress`` follows etcd raft's flow-control states:

* PROBE: we don't know where the follower's log matches ours; send one
  AppendEntries at a time and walk ``next`` back on rejections (Raft §5.3).
* REPLICATE: the logs match up to ``match``; stream entries optimistically
  (``next`` runs ahead of ``match``), at most ``max_inflight`` messages in
  flight (pipelining).
* SNAPSHOT: the follower needs entries we compacted; an InstallSnapshot is in
  flight (Raft §7), nothing else is sent until it is acknowledged or reported
  failed.

Quorum arithmetic is a simple majority of voters (Raft §5.2, §5.4); learners
(thesis §4.2.1) are tracked but never counted.
"""

from __future__ import annotations

import enum
from collections import deque


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Progress:
    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "pending_snapshot",
        "recent_active",
        "inflights",
        "max_inflight",
        "is_learner",
        "hb_match",
    )

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.recent_active = False
        self.inflights: deque[int] = deque()  # last index of each MsgApp in flight
        self.max_inflight = max_inflight
        self.is_learner = is_learner
        self.hb_match = -1  # match seen at the previous heartbeat response

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.clear()

    def become_probe(self) -> None:
        # After a snapshot, continue from the snapshot's index (or match if later).
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, n: int) -> bool:
        """The follower acknowledged index n. Returns True if match advanced."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        if self.next < n + 1:
            self.next = n + 1
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """An AppendEntries at prevLogIndex ``rejected`` was refused (Raft §5.3:
        "decrement nextIndex and retry"; the hint skips whole terms). Returns
        False if the rejection is stale (a reordered old response)."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return len(self.inflights) >= self.max_inflight
        return True

    def sent_entries(self, last_index: int) -> None:
        """A MsgApp carrying entries up to last_index went out."""
        if self.state == ProgressState.REPLICATE:
            self.next = last_index + 1
            self.inflights.append(last_index)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def free_inflights_to(self, index: int) -> None:
        infl = self.inflights
        while infl and infl[0] <= index:
            infl.popleft()

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match}, next={self.next}, state={self.state.name}, "
            f"learner={self.is_learner}, inflight={len(self.inflights)})"
        )


def majority(n: int) -> int:
    """Votes needed among n voters (Raft §5.2: "a majority of the servers")."""
    return n // 2 + 1


def committed_index(voters: tuple[int, ...], match: dict[int, int]) -> int:
    """The largest index replicated on a majority of voters (Raft §5.3/§5.4:
    "a majority of matchIndex[i] >= N"). Empty voter set -> 0."""
    n = len(voters)
    if n == 0:
        return 0
    if n == 1:
        return match.get(voters[0], 0)
    srt = sorted((match.get(v, 0) for v in voters), reverse=True)
    return srt[majority(n) - 1]


class VoteResult(enum.IntEnum):
    PENDING = 0
    WON = 1
    LOST = 2


def tally(voters: tuple[int, ...], votes: dict[int, bool]) -> VoteResult:
    """Election outcome; only votes of current voters count (learners never)."""
    granted = rejected = 0
    for v in voters:
        r = votes.get(v)
        if r is True:
            granted += 1
        elif r is False:
            rejected += 1
    q = majority(len(voters))
    if granted >= q:
        return VoteResult.WON
    if rejected > len(voters) - q:
        return VoteResult.LOST
    return VoteResult.PENDING
