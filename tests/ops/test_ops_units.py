"""WorkerMetrics, RaftMetrics and OpsServer in-process (no broker process):
deltas, gauges, role changes and the health answers on a follower."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from raftmq.broker.sys_topics import Stats
from raftmq.config import ConfigError, config_from_mapping
from raftmq.ops.http import OpsServer, node_role
from raftmq.ops.metrics import RaftMetrics, WorkerMetrics
from raftmq.raft.types import Role


def fake_broker() -> SimpleNamespace:
    return SimpleNamespace(
        stats=Stats(), connected_count=0, sessions={},
        router=SimpleNamespace(subscription_count=0), retained=SimpleNamespace(count=0),
    )


def test_worker_metrics_add_deltas_of_the_plain_counters() -> None:
    reg = CollectorRegistry()
    broker = fake_broker()
    broker.stats.publish_received = 7  # counted before the metrics existed: reported too
    m = WorkerMetrics(broker, 3, registry=reg)
    w = {"worker": "3"}
    assert reg.get_sample_value("raftmq_publish_messages_received_total", w) == 0
    m.update()
    assert reg.get_sample_value("raftmq_publish_messages_received_total", w) == 7
    broker.stats.publish_received += 5
    broker.stats.bytes_sent += 1000
    broker.stats.clients_maximum = 4
    broker.connected_count = 2
    broker.sessions = {"a": SimpleNamespace(inflight={1: 0, 2: 0}, queue=[0]),
                       "b": SimpleNamespace(inflight={}, queue=())}
    broker.router.subscription_count = 9
    broker.retained.count = 11
    m.update()
    m.update()  # nothing new: counters stay
    assert reg.get_sample_value("raftmq_publish_messages_received_total", w) == 12
    assert reg.get_sample_value("raftmq_sent_bytes_total", w) == 1000
    assert reg.get_sample_value("raftmq_clients_maximum", w) == 4
    assert reg.get_sample_value("raftmq_clients_connected", w) == 2
    assert reg.get_sample_value("raftmq_sessions", w) == 2
    assert reg.get_sample_value("raftmq_subscriptions", w) == 9
    assert reg.get_sample_value("raftmq_retained_messages", w) == 11
    assert reg.get_sample_value("raftmq_inflight_messages", w) == 2
    assert reg.get_sample_value("raftmq_queued_messages", w) == 1


def test_raft_metrics_from_plain_values() -> None:
    reg = CollectorRegistry()
    m = RaftMetrics(registry=reg)
    m.update(term=2, commit_index=10, applied_index=9, role=Role.FOLLOWER, proposals_total=0,
             last_index=12, leader_id=2, fsync_seconds=[0.002, 0.003])
    assert reg.get_sample_value("raftmq_raft_term") == 2
    assert reg.get_sample_value("raftmq_raft_commit_index") == 10
    assert reg.get_sample_value("raftmq_raft_applied_index") == 9
    assert reg.get_sample_value("raftmq_raft_last_index") == 12
    assert reg.get_sample_value("raftmq_raft_leader_id") == 2
    assert reg.get_sample_value("raftmq_raft_is_leader") == 0
    assert reg.get_sample_value("raftmq_raft_role", {"role": "follower"}) == 1
    assert reg.get_sample_value("raftmq_raft_fsync_duration_seconds_count") == 2
    assert reg.get_sample_value("raftmq_raft_fsync_duration_seconds_bucket", {"le": "0.0025"}) == 1
    m.update(3, 20, 20, "leader", proposals_total=15, leader_id=1)
    m.update(3, 25, 25, "leader", proposals_total=18, leader_id=1)
    assert reg.get_sample_value("raftmq_raft_proposals_total") == 18
    assert reg.get_sample_value("raftmq_raft_is_leader") == 1
    assert reg.get_sample_value("raftmq_raft_role", {"role": "leader"}) == 1
    assert reg.get_sample_value("raftmq_raft_role", {"role": "follower"}) == 0
    m.observe_fsync(0.5)
    assert reg.get_sample_value("raftmq_raft_fsync_duration_seconds_count") == 3


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_health_leader_follows_role_and_health(tmp_path: Path) -> None:
    state = {"up": True, "role": "follower"}
    ops = OpsServer("127.0.0.1", 0, str(tmp_path), lambda: state["up"], lambda: state["role"])
    ops.start()
    try:
        assert _status(ops.port, "/health") == 200
        assert _status(ops.port, "/health/leader") == 503  # a follower
        state["role"] = "leader"
        assert _status(ops.port, "/health/leader") == 200
        state["up"] = False  # a worker is down: neither answers 200
        assert _status(ops.port, "/health") == 503
        assert _status(ops.port, "/health/leader") == 503
        assert _status(ops.port, "/metrics") == 200  # an empty directory is no error
        ops.child_died(None, "raftmq-worker-2")
        ops.child_died(None, "raftmq-worker-2")
        body = ops.metrics(None)[0].decode()
        assert "raftmq_node_up 0.0" in body
        assert 'raftmq_child_restarts_total{child="raftmq-worker-2"} 2.0' in body
    finally:
        ops.stop()


def test_node_role_is_leader_in_standalone() -> None:
    assert node_role(config_from_mapping({}))() == "leader"


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9883", ("127.0.0.1", 9883)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9883", ("::1", 9883)),
    ("off", None),
    ("", None),
])
def test_http_listener_values(text: str, expected: tuple[str, int] | None) -> None:
    assert config_from_mapping({"http_listener": text}).http_listener == expected


def test_http_listener_default_is_off() -> None:
    assert config_from_mapping({}).http_listener is None


@pytest.mark.parametrize("bad", ["9883", "host:", "host:-1", "host:65536", 9883, True])
def test_bad_http_listener_names_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match="'http_listener'"):
        config_from_mapping({"http_listener": bad}, "x.toml")
