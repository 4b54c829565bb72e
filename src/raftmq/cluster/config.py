"""The ``[cluster]`` table of raftmq.toml: this node's Raft identity and peers.

::

    [cluster]
    node_id = 1                       # this node's id (> 0), unique in the cluster
    listen = "10.0.0.1:7000"          # raft peer address (host:port) this node listens on
    secret_file = "/etc/raftmq/cluster.secret"   # shared secret, mode 0600
    peers = [                         # every member (this node included) at bootstrap,
      { id = 1, host = "10.0.0.1", port = 7000, mqtt_port = 1883 },  # or the existing
      { id = 2, host = "10.0.0.2", port = 7000, mqtt_port = 1883 },  # members when joining
      { id = 3, host = "10.0.0.3", port = 7000, mqtt_port = 1883 },
    ]
    join = false                      # true: start empty and wait to be added (`raftmq cluster add`)
    tick_ms = 10                      # one Raft tick
    election_ticks = 20               # election timeout in ticks (randomized up to 2x by the core)
    heartbeat_ticks = 2
    snapshot_entries = 50000          # compact the log every N applied entries

``mqtt_host`` / ``mqtt_port`` (optional, ``mqtt_host`` defaults to ``host``): the
member's client listener.  In ``mode = "ha"`` a follower refuses clients with
MQTT 5 CONNACK 0x9C *Use another server* and a *Server Reference* naming the
leader's ``mqtt_host:mqtt_port`` (cluster/ha.py); a leader without them is
referred to without a Server Reference.

No ``[cluster]`` table (standalone): node 1, a one-member group, no peer
listener, no secret needed -- the same code path as a cluster.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ClusterConfigError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Peer:
    id: int
    host: str
    port: int
    mqtt_host: str | None = None  # the member's client listener (ha: Server Reference)
    mqtt_port: int | None = None


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    node_id: int = 1
    listen: tuple[str, int] | None = None
    secret_file: str | None = None
    peers: tuple[Peer, ...] = ()
    join: bool = False
    tick_ms: int = 10
    election_ticks: int = 20
    heartbeat_ticks: int = 2
    snapshot_entries: int = 50_000

    @property
    def standalone(self) -> bool:
        return self.listen is None and not self.peers

    def client_address(self, node_id: int) -> str | None:
        """``host:port`` of member ``node_id``'s client listener, if configured."""
        for p in self.peers:
            if p.id == node_id and p.mqtt_port is not None:
                host = p.mqtt_host or p.host
                return f"[{host}]:{p.mqtt_port}" if ":" in host else f"{host}:{p.mqtt_port}"
        return None

    def initial_voters(self) -> tuple[int, ...]:
        """Members of a new cluster: the peers list (with this node), or just this node."""
        if self.join:
            return ()
        ids = {p.id for p in self.peers} | {self.node_id}
        return tuple(sorted(ids))


def _int(table: Mapping[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    v = table.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ClusterConfigError(f"{where}: invalid value for 'cluster.{key}': expected an integer in {lo}..{hi}, got {v!r}")
    return v


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ClusterConfigError(f"invalid {what} {value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


_PEER_KEYS = {"id", "host", "port", "mqtt_host", "mqtt_port"}
_KEYS = {
    "node_id", "listen", "secret_file", "peers", "join", "tick_ms", "election_ticks",
    "heartbeat_ticks", "snapshot_entries",
}


def cluster_from_mapping(table: Mapping[str, Any] | None, where: str = "<config>") -> ClusterSettings:
    if not table:
        return ClusterSettings()
    unknown = set(table) - _KEYS
    if unknown:
        raise ClusterConfigError(f"{where}: unknown key 'cluster.{sorted(unknown)[0]}'")
    node_id = _int(table, "node_id", 1, 1, 2**63 - 1, where)
    listen = None
    if "listen" in table:
        if not isinstance(table["listen"], str):
            raise ClusterConfigError(f"{where}: 'cluster.listen' must be \"HOST:PORT\"")
        listen = parse_hostport(table["listen"], "cluster.listen")
    secret_file = table.get("secret_file")
    if secret_file is not None and (not isinstance(secret_file, str) or not secret_file):
        raise ClusterConfigError(f"{where}: 'cluster.secret_file' must be a path")
    peers = []
    raw_peers = table.get("peers", [])
    if not isinstance(raw_peers, list):
        raise ClusterConfigError(f"{where}: 'cluster.peers' must be a list of {{id, host, port}}")
    for p in raw_peers:
        if not isinstance(p, dict) or not {"id", "host", "port"} <= set(p) <= _PEER_KEYS:
            raise ClusterConfigError(f"{where}: each of 'cluster.peers' must be {{id, host, port}}"
                                     f" (optionally mqtt_host, mqtt_port), got {p!r}")
        mqtt_host = p.get("mqtt_host")
        if mqtt_host is not None and (not isinstance(mqtt_host, str) or not mqtt_host):
            raise ClusterConfigError(f"{where}: 'cluster.peers.mqtt_host' must be a host name or address")
        mqtt_port = _int(p, "mqtt_port", 0, 1, 65535, where) if "mqtt_port" in p else None
        if mqtt_host is not None and mqtt_port is None:
            raise ClusterConfigError(f"{where}: 'cluster.peers.mqtt_host' needs 'mqtt_port'")
        peers.append(Peer(_int(p, "id", 0, 1, 2**63 - 1, where), str(p["host"]), _int(p, "port", 0, 1, 65535, where),
                          mqtt_host, mqtt_port))
    if len({p.id for p in peers}) != len(peers):
        raise ClusterConfigError(f"{where}: duplicate id in 'cluster.peers'")
    join = table.get("join", False)
    if not isinstance(join, bool):
        raise ClusterConfigError(f"{where}: 'cluster.join' must be true or false")
    others = [p for p in peers if p.id != node_id]
    if others or join:
        if listen is None:
            raise ClusterConfigError(f"{where}: a cluster member needs 'cluster.listen'")
        if secret_file is None:
            raise ClusterConfigError(f"{where}: a cluster member needs 'cluster.secret_file'")
    heartbeat = _int(table, "heartbeat_ticks", 2, 1, 1000, where)
    election = _int(table, "election_ticks", 20, 2, 100000, where)
    if election <= heartbeat:
        raise ClusterConfigError(f"{where}: 'cluster.election_ticks' must exceed 'cluster.heartbeat_ticks'")
    return ClusterSettings(
        node_id=node_id,
        listen=listen,
        secret_file=secret_file,
        peers=tuple(peers),
        join=join,
        tick_ms=_int(table, "tick_ms", 10, 1, 10000, where),
        election_ticks=election,
        heartbeat_ticks=heartbeat,
        snapshot_entries=_int(table, "snapshot_entries", 50_000, 10, 2**40, where),
    )


def load_cluster_settings(path: str | None) -> ClusterSettings:
    """The ``[cluster]`` table of the TOML file at ``path`` (defaults if none)."""
    if path is None or path.startswith("<"):
        return ClusterSettings()
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return cluster_from_mapping(data.get("cluster"), path)
