"""The broker glue (raftmq.dynsec.plugin) and the CLI functions, in-process with a
fake broker whose commits complete only when the test says so."""

from __future__ import annotations

import argparse
import json
import os
import stat
from types import SimpleNamespace

from captures import EXAMPLE_DOCUMENT, example_document

from raftmq.dynsec.acl import RC_NOT_AUTHORIZED, RC_SUCCESS
from raftmq.dynsec.cli import (
    INIT_ADMIN_ACLS,
    add_dynsec_args,
    init_document,
    read_document,
    run_dynsec,
    run_export,
    run_import,
    run_init,
)
from raftmq.dynsec.commands import apply_change, prepare_request
from raftmq.dynsec.model import DynsecState
from raftmq.dynsec.plugin import PASSWORD_ENV, install, seed_change
from raftmq.state.entries import Dynsec, LoadedState, Message


class FakeStore:
    def __init__(self, document=None) -> None:
        self.document = document
        self.submitted: list = []
        self.listener = None

    def load(self) -> LoadedState:
        return LoadedState(dynsec=self.document)

    def submit(self, ops, done=None) -> None:
        self.submitted.append(ops)
        for op in ops:
            self.document = apply_change(self.document, op.change)  # as the state machine does
        if done is not None:
            done()

    def set_remote_listener(self, listener) -> None:
        self.listener = listener


