"""Start and stop real broker processes for tests: raftmq and the reference Mosquitto.

Both take the same options, named like mosquitto.conf keys (raftmq's TOML keys
have the same names), so one test can run the same script against both.
Every process is stopped by ``stop()`` (SIGTERM, then SIGKILL after a bound);
fixtures call it in their teardown whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support.ports import free_port

HOST = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 15.0
# Worker processes of every raftmq started here (the broker suite runs with 1, 2
# and 4: `RAFTMQ_TEST_WORKERS=4 pytest tests/broker -k raftmq`); an explicit
# ``workers`` option wins.
TEST_WORKERS = int(os.environ.get("RAFTMQ_TEST_WORKERS", "1"))
STOP_TIMEOUT = 5.0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class BrokerProcess:
    """One running broker; ``kind`` is "raftmq" or "mosquitto"."""

    def __init__(self, kind: str, workdir: Path, options: dict[str, Any] | None = None,
                 listener_in_config: bool = False) -> None:
        self.kind = kind
        self.host = HOST
        self.port = free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.options = dict(options or {})
        self.log_path = workdir / f"{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listener_in_config = listener_in_config

    # -- lifecycle
    def command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            lines = [f"listener {self.port} {self.host}", "persistence false",
                     "log_dest stderr", "log_type all"]
            opts = {"allow_anonymous": True, **self.options}
            lines += [f"{k} {_conf_value(v)}" for k, v in opts.items()]
            conf.write_text("\n".join(lines) + "\n")
            return [MOSQUITTO, "-c", str(conf)]
        conf = self.workdir / "raftmq.toml"
        opts = dict(self.options)
        body = [f"{k} = {_toml_value(v)}" for k, v in opts.items()]
        if self.listener_in_config:
            body += ["[[listener]]", f'host = "{self.host}"', f"port = {self.port}"]
        conf.write_text("\n".join(body) + "\n")
        cmd = [sys.executable, "-m", "raftmq", "serve", "-c", str(conf),
               "--data-dir", str(self.workdir / "data"), "-v"]
        if not self.listener_in_config:
            cmd += ["-p", str(self.port), "--host", self.host]
        if "workers" not in opts:
            cmd += ["--workers", str(TEST_WORKERS)]
        return cmd

    def start(self) -> BrokerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} at start:\n"
                                   + self.log_tail())
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not listen on {self.port} within {START_TIMEOUT}s:\n"
                           + self.log_tail())

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._log.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"<{self.kind} on {self.host}:{self.port}>"
