"""``mode = "ha"``: only the Raft leader serves clients; failover keeps every
acknowledged message (DESIGN.md §1, README "High availability (ha)").

Three real ``raftmq serve`` nodes on loopback with a shared secret file,
real clients (paho-mqtt; the raw client where the test needs exact packets),
real kill -9.
"""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from ha_harness import HOST, HaCluster, HaNode, wait_for

from support.helpers import unique
from support.mqttraw import (
    CONNACK,
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    Closed,
    RawClient,
)

USE_ANOTHER_SERVER = 0x9C
SERVER_UNAVAILABLE = 0x88
EXPIRY = {"session_expiry_interval": 3600}


class Client:
    """A paho-mqtt 2.x client that records its CONNACK, messages and DISCONNECT."""

    def __init__(self, address: str, client_id: str, version: int = 5, clean: bool = True,
                 expiry: int = 0, auth: tuple[str, str] | None = None) -> None:
        host, port = address.rsplit(":", 1)
        protocol = {4: mqtt.MQTTv311, 5: mqtt.MQTTv5}[version]
        kw: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if version != 5:
            kw["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
        self.client.reconnect_delay_set(60, 60)  # the test decides where to reconnect
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.connack: queue.Queue[Any] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put((flags, rc, props))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put((rc, props))
        connect_kw: dict[str, Any] = {}
        if version == 5:
            connect_kw["clean_start"] = clean
            if expiry:
                props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
                props.SessionExpiryInterval = expiry
                connect_kw["properties"] = props
        self.client.connect(host, int(port), keepalive=30, **connect_kw)
        self.client.loop_start()
        flags, self.rc, self.props = self.connack.get(timeout=10)
        self.session_present = flags.session_present
        self.ok = not self.rc.is_failure

    @property
    def server_reference(self) -> str | None:
        return getattr(self.props, "ServerReference", None) if self.props is not None else None

    def subscribe(self, topic: str, qos: int) -> Any:
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published()  # PUBACKed (QoS 1) / PUBCOMPed (QoS 2)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def abandon(self) -> None:
        """Stop a refused (or server-closed) client without waiting for paho's
        reconnect timer: disconnect() first wakes its loop thread."""
        self.client.disconnect()
        self.client.loop_stop()


def follow(cluster: HaCluster, client_id: str, start: HaNode | None = None, timeout: float = 30.0,
           **kw: Any) -> tuple[Client, HaNode, int]:
    """Connect as a client of the cluster does: try a node, follow its Server
    Reference, retry while no leader is known.  (client, node, refusals seen)."""
    deadline = time.monotonic() + timeout
    nodes = [n for n in cluster.nodes.values() if n.running]
    address = (start or nodes[0]).address
    refused = 0
    i = 0
    while time.monotonic() < deadline:
        try:
            c = Client(address, client_id, **kw)
        except (OSError, queue.Empty):
            c = None
        if c is not None and c.ok:
            return c, cluster.by_address(address), refused
        if c is not None:
            c.abandon()
            refused += 1
            if c.rc.value == USE_ANOTHER_SERVER and c.server_reference:
                address = c.server_reference
                continue
        time.sleep(0.1)
        i += 1
        address = nodes[i % len(nodes)].address
        nodes = [n for n in cluster.nodes.values() if n.running]
    raise AssertionError(f"no node served {client_id} within {timeout:.0f} s\n{cluster.logs()}")


def raw_connect(node: HaNode, client_id: str, version: int = 5, clean: bool = True,
                props: dict | None = None) -> tuple[RawClient, Any]:
    c = RawClient(HOST, node.mqtt_port, version, timeout=5)
    return c, c.connect(client_id, clean=clean, props=props)


# A node whose role just changed restarts its workers: its client port is closed
# for that start (README "High availability"), so a client right after the
# change may be refused by TCP and retries, as a real client does.
RESTART_WINDOW = 15.0


def raw_connect_retry(node: HaNode, client_id: str, **kw: Any) -> tuple[RawClient, Any]:
    return wait_for(lambda: raw_connect(node, client_id, **kw), RESTART_WINDOW, f"node {node.id} listening")


def client_retry(address: str, client_id: str, **kw: Any) -> Client:
    return wait_for(lambda: Client(address, client_id, **kw), RESTART_WINDOW, f"{address} listening")


def assert_refused_and_closed(c: RawClient) -> None:
    with pytest.raises(Closed):
        c.recv(timeout=3)
    c.close()


# ---------------------------------------------------------------------------


def test_follower_refuses_and_names_the_leader(ha_cluster: Any) -> None:
    cluster = ha_cluster()
    leader = cluster.serving()
    followers = cluster.others(leader)
    for f in followers:
        assert f.health_leader() == 503
        assert f.running
        # MQTT 5: CONNACK 0x9C Use another server + Server Reference, then close.
        c = Client(f.address, unique("refused5-"))
        assert c.rc.value == USE_ANOTHER_SERVER, c.rc
        assert c.server_reference == leader.address
        assert not c.session_present
        c.abandon()
        raw, ack = raw_connect(f, unique("raw5-"))
        assert (ack.reason, ack.props.get("server_reference")) == (USE_ANOTHER_SERVER, leader.address)
        assert_refused_and_closed(raw)
        # MQTT 3.1.1 and 3.1: return code 3 (server unavailable), then close.
        for version in (4, 3):
            raw, ack = raw_connect(f, unique("r3-")[:20], version=version)
            assert ack.type == CONNACK and ack.reason == 3, ack
            assert_refused_and_closed(raw)
    # The leader serves, and says so on /health/leader.
    assert leader.health_leader() == 200
    c, served_by, _ = follow(cluster, unique("ok-"), start=followers[0])
    assert served_by is leader
    c.subscribe("ha/ping", 1)
    c.publish("ha/ping", b"x", 1)
    assert c.messages.get(timeout=5).payload == b"x"
    c.close()


def test_failover_keeps_acknowledged_messages_and_retained(ha_cluster: Any) -> None:
    cluster = ha_cluster()
    leader = cluster.serving()
    topic = unique("ha/q1/")
    sub_id = unique("sub-")
    sub, _, _ = follow(cluster, sub_id, clean=True, expiry=3600)
    assert sub.subscribe(topic + "/#", 1)[0].value == 1
    sub.close()  # a persistent session, offline: the messages queue for it

    pub, _, _ = follow(cluster, unique("pub-"))
    pub.publish(topic + "/retained", b"kept", 1, retain=True)
    sent = [f"m{i}".encode() for i in range(40)]
    for payload in sent:
        pub.publish(topic + "/data", payload, 1)  # returns once PUBACKed
    pub.client.loop_stop()

    killed_at = time.monotonic()
    leader.kill9()
    new_leader = cluster.serving(exclude=(leader.id,))
    sub, served_by, _ = follow(cluster, sub_id, clean=False, expiry=3600)
    failover = time.monotonic() - killed_at
    assert served_by is new_leader
    assert sub.session_present
    got = []
    while len(got) < len(sent):
        msg = sub.messages.get(timeout=10)
        if msg.topic == topic + "/data":
            got.append(msg.payload)
    assert got == sent  # every PUBACKed message, in order, none twice
    with pytest.raises(queue.Empty):
        extra = sub.messages.get(timeout=0.5)
        assert extra.topic != topic + "/data", extra
    sub.close()

    # The retained message set before the failover is there.
    r, _, _ = follow(cluster, unique("ret-"))
    r.subscribe(topic + "/retained", 1)
    msg = r.messages.get(timeout=5)
    assert (msg.payload, msg.retain) == (b"kept", True)
    r.close()
    print(f"failover: kill -9 of the leader -> subscriber served by the new leader in {failover:.2f} s")


def test_qos2_in_flight_across_failover_completes_exactly_once(ha_cluster: Any) -> None:
    cluster = ha_cluster()
    leader = cluster.serving()
    topic = unique("ha/q2/")
    sub_id, pub_id = unique("s2-"), unique("p2-")

    sub, ack = raw_connect(leader, sub_id, clean=True, props=EXPIRY)
    assert ack.reason == 0
    sub.subscribe(1, [(topic + "/#", 2)])
    pub, ack = raw_connect(leader, pub_id, clean=True, props=EXPIRY)
    assert ack.reason == 0

    # Inbound: A is PUBRECed (receive state committed) but not released.
    pub.publish(topic + "/a", b"A", qos=2, pid=11)
    assert pub.expect(PUBREC).pid == 11
    # Outbound: B is delivered, PUBRECed by the subscriber, PUBREL received, no PUBCOMP.
    pub.publish(topic + "/b", b"B", qos=2, pid=12)
    assert pub.expect(PUBREC).pid == 12
    pub.ack(PUBREL, 12)
    assert pub.expect(PUBCOMP).pid == 12
    delivered: list[bytes] = []
    b_pid = None
    while b_pid is None:
        p = sub.recv(timeout=5)
        assert p.type == PUBLISH and p.qos == 2, p
        delivered.append(p.payload)
        if p.payload == b"A":
            sub.ack(PUBREC, p.pid)
        else:
            b_pid = p.pid
            sub.ack(PUBREC, p.pid)
    # A was delivered to the subscriber at PUBLISH (before its PUBREL), B too.
    got = []
    while len(got) < 2:
        p = sub.recv(timeout=5)
        assert p.type == PUBREL, p
        got.append(p.pid)  # PUBREL for both: their PUBREC state is committed
    time.sleep(0.3)

    leader.kill9()
    new_leader = cluster.serving(exclude=(leader.id,))
    sub.close()
    pub.close()

    # The publisher retransmits A (DUP, as if the PUBREC were lost) and releases it.
    pub, ack = raw_connect(new_leader, pub_id, clean=False, props=EXPIRY)
    assert ack.reason == 0 and ack.session_present
    pub.publish(topic + "/a", b"A", qos=2, pid=11, dup=True)
    assert pub.expect(PUBREC).pid == 11
    pub.ack(PUBREL, 11)
    assert pub.expect(PUBCOMP).pid == 11

    # The subscriber gets PUBRELs for what it had PUBRECed, never a PUBLISH again.
    sub, ack = raw_connect(new_leader, sub_id, clean=False, props=EXPIRY)
    assert ack.reason == 0 and ack.session_present
    released = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            p = sub.recv(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            break
        if p.type == PUBREL:
            released.add(p.pid)
            sub.ack(PUBCOMP, p.pid)
        else:
            assert p.type != PUBLISH, f"delivered twice: {p}"
    assert b_pid in released
    assert sorted(delivered) == [b"A", b"B"]  # exactly once each
    sub.close()
    pub.close()


def test_minority_survivor_closes_its_clients_and_refuses(ha_cluster: Any) -> None:
    cluster = ha_cluster()
    leader = cluster.serving()
    topic = unique("ha/minority/")
    v5 = Client(leader.address, unique("v5-"))
    assert v5.ok
    v3, ack = raw_connect(leader, unique("v3-"), version=4)
    assert ack.reason == 0
    pub, ack = raw_connect(leader, unique("pub-"))
    assert ack.reason == 0

    for f in cluster.others(leader):
        f.kill9()
    # A retained message (a proposal) sent to a leader cut off from its
    # majority: it can never be committed, so it must never be acknowledged.
    pub.publish(topic, b"lost", qos=1, pid=5, retain=True)

    rc, props = v5.disconnects.get(timeout=15)  # check-quorum step-down, then the close
    assert rc.value == USE_ANOTHER_SERVER, rc
    assert getattr(props, "ServerReference", None) is None  # no leader anywhere to name
    v5.abandon()
    with pytest.raises(Closed):
        while True:
            p = v3.recv(timeout=10)  # 3.1.1: closed (no DISCONNECT in 3.1.1)
            assert p.type not in (CONNACK, DISCONNECT), p
    while True:
        try:
            p = pub.recv(timeout=10)
        except Closed:
            break
        assert p.type != PUBACK, f"a minority leader acknowledged {p}"
        if p.type == DISCONNECT:
            assert p.reason == USE_ANOTHER_SERVER
    assert wait_for(lambda: leader.health_leader() == 503, 10, "/health/leader 503")
    # New clients are refused: no leader known (0x88), 3.1.1 return code 3.
    c, ack = raw_connect_retry(leader, unique("late5-"))
    assert ack.reason == SERVER_UNAVAILABLE and "server_reference" not in ack.props, ack
    assert_refused_and_closed(c)
    c, ack = raw_connect_retry(leader, unique("late3-"), version=4)
    assert ack.reason == 3
    assert_refused_and_closed(c)
    assert leader.running


def test_transfer_leader_moves_service(ha_cluster: Any) -> None:
    cluster = ha_cluster()
    leader = cluster.serving()
    target = cluster.others(leader)[0]
    client_id = unique("moved-")
    c = Client(leader.address, client_id, clean=True, expiry=3600)
    assert c.ok
    c.subscribe(unique("ha/t/"), 1)

    done = cluster_cli_async(leader, "transfer-leader", str(target.id))
    rc, props = c.disconnects.get(timeout=15)
    c.abandon()
    assert rc.value == USE_ANOTHER_SERVER, rc
    assert getattr(props, "ServerReference", None) == target.address
    result = done.result(30)
    assert result.returncode == 0, result.stderr

    assert cluster.serving(timeout=15) is target
    assert wait_for(lambda: leader.health_leader() == 503, 10, "old leader 503")
    old = client_retry(leader.address, unique("old-"))
    assert old.rc.value == USE_ANOTHER_SERVER and old.server_reference == target.address
    old.abandon()
    c, served_by, _ = follow(cluster, client_id, start=leader, clean=False, expiry=3600)
    assert served_by is target and c.session_present
    c.close()


def test_role_change_never_closes_the_client_port(ha_cluster: Any) -> None:
    """The workers of a node that becomes leader restart (a fresh process in the
    new role), but the supervisor holds the listening sockets: a client that
    connects meanwhile is queued, never refused."""
    cluster = ha_cluster()
    leader = cluster.serving()
    target = cluster.others(leader)[0]
    refused: list[float] = []
    tried = [0]
    stop = threading.Event()

    def knock() -> None:
        while not stop.is_set():
            tried[0] += 1
            try:
                with socket.create_connection((HOST, target.mqtt_port), timeout=2):
                    pass
            except ConnectionRefusedError:
                refused.append(time.monotonic())
            except OSError:
                pass
            time.sleep(0.005)

    knocker = threading.Thread(target=knock, daemon=True)
    knocker.start()
    try:
        result = cluster_cli_async(leader, "transfer-leader", str(target.id)).result(30)
        assert result.returncode == 0, result.stderr
        assert cluster.serving(timeout=15) is target
        time.sleep(0.5)
    finally:
        stop.set()
        knocker.join(5)
    assert tried[0] > 50, tried  # it knocked all through the role change
    assert not refused, f"{len(refused)} of {tried[0]} connects refused during the role change"


class _Async:
    def __init__(self, fn: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self._error = exc

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "timed out"
        if self._error is not None:
            raise self._error
        return self._result


def cluster_cli_async(node: HaNode, *args: str) -> _Async:
    return _Async(lambda: node.cluster_cli(*args))


@pytest.mark.skipif(shutil.which("mosquitto_ctrl") is None, reason="mosquitto_ctrl not installed")
def test_dynsec_changes_survive_failover(ha_cluster: Any) -> None:
    """dynsec is state-machine state: a client created with mosquitto_ctrl on the
    leader can log in at the next leader after a kill -9."""
    cluster = ha_cluster(extra=("dynsec = true", "allow_anonymous = false"),
                         env={"RAFTMQ_DYNSEC_PASSWORD": "adminpw-123"})
    leader = cluster.serving()
    user = unique("alice")

    def ctrl(*args: str) -> None:
        run = subprocess.run(["mosquitto_ctrl", "-h", HOST, "-p", str(leader.mqtt_port), "-u", "admin",
                              "-P", "adminpw-123", "dynsec", *args],
                             capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run

    ctrl("createClient", user, "-p", "alicepw")
    c = Client(leader.address, unique("a-"), auth=(user, "alicepw"))
    assert c.ok
    c.close()
    leader.kill9()
    new_leader = cluster.serving(exclude=(leader.id,))
    c, served_by, _ = follow(cluster, unique("a-"), auth=(user, "alicepw"))
    assert served_by is new_leader
    c.close()
    bad = Client(new_leader.address, unique("a-"), auth=(user, "wrong"))
    assert bad.rc.is_failure
    bad.abandon()


def test_failover_under_publish_load_loses_no_acknowledged_message(ha_cluster: Any) -> None:
    """The leader is killed while a publisher streams QoS 1 messages to an online
    persistent subscriber (queue rows added and removed within the raft
    process's deferral window): every message the old leader PUBACKed reaches the
    subscriber, before the kill or from its session on the new leader."""
    cluster = ha_cluster()
    leader = cluster.serving()
    topic = unique("ha/load/")
    sub_id = unique("lsub-")
    sub, _, _ = follow(cluster, sub_id, clean=True, expiry=3600)
    sub.subscribe(topic, 1)

    pub, _, _ = follow(cluster, unique("lpub-"))
    acked_mids: set[int] = set()  # paho's callback thread adds; set.add is atomic
    pub.client.on_publish = lambda _c, _u, mid, rc, _p: None if rc.is_failure else acked_mids.add(mid)
    total = 3000
    by_mid = {}
    for i in range(total):
        payload = f"p{i}".encode()
        by_mid[pub.client.publish(topic, payload, 1).mid] = payload
    assert wait_for(lambda: len(acked_mids) >= 300, 30, "300 PUBACKs")
    leader.kill9()
    acked_before_kill = {by_mid[m] for m in list(acked_mids)}
    pub.abandon()
    assert len(acked_before_kill) < total, "everything was acknowledged before the kill: no test"

    received: set[bytes] = set()
    while True:
        try:
            received.add(sub.messages.get_nowait().payload)
        except queue.Empty:
            break
    sub.abandon()
    sub, served_by, _ = follow(cluster, sub_id, clean=False, expiry=3600)
    assert sub.session_present
    deadline = time.monotonic() + 30
    while not acked_before_kill <= received and time.monotonic() < deadline:
        try:
            received.add(sub.messages.get(timeout=1).payload)
        except queue.Empty:
            pass
    missing = acked_before_kill - received
    print(f"{len(acked_before_kill)} of {total} PUBACKed before the kill; {len(received)} received")
    assert not missing, f"{len(missing)} PUBACKed messages lost, e.g. {sorted(missing)[:5]}"
    sub.close()
