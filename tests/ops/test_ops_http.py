"""The node's HTTP endpoint against a real raftmq: /metrics scraped while paho
clients publish, /health and /health/leader, the metrics directory, and the
``http_listener`` key (off by default, checked at start)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.brokers import HOST, BrokerProcess, free_port
from support.helpers import Paho, unique, wait_for

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one request; 4xx/5xx are answers, not errors."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def scrape(port: int) -> Sample:
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200, body
    assert ctype.startswith("text/plain"), ctype
    out: Sample = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Sample, name: str, **labels: str) -> float | None:
    """The sample of ``name`` with exactly these labels (None if absent)."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Sample, name: str) -> float | None:
    """``name`` summed over its series (the workers of the node); None if absent."""
    values = [v for (n, _labels), v in samples.items() if n == name]
    return sum(values) if values else None


def peak(samples: Sample, name: str) -> float | None:
    """The largest series of ``name`` (retained messages: every worker holds them all)."""
    values = [v for (n, _labels), v in samples.items() if n == name]
    return max(values) if values else None


@pytest.fixture
def node(raftmq_factory: Callable[..., BrokerProcess]) -> Iterator[tuple[BrokerProcess, int]]:
    """A one-worker raftmq with its HTTP endpoint on a free loopback port and no
    $SYS (its retained topics and messages would blur the exact counts)."""
    port = free_port()
    broker = raftmq_factory(http_listener=f"{HOST}:{port}", sys_interval=0, workers=1)
    yield broker, port


def wait_metric(port: int, name: str, expected: float, timeout: float = 5.0,
                of: Callable[[Sample, str], float | None] = total) -> Sample:
    """Scrape until ``of(samples, name)`` (the sum over workers by default) is
    ``expected`` (workers copy their stats every 0.5 s)."""
    last: list[Sample] = [{}]

    def ok() -> bool:
        last[0] = scrape(port)
        return of(last[0], name) == expected

    wait_for(ok, timeout, interval=0.1)
    assert of(last[0], name) == expected, (name, of(last[0], name))
    return last[0]


def test_metrics_count_publishes_bytes_and_clients(node: tuple[BrokerProcess, int]) -> None:
    broker, port = node
    topic = unique("ops/")
    payload = b"x" * 50
    n = 40
    # A QoS 0 PUBLISH of 3.1.1 with a short topic: fixed header (2) + topic length (2) + topic + payload.
    size = 2 + 2 + len(topic) + len(payload)
    with Paho(broker) as sub, Paho(broker) as pub:
        sub.subscribe(topic, 0)
        before = wait_metric(port, "raftmq_subscriptions", 1)
        assert total(before, "raftmq_clients_connected") == 2
        assert total(before, "raftmq_sessions") == 2
        # + 1: BrokerProcess.start's probe that the port listens.
        assert total(before, "raftmq_connections_total") == 3
        for _ in range(n):
            pub.publish(topic, payload, 0)
        for _ in range(n):
            assert sub.get().payload == payload
        after = wait_metric(port, "raftmq_publish_messages_sent_total", n)

        def delta(name: str) -> float:
            return (total(after, name) or 0.0) - (total(before, name) or 0.0)

        assert total(after, "raftmq_publish_messages_received_total") == n
        assert delta("raftmq_received_bytes_total") == n * size
        assert delta("raftmq_sent_bytes_total") == n * size
        assert delta("raftmq_packets_received_total") == n
        assert delta("raftmq_packets_sent_total") == n
        assert total(after, "raftmq_publish_messages_dropped_total") == 0
        assert total(after, "raftmq_clients_maximum") == 2
    wait_metric(port, "raftmq_clients_connected", 0)


def test_metrics_retained_queued_and_dropped(raftmq_factory: Callable[..., BrokerProcess]) -> None:
    port = free_port()
    broker = raftmq_factory(http_listener=f"{HOST}:{port}", sys_interval=0, max_queued_messages=2,
                            workers=1)
    base = unique("ops/")
    with Paho(broker) as pub:
        for i in range(3):
            pub.publish(f"{base}/retained/{i}", b"r", 1, retain=True)
        wait_metric(port, "raftmq_retained_messages", 3, of=peak)
        # An offline persistent subscriber can queue 2 messages; 3 of 5 are dropped.
        sub = Paho(broker, unique("persist"), clean=False)
        sub.subscribe(f"{base}/q", 1)
        sub.close()
        wait_metric(port, "raftmq_clients_connected", 1)
        for _ in range(5):
            pub.publish(f"{base}/q", b"q", 1)
        samples = wait_metric(port, "raftmq_publish_messages_dropped_total", 3)
        assert total(samples, "raftmq_queued_messages") == 2
        assert total(samples, "raftmq_inflight_messages") == 0
        assert total(samples, "raftmq_sessions") == 2  # the offline one is kept


