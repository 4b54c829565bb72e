"""Plain data of the Raft core: log entries, persistent state, messages, Ready.

Everything here is inert data (no behaviour beyond small encoders); the core
(raft/core.py) produces and consumes it, the I/O shell persists and ships it.
Classes are slotted dataclasses rather than frozen ones because the hot path
creates one ``Entry`` per proposal and frozen dataclasses are several times
slower to construct. Treat them as immutable all the same.

Index and term numbering follow the Raft paper (Figure 2): the first log index
is 1, index 0 / term 0 is the empty log. Node ids are positive ints; ``NONE``
(0) means "no node".
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

NONE = 0
"""Node id meaning "nobody" (no vote cast, no known leader)."""

# -- entries -------------------------------------------------------------------

NORMAL = 0
"""Entry kind: application data (possibly empty: a new leader's no-op, Raft §8)."""
CONF_CHANGE = 1
"""Entry kind: ``data`` is an encoded ``ConfChange`` (Raft thesis §4.1)."""


@dataclass(slots=True)
class Entry:
    """One log entry (Raft Figure 2: "each entry contains command for state
    machine, and term when entry was received by leader")."""

    term: int
    index: int
    data: bytes = b""
    kind: int = NORMAL

    def size(self) -> int:
        """Approximate wire/disk size, used for max_size_per_msg batching."""
        return len(self.data) + 24


@dataclass(slots=True)
class HardState:
    """What must be on stable storage before responding to RPCs (Figure 2,
    "Persistent state on all servers": currentTerm, votedFor) plus the commit
    index, which lets a restarted node re-apply without waiting for a leader."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


@dataclass(slots=True, frozen=True)
class ConfState:
    """Cluster membership: voters count for elections and commit; learners only
    receive the log (Raft thesis §4.2.1 "non-voting members")."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    """Last included index and term of a snapshot and the membership at that
    index (Raft §7, Figure 13)."""

    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(slots=True, frozen=True)
class Snapshot:
    """A state-machine snapshot: ``data`` is opaque to the core."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.meta.index == 0


# -- membership changes ----------------------------------------------------------


class ConfChangeType(enum.IntEnum):
    ADD_LEARNER = 0
    """Add a non-voting member (it catches up without affecting quorum)."""
    PROMOTE = 1
    """Make a member a voter (a learner, or a new node directly: discouraged)."""
    REMOVE = 2
    """Remove a voter or learner."""


ADD_LEARNER = ConfChangeType.ADD_LEARNER
PROMOTE = ConfChangeType.PROMOTE
REMOVE = ConfChangeType.REMOVE

_CC = struct.Struct(">BQ")


@dataclass(slots=True, frozen=True)
class ConfChange:
    """A single-server membership change (Raft thesis §4.1): one at a time."""

    type: ConfChangeType
    node_id: int

    def encode(self) -> bytes:
        return _CC.pack(int(self.type), self.node_id)

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        t, node_id = _CC.unpack(data)
        return cls(ConfChangeType(t), node_id)


# -- messages ------------------------------------------------------------------


class MessageType(enum.IntEnum):
    # Local messages (term 0), never sent over the wire.
    HUP = 0
    """Start an election (tick ran out or campaign())."""
    BEAT = 1
    """Leader: time to send heartbeats."""
    PROP = 2
    """Proposal of ``entries``."""
    TRANSFER_LEADER = 3
    """Ask the leader to hand leadership to ``src`` (local: ``src`` = target)."""
    CHECK_QUORUM = 4
    """Leader: verify a majority was active during the last election timeout."""
    # Wire messages.
    PRE_VOTE = 10
    PRE_VOTE_RESP = 11
    VOTE = 12
    VOTE_RESP = 13
    APP = 14
    APP_RESP = 15
    HEARTBEAT = 16
    HEARTBEAT_RESP = 17
    SNAP = 18
    TIMEOUT_NOW = 19
    READ_INDEX = 20
    READ_INDEX_RESP = 21


MT = MessageType  # short alias used by the core


@dataclass(slots=True)
class Message:
    """One Raft RPC, request or response (Figure 2's RequestVote and
    AppendEntries, plus §7 InstallSnapshot, thesis §3.10 TimeoutNow, §6.4
    ReadIndex, §9.6 PreVote).

    Field use by type:
      APP: index/log_term = prevLogIndex/prevLogTerm, entries, commit.
      APP_RESP: index = last index matched (success) or the rejected prevLogIndex
        (reject=True) with reject_hint/log_term = the follower's guess of where
        the logs diverge.
      VOTE/PRE_VOTE: index/log_term = candidate's last log index/term;
        context = b"transfer" for a leadership-transfer election.
      HEARTBEAT: commit, context (ReadIndex round id). HEARTBEAT_RESP: context.
      SNAP: snapshot. READ_INDEX: context; READ_INDEX_RESP: index, context.
    """

    type: MessageType
    src: int = NONE
    dst: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


# -- Ready ---------------------------------------------------------------------


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@dataclass(slots=True, frozen=True)
class SoftState:
    """Volatile state worth telling the application (not persisted)."""

    leader: int
    role: Role


@dataclass(slots=True, frozen=True)
class ReadState:
    """A linearizable read may be served once ``applied >= index`` (Raft thesis
    §6.4). ``context`` is what the application passed to read_index()."""

    context: bytes
    index: int


@dataclass(slots=True)
class Ready:
    """Work the application must do, in this order (etcd raft's contract; the
    loop is: ``rd = node.ready()``, do 1-4, ``node.advance(rd)``):

    1. Persist ``snapshot`` (if not None; it replaces the whole log), then
       ``entries``, then ``hard_state`` (if not None) to stable storage, in one
       atomic write, then fsync if ``must_sync``. Entries REPLACE any stored
       entries with index >= ``entries[0].index`` (a follower truncates a
       conflicting suffix, Raft §5.3).
    2. Only then send ``messages`` (Raft thesis §3.8: a vote or an append
       acknowledgement must not leave before the state it vouches for is
       durable; so also the leader's own appends are counted only after
       ``advance``). Messages may be sent in any order, dropped or duplicated;
       the core tolerates it.
    3. Hand ``snapshot`` (if not None) to the state machine (replace its state),
       then apply ``committed_entries`` in order. For a CONF_CHANGE entry call
       ``node.apply_conf_change(ConfChange.decode(e.data))``. Committed entries
       are always already persisted (earlier Ready or this one).
    4. Serve ``read_states`` once the state machine applied ``index``.
    Then call ``advance(rd)`` exactly once before the next ``ready()``.
    """

    soft_state: SoftState | None = None
    """New leader/role, or None if unchanged since the previous Ready."""
    hard_state: HardState | None = None
    """Persist if not None (changed since the previous Ready)."""
    entries: list[Entry] = field(default_factory=list)
    """Append to stable storage (replacing entries with index >= entries[0].index)."""
    snapshot: Snapshot | None = None
    """Persist, then restore the state machine from it; None if no new snapshot."""
    committed_entries: list[Entry] = field(default_factory=list)
    """Apply to the state machine in order."""
    messages: list[Message] = field(default_factory=list)
    """Send AFTER hard_state/entries/snapshot are durable (fsynced if must_sync)."""
    read_states: list[ReadState] = field(default_factory=list)
    """(context, index) pairs for read_index() requests now safe to serve."""
    must_sync: bool = False
    """True if hard_state term/vote or entries changed: an fsync is required."""
