"""The Raft consensus core, sans-IO (API skeleton; implementation follows)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from raftmq.raft.storage import Storage
from raftmq.raft.types import ConfChange, ConfState, Message, Ready


class ProposalDropped(Exception):
    """The proposal was not appended (no leader, transfer in progress, a conf
    change already pending, ...). Retry later or elsewhere."""


class NotLeader(ProposalDropped):
    """This node is not the leader; ``leader`` is the known leader id or 0."""

    def __init__(self, leader: int) -> None:
        super().__init__(f"not leader (leader={leader})")
        self.leader = leader


@dataclass(slots=True)
class Config:
    id: int
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_size_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    applied: int = 0
    max_committed_size_per_ready: int = 64 << 20


class RawNode:
    """One Raft member. Drive it with tick()/step(); loop ready() -> persist,
    send, apply -> advance(rd)."""

    def __init__(self, config: Config, storage: Storage, rng: random.Random) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """One logical clock tick (election_tick ticks = one election timeout)."""
        raise NotImplementedError

    def step(self, msg: Message) -> None:
        """Feed a message received from a peer."""
        raise NotImplementedError

    def propose(self, data: bytes) -> None:
        """Append ``data`` to the log (leader only). Raises NotLeader / ProposalDropped."""
        raise NotImplementedError

    def propose_many(self, datas: list[bytes]) -> None:
        """Append several entries at once (cheaper than propose() in a loop)."""
        raise NotImplementedError

    def propose_conf_change(self, cc: ConfChange) -> None:
        """Propose a membership change; refused while one is pending."""
        raise NotImplementedError

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Call when a committed CONF_CHANGE entry is applied; returns new membership."""
        raise NotImplementedError

    def transfer_leadership(self, to: int) -> None:
        raise NotImplementedError

    def read_index(self, context: bytes) -> None:
        raise NotImplementedError

    def campaign(self) -> None:
        raise NotImplementedError

    def has_ready(self) -> bool:
        raise NotImplementedError

    def ready(self) -> Ready:
        raise NotImplementedError

    def advance(self, rd: Ready) -> None:
        raise NotImplementedError

    def status(self) -> dict:
        raise NotImplementedError

    def report_unreachable(self, node_id: int) -> None:
        raise NotImplementedError

    def report_snapshot(self, node_id: int, success: bool) -> None:
        raise NotImplementedError
