"""``mode = "ha"`` on the broker side: only the Raft leader's workers serve clients.

Every worker of an ha node starts by asking the local raft process its role
(``probe_role``: a channel connection that gets ROLE frames and no entries):

* **leader -> serving.**  The worker starts exactly as after a restart: it
  loads the committed state through ``RaftStore.load()``.  The raft process
  answers that LOAD only once the entry the new leader appended for its term
  is committed and applied (so every entry committed under earlier leaders is
  applied too: Raft §5.4.2 and §8), and writes its deferred queue rows to the
  tables first (``StateMachine.load``).  CONNECTs are refused until the store
  has confirmed the leadership once more after the load (``attach_serving``).
* **anything else -> standby.**  An empty in-memory broker whose listeners
  stay open and refuse every CONNECT (``run_standby``): MQTT 5 CONNACK 0x9C
  *Use another server* with a *Server Reference* naming the leader's client
  listener (``[cluster] peers`` ``mqtt_host``/``mqtt_port``), or 0x88 *Server
  unavailable* while no leader is known (no majority); MQTT 3.1.1/3.1 return
  code 3 (server unavailable) in both cases.  Then the connection is closed.

A change of role ends the worker with ``EXIT_ROLE_CHANGED``; the supervisor
starts it again at once and it probes again.  Restarting, rather than
switching a live broker over, means a new leader's workers hold nothing but
what was committed (a worker that served under an old leader may have
in-memory changes that never committed), at the cost of a worker start
(measured in README "High availability").

A serving worker that learns its node is no longer leader (check-quorum
step-down in a minority, a leadership transfer, a higher term) stops at once:
the refusal is set and reading from every client paused before anything else;
then, as soon as the new leader is known (at most one election timeout
later), every client gets MQTT 5 DISCONNECT 0x9C (with the Server Reference
when the new leader is known) or, for 3.x, a plain close, and the process
exits.  Its pending proposals are never
acknowledged: the raft process answers them FAILED, and a COMMITTED arriving
after the stop finds only closed connections (a closing connection writes
nothing).  Their clients retransmit to the new leader ([MQTT-4.4.0-1]).

Reason codes: DISCONNECT may not carry 0x88 (MQTT 5 §3.14.2.1), and 0x8B
*Server shutting down* would tell the client this server is going away; it is
not -- it only stops being the one to use.  0x9C *Use another server* says
exactly that, and §4.11 makes the Server Reference optional ("MAY"), so a
stepped-down node with no known leader sends 0x9C without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import orjson

from raftmq.cluster.config import ClusterSettings
from raftmq.raft import channel as ch

log = logging.getLogger("raftmq.ha")

EXIT_ROLE_CHANGED = 76  # the supervisor restarts the worker at once, in its new role
RC_SERVER_UNAVAILABLE = 0x88
RC_USE_ANOTHER_SERVER = 0x9C
_ROLE_WATCH = 2  # HELLO flags bit 1: ROLE frames only (raft/process.py)
_DRAIN_SECONDS = 0.1  # let the DISCONNECTs leave before the process exits
PROBE_TIMEOUT = 60.0  # the raft process may be starting (or restarting) meanwhile

Refusal = tuple[int, dict | None]


def refusal_for(settings: ClusterSettings, leader: int) -> Refusal:
    """What a CONNECT is answered with on a node that does not serve."""
    if not leader:
        return RC_SERVER_UNAVAILABLE, None
    address = settings.client_address(leader)
    return RC_USE_ANOTHER_SERVER, ({"server_reference": address} if address else None)


def _hello() -> bytes:
    return ch.frame(ch.HELLO, ch.U32.pack(0) + bytes((_ROLE_WATCH,)))


def probe_role(data_dir: str, timeout: float = PROBE_TIMEOUT) -> tuple[str, int, int]:
    """(role, leader id, term) of the node, asked of its raft process."""
    sock = ch.connect_blocking(ch.socket_path(data_dir), timeout)
    try:
        sock.settimeout(timeout)
        sock.sendall(_hello())
        reader = ch.FrameReader()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the raft process closed the channel")
            for kind, body in reader.feed(data):
                if kind == ch.ROLE:
                    r = orjson.loads(body)
                    return str(r["role"]), int(r["leader"]), int(r["term"])
    finally:
        sock.close()


def _exit_now(why: str) -> None:
    log.info("%s", why)
    logging.shutdown()
    os._exit(EXIT_ROLE_CHANGED)


class ServingGate:
    """A serving worker's side: confirms the leadership, and stops at once on its loss.

    ``flags[index]`` (shared with the supervisor, read by /health/leader) is 1
    while this worker serves."""

    def __init__(self, broker: Any, settings: ClusterSettings, flags: Any, index: int) -> None:
        self.broker = broker
        self.settings = settings
        self.flags = flags
        self.index = index
        self.stopping = False  # leadership lost: nothing is served any more
        self.finished = False  # the clients are closed, the exit is scheduled
        self._timer: asyncio.TimerHandle | None = None
        # Until the store confirms the role after the load, refuse like a node
        # that knows no leader (a CONNECT in that window is rare and retried).
        broker.ha_refusal = (RC_SERVER_UNAVAILABLE, None)

    def on_role(self, role: str, leader: int, term: int) -> None:
        if self.stopping:
            if role != "leader" and leader and not self.finished:
                self._finish(leader)  # the new leader is known: name it
            return
        if role == "leader":
            if self.broker.ha_refusal is not None:
                self.broker.ha_refusal = None
                self._mark_serving(term)
            return
        self.stop(leader)

    def _mark_serving(self, term: int) -> None:
        """Raise the /health/leader flag once the listeners are open too (the
        store may confirm the role while Broker.start still links the mesh)."""
        if self.stopping:
            return
        broker = self.broker
        if len(broker.servers) < len(broker.config.listeners):
            asyncio.get_running_loop().call_later(0.02, self._mark_serving, term)
            return
        if self.flags is not None:
            self.flags[self.index] = 1
        log.info("Worker %d serving clients: this node leads (term %d).", self.index + 1, term)

    def stop(self, leader: int) -> None:
        """Leadership lost: stop at once (refuse, read nothing more), then
        DISCONNECT everyone and exit (see the module doc)."""
        self.stopping = True
        if self.flags is not None:
            self.flags[self.index] = 0
        broker = self.broker
        broker.ha_refusal = refusal_for(self.settings, leader)
        for conn in list(broker.connections):
            transport = conn.transport
            if transport is not None:
                try:
                    transport.pause_reading()  # no packet of theirs is handled any more
                except (RuntimeError, AttributeError):
                    pass
        if leader:
            self._finish(leader)
            return
        # Right after a step-down the new leader is usually unknown for a few
        # milliseconds (a transfer: until its first append; an election: until
        # it wins).  Wait for it up to one election timeout, so that the
        # DISCONNECT can name it; a node cut off from the majority waits in vain
        # and sends 0x9C without a Server Reference.
        wait = self.settings.election_ticks * self.settings.tick_ms / 1000
        self._timer = asyncio.get_running_loop().call_later(wait, self._finish, 0)

    def _finish(self, leader: int) -> None:
        from raftmq._codec import Disconnect
        from raftmq.broker.protocol import CONNECTED

        if self.finished:
            return
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
        refusal = refusal_for(self.settings, leader)
        broker = self.broker
        broker.ha_refusal = refusal
        props = refusal[1]
        packet = Disconnect(RC_USE_ANOTHER_SERVER, props).encode(5)
        closed = 0
        for conn in list(broker.connections):
            if conn.version == 5 and conn.state == CONNECTED:
                conn.write(packet)
            conn.close()
            closed += 1
        where = props["server_reference"] if props else f"node {leader}" if leader else "unknown"
        log.warning("Worker %d: this node is no longer the leader (leader: %s); closed %d "
                    "connection(s); restarting as standby.", self.index + 1, where, closed)
        asyncio.get_running_loop().call_later(
            _DRAIN_SECONDS, _exit_now, f"Worker {self.index + 1} restarting in its new role.")


def attach_serving(node: Callable[[Any], None] | None, store: Any, settings: ClusterSettings,
                   flags: Any, index: int) -> tuple[Callable[[Any], None], Callable[[], bool]]:
    """The ``node`` hook of a serving worker (wraps the worker layer's), and a
    ``stopping()`` test for the worker's store failure listener: once the
    leadership is lost, failed proposals are expected and the exit is ours."""
    gates: list[ServingGate] = []

    def attach(broker: Any) -> None:
        if node is not None:
            node(broker)
        gate = ServingGate(broker, settings, flags, index)
        gates.append(gate)
        store.set_role_listener(gate.on_role)

    return attach, lambda: bool(gates) and gates[0].stopping


_tasks: set[asyncio.Task] = set()


async def _watch_role(broker: Any, data_dir: str, settings: ClusterSettings, index: int) -> None:
    """A standby worker follows the node's role: the refusal tracks the leader;
    once this node leads, the worker exits to come back serving."""
    loop = asyncio.get_running_loop()
    path = ch.socket_path(data_dir)
    while True:
        lost: asyncio.Future = loop.create_future()

        def on_frames(_proto: ch.FrameProtocol, frames: list[tuple[int, bytes]]) -> None:
            for kind, body in frames:
                if kind != ch.ROLE:
                    continue
                r = orjson.loads(body)
                if r["role"] == "leader":
                    _exit_now(f"Worker {index + 1}: this node now leads (term {r['term']}); "
                              "restarting to serve.")
                broker.ha_refusal = refusal_for(settings, int(r["leader"]))

        def on_lost(_proto: ch.FrameProtocol, fut: asyncio.Future = lost) -> None:
            if not fut.done():
                fut.set_result(None)

        proto = ch.FrameProtocol(on_frames, on_lost=on_lost)
        try:
            await loop.create_unix_connection(lambda p=proto: p, path)
        except OSError:
            broker.ha_refusal = (RC_SERVER_UNAVAILABLE, None)
            await asyncio.sleep(0.1)
            continue
        proto.send(_hello())
        await lost
        broker.ha_refusal = (RC_SERVER_UNAVAILABLE, None)  # the raft process restarts


def run_standby(config: Any, node: Callable[[Any], None] | None, index: int,
                first: tuple[str, int, int]) -> int:
    """Run a standby worker (see the module doc) until SIGTERM or a role change."""
    from raftmq.broker.server import run
    from raftmq.state.store import MemoryStore

    settings = config.cluster

    def attach(broker: Any) -> None:
        if node is not None:
            node(broker)
        broker.ha_refusal = refusal_for(settings, first[1])
        task = asyncio.get_running_loop().create_task(
            _watch_role(broker, config.data_dir, settings, index))
        _tasks.add(task)

    log.info("Worker %d on standby: this node is %s (leader %s); refusing clients.",
             index + 1, first[0], first[1] or "unknown")
    # No dynsec on standby: it would seed or import (and consume a pending
    # dynsec-import.json) into the throw-away in-memory store; nobody is
    # authenticated here anyway.
    from dataclasses import replace

    return run(replace(config, dynsec_enabled=False), MemoryStore(), node=attach)

