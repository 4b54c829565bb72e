"""TLS and WebSocket clients on a node of 2 workers, accepted by the worker that
does not own their client id: the accepting worker keeps terminating TLS /
WebSocket and relays the MQTT stream to the owner (raftmq.workers.relay).

Each test opens TCP connections to the TLS or WebSocket port until the kernel
gives one to the wanted worker (the /proc evidence of nodeprobe), then speaks
TLS / WebSocket over it with a client id the *other* worker owns; the broker
log proves where the client landed ("... on worker K.") and that the owner saw
the real client address and certificate identity.
"""

from __future__ import annotations

import re
import socket
import struct
import time

import pytest
from nodeprobe import log_text, owned_id, server_inode, socket_inodes, wait_log, worker_pids

from support.certs import Certs, make_certs
from support.helpers import connected, unique
from support.listeners import (
    ListenerBroker,
    WSSocket,
    client_context,
    mask_frame,
    read_http_head,
    ws_request,
)
from support.mqttraw import PUBACK, PUBLISH, RawClient, Will

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def node(certs: Certs, tmp_path_factory: pytest.TempPathFactory):
    b = ListenerBroker("raftmq", tmp_path_factory.mktemp("relay"), {
        "tls": {"certfile": certs.server_cert, "keyfile": certs.server_key, "cafile": certs.ca,
                "require_certificate": True, "use_identity_as_username": True},
        "ws": {"protocol": "websockets"},
        "wss": {"protocol": "websockets", "certfile": certs.server_cert,
                "keyfile": certs.server_key},
    }, options={"workers": 2}).start()
    b.pids = worker_pids(b, 2)  # type: ignore[attr-defined]
    yield b
    b.stop()


def _holder(port: int, client: socket.socket, pids: dict[int, int]) -> int | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        inode = server_inode(port, client)
        if inode:
            holders = [i for i, pid in pids.items() if inode in socket_inodes(pid)]
            if len(holders) == 1:
                return holders[0]
        time.sleep(0.01)
    return None


def _accepted_by(node: ListenerBroker, port: int, worker: int) -> socket.socket:
    for _ in range(200):
        s = socket.create_connection((node.host, port), timeout=5)
        if _holder(port, s, node.pids) == worker:  # type: ignore[attr-defined]
            return s
        s.close()
    raise AssertionError(f"no connection on port {port} accepted by worker {worker}")


def _publishes(c: RawClient, n: int) -> set[tuple[str, int]]:
    """The next ``n`` PUBLISHes (acknowledged), acks of the client's own skipped."""
    out = set()
    while len(out) < n:
        p = c.recv(5)
        if p.type == PUBLISH:
            if p.qos == 1:
                c.ack(PUBACK, p.pid)
            out.add((p.topic, len(p.payload)))
    return out


def _raw(sock: socket.socket, version: int = 4) -> RawClient:
    c = RawClient.__new__(RawClient)
    c.version, c.sock, c.buf, c.aliases, c.eof = version, sock, bytearray(), {}, False
    return c


def _client(node: ListenerBroker, certs: Certs, kind: str, accepting: int,
            version: int = 4) -> tuple[RawClient, int]:
    """A RawClient over ``kind`` ("tls" / "ws" / "wss") whose TCP connection
    worker ``accepting`` holds; also its local port."""
    port = node.ports[kind]
    sock = _accepted_by(node, port, accepting)
    local_port = sock.getsockname()[1]
    if kind in ("tls", "wss"):
        cert = (certs.client_cert, certs.client_key) if kind == "tls" else None
        sock = client_context(certs, cert).wrap_socket(sock, server_hostname=node.host)
    if kind == "tls":
        return _raw(sock, version), local_port
    sock.sendall(ws_request())
    head, rest = read_http_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return _raw(WSSocket(sock, rest), version), local_port  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["tls", "ws", "wss"])
