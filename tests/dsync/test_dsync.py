"""``mode = "dynsec-sync"``: three real ``raftmq serve`` nodes, every node of the
majority serves clients, only Dynamic Security goes through Raft.

Clients are raw MQTT 5 / 3.1.1 clients (tests/support/mqttraw.py); dynsec
changes are made with the real ``mosquitto_ctrl``.
"""

from __future__ import annotations

import time

import pytest
from dsync_harness import ADMIN, CTRL, connack, serves
from ha_harness import wait_for

from support.mqttraw import DISCONNECT, SUBACK, Closed

pytestmark = pytest.mark.skipif(CTRL is None, reason="mosquitto_ctrl (mosquitto-clients) not installed")

RC_NOT_AUTHORIZED = 0x87
RC_ADMINISTRATIVE_ACTION = 0x98
RC_SERVER_UNAVAILABLE = 0x88
RC_USE_ANOTHER_SERVER = 0x9C


def _closed_or_disconnect(client, timeout: float = 10.0) -> int | None:
    """The DISCONNECT reason the server sends before closing, or None for a plain close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            p = client.recv(max(0.1, deadline - time.monotonic()))
        except Closed:
            return None
        if p.type == DISCONNECT:
            return p.reason
    raise AssertionError("the connection stayed open")


def test_every_node_serves_and_dynsec_changes_reach_every_node(dsync_cluster) -> None:
    cluster = dsync_cluster()
    nodes = list(cluster.nodes.values())
    for node in nodes:  # (1) active-active: every node accepts clients
        c, rc, _ = connack(node, f"hello-{node.id}")
        assert rc == 0
        c.close()
    follower, other = cluster.followers()
    # (2) a change sent to a follower is committed cluster-wide before the answer:
    # the new client logs in on the follower at once, and soon everywhere.
    cluster.ctrl(follower, "createClient", "u1", "-p", "pw1")
    assert serves(follower, ("u1", "pw1"))
    for node in nodes:
        wait_for(lambda n=node: serves(n, ("u1", "pw1")), 10, f"u1 on node {node.id}")
    # An ACL change made on another node applies on every node.
    clients = {}
    for node in nodes:
        c, rc, _ = connack(node, f"u1-{node.id}", ("u1", "pw1"))
        assert rc == 0
        assert c.subscribe(1, [("acl/t", 0)]).codes == [RC_NOT_AUTHORIZED]
        c.close()
    cluster.ctrl(other, "createRole", "r1")
    cluster.ctrl(other, "addRoleACL", "r1", "subscribeLiteral", "acl/t", "allow")
    cluster.ctrl(follower, "addClientRole", "u1", "r1")
    for node in nodes:
        def allowed(n=node) -> bool:
            c, rc, _ = connack(n, f"u1-{n.id}", ("u1", "pw1"))
            try:
                return rc == 0 and c.subscribe(1, [("acl/t", 0)]).codes == [0]
            finally:
                c.close()

        wait_for(allowed, 10, f"the new ACL on node {node.id}")
        c, rc, _ = connack(node, f"u1-{node.id}", ("u1", "pw1"))
        assert rc == 0 and c.subscribe(1, [("acl/t", 0)]).codes == [0]
        clients[node.id] = c
    # A disableClient on one node kicks the client wherever it is connected (0x98).
    cluster.ctrl(other, "disableClient", "u1")
    for node in nodes:
        assert _closed_or_disconnect(clients[node.id]) == RC_ADMINISTRATIVE_ACTION, node.id
        clients[node.id].close()
    for node in nodes:
        wait_for(lambda n=node: not serves(n, ("u1", "pw1")), 10, f"u1 refused on node {node.id}")


def test_sessions_stay_on_their_node(dsync_cluster) -> None:
    cluster = dsync_cluster()
    a, b, _ = cluster.nodes.values()
    props = {"session_expiry_interval": 300}
    c, rc, present = connack(a, "sess-1", clean=False, props=props)
    assert rc == 0 and not present
    assert c.subscribe(1, [("s/#", 1)]).type == SUBACK
    c.disconnect()
    c.close()
    c, rc, present = connack(b, "sess-1", clean=False, props=props)
    assert rc == 0 and not present  # node B never saw the session
    c.close()
    c, rc, present = connack(a, "sess-1", clean=False, props=props)
    assert rc == 0 and present  # node A kept it
    c.close()


def test_minority_node_refuses_until_back_in_a_majority(dsync_cluster) -> None:
    cluster = dsync_cluster()
    n1, n2, n3 = cluster.nodes.values()
    v5, rc, _ = connack(n3, "minority-v5")
    assert rc == 0
    v4, rc, _ = connack(n3, "minority-v4", version=4)
    assert rc == 0
    n1.kill9()
    n2.kill9()
    # The survivor closes its clients once it has heard from no leader for an
    # election timeout (v5: DISCONNECT 0x9C first, or a plain close).
    assert _closed_or_disconnect(v5, 15) in (RC_USE_ANOTHER_SERVER, None)
    assert _closed_or_disconnect(v4, 15) is None
    v5.close()
    v4.close()
    c, rc, _ = connack(n3, "late-v5")
    c.close()
    assert rc == RC_SERVER_UNAVAILABLE
    c, rc, _ = connack(n3, "late-v4", version=4)
    c.close()
    assert rc == 3
    time.sleep(1.0)  # still refused a while later: no majority, no service
    c, rc, _ = connack(n3, "late-v5b")
    c.close()
    assert rc == RC_SERVER_UNAVAILABLE
    n1.start()
    cluster.wait_serving(n1)
    cluster.wait_serving(n3)
    assert sum(1 for n in (n1, n3) if cluster.role(n) == "leader") == 1


def test_password_seed_happens_once_for_the_cluster(dsync_cluster) -> None:
    cluster = dsync_cluster()
    nodes = list(cluster.nodes.values())
    for node in nodes:
        assert serves(node, ADMIN)
    # A change made right after start is not undone by a later seed of another node.
    cluster.ctrl(nodes[2], "createClient", "keep", "-p", "keep1")
    time.sleep(1.0)
    for node in nodes:
        wait_for(lambda n=node: serves(n, ("keep", "keep1")), 10, f"keep on node {node.id}")
    seeded = [n.id for n in nodes if "configuration seeded" in n.log_path.read_text(errors="replace")]
    assert len(seeded) == 1, seeded
    # A restart seeds nothing again.
    nodes[0].terminate()
    nodes[0].start()
    cluster.wait_serving(nodes[0])
    assert serves(nodes[0], ("keep", "keep1"))
    text = nodes[0].log_path.read_text(errors="replace")
    assert text.count("configuration seeded") == (1 if nodes[0].id in seeded else 0)
