"""The raft process's pipelined meta sync (issue 3, durable QoS 1): with LMDB's
meta page synced in a thread while the next Ready is built, a proposer must
still hear COMMITTED only for entries whose commit an fdatasync has covered.

A kill -9 cannot show a missing fsync (the page cache survives a process
crash), so the real raft process runs with two probes: ``sync_file`` records
the last log index committed before each completed fdatasync, and
``_notify_committed`` checks every entry it announces against it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from raftmq.raft import channel as ch
from raftmq.state.entries import Message, QueueAdd, QueueRemove, SessionPut, encode_ops

pytestmark = pytest.mark.timeout(120)

SRC = str(Path(__file__).resolve().parents[2] / "src")

PROBED_PROCESS = """
import json, os, sys, threading
from raftmq.raft import process as P
from raftmq.raft.lmdb_storage import LmdbStorage

lock = threading.Lock()
state = {"synced": 0, "notified": 0, "violations": [], "syncs": 0, "overlapped": 0}
real_sync = LmdbStorage.sync_file

def sync_file(self):
    upto = self._last  # commits finished before this fdatasync starts
    real_sync(self)
    with lock:
        state["synced"] = max(state["synced"], upto)
        state["syncs"] += 1

real_notify = P.RaftProcess._notify_committed

def notify(self, committed):
    top = committed[-1].index
    with lock:
        if top > state["synced"]:
            state["violations"].append([top, state["synced"]])
        state["notified"] = max(state["notified"], top)
    return real_notify(self, committed)

real_hook = P.RaftProcess._notify_when_synced

def hook(self, committed):
    state["overlapped"] += 1
    return real_hook(self, committed)

LmdbStorage.sync_file = sync_file
P.RaftProcess._notify_committed = notify
P.RaftProcess._notify_when_synced = hook
try:
    rc = P.main(sys.argv[1:])
finally:
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(state, f)
sys.exit(rc)
"""


def _proposer(data_dir: str, name: str, rounds: int, burst: int, answered: list[int]) -> None:
    c = ch.BlockingChannel(data_dir, timeout=30, connect_timeout=30)
    try:
        rid = 0
        seq = 0
        c.send(ch.request_frame(ch.PROPOSE, 10**9, encode_ops([SessionPut(name, 4, 3600, True)])))
        pending = {10**9}
        for _ in range(rounds):
            frames = []
            for _ in range(burst):
                rid += 1
                seq += 1
                ops = [QueueAdd([[name, seq, 0, 1, []]], Message("t", b"x" * 64, 1))]
                if seq > 1:
                    ops.append(QueueRemove(name, seq - 1))
                frames.append(ch.request_frame(ch.PROPOSE, rid, encode_ops(ops)))
                pending.add(rid)
            c.send(b"".join(frames))
            # Keep about one burst in flight: Readys overlap with meta syncs.
            while len(pending) > burst:
                kind, body = c.recv_frame()
                if kind == ch.COMMITTED:
                    pending.difference_update(ch.parse_ids(body))
                elif kind == ch.FAILED:
                    raise AssertionError(f"proposals failed: reason {body[0]}")
        while pending:
            kind, body = c.recv_frame()
            if kind == ch.COMMITTED:
                pending.difference_update(ch.parse_ids(body))
        answered.append(rid)
    finally:
        c.close()


def test_committed_is_told_only_after_the_meta_sync(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    out = tmp_path / "probe.json"
    env = dict(os.environ, PYTHONPATH=SRC, PROBE_OUT=str(out))
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBED_PROCESS, "--data-dir", data_dir, "--durability", "sync"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        answered: list[int] = []
        threads = [
            threading.Thread(target=_proposer, args=(data_dir, f"c{i}", 40, 50, answered)) for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert answered == [2000, 2000, 2000]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    state = json.loads(out.read_text())
    assert state["violations"] == []
    assert state["notified"] >= 6000  # every proposal was announced ...
    assert state["overlapped"] > 0  # ... some while the previous meta sync still ran
    assert state["syncs"] > 0
