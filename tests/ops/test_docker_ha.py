"""docker/docker-compose.ha.yml and docker/ha/: checked without a Docker engine.

No Docker daemon runs here, so the compose file itself is never started.  What
is checked for real: the three node configs load with raftmq's own loader and
agree; three real ``raftmq serve`` nodes run from those very files (only the
addresses, ports, data dirs and secret path rewritten for loopback) and elect
one serving leader; the real HAProxy (if installed) accepts docker/ha/haproxy.cfg
and, run from it with only addresses rewritten, sends a client to the leader and
to the new leader after kill -9; the secret-init script writes a secret raftmq
accepts; the compose YAML parses and every file it mounts exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from raftmq.config import load_config
from raftmq.raft.transport import read_secret_file
from support.helpers import unique
from support.mqttraw import PUBACK, PUBLISH, Closed, Packet, RawClient

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
HA = DOCKER / "ha"
NODES = (1, 2, 3)
COMPOSE = DOCKER / "docker-compose.ha.yml"
SECRET_DIR = "/run/raftmq-secret"

sys.path.insert(0, str(REPO / "tests" / "ha"))
from ha_harness import HOST, HaCluster, free_port, wait_for  # noqa: E402

USE_ANOTHER_SERVER = 0x9C


def node_file(i: int) -> Path:
    return HA / f"node{i}.toml"


# -- the node configs ----------------------------------------------------------------


def test_node_configs_load_and_agree() -> None:
    configs = {i: load_config(str(node_file(i))) for i in NODES}
    peers = configs[1].cluster.peers
    assert [p.id for p in peers] == list(NODES)
    for i, c in configs.items():
        assert (c.mode, c.durability, c.data_dir) == ("ha", "sync", "/var/lib/raftmq")
        cl = c.cluster
        assert cl.node_id == i
        assert cl.peers == peers, f"node{i}.toml: peers differ from node1.toml"
        assert cl.secret_file == f"{SECRET_DIR}/cluster.secret"
        assert cl.initial_voters() == NODES
        own = next(p for p in peers if p.id == i)
        # The peers reach this node's Raft listener by its compose service name,
        # and it listens (and tells its peers it listens) on that name: a
        # wildcard would be advertised as 0.0.0.0, where each peer finds itself.
        assert (own.host, own.port) == (f"raftmq{i}", 7000) and cl.listen == (own.host, own.port)
        assert c.http_listener == ("0.0.0.0", 9883)  # HAProxy's check port, Prometheus' target
        assert [(lst.host, lst.port) for lst in c.listeners] == [("0.0.0.0", 1883)]
        # Clients reach only HAProxy: every Server Reference names its published address.
        assert cl.client_address(own.id) == "localhost:1883"
    # Only node_id and listen differ between the files: everything else in one place.
    raw = {i: tomllib.loads(node_file(i).read_text()) for i in NODES}
    for i in NODES:
        assert raw[i]["cluster"].pop("node_id") == i
        assert raw[i]["cluster"].pop("listen") == f"raftmq{i}:7000"
    assert raw[1] == raw[2] == raw[3]


# -- the secret ----------------------------------------------------------------------


def run_secret_init(directory: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, str(HA / "secret-init.py"), str(directory), *args],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


def test_secret_init_writes_a_secret_raftmq_accepts(tmp_path: Path) -> None:
    d = tmp_path / "secret"
    path = d / "cluster.secret"
    run_secret_init(d)
    st = path.stat()
    assert st.st_mode & 0o777 == 0o600 and d.stat().st_mode & 0o777 == 0o700
    # As root (the compose service) the file belongs to the image's raftmq user.
    assert st.st_uid == (1883 if os.geteuid() == 0 else os.geteuid())
    first = read_secret_file(str(path))
    assert len(first) >= 32
    # A second `up` keeps it (and repairs a mode that drifted) ...
    os.chmod(path, 0o644)
    assert "keeping" in run_secret_init(d)
    assert read_secret_file(str(path)) == first
    # ... and --rotate replaces it.
    run_secret_init(d, "--rotate")
    assert read_secret_file(str(path)) != first
    assert not (d / "cluster.secret.new").exists()


# -- the compose file ----------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: the compose YAML is not parsed")
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_parses_and_mounts_exist() -> None:
    compose = load_compose()
    services = compose["services"]
    assert {"secret-init", "raftmq1", "raftmq2", "raftmq3", "haproxy", "prometheus", "grafana"} <= set(services)
    declared = set(compose["volumes"])
    data_volumes = set()
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                assert (DOCKER / source).resolve().exists(), f"{name} mounts {source}, missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
    for i in NODES:
        svc = services[f"raftmq{i}"]
        mounts = {m.split(":")[1]: m for m in svc["volumes"]}
        assert mounts["/etc/raftmq/raftmq.toml"] == f"./ha/node{i}.toml:/etc/raftmq/raftmq.toml:ro"
        data_volumes.add(mounts["/var/lib/raftmq"].split(":")[0])
        assert mounts[SECRET_DIR] == f"cluster-secret:{SECRET_DIR}:ro"
        assert svc["depends_on"]["secret-init"]["condition"] == "service_completed_successfully"
        assert "ports" not in svc  # clients go through HAProxy
    assert len(data_volumes) == 3  # each node its own volume
    init = services["secret-init"]
    assert init["user"].startswith("0") and f"cluster-secret:{SECRET_DIR}" in init["volumes"]
    assert "1883:1883" in services["haproxy"]["ports"]


def test_prometheus_scrapes_all_three_nodes(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    prom = yaml.safe_load((HA / "prometheus.yml").read_text())
    targets = [t for sc in prom["scrape_configs"] for g in sc["static_configs"] for t in g["targets"]]
    assert targets == [f"raftmq{i}:9883" for i in NODES]
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed: the Prometheus config was only parsed")
    # promtool checks the rule file too: point it at the repo's alerts.yml.
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text((HA / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml",
                                                                  str(DOCKER / "alerts.yml")))
    out = subprocess.run(["promtool", "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- HAProxy -------------------------------------------------------------------------


def test_haproxy_config_routes_to_the_leader_check() -> None:
    text = (HA / "haproxy.cfg").read_text()
    assert re.search(r"^\s*mode tcp$", text, re.M)
    assert "http-check send meth GET uri /health/leader" in text
    assert "http-check expect status 200" in text
    assert re.search(r"default-server check port 9883 ", text)
    assert re.findall(r"^\s*server (\S+) (\S+)$", text, re.M) == [(f"raftmq{i}", f"raftmq{i}:1883") for i in NODES]
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed: `haproxy -c` not run (it is not a CI dependency)")
    out = subprocess.run(["haproxy", "-c", "-f", str(HA / "haproxy.cfg")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Configuration file is valid" in out.stdout + out.stderr, out.stdout + out.stderr


# -- three real nodes from the docker configs ----------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for these values
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[\n" + "".join(f"  {toml_value(x)},\n" for x in v) + "]"
    raise TypeError(v)


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for the node configs: scalars, [[listener]], [cluster] with inline peers."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    for k, v in data.items():
        if isinstance(v, list):
            for table in v:
                lines += [f"[[{k}]]", *(f"{a} = {toml_value(b)}" for a, b in table.items())]
        elif isinstance(v, dict):
            lines += [f"[{k}]", *(f"{a} = {toml_value(b)}" for a, b in v.items())]
    return "\n".join(lines) + "\n"


def loopback_config(i: int, cluster: HaCluster, front_port: int) -> str:
    """docker/ha/node{i}.toml with only addresses, ports, the data dir and the
    secret path changed: the service names become 127.0.0.1 and each node's
    ports, and the Server Reference names the local HAProxy instead of
    localhost:1883."""
    data = tomllib.loads(node_file(i).read_text())
    node = cluster.nodes[i]
    data["data_dir"] = str(node.data_dir)
    data["http_listener"] = f"{HOST}:{node.http_port}"
    data["listener"] = [{**lst, "host": HOST, "port": node.mqtt_port} for lst in data["listener"]]
    cl = data["cluster"]
    # The service names become 127.0.0.1; any other listen host (a wildcard) stays,
    # so that the peer addresses check below sees what it would advertise.
    own = next(p for p in cl["peers"] if p["id"] == i)
    listen_host = cl["listen"].rpartition(":")[0]
    cl["listen"] = f"{HOST if listen_host == own['host'] else listen_host}:{node.raft_port}"
    cl["secret_file"] = str(cluster.secret_file)
    cl["peers"] = [{**p, "host": HOST, "port": cluster.nodes[p["id"]].raft_port,
                    "mqtt_host": HOST, "mqtt_port": front_port} for p in cl["peers"]]
    text = dump_toml(data)
    # The rewrite changed nothing but those keys.
    original, rewritten = load_config(str(node_file(i))), tomllib.loads(text)
    for key in ("mode", "durability", "allow_anonymous", "max_inflight_messages", "max_queued_messages"):
        assert rewritten[key] == getattr(original, key), key
    for key in ("node_id", "tick_ms", "election_ticks", "heartbeat_ticks"):
        assert rewritten["cluster"][key] == getattr(original.cluster, key), key
    return text


def loopback_haproxy(cluster: HaCluster, front_port: int, stats_port: int) -> str:
    """docker/ha/haproxy.cfg with only addresses changed: the nodes share 127.0.0.1,
    so each server line gets its own MQTT port and check port."""
    text = (HA / "haproxy.cfg").read_text()
    text = text.replace("bind :1883", f"bind {HOST}:{front_port}").replace("bind :8404", f"bind {HOST}:{stats_port}")
    for i, node in cluster.nodes.items():
        text = text.replace(f"server raftmq{i} raftmq{i}:1883",
                            f"server raftmq{i} {HOST}:{node.mqtt_port} port {node.http_port}")
    return text


@pytest.fixture
def docker_cluster(tmp_path: Path) -> Any:
    front_port = free_port()
    cluster = HaCluster(tmp_path, 3)  # ports, data dirs
    # The secret as the compose file makes it: by the secret-init script.
    run_secret_init(tmp_path / "secret", "--uid", str(os.geteuid()))
    cluster.secret_file = tmp_path / "secret" / "cluster.secret"
    for i, node in cluster.nodes.items():
        node.config_path.write_text(loopback_config(i, cluster, front_port))
    try:
        cluster.start()
        yield cluster, front_port
    finally:
        cluster.close()


def raw_connect(port: int, client_id: str, clean: bool = True) -> tuple[RawClient, Packet]:
    c = RawClient(HOST, port, version=5, timeout=5)
    try:
        return c, c.connect(client_id, clean=clean, props={"session_expiry_interval": 300})
    except BaseException:
        c.close()
        raise


def served(port: int, client_id: str, clean: bool = True) -> tuple[RawClient, Packet] | None:
    """A CONNACK 0 on ``port``, or None (port closed, no server behind HAProxy, refused)."""
    try:
        c, ack = raw_connect(port, client_id, clean)
    except (OSError, Closed, TimeoutError):
        return None
    if ack.reason != 0:
        c.close()
        return None
    return c, ack


def test_three_nodes_from_the_docker_configs_elect_one_serving_leader(docker_cluster: Any) -> None:
    cluster, front_port = docker_cluster
    leader = cluster.stable_leader()
    assert [n.health_leader() for n in cluster.nodes.values()].count(200) == 1
    # Every node dials its peers where the configs say (what a peer advertises
    # when it dials replaces the configured address, and is kept in peers.json).
    for n in cluster.nodes.values():
        expect = {str(o.id): f"{HOST}:{o.raft_port}" for o in cluster.others(n)}
        wait_for(lambda n=n, expect=expect: n.status()["peers"] == expect, 10, f"node {n.id}'s peer addresses")
    for other in cluster.others(leader):
        assert other.health_leader() == 503
        # A follower reached directly refers the client to the front (HAProxy) address.
        c, ack = raw_connect(other.mqtt_port, unique("dockerha-"))
        assert (ack.reason, ack.props.get("server_reference")) == (USE_ANOTHER_SERVER, f"{HOST}:{front_port}")
        c.close()
    c, ack = raw_connect(leader.mqtt_port, unique("dockerha-"))
    assert ack.reason == 0
    c.close()


def test_haproxy_from_the_docker_config_follows_the_leader(docker_cluster: Any, tmp_path: Path) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed: the real HAProxy in front of the nodes is not run")
    cluster, front_port = docker_cluster
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(loopback_haproxy(cluster, front_port, free_port()))
    log = open(tmp_path / "haproxy.log", "wb")
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        leader = cluster.stable_leader()
        # HAProxy starts with every server UP; two failed checks (fall 2) take a
        # follower out (a real setup is past that long before its first client).
        def followers_down() -> bool:
            text = (tmp_path / "haproxy.log").read_text(errors="replace")
            return all(f"raftmq_leader/raftmq{f.id} is DOWN" in text for f in cluster.others(leader))

        wait_for(followers_down, 15, "HAProxy marking the followers DOWN", 0.2)
        # Through HAProxy only: a persistent session subscribes, then goes away.
        sub_id = unique("dockerha-sub-")
        sub, _ = wait_for(lambda: served(front_port, sub_id), 15, "a client served through HAProxy", 0.3)
        assert sub.subscribe(1, [("dockerha/t", 1)]).codes == [1]
        sub.disconnect()
        sub.close()
        # Every connection goes to the leader (a check on /health, 200 on every
        # node, would send two of three to followers, which refuse).
        for _ in range(6):
            c, ack = raw_connect(front_port, unique("dockerha-each-"))
            assert ack.reason == 0, ack
            c.close()
        # A QoS 1 message for it, PUBACKed by the leader behind HAProxy.
        pub, _ = wait_for(lambda: served(front_port, unique("dockerha-pub-")), 15, "a publisher", 0.3)
        pub.publish("dockerha/t", b"before the failover", 1, pid=1)
        assert pub.expect(PUBACK).reason == 0
        pub.close()
        # kill -9 of the leader: HAProxy's next checks find the new leader.
        leader.kill9()
        new = cluster.serving(exclude=(leader.id,))
        sub, ack = wait_for(lambda: served(front_port, sub_id, clean=False), 30,
                            "the client served again through HAProxy", 0.3)
        assert ack.session_present, "the session did not survive the failover"
        msg = sub.expect(PUBLISH)
        assert (msg.topic, msg.payload) == ("dockerha/t", b"before the failover")
        sub.close()
        assert new.health_leader() == 200
        assert b"is UP" in (tmp_path / "haproxy.log").read_bytes()
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait(5)
        log.close()


def test_rotating_the_secret_one_node_at_a_time(docker_cluster: Any, tmp_path: Path) -> None:
    """docker/README.md's rotation: secret-init --rotate, then restart the nodes
    one by one, followers first.  The majority always shares one secret."""
    cluster, _ = docker_cluster
    leader = cluster.stable_leader()
    c, _ = raw_connect(leader.mqtt_port, unique("dockerha-rot-"))
    c.publish("dockerha/retained", b"kept", 1, pid=1, retain=True)
    assert c.expect(PUBACK).reason in (0, 0x10)  # 0x10: no subscribers (it is retained all the same)
    c.close()
    old = read_secret_file(str(cluster.secret_file))
    run_secret_init(tmp_path / "secret", "--uid", str(os.geteuid()), "--rotate")
    assert read_secret_file(str(cluster.secret_file)) != old
    first, second = cluster.others(leader)
    # One node on the new secret: the two on the old one keep serving, and it
    # cannot join them (the peer handshake fails), so it never learns the leader.
    first.terminate()
    first.start()
    first.wait_listening()
    time.sleep(3)  # many election timeouts (0.5-1 s)
    assert first.status()["leader"] != leader.id
    assert leader.health_leader() == 200
    # The second: now the new secret holds the majority; service moves once.
    second.terminate()
    second.start()
    cluster.serving(exclude=(leader.id,), timeout=30)
    # The old leader last: it joins on the new secret.  (Its term grew while it
    # was cut off, so its return may cost one more election: any leader will do.)
    leader.terminate()
    leader.start()
    leader.wait_listening()

    def one_leader() -> bool:
        leaders = {n.status()["leader"] for n in cluster.nodes.values()}
        return len(leaders) == 1 and 0 not in leaders

    wait_for(one_leader, 30, "all three nodes following one leader")
    new = cluster.stable_leader()
    wait_for(lambda: sorted(new.status()["connected"]) == sorted(n.id for n in cluster.others(new)), 30,
             "the leader linked to both others")
    c, ack = wait_for(lambda: served(new.mqtt_port, unique("dockerha-rot-")), 15, "the new leader serving")
    assert c.subscribe(1, [("dockerha/retained", 1)]).codes == [1]
    assert c.expect(PUBLISH).payload == b"kept"
    c.close()
