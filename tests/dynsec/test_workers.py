"""Several workers of one node, each a Broker with its own dynsec plugin, on one
store: seeding and staged imports happen once (worker 0), every change committed
by one worker reaches the others through the committed-ops stream, and each of
them then kicks its own affected clients and moves its own ACL generation.

The store here is the shared part of the raft process as the workers see it:
``submit`` commits at once and fans the ops out to every *other* worker's remote
listener (a worker does not get its own ops back).  The brokers are real
``raftmq.broker.server.Broker`` objects; their connections are stand-ins with the
fields the broker and the plugin read.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from captures import example_document

from raftmq.broker.server import Broker
from raftmq.config import load_config
from raftmq.dynsec.plugin import IMPORT_FILE, PASSWORD_ENV, install
from raftmq.state.entries import Dynsec, LoadedState, Message

REQUEST = "$CONTROL/dynamic-security/v1"
SEND = "publish_client_send"


class SharedLog:
    """What every worker's store shares: the committed ops, the committed document."""

    def __init__(self, document: dict | None = None) -> None:
        self.document = document
        self.committed: list[tuple[int, list]] = []  # (worker, ops)
        self.views: list[WorkerStore] = []


class WorkerStore:
    """One worker's handle on the shared log (the Store interface the broker uses)."""

    def __init__(self, log: SharedLog, worker: int) -> None:
        self.log = log
        self.worker = worker
        self.listener = None
        log.views.append(self)

    def load(self) -> LoadedState:
        return LoadedState(dynsec=self.log.document)

    def submit(self, ops: list, done=None) -> None:
        from raftmq.dynsec.commands import apply_change

        self.log.committed.append((self.worker, list(ops)))
        for op in ops:
            if isinstance(op, Dynsec):
                self.log.document = apply_change(self.log.document, op.change)
        if done is not None:
            done()
        for view in self.log.views:  # the fan-out of committed entries to the other workers
            if view is not self and view.listener is not None:
                view.listener(list(ops))

    def set_remote_listener(self, listener) -> None:
        self.listener = listener

    async def close(self) -> None:
        return None


class Conn:
    """A connected client as Broker.disconnect_clients and the ACL cache see it."""

    def __init__(self, client_id: str, username: str | None) -> None:
        self.client_id = client_id
        self.username = username
        self.state = 1  # CONNECTED
        self.will = None
        self.session = None
        self.kicked: list[int] = []

    def disconnect(self, reason_code: int) -> None:
        self.kicked.append(reason_code)
        self.state = 2


def _workers(log: SharedLog, n: int, data_dir: Path, environ: dict | None = None):
    config = load_config(None, {"host": "127.0.0.1", "port": 1, "data_dir": str(data_dir),
                                "allow_anonymous": False, "dynsec_enabled": True})
    out = []
    for index in range(n):
        broker = Broker(config, WorkerStore(log, index))
        broker.worker_id = index  # as the worker layer sets it before install
        plugin = install(broker, config, environ=environ or {})
        out.append((broker, plugin))
    return out


def _dynsec_commits(log: SharedLog) -> list[int]:
    return [worker for worker, ops in log.committed if any(isinstance(op, Dynsec) for op in ops)]


def test_seed_from_the_environment_happens_once_per_node(tmp_path: Path) -> None:
    log = SharedLog(None)  # empty data dir: nothing committed yet
    workers = _workers(log, 3, tmp_path, {PASSWORD_ENV: "seed-pass-123"})
    for _broker, plugin in workers:
        plugin.start()  # what run() does once the loop runs
    assert _dynsec_commits(log) == [0]  # one seed, proposed by worker 0
    for broker, plugin in workers:
        assert "admin" in plugin.state.clients, broker.worker_id
        assert plugin.authenticate("c", "admin", b"seed-pass-123") == 0


def test_staged_import_happens_once_per_node(tmp_path: Path) -> None:
    (tmp_path / IMPORT_FILE).write_text(json.dumps(example_document()))
    log = SharedLog({"clients": [], "groups": [], "roles": []})  # a configuration exists already
    workers = _workers(log, 2, tmp_path)
    for _broker, plugin in workers:
        plugin.start()
    assert _dynsec_commits(log) == [0]
    assert not (tmp_path / IMPORT_FILE).exists()
    assert (tmp_path / (IMPORT_FILE + ".imported")).exists()
    for _broker, plugin in workers:
        assert plugin.authenticate("c", "alice", b"alicepass1") == 0


def test_a_change_committed_by_one_worker_kicks_and_invalidates_on_the_others(tmp_path: Path) -> None:
    log = SharedLog(example_document())
    (b0, p0), (b1, p1) = _workers(log, 2, tmp_path)
    # The plugin listens next to the broker's own listeners, not instead of them.
    assert b1.store.listener == b1._on_remote_ops and p1.on_remote_ops in b1.remote_listeners
    alice = Conn("a1", "alice")
    carol = Conn("c1", "carol")
    b1.connections.update({alice, carol})
    # Worker 1's warm ACL caches: alice may publish to sensors/t1 (role sensor-writer).
    assert b1.acl_publish_decision(alice, "sensors/t1", 0, False) is not False
    generation = p1.acl_generation

    # The request reaches worker 0 (its own client); worker 0 commits it.
    admin = SimpleNamespace(client_id="adm", username="admin")
    change = {"commands": [{"command": "removeClientRole", "username": "alice",
                            "rolename": "sensor-writer"}]}
    p0.on_request(admin, Message(REQUEST, json.dumps(change).encode(), 0, False))
    b0.flush_ops()
    assert _dynsec_commits(log) == [0]

    # Worker 1 applied it from the stream: its state, its kicks, its ACL caches.
    assert "sensor-writer" not in {r for r in p1.state.clients["alice"].roles}
    assert alice.kicked == [0x98] and carol.kicked == []
    assert p1.acl_generation != generation
    assert b1.acl_publish_decision(Conn("a2", "alice"), "sensors/t1", 0, False) is False
    assert b1.acl_publish_decision(alice, "sensors/t1", 0, False) is False  # the cached allow is gone
    assert p0.state.to_document() == p1.state.to_document() == log.document


def test_a_change_from_another_worker_drops_the_wills_of_the_kicked(tmp_path: Path) -> None:
    log = SharedLog(example_document())
    (b0, p0), (b1, _p1) = _workers(log, 2, tmp_path)
    alice = Conn("a1", "alice")
    alice.will = (0, Message("sensors/will", b"gone", 1, False))
    alice.session = SimpleNamespace(client_id="a1", durable=True)
    b1.connections.add(alice)
    p0.on_request(SimpleNamespace(client_id="adm", username="admin"),
                  Message(REQUEST, b'{"commands":[{"command":"disableClient","username":"alice"}]}',
                          0, False))
    b0.flush_ops()
    assert alice.kicked == [0x98] and alice.will is None
    # Worker 1 deleted the stored will of alice's durable session.
    assert [(w, [type(op).__name__ for op in ops]) for w, ops in log.committed][-1] == \
        (1, ["WillDelete"])
