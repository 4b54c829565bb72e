"""Checks of the load generator against Mosquitto and against brokers that misbehave.

    python -m pytest bench/test_loadgen.py -q

Not in the default test run (pytest's testpaths is tests/): these check the
benchmark tool, not raftmq.  Each run is short (about 1 s of load) and every
process started here is stopped here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") and os.access(compare.MOSQUITTO, os.X_OK)),
    reason="needs a C compiler and /usr/sbin/mosquitto",
)


@pytest.fixture(scope="module")
def loadgen() -> Path:
    compare.build_loadgen()
    return compare.LOADGEN


@pytest.fixture(scope="module")
def mosquitto() -> Iterator[tuple[int, int]]:
    with compare.Broker("mosquitto").running() as (pid, port, _log):
        yield pid, port


def run(loadgen: Path, port: int, *args: str, timeout: float = 60) -> tuple[int, dict]:
    r = subprocess.run(
        [str(loadgen), "-p", str(port), "--warmup", "0.3", "-d", "1", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])


def test_qos0_pairs_delivers_every_message_in_order(loadgen, mosquitto):
    pid, port = mosquitto
    rc, res = run(loadgen, port, "-l", "pairs", "-P", "4", "--cpu-pid", str(pid))
    assert rc == 0 and res["ok"], res
    assert res["sent"] > 1000
    assert res["received"] == res["expected"] == res["sent"]
    assert res["lost"] == 0 and res["reorders"] == 0
    assert res["latency_us"]["count"] > 0
    assert 0 < res["latency_us"]["p50"] <= res["latency_us"]["p99"] <= res["latency_us"]["max"]
    assert res["broker_procs"] == 1 and res["broker_cpu_s"] > 0


def test_fanout_expects_one_delivery_per_subscriber(loadgen, mosquitto):
    _pid, port = mosquitto
    rc, res = run(loadgen, port, "-l", "fanout", "-S", "7", "-w", "20")
    assert rc == 0 and res["ok"], res
    assert res["expected"] == res["sent"] * 7
    assert res["received"] == res["expected"]


@pytest.mark.parametrize("qos", [1, 2])
def test_qos1_and_qos2_flows_complete(loadgen, mosquitto, qos):
    _pid, port = mosquitto
    # window <= Mosquitto's max_inflight_messages (20): see README on QoS 2
    rc, res = run(loadgen, port, "-q", str(qos), "-P", "3", "-w", "20", "--mqtt", "5")
    assert rc == 0 and res["ok"], res
    assert res["acked"] == res["sent"] > 0
    assert res["lost"] == 0


def test_open_loop_keeps_the_rate(loadgen, mosquitto):
    _pid, port = mosquitto
    rc, res = run(loadgen, port, "-P", "20", "-r", "2000", "-d", "2")
    assert rc == 0 and res["ok"], res
    assert 1500 < res["sent_per_s"] < 2500
    assert res["skipped"] == 0 and res["lost"] == 0


def test_idle_connections_and_broker_memory(loadgen, mosquitto):
    pid, port = mosquitto
    rc, res = run(loadgen, port, "-l", "idle", "-n", "300", "--hold", "0.2", "--cpu-pid", str(pid))
    assert rc == 0 and res["ok"], res
    assert res["connected"] == 300 and res["connects_per_s"] > 0
    assert res["broker_rss_kb_after"] > 0 and res["broker_pss_kb_after"] > 0


def test_connection_refused_is_an_error_not_a_hang(loadgen):
    port = compare.free_port()  # nothing listens there
    rc, res = run(loadgen, port, timeout=10)
    assert rc == 2 and res["ok"] is False
    assert "refused" in res["error"]


class FakeBroker:
    """A TCP server that answers CONNECT and SUBSCRIBE (or not) and never forwards."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            while data := c.recv(65536):
                if not self.answer:
                    continue
                if data[0] >> 4 == 1:
                    c.sendall(b"\x20\x02\x00\x00")  # CONNACK accepted
                elif data[0] >> 4 == 8:
                    c.sendall(b"\x90\x03" + data[2:4] + b"\x00")  # SUBACK QoS 0
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_silent_broker_times_out_in_setup(loadgen):
    fake = FakeBroker(answer=False)
    try:
        rc, res = run(loadgen, fake.port, "-P", "2", "--connect-timeout", "1", timeout=15)
    finally:
        fake.close()
    assert rc == 1 and res["ok"] is False
    assert "setup timed out" in res["error"]


def test_broker_that_delivers_nothing_fails_the_run(loadgen):
    fake = FakeBroker(answer=True)
    try:
        rc, res = run(loadgen, fake.port, "-P", "2", "--drain", "0.5", timeout=15)
    finally:
        fake.close()
    assert rc == 1 and res["ok"] is False
    assert res["received"] == 0 and res["lost"] == res["expected"] > 0