def test_metric_families_have_types_help_and_worker_label(node: tuple[BrokerProcess, int]) -> None:
    _broker, port = node
    _status, _ctype, body = http_get(port, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    counters = ["raftmq_publish_messages_received", "raftmq_publish_messages_sent",
                "raftmq_publish_messages_dropped", "raftmq_received_bytes", "raftmq_sent_bytes",
                "raftmq_packets_received", "raftmq_packets_sent", "raftmq_connections",
                "raftmq_clients_expired"]
    gauges = ["raftmq_clients_connected", "raftmq_clients_maximum", "raftmq_sessions",
              "raftmq_subscriptions", "raftmq_retained_messages", "raftmq_inflight_messages",
              "raftmq_queued_messages"]
    for name in counters + gauges:
        assert name in families, (name, sorted(families))
        family = families[name]
        assert family.type == ("counter" if name in counters else "gauge"), name
        assert family.documentation, name
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) == {"worker"}, sample
            assert sample.labels["worker"].isdigit(), sample
    assert re.search(r'\nraftmq_publish_messages_received_total\{worker="\d+"\} ', body)


def test_health_and_leader_in_standalone(node: tuple[BrokerProcess, int]) -> None:
    _broker, port = node
    status, ctype, body = http_get(port, "/health")
    assert (status, ctype) == (200, "application/json")
    assert '"status":"ok"' in body
    status, _ctype, body = http_get(port, "/health/leader")
    assert status == 200
    assert '"role":"leader"' in body
    samples = scrape(port)
    assert total(samples, "raftmq_node_up") == 1
    # Every child from 0: increase() then counts the first restart too.
    counts = restarts(samples)
    assert counts["raftmq-raft"] == 0
    assert [v for k, v in counts.items() if k.startswith("raftmq-worker-")] == [0]
    assert http_get(port, "/health", method="HEAD")[0] == 200
    assert http_get(port, "/nothing-here")[0] == 404


def test_metrics_dir_is_fresh_and_written(tmp_path: Path) -> None:
    """<data_dir>/metrics is emptied at start (an old run's files would add to the
    new totals) and the worker writes its files there."""
    port = free_port()
    broker = BrokerProcess("raftmq", tmp_path / "node", {"http_listener": f"{HOST}:{port}"})
    metrics_dir = tmp_path / "node" / "data" / "metrics"
    metrics_dir.mkdir(parents=True)
    stale = metrics_dir / "counter_999999999.db"
    stale.write_bytes(b"\0" * 16)
    try:
        broker.start()
        assert wait_for(lambda: any(metrics_dir.glob("counter_*.db")), 5.0)
        assert not stale.exists()
        assert any(metrics_dir.glob("gauge_livesum_*.db"))
        status, _ctype, body = http_get(port, "/metrics")
        assert status == 200 and "raftmq_clients_connected" in body
    finally:
        broker.stop()


def test_http_listener_is_off_by_default(raftmq: BrokerProcess) -> None:
    with Paho(raftmq) as c:
        c.publish(unique("ops/"), b"x", 1)
    time.sleep(0.7)  # an upkeep tick: a worker with metrics on would have written files
    assert not (raftmq.workdir / "data" / "metrics").exists()
    assert raftmq.alive()


