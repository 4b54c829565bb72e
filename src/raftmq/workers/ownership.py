"""Which worker of a node owns a client id.

A stable hash (CRC-32 of the UTF-8 id, the same in every process and across
restarts, unlike ``hash()``), mixed (MurmurHash3's finalizer: CRC-32 is
linear, so ids differing in one character -- client-1, client-2 -- would
otherwise often share their low bits), modulo the number of workers.  Changing the
number of workers moves ownership: every worker loads the persistent sessions
it owns from the store at start, so a restart with another count is safe.
"""

from __future__ import annotations

import uuid
import zlib


def owner_of(client_id: str, workers: int) -> int:
    """Index (0-based) of the worker that owns ``client_id``."""
    if workers <= 1:
        return 0
    h = zlib.crc32(client_id.encode("utf-8", "surrogatepass"))
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h % workers


def assign_client_id(worker: int, workers: int) -> str:
    """A fresh client identifier (MQTT 5 Assigned Client Identifier) owned by
    ``worker``, so the connection that asked for it needs no hand-off."""
    while True:
        client_id = f"auto-{uuid.uuid4()}"
        if owner_of(client_id, workers) == worker:
            return client_id
