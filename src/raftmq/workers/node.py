"""Make a Broker one worker of a multi-worker node (called by the supervisor's
worker process before the broker starts)."""

from __future__ import annotations

from typing import Any

from raftmq.workers.colocate import Colocate
from raftmq.workers.handoff import Handoff
from raftmq.workers.mesh import Mesh


def attach_worker(broker: Any, index: int, count: int, run_dir: str,
                  sockets: tuple = ()) -> None:
    """Worker ``index`` (0-based) of ``count``: with siblings, link it to them
    (mesh) and let it pass connections on (handoff).  ``sockets``: the
    listening sockets of its slot, held by the supervisor (supervisor.py), as
    (listener index, socket) pairs."""
    broker.listen_sockets = sockets
    broker.worker_id = index
    broker.worker_count = count
    if count > 1:
        broker.mesh = Mesh(broker, index, count, run_dir)
        broker.handoff = Handoff(broker, index, run_dir)
        if getattr(broker.config, "colocate", True):
            Colocate(broker, broker.mesh, broker.handoff)
