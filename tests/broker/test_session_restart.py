"""Persistent sessions across a clean restart (SIGTERM) of the broker, with Mosquitto's
persistence on (``persistence true``: it writes its database at a clean exit, so
a kill -9 cannot be compared; tests/durability/test_session_clocks.py does the
kill -9 part for raftmq).

Differential: sessions survive the restart, and a session whose client came back
after the restart expires its interval after its next disconnect -- the same in
both.  raftmq only: an offline session's expiry counts from its disconnect
across the restart (MQTT 5 §3.1.2.11.2).  Mosquitto 2.0.11 does not: a session
restored from its persistence file is not expired until its client returns
(checked by hand: a 5 s session disconnected just before the restart was still
present 13 s after it, and so was a 4 s session still connected at the stop, 9 s
after it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from support.helpers import unique
from support.sessionclients import Mq, session_present, until

pytestmark = [pytest.mark.timeout(90), pytest.mark.waits]


def _start(broker_factory, kind: str, tmp_path: Path):
    if kind == "raftmq":
        return broker_factory("raftmq")  # durable by default (data dir, durability "sync")
    db = tmp_path / "mosquitto-db"
    db.mkdir()
    options: dict = {"persistence": True, "persistence_location": f"{db}/"}
    if os.geteuid() == 0:
        options["user"] = "root"  # else it drops to "mosquitto", who may not write there
    return broker_factory("mosquitto", **options)


@pytest.mark.parametrize("kind", ["raftmq", "mosquitto"])
def test_sessions_survive_a_clean_restart_and_expire_after_the_next_disconnect(
        kind, broker_factory, tmp_path) -> None:
    b = _start(broker_factory, kind, tmp_path)
    keep, back = unique("rs-keep"), unique("rs-back")
    for cid in (keep, back):
        # Clean Start 0 even for a new session: Mosquitto 2.0.11 does not write a
        # session begun with Clean Start 1 to its persistence file.
        c = Mq(b, cid, clean=False, expiry=300)
        c.subscribe(unique("rs/") + "/x")
        c.disconnect()
    b.stop()
    b.start()
    assert session_present(b, keep)
    c = Mq(b, back, clean=False, expiry=3)  # back after the restart, now with 3 s
    assert c.present
    c.disconnect()
    t0 = time.monotonic()
    until(t0 + 3.0 + 2.5)  # Mosquitto checks expiries about once a second
    assert not session_present(b, back)


def test_offline_session_expiry_counts_from_its_disconnect_across_a_clean_restart(
        raftmq_factory) -> None:
    """raftmq only (Mosquitto 2.0.11 never expires a session it restored: see the module doc)."""
    b = raftmq_factory()
    short, keep, online = unique("rs-short"), unique("rs-keep"), unique("rs-online")
    c = Mq(b, short, expiry=6)
    c.subscribe(unique("rs/") + "/y")
    c.disconnect()
    t0 = time.monotonic()
    c = Mq(b, keep, expiry=300)
    c.disconnect()
    stayed = Mq(b, online, expiry=6)  # still connected when the broker stops
    until(t0 + 2.0)
    b.stop()
    stayed.client.loop_stop()
    stopped = time.monotonic()
    until(stopped + 1.0)
    b.start()
    restarted = time.monotonic()
    until(t0 + 7.0)  # short: gone at t0 + 6 (from the restart: t0 + 9 or later)
    assert not session_present(b, short)
    assert session_present(b, keep)
    # online: no disconnect was recorded, its interval counts from the restart,
    # so it lives until restarted + 6 >= stopped + 7 (Mosquitto: until it returns).
    until(stopped + 6.3)
    assert time.monotonic() < restarted + 5.5, "too slow to tell the rules apart"
    assert session_present(b, online)
