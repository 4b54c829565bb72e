"""The [cluster] peers' client addresses, and what ``raftmq serve`` refuses to run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ha_harness import SRC

from raftmq.cluster.config import ClusterConfigError, cluster_from_mapping
from raftmq.cluster.ha import RC_SERVER_UNAVAILABLE, RC_USE_ANOTHER_SERVER, refusal_for

BASE = {"node_id": 1, "listen": "127.0.0.1:7001", "secret_file": "/x"}


def test_peers_carry_client_addresses() -> None:
    s = cluster_from_mapping({**BASE, "peers": [
        {"id": 1, "host": "10.0.0.1", "port": 7001, "mqtt_port": 1883},
        {"id": 2, "host": "10.0.0.2", "port": 7001, "mqtt_host": "mqtt2.example", "mqtt_port": 8883},
        {"id": 3, "host": "::1", "port": 7001, "mqtt_port": 1884},
        {"id": 4, "host": "10.0.0.4", "port": 7001},
    ]})
    assert s.client_address(1) == "10.0.0.1:1883"
    assert s.client_address(2) == "mqtt2.example:8883"
    assert s.client_address(3) == "[::1]:1884"
    assert s.client_address(4) is None
    assert refusal_for(s, 2) == (RC_USE_ANOTHER_SERVER, {"server_reference": "mqtt2.example:8883"})
    assert refusal_for(s, 4) == (RC_USE_ANOTHER_SERVER, None)  # leader known, address not
    assert refusal_for(s, 0) == (RC_SERVER_UNAVAILABLE, None)  # no leader: no majority


@pytest.mark.parametrize("peer", [
    {"id": 2, "host": "h", "port": 1, "mqtt_host": "m"},  # mqtt_host without mqtt_port
    {"id": 2, "host": "h", "port": 1, "mqtt_port": 0},
    {"id": 2, "host": "h", "port": 1, "mqtt_port": "1883"},
    {"id": 2, "host": "h", "port": 1, "client_port": 1883},
])
def test_bad_peer_client_address_is_refused(peer: dict) -> None:
    with pytest.raises(ClusterConfigError):
        cluster_from_mapping({**BASE, "peers": [peer]})


def _serve(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    conf = tmp_path / "raftmq.toml"
    conf.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "raftmq", "serve", "-c", str(conf), "--data-dir", str(tmp_path / "d"),
         "-p", "0"],
        capture_output=True, text=True, timeout=30, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )


def test_serve_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    r = _serve(tmp_path, 'mode = "ha"\n')  # no [cluster]: nothing to be highly available with
    assert r.returncode == 2 and "needs a [cluster] table" in r.stderr, r.stderr
    r = _serve(tmp_path, 'mode = "ha"\ndurability = "none"\n[cluster]\nnode_id = 1\nlisten = "127.0.0.1:1"\n'
               'secret_file = "/nonexistent"\npeers = [{ id = 2, host = "127.0.0.1", port = 2 }]\n')
    assert r.returncode == 2 and "durability" in r.stderr, r.stderr
    r = _serve(tmp_path, 'mode = "dynsec-sync"\n')  # no [cluster]: nothing to sync with
    assert r.returncode == 2 and "needs a [cluster] table" in r.stderr, r.stderr
