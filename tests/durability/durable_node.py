"""A standalone raftmq node (supervisor + raft process + worker) for crash tests.

``DurableNode(tmp_path)`` writes a config (one listener on a free loopback
port, a data dir) and runs ``python -m raftmq.supervisor -c FILE``.
``kill9()`` kills the whole node at once -- the supervisor and every process
under it -- with SIGKILL, like a power cut of the node's processes (the page
cache survives, as it does for Mosquitto's tests).  ``start()`` again on the
same data dir and port.

Also a tiny raw MQTT 3.1.1 client (``RawClient``) for flows paho hides (a QoS 2
publish stopped after PUBREC).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from support.ports import free_port
from support.procs import descendants

SRC = str(Path(__file__).resolve().parents[2] / "src")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class DurableNode:
    host = "127.0.0.1"

    def __init__(self, root: Path, durability: str = "sync", extra: str = "") -> None:
        """``extra``: more top-level config lines (e.g. ``persistent_client_expiration = 9``)."""
        self.root = root
        self.port = free_port()
        self.data_dir = root / "data"
        self.config_path = root / "raftmq.toml"
        self.log_path = root / "node.log"
        self.config_path.write_text(
            f'data_dir = "{self.data_dir}"\n'
            f'durability = "{durability}"\n'
            "allow_anonymous = true\n"
            "max_inflight_messages = 100\n"
            "max_queued_messages = 100000\n"
            + (extra + "\n" if extra else "")
            + "[[listener]]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raftmq.supervisor", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": SRC},
            start_new_session=True,
        )
        log.close()
        wait_for(self._accepting, timeout, f"the node to accept MQTT on port {self.port}")

    def _accepting(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def kill9(self) -> None:
        """SIGKILL the supervisor and all its descendants at the same instant."""
        assert self.proc is not None
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        # The whole process group too (the node runs in its own session): a child
        # the supervisor was spawning at this instant is not in ``pids`` yet.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        wait_for(lambda: not any(_alive(p) for p in pids), 10, "the node's processes to die")
        # Nothing of the old node may still hold the listener, or the next
        # start() would take the old socket for the new node.
        wait_for(lambda: not self._port_open(), 10, f"port {self.port} to close")

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- a minimal MQTT 3.1.1 client over a socket ----------------------------------------

CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK = 2, 3, 4, 5, 6, 7, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


class RawClient:
    def __init__(self, port: int, client_id: str, clean: bool, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        flags = 0x02 if clean else 0x00
        body = _str("MQTT") + bytes((4, flags)) + struct.pack(">H", 60) + _str(client_id)
        self.sock.sendall(_packet(0x10, body))
        ptype, _flags, payload = self.read()
        assert ptype == CONNACK and payload[1] == 0, (ptype, payload)
        self.session_present = bool(payload[0] & 1)

    def read(self) -> tuple[int, int, bytes]:
        while True:
            if len(self.buf) >= 2:
                mult, length, pos = 1, 0, 1
                while pos < len(self.buf):
                    b = self.buf[pos]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    pos += 1
                    if not b & 0x80:
                        if len(self.buf) >= pos + length:
                            first = self.buf[0]
                            payload = self.buf[pos : pos + length]
                            self.buf = self.buf[pos + length :]
                            return first >> 4, first & 0x0F, payload
                        break
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the connection")
            self.buf += data

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int = 0, dup: bool = False,
                retain: bool = False) -> None:
        first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (1 if retain else 0)
        body = _str(topic) + (struct.pack(">H", packet_id) if qos else b"") + payload
        self.sock.sendall(_packet(first, body))

    def pubrel(self, packet_id: int) -> None:
        self.sock.sendall(_packet(0x62, struct.pack(">H", packet_id)))

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.sock.close()
