"""Loopback ports for the brokers and Raft nodes the tests start.

Two rules, each learned from a failed run: a port is handed out once per test
session (``bind(0)`` twice in a row may return the same port when the first
socket is already closed: two nodes of one cluster then shared a Raft port), and
ports come from below Linux's ephemeral range (32768-60999 by default), so the
outgoing connection of some client cannot take a port between the moment it is
chosen here and the moment the broker binds it."""

from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"
_LOW, _HIGH = 20000, 32767
_given: set[int] = set()
_pick = random.Random()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and was not handed out before."""
    for _ in range(1000):
        port = _pick.randint(_LOW, _HIGH)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")
