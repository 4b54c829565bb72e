"""``mode = "dynsec-sync"`` (active-active) on the broker side.

Every node whose Raft group has a working majority serves clients; only the
Dynamic Security configuration goes through Raft.

* **What is replicated.**  A worker's store is a ``DsyncStore``: ``Dynsec``
  ops go to the node's raft process (``RaftStore`` with proposal forwarding:
  on a follower the raft process sends them to the leader over the peer
  transport and answers COMMITTED once this node has applied the entry, so a
  ``$CONTROL/dynamic-security/v1`` request sent to any node is answered only
  once it is committed cluster-wide and in force here).  Every other op
  (sessions, subscriptions, retained and queued messages) is kept in the
  worker's memory only, as with ``durability = "none"``: the simplest correct
  choice, since a client of an active-active cluster reconnects to any node
  without its session anyway.  A node restart therefore loses its sessions and
  retained messages, never the dynsec configuration.
* **Order.**  ``done`` callbacks keep the submission order: a batch without
  dynsec ops that follows one waiting for its commit is answered after it (a
  pipelined ``createClient`` + ``getClient`` reads its own write).
* **Changes committed elsewhere** arrive as ENTRY frames and are applied by the
  dynsec plugin (``on_remote_ops``): kicks happen where the client is
  connected, ACL caches are invalidated in every worker of every node.
* **Majority.**  A worker serves while its node is the leader, or a follower
  that knows a leader.  A pre-candidate or candidate (no leader heard within an
  election timeout) and a follower without a leader (a leader that stepped
  down by check-quorum) refuse every CONNECT (MQTT 5 CONNACK 0x88 *Server
  unavailable*, 3.1.1/3.1 return code 3) and close the connections they have
  (MQTT 5: DISCONNECT 0x9C *Use another server* first, without a Server
  Reference: any node of the majority will do; DISCONNECT may not carry 0x88).
  The worker keeps running: back in a majority, it serves again.
* **Seeding** (``RAFTMQ_DYNSEC_PASSWORD``): only a worker that starts on the
  leader of a cluster with no dynsec document yet seeds; the others receive the
  committed seed like any change (``may_seed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from raftmq.cluster.ha import RC_SERVER_UNAVAILABLE, RC_USE_ANOTHER_SERVER
from raftmq.raft.client import LEADERSHIP_LOST, NOT_LEADER, RaftStore
from raftmq.state.entries import Dynsec, LoadedState, Op

log = logging.getLogger("raftmq.dsync")


class DsyncStore:
    """The Store of a dynsec-sync worker (see the module doc)."""

    def __init__(self, data_dir: str, worker_id: int) -> None:
        self.raft = RaftStore(data_dir, worker_id, forward=True)
        self.data_dir = data_dir
        self.may_seed = False  # read by the dynsec plugin's install()
        # Dynsec batches waiting for their commit, in order: [request id, done,
        # then the done callbacks of the local-only batches submitted after it].
        self._waiting: list[list[Any]] = []

    def load(self) -> LoadedState:
        from raftmq.cluster.ha import probe_role

        state = self.raft.load()
        try:
            self.may_seed = state.dynsec is None and probe_role(self.data_dir, 10.0)[0] == "leader"
        except (OSError, ConnectionError):
            self.may_seed = False
        # Only dynsec is ever proposed in this mode; anything else in the tables
        # (a data dir used in another mode before) is not this mode's state.
        return LoadedState(dynsec=state.dynsec)

    def submit(self, ops: list[Op], done: Callable[[], None] | None = None) -> None:
        dynsec = [op for op in ops if isinstance(op, Dynsec)]
        if not dynsec:
            if self._waiting:
                self._waiting[-1].append(done)
            elif done is not None:
                done()
            return
        entry: list[Any] = [self.raft._next_id, done]  # the id submit() gives it
        self._waiting.append(entry)
        self.raft.submit(dynsec, lambda: self._committed(entry))
        if entry[0] not in self.raft._pending:
            self.failed()  # refused at once (no channel)

    def _committed(self, entry: list[Any]) -> None:
        # Commits of one channel arrive in submission order.
        waiting = self._waiting
        if not any(h is entry for h in waiting):
            return
        while waiting:
            head = waiting.pop(0)
            for done in head[1:]:
                if done is not None:
                    done()
            if head is entry:
                return

    def failed(self) -> None:
        """Proposals were answered FAILED (the raft store forgot them): they are
        never acknowledged, but the local-only batches queued behind them are
        (they need no commit)."""
        pending = self.raft._pending
        keep: list[list[Any]] = []
        for head in self._waiting:
            if head[0] in pending:
                keep.append(head)
                continue
            if keep:  # still behind an earlier batch that waits
                keep[-1].extend(head[2:])
                continue
            for done in head[2:]:
                if done is not None:
                    done()
        self._waiting = keep

    def set_remote_listener(self, listener: Callable[[list[Op]], None]) -> None:
        self.raft.set_remote_listener(listener)

    def set_failure_listener(self, listener: Callable[[str, str], None]) -> None:
        self.raft.set_failure_listener(listener)

    def set_role_listener(self, listener: Callable[[str, int, int], None]) -> None:
        self.raft.set_role_listener(listener)

    async def close(self) -> None:
        await self.raft.close()

    @property
    def pending(self) -> int:
        return self.raft.pending


def serving_role(role: str, leader: int) -> bool:
    """Whether a node in this Raft role is part of a working majority."""
    return role == "leader" or (role == "follower" and leader != 0)


class MajorityGate:
    """Follows the node's Raft role: refuse and close clients outside a majority."""

    def __init__(self, broker: Any, index: int) -> None:
        self.broker = broker
        self.index = index
        self.serving = False
        broker.ha_refusal = (RC_SERVER_UNAVAILABLE, None)  # until the first ROLE

    def on_role(self, role: str, leader: int, term: int) -> None:
        serving = serving_role(role, leader)
        if serving == self.serving:
            return
        self.serving = serving
        broker = self.broker
        if serving:
            broker.ha_refusal = None
            log.info("Worker %d serving clients: the node is in a majority (%s, leader %d, term %d).",
                     self.index + 1, role, leader, term)
            return
        broker.ha_refusal = (RC_SERVER_UNAVAILABLE, None)
        closed = self._close_all()
        log.warning("Worker %d: the node is outside a working majority (%s, leader %s); closed %d "
                    "connection(s), refusing clients until it is back in a majority.",
                    self.index + 1, role, leader or "unknown", closed)

    def _close_all(self) -> int:
        from raftmq._codec import Disconnect
        from raftmq.broker.protocol import CONNECTED

        packet = Disconnect(RC_USE_ANOTHER_SERVER, None).encode(5)
        closed = 0
        for conn in list(self.broker.connections):
            if conn.version == 5 and conn.state == CONNECTED:
                conn.write(packet)
            conn.close()
            closed += 1
        return closed


def attach(node: Callable[[Any], None] | None, store: DsyncStore, index: int) -> Callable[[Any], None]:
    """The ``node`` hook of a dynsec-sync worker (wraps the worker layer's)."""

    def hook(broker: Any) -> None:
        if node is not None:
            node(broker)
        gate = MajorityGate(broker, index)
        store.set_role_listener(gate.on_role)

    return hook


def failure_listener(store: DsyncStore, worker_id: int, crash: Callable[[str], None]) -> Callable[[str, str], None]:
    """A dynsec proposal that fails is not answered (``mosquitto_ctrl`` times
    out; nothing changed, or the change still commits and arrives as a remote
    entry); only a lost channel to the raft process restarts the worker."""

    def lost(kind: str, detail: str) -> None:
        store.failed()
        if kind in (NOT_LEADER, LEADERSHIP_LOST):
            log.warning("Worker %d: dynsec change not acknowledged: %s.", worker_id, detail)
            return
        crash(detail)

    return lost

