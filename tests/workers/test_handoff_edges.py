"""The socket hand-off at its edges: a CONNECT in pieces, keep alive and wills
of an adopted connection, assigned client ids, fan-out to every worker."""

from __future__ import annotations

import time

import pytest
from nodeprobe import (
    accepting_worker,
    assert_placed,
    owned_id,
    raw_over,
    socket_on_worker,
    worker_pids,
)

from raftmq.workers.ownership import owner_of
from support.helpers import Paho, connected, unique
from support.mqttraw import CONNACK, PUBACK, Will
from support.mqttraw import connect as connect_packet

pytestmark = pytest.mark.timeout(60)


def test_connect_in_pieces_through_the_other_worker(node2):
    """The accepting worker has only part of the CONNECT for a while: it must
    wait for the rest, then hand the whole of it over."""
    pids = worker_pids(node2, 2)
    cid = owned_id(0, 2, "slow")
    packet = connect_packet(cid, version=5, props={"session_expiry_interval": 0})
    c = raw_over(socket_on_worker(node2, 1, pids), 5)
    with c:
        for piece in (packet[:1], packet[1:3], packet[3:12], packet[12:]):
            c.send(piece)
            time.sleep(0.15)
        ack = c.recv(5)
        assert ack.type == CONNACK and ack.reason == 0, ack
        assert_placed(node2, cid, 0)
        assert accepting_worker(node2, c.sock, pids) == 0


@pytest.mark.waits
def test_keep_alive_of_an_adopted_connection(node2):
    """A client handed to its owner and then silent past 1.5 x keep alive is
    dropped by the owner, and its will published."""
    pids = worker_pids(node2, 2)
    topic = unique("xw/ka/")
    cid = owned_id(0, 2, "ka")
    with Paho(node2, owned_id(1, 2, "kasub"), 4) as sub:
        sub.subscribe(topic, 1)
        c = raw_over(socket_on_worker(node2, 1, pids), 4)
        with c:
            ack = c.connect(cid, keepalive=1, will=Will(topic, b"timed out", qos=1))
            assert ack.reason == 0
            assert_placed(node2, cid, 0)
            msg = sub.get(timeout=6)
            assert msg.payload == b"timed out"


def test_assigned_client_id_is_owned_by_the_accepting_worker(node2):
    """MQTT 5 empty client id: the id assigned is one the accepting worker owns,
    so the connection needs no hand-off, and a later reconnect finds the session."""
    pids = worker_pids(node2, 2)
    for acceptor in (0, 1):
        c = raw_over(socket_on_worker(node2, acceptor, pids), 5)
        with c:
            ack = c.connect("", clean=False, props={"session_expiry_interval": 60})
            assert ack.reason == 0
            assigned = ack.props["assigned_client_identifier"]
            assert owner_of(assigned, 2) == acceptor
            assert_placed(node2, assigned, acceptor)
            c.disconnect()
        other = raw_over(socket_on_worker(node2, 1 - acceptor, pids), 5)
        with other:
            ack = other.connect(assigned, clean=False, props={"session_expiry_interval": 0})
            assert ack.reason == 0 and ack.session_present


def test_fan_out_to_every_worker_once(node4):
    """A subscriber on each of 4 workers (one with two overlapping filters):
    every message once per subscriber, in order."""
    topic = unique("xw/fan/")
    subs = {}
    for w in range(4):
        cid = owned_id(w, 4, "fan")
        subs[w] = connected(node4, cid, version=4)
        assert_placed(node4, cid, w)
        subs[w].subscribe(1, [(topic, 1)])
    # Two clients of worker 2 with the same filter: the sibling still sends once
    # per worker, and both get it.
    extra = connected(node4, owned_id(2, 4, "fan"), version=4)
    extra.subscribe(1, [(topic, 1)])
    try:
        with connected(node4, owned_id(0, 4, "fanpub")) as pub:
            for i in range(100):
                pub.publish(topic, b"%d" % i, 1, pid=i + 1)
                assert pub.expect(PUBACK).pid == i + 1
        for name, c in (*subs.items(), ("extra", extra)):
            got = [p.payload for p in c.drain_publishes()]
            assert got == [b"%d" % i for i in range(100)], (name, len(got))
    finally:
        for c in (*subs.values(), extra):
            c.close()
