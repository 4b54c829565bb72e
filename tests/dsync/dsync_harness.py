"""Real ``raftmq serve`` nodes in ``mode = "dynsec-sync"`` on loopback, for tests/dsync.

The ha harness (tests/ha/ha_harness.py) with the mode swapped: one raftmq.toml
per node, a shared secret file of mode 0600, dynsec on, anonymous clients
refused, ``RAFTMQ_DYNSEC_PASSWORD`` in every node's environment.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from ha_harness import HOST, HaCluster, HaNode, wait_for

from support.mqttraw import RawClient

CTRL = shutil.which("mosquitto_ctrl")
ADMIN = ("admin", "adminpass123")


def connack(node: HaNode, client_id: str, user: tuple[str, str] | None = ADMIN, version: int = 5,
            **kw: object) -> tuple[RawClient, int, bool]:
    """(client, CONNACK reason, session present); the client may be closed."""
    c = RawClient(HOST, node.mqtt_port, version=version, timeout=3.0)
    if user is not None:
        kw.update(username=user[0], password=user[1].encode())
    p = c.connect(client_id, **kw)
    return c, int(p.reason or 0), p.session_present


def serves(node: HaNode, user: tuple[str, str] = ADMIN) -> bool:
    """Whether ``node`` accepts a CONNECT of ``user`` now."""
    try:
        c, rc, _ = connack(node, f"probe-{node.id}-{time.monotonic_ns()}", user)
    except (OSError, AssertionError, Exception):
        return False
    c.close()
    return rc == 0


class DsyncCluster(HaCluster):
    def __init__(self, root: Path, n: int = 3, env: dict[str, str] | None = None,
                 extra: tuple[str, ...] = (), **kw: object) -> None:
        env = {"RAFTMQ_DYNSEC_PASSWORD": ADMIN[1], **(env or {})}
        super().__init__(root, n, extra=("dynsec = true", "allow_anonymous = false", *extra),
                         env=env, **kw)  # type: ignore[arg-type]
        for node in self.nodes.values():
            text = node.config_path.read_text().replace('mode = "ha"', 'mode = "dynsec-sync"')
            node.config_path.write_text(text)

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            self.wait_serving(node)

    def wait_serving(self, node: HaNode, timeout: float = 60.0) -> None:
        wait_for(lambda: serves(node), timeout, f"node {node.id} serving the admin client")

    def role(self, node: HaNode) -> str:
        return str(node.status()["role"])

    def leader(self) -> HaNode:
        return wait_for(lambda: next((n for n in self.nodes.values()
                                      if n.running and self.role(n) == "leader"), None),
                        30, "a leader")

    def followers(self) -> list[HaNode]:
        lead = self.leader()
        return [n for n in self.nodes.values() if n.id != lead.id]

    def ctrl(self, node: HaNode, *args: str) -> str:
        """``mosquitto_ctrl dynsec ...`` against ``node``; its output."""
        assert CTRL is not None
        cmd = [CTRL, "-h", HOST, "-p", str(node.mqtt_port), "-u", ADMIN[0], "-P", ADMIN[1], "dynsec", *args]
        run = subprocess.run(cmd, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        out = (run.stdout + run.stderr).decode()
        assert run.returncode == 0, out
        return out