class FakeBroker:
    """Broker hooks with commit batches completed by ``complete()``."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.auth = None
        self.control_handlers: dict = {}
        self.batches: list = []
        self.published: list[dict] = []
        self.connections: list = []
        self.kicked: list = []
        self.kick_wills: list = []  # with_will of each disconnect_clients call

    def commit(self, ops, action) -> None:
        self.batches.append((ops, action))

    def after_commit(self, action) -> None:
        if self.batches:
            self.batches.append(([], action))
        else:
            action()

    def complete(self) -> None:
        ops, action = self.batches.pop(0)
        if ops:
            self.store.submit(ops)
        if action is not None:
            action()

    def flush_ops(self) -> None:
        self.flushed = True

    def publish_message(self, message: Message) -> None:
        assert message.topic == "$CONTROL/dynamic-security/v1/response" and message.qos == 0
        self.published.append(json.loads(message.payload))

    def disconnect_clients(self, predicate, reason_code, with_will=True) -> int:
        """As Broker.disconnect_clients: ``with_will=False`` discards the Will."""
        hit = [c for c in self.connections if predicate(c)]
        self.kicked += [(c.username, reason_code) for c in hit]
        self.kick_wills.append(with_will)
        if not with_will:
            for c in hit:
                c.will = None
        return len(hit)

    def request(self, payload: dict) -> None:
        self.control_handlers["$CONTROL/dynamic-security/v1"](None, Message("x", json.dumps(payload).encode()))


def _installed(document=None, environ=None):
    store = FakeStore(document if document is not None else example_document())
    broker = FakeBroker(store)
    plugin = install(broker, SimpleNamespace(allow_anonymous=False, data_dir=None), environ=environ or {})
    return broker, plugin


def test_install_hooks_auth_and_control_topic() -> None:
    broker, plugin = _installed()
    assert broker.auth is plugin and plugin.checks_acl
    assert broker.store.listener == plugin.on_remote_ops
    assert plugin.authenticate("c", "alice", b"alicepass1") == RC_SUCCESS
    conn = SimpleNamespace(username="dave", client_id="dave-01")
    assert plugin.acl_check(conn, "publish_client_send", "sensors/secret", 0, False) is False
    assert plugin.acl_check(conn, "publish_client_send", "sensors/x", 0, False) is True


def test_changes_answer_only_once_committed_and_reads_wait_their_turn() -> None:
    broker, plugin = _installed()
    broker.request({"commands": [{"command": "createClient", "username": "zed", "password": "zedpw"}]})
    broker.request({"commands": [{"command": "getClient", "username": "zed"}]})
    assert broker.published == [] and len(broker.batches) == 2
    assert plugin.authenticate("c", "zed", b"zedpw") == RC_NOT_AUTHORIZED  # not committed yet
    broker.complete()
    assert broker.published == [{"responses": [{"command": "createClient"}]}]
    assert isinstance(broker.store.submitted[0][0], Dynsec)
    assert "zed" in [c["username"] for c in broker.store.document["clients"]]
    broker.complete()
    assert broker.published[1]["responses"][0]["data"]["client"]["username"] == "zed"
    assert plugin.authenticate("c", "zed", b"zedpw") == RC_SUCCESS


def test_read_only_and_invalid_requests_are_answered_at_once_without_a_proposal() -> None:
    broker, _plugin = _installed()
    broker.request({"commands": [{"command": "getAnonymousGroup"}]})
    broker.control_handlers["$CONTROL/dynamic-security/v1"](None, Message("x", b"not json"))
    assert broker.batches == [] and broker.store.submitted == []
    assert broker.published == [
        {"responses": [{"command": "getAnonymousGroup", "data": {"group": {"groupname": "anon"}}}]},
        {"responses": [{"command": "Unknown command", "error": "Payload not valid JSON"}]},
    ]


def test_kicks_use_reason_0x98_and_drop_the_will() -> None:
    broker, _plugin = _installed()
    alice = SimpleNamespace(username="alice", client_id="a", will=(0, object()))
    carol = SimpleNamespace(username="carol", client_id="c", will=(0, object()))
    anon = SimpleNamespace(username=None, client_id="n", will=None)
    broker.connections = [alice, carol, anon]
    broker.request({"commands": [{"command": "disableClient", "username": "alice"},
                                 {"command": "setAnonymousGroup", "groupname": "devices"}]})
    broker.complete()
    assert sorted(broker.kicked, key=str) == sorted([("alice", 0x98), (None, 0x98)], key=str)
    assert alice.will is None and carol.will is not None


def test_kick_asks_the_broker_to_drop_the_will() -> None:
    """Kicks pass ``with_will=False``: the broker discards the Will and deletes a
    durable session's stored one (Broker.disconnect_clients; the restart case
    is tests/dynsec/test_live.py)."""
    broker, _plugin = _installed()
    alice = SimpleNamespace(username="alice", client_id="a", will=(0, object()))
    broker.connections = [alice]
    broker.request({"commands": [{"command": "disableClient", "username": "alice"}]})
    broker.complete()
    assert broker.kicked == [("alice", 0x98)] and broker.kick_wills == [False]
    assert broker.batches == []  # the broker deletes a stored will itself


def test_remote_changes_are_applied_without_a_response() -> None:
    broker, plugin = _installed()
    change = prepare_request(b'{"commands":[{"command":"deleteClient","username":"alice"}]}').change
    broker.connections = [SimpleNamespace(username="alice", client_id="a", will=None)]
    broker.store.listener([Dynsec(change)])
    assert "alice" not in plugin.state.clients and broker.published == []
    assert broker.kicked == [("alice", 0x98)]


def test_seed_from_environment_on_first_start_only() -> None:
    assert seed_change({"clients": []}, None, {PASSWORD_ENV: "pw"}) is None  # not the first start
    assert seed_change(None, None, {}) is None
    store = FakeStore(None)
    broker = FakeBroker(store)
    plugin = install(broker, SimpleNamespace(allow_anonymous=False, data_dir=None),
                     environ={PASSWORD_ENV: "seeded-pw"})
    assert store.submitted == []  # no event loop yet: committed on first use
    assert plugin.authenticate("c", "admin", b"seeded-pw") == RC_SUCCESS
    assert plugin.authenticate("c", "admin", b"wrong") == RC_NOT_AUTHORIZED
    assert len(store.submitted) == 1 and "replace" in store.submitted[0][0].change
    state = DynsecState.from_document(store.document)
    assert state.clients["admin"].roles == {"admin": -1}
    admin = state.roles["admin"]
    assert sorted((t, a.topic) for t, acls in admin.acls.items() for a in acls) == sorted(INIT_ADMIN_ACLS)
    assert state.default_access == {"publishClientSend": False, "publishClientReceive": True,
                                    "subscribe": False, "unsubscribe": True}


def test_staged_import_file_replaces_the_configuration(tmp_path) -> None:
    assert run_import(str(EXAMPLE_DOCUMENT), str(tmp_path)) == 0
    staged = tmp_path / "dynsec-import.json"
    assert stat.S_IMODE(os.stat(staged).st_mode) == 0o600
    store = FakeStore({"clients": [{"username": "old"}]})
    broker = FakeBroker(store)
    plugin = install(broker, SimpleNamespace(allow_anonymous=False, data_dir=str(tmp_path)), environ={})
    plugin.start()
    assert sorted(plugin.state.clients) == ["admin", "alice", "bob", "carol", "dave", "eve", "nopw"]
    assert not staged.exists() and (tmp_path / "dynsec-import.json.imported").exists()
    assert plugin.authenticate("bob-device", "bob", b"bobpass22") == RC_SUCCESS


def test_init_writes_a_mosquitto_file_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    target = tmp_path / "dynamic-security.json"
    assert run_init(str(target), "boss", "bosspw") == 0
    assert run_init(str(target), "boss", "other") == 1
    doc = read_document(target)
    state = DynsecState.from_document(doc)
    assert state.clients["boss"].password.verify(b"bosspw")
    assert state.clients["boss"].textname == "Dynsec admin user"
    assert list(json.loads(target.read_text())) == ["clients", "roles", "defaultACLAccess"]
    datadir = tmp_path / "data"
    datadir.mkdir()
    assert run_init(str(datadir), "admin", "pw") == 0
    assert (datadir / "dynsec-import.json").exists()


def test_export_round_trips_mosquitto_hashes(tmp_path) -> None:
    out = tmp_path / "out.json"
    assert run_export(str(out), example_document()) == 0
    exported = json.loads(out.read_text())
    assert exported["clients"] == example_document()["clients"]
    assert exported == DynsecState.from_document(exported).to_document()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_argparse_wiring(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_dynsec_args(parser)
    args = parser.parse_args(["export", str(tmp_path / "e.json"), "--data-dir", str(tmp_path)])
    assert run_dynsec(args, lambda data_dir: init_document("x", "y")) == 0
    assert read_document(tmp_path / "e.json")["clients"][0]["username"] == "x"
    args = parser.parse_args(["init", str(tmp_path / "i.json"), "root", "pw"])
    assert run_dynsec(args) == 0


def test_cached_acl_decisions_follow_every_committed_change() -> None:
    broker, plugin = _installed()
    dave = SimpleNamespace(username="dave", client_id="dave-01")
    assert plugin.acl_check(dave, "publish_client_send", "sensors/t1", 0, False) is True
    assert plugin.acl_check(dave, "publish_client_send", "sensors/t1", 0, False) is True  # cached
    broker.request({"commands": [{"command": "removeRoleACL", "rolename": "sensor-writer",
                                  "acltype": "publishClientSend", "topic": "sensors/#"}]})
    assert plugin.acl_check(dave, "publish_client_send", "sensors/t1", 0, False) is True  # not committed
    broker.complete()
    assert plugin.acl_check(dave, "publish_client_send", "sensors/t1", 0, False) is False
    change = prepare_request(b'{"commands":[{"command":"setDefaultACLAccess","acls":'
                             b'[{"acltype":"publishClientSend","allow":true}]}]}').change
    broker.store.listener([Dynsec(change)])  # committed by another worker
    assert plugin.acl_check(dave, "publish_client_send", "sensors/t1", 0, False) is True


def test_acl_generation_moves_with_committed_changes_only() -> None:
    broker, plugin = _installed()
    before = plugin.acl_generation
    broker.request({"commands": [{"command": "listClients"}]})
    broker.request({"commands": [{"command": "deleteClient", "username": "nobody"}]})  # fails
    broker.complete()
    assert plugin.acl_generation == before
    broker.request({"commands": [{"command": "disableClient", "username": "eve"}]})
    assert plugin.acl_generation == before
    broker.complete()
    assert plugin.acl_generation != before


def test_export_reads_the_committed_document_from_a_data_dir(tmp_path) -> None:
    from raftmq.raft.process import LMDB_DIR
    from raftmq.raft.types import Entry
    from raftmq.state.entries import encode_ops
    from raftmq.state.machine import StateMachine
    from raftmq.state.tables import open_environment

    parser = argparse.ArgumentParser()
    add_dynsec_args(parser)
    args = parser.parse_args(["export", str(tmp_path / "out.json"), "--data-dir", str(tmp_path)])
    assert run_dynsec(args) == 1  # nothing committed yet
    env = open_environment(str(tmp_path / LMDB_DIR), map_size=64 << 20, sync=False)
    StateMachine(env).apply([Entry(1, 1, encode_ops([Dynsec({"replace": example_document()})]))])
    env.close()
    assert run_dynsec(args) == 0
    assert json.loads((tmp_path / "out.json").read_text())["clients"] == example_document()["clients"]