def test_stray_multiproc_env_is_ignored_when_off(
        raftmq_factory: Callable[..., BrokerProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With http_listener off, a PROMETHEUS_MULTIPROC_DIR inherited from the shell
    must not reach the workers (they would write, or fail on, a directory nobody
    reads)."""
    stray = tmp_path / "not-there"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(stray))
    broker = raftmq_factory()
    with Paho(broker) as c:
        c.publish(unique("ops/"), b"x", 1)
    time.sleep(0.7)  # an upkeep tick
    assert broker.alive()
    assert not stray.exists()
    assert "exited with" not in broker.log_tail(200)


def restarts(samples: Sample) -> dict[str, float]:
    """raftmq_child_restarts_total by child name."""
    return {dict(labels)["child"]: v for (name, labels), v in samples.items()
            if name == "raftmq_child_restarts_total"}


def _worker_pids(metrics_dir: Path) -> set[int]:
    """Processes whose counter file holds broker counters (the raft process's does not)."""
    return {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")
            if b"raftmq_publish_messages_received" in p.read_bytes()}


def test_worker_crash_drops_its_gauges_and_keeps_counting(node: tuple[BrokerProcess, int]) -> None:
    """kill -9 of the worker: the supervisor marks it dead (its live gauges go),
    the restarted worker reports again, and the counters never go back."""
    broker, port = node
    metrics_dir = broker.workdir / "data" / "metrics"
    topic = unique("ops/")
    with Paho(broker) as pub:
        for _ in range(5):
            pub.publish(topic, b"m", 0)
        wait_metric(port, "raftmq_publish_messages_received_total", 5)
    (old,) = _worker_pids(metrics_dir)
    assert (metrics_dir / f"gauge_livesum_{old}.db").exists()
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: not (metrics_dir / f"gauge_livesum_{old}.db").exists(), 10.0)
    assert wait_for(lambda: len(_worker_pids(metrics_dir)) == 2, 15.0)
    (new,) = _worker_pids(metrics_dir) - {old}
    assert (metrics_dir / f"gauge_livesum_{new}.db").exists()
    assert wait_for(lambda: http_get(port, "/health")[0] == 200, 10.0)

    def publish_one() -> bool:
        try:
            with Paho(broker) as pub:
                pub.publish(topic, b"m", 0)
            return True
        except Exception:
            return False

    assert wait_for(publish_one, 10.0, interval=0.2)
    # 5 counted by the dead worker (its counter file stays) + 1 by the new one.
    samples = wait_metric(port, "raftmq_publish_messages_received_total", 6)
    assert total(samples, "raftmq_clients_connected") == 0
    counts = restarts(samples)
    assert counts["raftmq-raft"] == 0
    assert [v for k, v in counts.items() if k.startswith("raftmq-worker-")] == [1]
    assert total(samples, "raftmq_node_up") == 1


@pytest.mark.parametrize("bad", ["localhost", "127.0.0.1:http", "127.0.0.1:70000", ":9883", "1"])
def test_bad_http_listener_stops_the_start(raftmq_factory: Callable[..., BrokerProcess], bad: str) -> None:
    with pytest.raises(RuntimeError) as err:
        raftmq_factory(http_listener=bad)
    assert "http_listener" in str(err.value), str(err.value)


def test_http_listener_in_use_stops_the_start(raftmq_factory: Callable[..., BrokerProcess]) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as err:
            raftmq_factory(http_listener=f"{HOST}:{port}")
    message = str(err.value)
    assert "http_listener" in message and str(port) in message, message


def test_raft_metrics_of_a_standalone_node(node: tuple[BrokerProcess, int]) -> None:
    broker, port = node
    with Paho(broker) as pub:
        pub.publish(unique("ops/"), b"durable", 1, retain=True)  # one proposal, one commit
    samples = wait_metric(port, "raftmq_raft_is_leader", 1)
    assert value(samples, "raftmq_raft_role", role="leader") == 1
    assert value(samples, "raftmq_raft_role", role="follower") == 0
    assert (total(samples, "raftmq_raft_term") or 0) >= 1
    commit = total(samples, "raftmq_raft_commit_index") or 0
    assert commit >= 2  # the leader's empty entry + the retained message
    assert total(samples, "raftmq_raft_applied_index") == commit
    assert (total(samples, "raftmq_raft_proposals_total") or 0) >= 1
    assert (total(samples, "raftmq_raft_fsync_duration_seconds_count") or 0) >= 1


def test_workers_each_report_under_their_label(raftmq_factory: Callable[..., BrokerProcess]) -> None:
    """Two workers: two `worker` series per metric, and the sums are the node's."""
    pytest.importorskip("raftmq.workers", reason="this branch serves one worker per node")
    port = free_port()
    broker = raftmq_factory(http_listener=f"{HOST}:{port}", sys_interval=0, workers=2)
    topic = unique("ops/")
    clients = [Paho(broker) for _ in range(6)]
    try:
        clients[0].subscribe(topic, 0)
        for _ in range(10):
            clients[1].publish(topic, b"w", 0)
        for _ in range(10):
            clients[0].get()
        samples = wait_metric(port, "raftmq_publish_messages_sent_total", 10)
        assert total(samples, "raftmq_publish_messages_received_total") == 10
        assert total(samples, "raftmq_clients_connected") == 6
        assert total(samples, "raftmq_subscriptions") == 1
        workers = {dict(labels)["worker"] for (name, labels) in samples
                   if name == "raftmq_clients_connected"}
        assert workers == {"0", "1"}
        assert len(restarts(samples)) == 3  # raft process + 2 workers
    finally:
        for c in clients:
            c.close()
