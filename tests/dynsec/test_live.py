"""Dynamic security on a real raftmq process, driven by the real ``mosquitto_ctrl``
(Debian mosquitto-clients) and raw MQTT 5 / 3.1.1 clients (tests/support/mqttraw.py).

raftmq runs as the product does: ``raftmq serve`` with ``dynsec = true`` (its
supervisor, raft process and workers; the document imported at start).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from captures import VERSION_DIFFERENCES, example_document, histories, init_document

from support.brokers import REPO, free_port
from support.mqttraw import (
    CONNACK,
    DISCONNECT,
    PUBACK,
    PUBLISH,
    UNSUBACK,
    Closed,
    RawClient,
    Will,
    publish,
    unsubscribe,
)

CTRL = shutil.which("mosquitto_ctrl")
REQUEST = "$CONTROL/dynamic-security/v1"
RESPONSE = "$CONTROL/dynamic-security/v1/response"
ADMIN = ("admin", "adminpass123")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
HAVE_MOSQUITTO = os.path.exists(MOSQUITTO) and os.path.exists(MOSQUITTO_DYNSEC)

pytestmark = pytest.mark.skipif(CTRL is None, reason="mosquitto_ctrl (mosquitto-clients) not installed")


class DynsecBroker:
    """raftmq with dynsec, or (``kind="mosquitto"``) Mosquitto 2.0 with its dynsec
    plugin on the same document: the same test must pass on both."""

    def __init__(self, workdir: Path, document: dict, allow_anonymous: bool, kind: str = "raftmq",
                 durable: bool = False) -> None:
        """``durable``: Mosquitto with ``persistence true`` (state kept across
        ``restart()``); raftmq always keeps it (Raft log + LMDB in the data dir)."""
        self.kind = kind
        self.port = free_port()
        self.workdir = workdir
        data = workdir / "data"
        data.mkdir(parents=True)
        self.env = dict(os.environ)
        self.env.pop("RAFTMQ_DYNSEC_PASSWORD", None)
        if kind == "mosquitto":
            (data / "dynamic-security.json").write_text(json.dumps(document))
            conf = workdir / "mosquitto.conf"
            persistence = f"persistence true\npersistence_location {data}/\n" if durable \
                else "persistence false\n"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous {str(allow_anonymous).lower()}\n"
                f"per_listener_settings false\nuser root\n{persistence}log_dest stderr\n"
                f"plugin {MOSQUITTO_DYNSEC}\nplugin_opt_config_file {data / 'dynamic-security.json'}\n")
            self.cmd = [MOSQUITTO, "-c", str(conf)]
        else:
            (data / "dynsec-import.json").write_text(json.dumps(document))
            self.env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + self.env.get("PYTHONPATH", "")
            # The product itself: `raftmq serve` with dynsec = true (its workers,
            # its raft process, the imported document committed at start).
            conf = workdir / "raftmq.toml"
            conf.write_text(f"dynsec = true\nallow_anonymous = {str(allow_anonymous).lower()}\n")
            self.cmd = [sys.executable, "-m", "raftmq", "serve", "-c", str(conf), "--data-dir",
                        str(data), "-p", str(self.port), "--host", "127.0.0.1", "-v"]
        self.log = open(workdir / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
        self._start()

    def _start(self) -> None:
        # Its own process group: ``raftmq serve`` has children (raft process, workers).
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, (self.workdir / "broker.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "broker did not start"
                time.sleep(0.05)

    def restart(self) -> None:
        """Stop (SIGTERM, a clean shutdown) and start again on the same data."""
        self._terminate()
        self._start()

    def _terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def stop(self) -> None:
        self._terminate()
        self.log.close()

    def client(self, client_id: str, username: str | None = None, password: str | None = None,
               version: int = 5) -> tuple[RawClient, int]:
        c = RawClient("127.0.0.1", self.port, version=version)
        connack = c.connect(client_id, username=username,
                            password=password.encode() if password is not None else None)
        assert connack.type == CONNACK
        return c, connack.reason

    def logged_in(self, client_id: str, username: str | None, password: str | None) -> RawClient:
        c, rc = self.client(client_id, username, password)
        assert rc == 0
        return c

    def ctrl(self, *args: str, user: tuple[str, str] = ADMIN) -> list[str]:
        """Run mosquitto_ctrl; its output lines without the no-TLS warning."""
        cmd = [CTRL, "-h", "127.0.0.1", "-p", str(self.port), "-u", user[0], "-P", user[1], "dynsec", *args]
        run = subprocess.run(cmd, capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run
        lines = (run.stdout + run.stderr).decode().splitlines()
        return [ln.rstrip() for ln in lines if ln.strip() and not ln.startswith(("Warning: You are running",
                                                                                   "This means all of the"))]


@pytest.fixture(params=["raftmq", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "mosquitto" and not HAVE_MOSQUITTO:
        pytest.skip("mosquitto with its dynamic-security plugin is not installed")
    return request.param


@pytest.fixture
def start(tmp_path: Path, kind: str) -> Iterator:
    started: list[DynsecBroker] = []

    def make(document: dict | None = None, allow_anonymous: bool = False, durable: bool = False
             ) -> DynsecBroker:
        b = DynsecBroker(tmp_path / f"b{len(started)}", document or example_document(), allow_anonymous, kind,
                         durable)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


class Observer:
    """An admin connection subscribed to the response topic: sees every response."""

    def __init__(self, broker: DynsecBroker) -> None:
        self.c = broker.logged_in("observer", *ADMIN)
        assert self.c.subscribe(1, [(RESPONSE, 0)]).codes == [0]
        self.pid = 1

    def next_response(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            p = self.c.recv(max(0.01, deadline - time.monotonic()))
            if p.type == PUBLISH and p.topic == RESPONSE:
                assert p.qos == 0 and not p.retain  # spec §3.1
                return p.payload.decode()

    def request(self, payload: str) -> str:
        self.pid += 1
        self.c.publish(REQUEST, payload.encode(), qos=1, pid=self.pid)
        return self.next_response()


@pytest.mark.parametrize("which", [0, 1], ids=["sessions1-5", "example-build"])
def test_captures_replayed_with_mosquitto_ctrl_and_a_v5_client(start, which: int) -> None:
    broker = start(init_document())
    observer = Observer(broker)
    mismatches = []
    for ex in histories()[which]:
        if ex.ctrl is not None:
            args = shlex.split(ex.ctrl)
            printed = broker.ctrl(*args[args.index("dynsec") + 1:])
            got = observer.next_response()
            if printed != [ln.rstrip() for ln in ex.ctrl_output if ln.strip()]:
                mismatches.append((ex.ctrl, ex.ctrl_output, printed))
        else:
            got = observer.request(ex.request)
        expected = ex.response if broker.kind == "mosquitto" else ex.expected
        if got != expected:
            mismatches.append((ex.request, expected, got))
    assert mismatches == []


def test_version_differences_are_the_only_ones() -> None:
    assert len(VERSION_DIFFERENCES) == 4


@pytest.mark.parametrize(("version", "client_id", "username", "password", "code"), [
    (5, "c1", "alice", "alicepass1", 0),
    (5, "c1", "alice", "ALICEPASS1", 0x87),
    (5, "c1", "nobody", "x", 0x87),
    (5, "c1", "eve", "evepass55555", 0x87),
    (5, "other", "bob", "bobpass22", 0x87),
    (5, "bob-device", "bob", "bobpass22", 0),
    (5, "c1", "nopw", "", 0x87),
    (5, "c1", None, None, 0x87),
    (4, "c1", "alice", "wrong", 5),
    (4, "c1", "carol", "carolpass333", 0),
])
def test_connack_codes(start, version, client_id, username, password, code) -> None:
    broker = start()
    _c, rc = broker.client(client_id, username, password, version=version)
    assert rc == code


def test_anonymous_clients_use_the_anonymous_group(start) -> None:
    broker = start(allow_anonymous=True)
    anon = broker.logged_in("anon1", None, None)
    anon.publish("status/x", b"1", qos=1, pid=1)
    assert anon.expect(PUBACK).reason == 0x87  # anon group has no roles, default send false
    broker.ctrl("addGroupRole", "anon", "status-pub")  # kicks anonymous connections
    assert anon.expect(DISCONNECT).reason == 0x98
    anon = broker.logged_in("anon2", None, None)
    anon.publish("status/x", b"1", qos=1, pid=2)
    assert anon.expect(PUBACK).reason in (0, 0x10)  # success (0x10: no matching subscribers)


def test_publish_and_subscribe_acls_on_the_wire(start) -> None:
    broker = start()
    dave = broker.logged_in("dave-01", "dave", "davepass4444")
    for pid, (topic, reason) in enumerate([("sensors/t1", 0), ("sensors/secret", 0x87),
                                           ("status/public", 0), ("other", 0x87)], start=1):
        dave.publish(topic, b"x", qos=1, pid=pid)
        got = dave.expect(PUBACK).reason
        assert (got in (0, 0x10)) if reason == 0 else (got == reason), topic
    assert dave.subscribe(10, [("sensors/#", 1)]).codes == [1]
    assert dave.subscribe(11, [("$share/g/sensors/#", 1)]).codes == [0x87]
    assert dave.subscribe(12, [("status/#", 0)]).codes == [0]  # subscribeLiteral via devices/reader
    assert dave.subscribe(13, [("status/+", 0)]).codes == [0x87]
    dave.send(unsubscribe(14, ["status/+"], version=5))
    assert dave.expect(UNSUBACK).codes == [0x87]  # reader: unsubscribePattern status/+ deny


def test_receive_acl_filters_deliveries(start) -> None:
    broker = start()
    alice = broker.logged_in("a1", "alice", "alicepass1")
    assert alice.subscribe(1, [("status/#", 0)]).codes == [0]
    dave = broker.logged_in("dave-01", "dave", "davepass4444")
    dave.publish("status/private", b"p", qos=0)
    dave.publish("status/public", b"q", qos=0)
    got = [p.topic for p in alice.drain_publishes(quiet=0.7)]
    assert got == ["status/public"]  # reader denies receiving status/private


def test_only_admins_reach_the_control_topic(start) -> None:
    broker = start()
    observer = Observer(broker)
    alice = broker.logged_in("a1", "alice", "alicepass1")
    alice.publish(REQUEST, b'{"commands":[{"command":"deleteClient","username":"admin"}]}', qos=1, pid=1)
    assert alice.expect(PUBACK).reason == 0x87
    assert alice.subscribe(2, [(RESPONSE, 0)]).codes == [0x87]
    assert json.loads(observer.request('{"commands":[{"command":"listClients","count":1}]}')) == \
        {"responses": [{"command": "listClients", "data": {"totalCount": 7, "clients": ["admin"]}}]}


def test_kicks_on_change_with_reason_0x98(start) -> None:
    broker = start()
    alice = broker.logged_in("a1", "alice", "alicepass1")
    carol = broker.logged_in("c1", "carol", "carolpass333")
    old = RawClient("127.0.0.1", broker.port, version=4)
    assert old.connect("b311", username="bob", password=b"bobpass22").reason == 5  # wrong client id
    bob = RawClient("127.0.0.1", broker.port, version=4)
    assert bob.connect("bob-device", username="bob", password=b"bobpass22").reason == 0

    broker.ctrl("addRoleACL", "reader", "subscribePattern", "x/#", "allow")  # carol, devices members
    assert alice.expect(DISCONNECT).reason == 0x98
    assert carol.expect(DISCONNECT).reason == 0x98
    with pytest.raises(Closed):
        bob.recv(3.0)  # MQTT 3.1.1: just closed

    alice = broker.logged_in("a2", "alice", "alicepass1")
    carol = broker.logged_in("c2", "carol", "carolpass333")
    broker.ctrl("disableClient", "alice")
    assert alice.expect(DISCONNECT).reason == 0x98
    with pytest.raises(TimeoutError):
        carol.recv(0.5)  # untouched
    _c, rc = broker.client("a3", "alice", "alicepass1")
    assert rc == 0x87
    broker.ctrl("enableClient", "alice")
    broker.logged_in("a4", "alice", "alicepass1")


def test_kicked_client_will_is_not_published(start) -> None:
    broker = start()
    admin = broker.logged_in("adm", *ADMIN)
    assert admin.subscribe(1, [("sensors/#", 0)]).codes == [0]
    alice = RawClient("127.0.0.1", broker.port, version=5)
    will = Will("sensors/will", b"gone", 0, False)
    assert alice.connect("a1", username="alice", password=b"alicepass1", will=will).reason == 0
    broker.ctrl("removeClientRole", "alice", "sensor-writer")
    assert alice.expect(DISCONNECT).reason == 0x98
    assert [p.topic for p in admin.drain_publishes(quiet=0.7)] == []
    # control: an ungraceful close of a connection with the same will publishes it
    broker.ctrl("addClientRole", "alice", "sensor-writer")
    alice = RawClient("127.0.0.1", broker.port, version=5)
    assert alice.connect("a2", username="alice", password=b"alicepass1", will=will).reason == 0
    alice.close()
    assert [p.topic for p in admin.drain_publishes(quiet=1.0)] == ["sensors/will"]


def test_kicked_durable_session_will_is_not_published_after_a_restart(start) -> None:
    """A kick drops the Will for good: also the one a durable session keeps in the
    store (raftmq: WillDelete), which a restart would otherwise publish.  Mosquitto
    (with_will = false) clears it at the kick."""
    broker = start(durable=True)
    session = {"session_expiry_interval": 600}
    admin = RawClient("127.0.0.1", broker.port, version=5)
    assert admin.connect("adm", clean=False, username=ADMIN[0], password=ADMIN[1].encode(),
                         props=session).reason == 0
    assert admin.subscribe(1, [("sensors/#", 1)]).codes == [1]
    alice = RawClient("127.0.0.1", broker.port, version=5)
    will = Will("sensors/will", b"gone", 1, False)
    assert alice.connect("a1", clean=False, username="alice", password=b"alicepass1", will=will,
                         props=session).reason == 0
    broker.ctrl("setClientPassword", "alice", "alicepass2")  # kicks alice, keeps her publish rights
    assert alice.expect(DISCONNECT).reason == 0x98
    assert admin.nothing_for(1.0)
    admin.disconnect()
    admin.close()
    # Queued for the offline admin session: shows the restart keeps what it should.
    sender = broker.logged_in("a2", "alice", "alicepass2")
    sender.publish("sensors/t", b"queued", qos=1, pid=1)
    assert sender.expect(PUBACK).reason == 0
    sender.disconnect()
    sender.close()

    broker.restart()
    admin = RawClient("127.0.0.1", broker.port, version=5)
    connack = admin.connect("adm", clean=False, username=ADMIN[0], password=ADMIN[1].encode(),
                            props=session)
    assert connack.reason == 0
    got = [(p.topic, p.payload) for p in admin.collect(2.0)]
    assert got == [("sensors/t", b"queued")]


def test_seeded_admin_from_environment(tmp_path: Path, kind: str) -> None:
    if kind != "raftmq":
        pytest.skip("RAFTMQ_DYNSEC_PASSWORD is raftmq's")
    port = free_port()
    env = dict(os.environ, RAFTMQ_DYNSEC_PASSWORD="seedpass-123")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    (tmp_path / "data").mkdir()
    (tmp_path / "raftmq.toml").write_text("dynsec = true\n")
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "raftmq", "serve", "-c", str(tmp_path / "raftmq.toml"),
                                 "--data-dir", str(tmp_path / "data"), "-p", str(port), "--host",
                                 "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
            cmd = [CTRL, "-h", "127.0.0.1", "-p", str(port), "-u", "admin", "-P", "seedpass-123", "dynsec"]
            out = subprocess.run([*cmd, "getRole", "admin"], capture_output=True, timeout=15).stdout.decode()
            assert out.splitlines()[0] == "Rolename: admin" and out.count("allow") == 8
            out = subprocess.run([*cmd, "getDefaultACLAccess"], capture_output=True, timeout=15).stdout.decode()
            assert out.split() == ["publishClientSend", ":", "deny", "publishClientReceive", ":", "allow",
                                   "subscribe", ":", "deny", "unsubscribe", ":", "allow"]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)


def test_pipelined_requests_answer_in_order_and_read_their_writes(start) -> None:
    """Three requests in one TCP write: a change, a read of it, a second change."""
    broker = start()
    observer = Observer(broker)
    requests = [
        {"commands": [{"command": "createClient", "username": "zed", "password": "zedpass", "correlationData": "1"}]},
        {"commands": [{"command": "getClient", "username": "zed", "correlationData": "2"}]},
        {"commands": [{"command": "deleteClient", "username": "zed", "correlationData": "3"}]},
    ]
    observer.c.send(b"".join(publish(REQUEST, json.dumps(r).encode(), 1, pid=10 + i, version=5)
                             for i, r in enumerate(requests)))
    got = [json.loads(observer.next_response())["responses"][0] for _ in requests]
    assert got == [
        {"command": "createClient", "correlationData": "1"},
        {"command": "getClient", "data": {"client": {"username": "zed", "roles": [], "groups": []}},
         "correlationData": "2"},
        {"command": "deleteClient", "correlationData": "3"},
    ]


def test_resumed_session_keeps_only_the_subscriptions_still_allowed(start) -> None:
    """Spec §7: after a kick, a persistent session keeps its subscriptions only if
    they are still allowed when the client comes back."""
    broker = start()
    session = {"session_expiry_interval": 600}
    alice = RawClient("127.0.0.1", broker.port, version=5)
    assert alice.connect("a1", clean=False, username="alice", password=b"alicepass1",
                         props=session).reason == 0
    assert alice.subscribe(1, [("sensors/#", 0), ("status/#", 0)]).codes == [0, 0]
    broker.ctrl("removeClientRole", "alice", "sensor-writer")  # no more subscribe on sensors/#
    assert alice.expect(DISCONNECT).reason == 0x98
    alice = RawClient("127.0.0.1", broker.port, version=5)
    connack = alice.connect("a1", clean=False, username="alice", password=b"alicepass1", props=session)
    assert connack.reason == 0 and connack.session_present
    dave = broker.logged_in("dave-01", "dave", "davepass4444")
    dave.publish("sensors/t1", b"s", qos=1, pid=1)
    dave.expect(PUBACK)
    dave.publish("status/public", b"p", qos=1, pid=2)
    dave.expect(PUBACK)
    assert [p.topic for p in alice.drain_publishes(quiet=0.7)] == ["status/public"]


@pytest.mark.parametrize("version", [4, 5])
def test_a_will_on_a_control_topic_is_refused_at_connect(start, version: int) -> None:
    """Even an admin, who may publish to $CONTROL, cannot leave a Will there (a
    request run unattended once the connection is gone): CONNACK Not authorized.
    Mosquitto 2.0.22 refuses it (spec §3.1); Debian's 2.0.11 predates the check."""
    broker = start()
    if broker.kind == "mosquitto":
        pytest.skip("Mosquitto 2.0.11 accepts a $CONTROL will (fixed upstream in 2.0.x later)")
    admin = RawClient("127.0.0.1", broker.port, version=version)
    will = Will("$CONTROL/dynamic-security/v1", b'{"commands":[{"command":"listClients"}]}', 0,
                False)
    connack = admin.connect("w1", username=ADMIN[0], password=ADMIN[1].encode(), will=will)
    assert connack.reason == (0x87 if version == 5 else 5)
    # the same admin with a will elsewhere is welcome
    other = RawClient("127.0.0.1", broker.port, version=version)
    connack = other.connect("w2", username=ADMIN[0], password=ADMIN[1].encode(),
                            will=Will("admin/gone", b"x", 0, False))
    assert connack.reason == 0