@pytest.mark.parametrize(("accepting", "owner"), [(0, 1), (1, 0)])
def test_relayed_client_talks_to_both_workers(node, certs, kind, accepting, owner):
    start = len(log_text(node))
    client_id = owned_id(owner, 2, f"{kind}-relay")
    c, local_port = _client(node, certs, kind, accepting, version=5)
    assert c.connect(client_id, username="ignored", password=b"ignored").reason == 0
    line = wait_log(node, rf"New client connected from (\S+) as {re.escape(client_id)} "
                          rf"\((.*?)\) on worker (\d)\.", start)
    assert line.group(1) == f"127.0.0.1:{local_port}"  # the real peer, not the socketpair
    assert int(line.group(3)) == owner
    if kind == "tls":
        assert "u'alice'" in line.group(2)  # the certificate's CN, from the accepting worker
    else:
        assert "u'ignored'" in line.group(2)
    # Messages both ways with plain clients owned by each worker.
    topic = unique(f"relay/{kind}/")
    c.subscribe(1, [(topic + "/#", 1)])
    for w in (0, 1):
        with connected(node, owned_id(w, 2, "plain")) as plain:
            plain.subscribe(1, [(topic + "/#", 1)])
            plain.publish(f"{topic}/from-plain-{w}", b"p" * 100_000, qos=1, pid=1)
            c.publish(f"{topic}/from-{kind}-{w}", b"r" * 70_000, qos=1, pid=9)
            want = {(f"{topic}/from-plain-{w}", 100_000), (f"{topic}/from-{kind}-{w}", 70_000)}
            assert _publishes(c, 2) == want
            assert _publishes(plain, 2) == want
    c.disconnect()
    c.close()


@pytest.mark.parametrize("kind", ["tls", "ws"])
def test_relayed_client_going_away_publishes_its_will(node, certs, kind):
    owner, accepting = 1, 0
    topic = unique("relay-will/")
    with connected(node, owned_id(0, 2, "watch")) as watcher:
        watcher.subscribe(1, [(topic, 0)])
        c, _port = _client(node, certs, kind, accepting)
        assert c.connect(owned_id(owner, 2, "dies"), will=Will(topic, b"gone")).reason == 0
        if kind == "ws":
            c.sock.send_raw(mask_frame(0x8, struct.pack("!H", 1001)))  # going away
        c.sock.close()
        got = watcher.recv_publish(5)
        assert (got.topic, got.payload) == (topic, b"gone")


@pytest.mark.parametrize("kind", ["tls", "ws"])
def test_owner_closing_closes_the_client_stream(node, certs, kind):
    """A takeover in the owner ends the relayed client's stream in the accepting
    worker: a WebSocket Close 1000, a TLS close."""
    client_id = owned_id(1, 2, "taken")
    c, _port = _client(node, certs, kind, accepting=0)
    assert c.connect(client_id).reason == 0
    with connected(node, client_id):
        if kind == "ws":
            frame = c.sock.read_frame(5)
            assert frame[1] == 0x8 and struct.unpack("!H", frame[2][:2])[0] == 1000
        c.sock.settimeout(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not c.sock.recv(4096):
                    break
            except (ConnectionError, OSError):
                break
        else:
            raise AssertionError("the client stream stayed open")


def test_relayed_connections_leave_no_descriptors(node, certs):
    """Many relayed connections opened and closed: the accepting worker keeps no
    descriptor of them (socketpairs closed on both ends)."""
    pids = node.pids  # type: ignore[attr-defined]
    import os

    before = len(os.listdir(f"/proc/{pids[0]}/fd"))
    for _ in range(10):
        c, _port = _client(node, certs, "ws", accepting=0)
        assert c.connect(owned_id(1, 2, "churn")).reason == 0
        c.disconnect()
        c.close()
    time.sleep(1.0)
    after = len(os.listdir(f"/proc/{pids[0]}/fd"))
    assert after <= before + 2, (before, after)
