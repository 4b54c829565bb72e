"""The store interface between a broker worker and durable state.

A worker keeps the live state in memory (sessions, trie, retained) and tells the
store every durable change as entries (state/entries.py).  ``submit`` makes a
batch durable *in order*; ``done`` is called on the worker's event loop once the
batch is committed (fsynced locally in standalone, on a majority in a cluster).
The worker sends PUBACK / PUBREC / SUBACK / CONNACK for state-changing packets
only from ``done``: nothing acknowledged is ever lost.

``MemoryStore`` keeps nothing and acknowledges at once (tests, `durability =
"none"`).  The Raft-backed store lives with the raft process and is injected by
the supervisor: the broker never imports raft.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from raftmq.state.entries import LoadedState, Op


class Store(Protocol):
    def load(self) -> LoadedState:
        """The committed state at start-up (sessions, retained, dynsec)."""
        ...

    def submit(self, ops: list[Op], done: Callable[[], None] | None = None) -> None:
        """Make ``ops`` durable after every earlier batch; then call ``done``.

        ``done`` may be called synchronously (before ``submit`` returns) by a
        store that has nothing to wait for.
        """
        ...

    def set_remote_listener(self, listener: Callable[[list[Op]], None]) -> None:
        """Entries committed by *another* node or worker (dynsec-sync, takeover) go here."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """Nothing durable: every batch is 'committed' the moment it is submitted."""

    def __init__(self) -> None:
        self._listener: Callable[[list[Op]], None] | None = None

    def load(self) -> LoadedState:
        return LoadedState()

    def submit(self, ops: list[Op], done: Callable[[], None] | None = None) -> None:
        if done is not None:
            done()

    def set_remote_listener(self, listener: Callable[[list[Op]], None]) -> None:
        self._listener = listener

    async def close(self) -> None:
        return None
