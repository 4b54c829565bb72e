"""Command behaviour not covered by the captures (spec/dynsec.md §3, §5, §13)."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import example_state, ok, request, responses

from raftmq.dynsec.commands import COMMANDS, apply, apply_change, prepare_request
from raftmq.dynsec.jsontext import dumps
from raftmq.dynsec.model import DynsecState


def test_all_31_commands_of_20_plus_get_details() -> None:
    assert len(COMMANDS) == 32


def test_correlation_data_type_error_stops_the_request() -> None:
    rs = responses(example_state(), {"command": "listRoles", "correlationData": "a"},
                   {"command": "createRole", "rolename": "r", "correlationData": None},
                   {"command": "createRole", "rolename": "r2"})
    assert rs == [rs[0], {"command": "createRole", "error": "Invalid correlationData data type."}]


def test_errors_do_not_stop_later_commands_and_results_keep_order() -> None:
    state = example_state()
    rs = responses(state, {"command": "getRole", "rolename": "nope", "correlationData": "1"},
                   {"command": "createRole", "rolename": "r", "correlationData": "2"},
                   {"command": "getRole", "rolename": "r", "correlationData": "3"})
    assert rs == [
        {"command": "getRole", "error": "Role not found", "correlationData": "1"},
        {"command": "createRole", "correlationData": "2"},
        {"command": "getRole", "data": {"role": {"rolename": "r", "acls": []}}, "correlationData": "3"},
    ]


def test_non_object_and_nameless_entries_continue_without_stale_correlation_data() -> None:
    rs = responses(example_state(), {"command": "listRoles", "correlationData": "a", "count": 1}, 42,
                   {"foo": 1}, {"command": "getAnonymousGroup"})
    assert rs[1:] == [
        {"command": "Unknown command", "error": "Command not an object"},
        {"command": "Unknown command", "error": "Missing command"},
        {"command": "getAnonymousGroup", "data": {"group": {"groupname": "anon"}}},
    ]


@pytest.mark.parametrize(("command", "error"), [
    ({"command": "createClient", "username": "a\u0001b"}, "Username not valid UTF-8"),
    ({"command": "createClient", "username": "u", "clientid": "c\u0085"}, "Client ID not valid UTF-8"),
    ({"command": "createGroup", "groupname": "g\ufffe"}, "Group name not valid UTF-8"),
    ({"command": "createRole", "rolename": "r\ufdd0"}, "Role name not valid UTF-8"),
    ({"command": "setClientId", "username": "alice", "clientid": 1}, "Invalid/missing client ID"),
    ({"command": "addRoleACL", "rolename": "reader", "acltype": "subscribe", "topic": "a"}, "Unknown acltype"),
    ({"command": "addRoleACL", "rolename": "reader", "topic": "a"}, "Invalid/missing acltype"),
    ({"command": "addRoleACL", "rolename": "reader", "acltype": "subscribePattern"}, "Invalid/missing topic"),
    ({"command": "addRoleACL", "rolename": "reader", "acltype": "subscribePattern", "topic": "a/#/b"},
     "Invalid ACL topic"),
    ({"command": "addRoleACL", "rolename": "reader", "acltype": "subscribePattern", "topic": "a+"},
     "Invalid ACL topic"),
    ({"command": "addRoleACL", "rolename": "nope", "acltype": "bad", "topic": "a+"}, "Role not found"),
    ({"command": "removeRoleACL", "rolename": "reader", "acltype": "subscribeLiteral", "topic": "#/a"},
     "Invalid ACL topic"),
    ({"command": "deleteGroup", "groupname": "anon"}, "Deleting the anonymous group is forbidden"),
    ({"command": "createGroup", "groupname": "x", "roles": {}}, "Internal error"),
    ({"command": "createGroup", "groupname": "x", "roles": [{"rolename": "nope"}]}, "Role not found"),
    ({"command": "createGroup", "groupname": "devices"}, "Group already exists"),
    ({"command": "addGroupRole", "groupname": "devices", "rolename": "reader"}, "Group is already in this role"),
    ({"command": "modifyGroup", "groupname": "devices", "roles": 5},
     "'roles' not an array or missing/invalid rolename"),
    ({"command": "setAnonymousGroup", "groupname": "nope"}, "Group not found"),
    ({"command": "setClientPassword", "username": "carol", "password": 5}, "Invalid/missing password"),
    ({"command": "createClient", "username": "u", "password": {"$hash": {}}}, "Invalid/missing password"),
])
def test_error_strings(command: dict, error: str) -> None:
    assert responses(example_state(), command)[0]["error"] == error


def test_invalid_utf8_bytes_in_the_payload_are_a_utf8_error() -> None:
    state = example_state()
    prepared = prepare_request(b'{"commands":[{"command":"createClient","username":"bad\xff"}]}')
    assert apply(state, prepared.change).response["responses"][0]["error"] == "Username not valid UTF-8"


def test_payload_quirks() -> None:
    assert prepare_request(b'{"commands":[],"x":NaN}').error == "Payload not valid JSON"
    assert prepare_request(b"[1]").error == "Invalid/missing commands"
    # first of duplicate keys wins, as cJSON's lookup does
    req = prepare_request(b'{"commands":[{"command":"getRole","rolename":"reader","ROLENAME":"x"}]}')
    assert apply(example_state(), req.change).response["responses"][0]["data"]["role"]["rolename"] == "reader"
    # a string stops at an embedded NUL
    req = prepare_request(b'{"commands":[{"command":"getRole","rolename":"reader\\u0000junk"}]}')
    assert "data" in apply(example_state(), req.change).response["responses"][0]


def test_modify_client_changes_nothing_on_error() -> None:
    state = example_state()
    before = state.to_document()
    rs = responses(state, {"command": "modifyClient", "username": "alice", "textname": "changed",
                           "roles": [], "groups": [{"groupname": "nope"}]})
    assert "error" in rs[0]
    assert state.to_document() == before


def test_modify_client_password_empty_is_ignored_and_priorities_wrong_type_default() -> None:
    state = example_state()
    old = state.clients["alice"].password
    ok(state, {"command": "modifyClient", "username": "alice", "password": ""},
       {"command": "addClientRole", "username": "carol", "rolename": "status-pub", "priority": "9"})
    assert state.clients["alice"].password is old
    assert state.clients["carol"].roles["status-pub"] == -1


def test_get_details_counts_and_change_index() -> None:
    state = example_state()
    first = responses(state, {"command": "getDetails"})[0]["data"]
    assert first == {"clientCount": 7, "groupCount": 3, "roleCount": 4, "changeIndex": 0}
    ok(state, {"command": "createRole", "rolename": "x"}, {"command": "deleteRole", "rolename": "x"})
    responses(state, {"command": "deleteRole", "rolename": "x"})  # failure: no change
    assert responses(state, {"command": "getDetails"})[0]["data"]["changeIndex"] == 2


def test_read_only_requests_are_flagged() -> None:
    assert prepare_request(b'{"commands":[{"command":"listClients"},{"command":"GETROLE"}]}').read_only
    assert not prepare_request(b'{"commands":[{"command":"listClients"},{"command":"deleteRole"}]}').read_only


def test_acl_order_within_a_type_is_priority_then_insertion() -> None:
    state = example_state()
    ok(state, {"command": "createRole", "rolename": "o"},
       *[{"command": "addRoleACL", "rolename": "o", "acltype": "publishClientSend", "topic": t, "priority": p}
         for t, p in [("a", 1), ("b", 5), ("c", 1), ("d", 5), ("e", -1)]])
    acls = responses(state, {"command": "getRole", "rolename": "o"})[0]["data"]["role"]["acls"]
    assert [a["topic"] for a in acls] == ["b", "d", "a", "c", "e"]


def test_apply_change_is_pure_and_deterministic() -> None:
    doc = example_state().to_document()
    snapshot = copy.deepcopy(doc)
    change = prepare_request(json.dumps({"commands": [
        {"command": "createClient", "username": "zed", "password": "pw", "groups": [{"groupname": "devices"}]},
        {"command": "deleteRole", "rolename": "reader"}]}).encode()).change
    change = json.loads(dumps(change))  # it travels as JSON in the Raft log
    first = apply_change(doc, change)
    assert doc == snapshot
    assert apply_change(doc, change) == first
    assert "zed" in [c["username"] for c in first["clients"]]
    assert "reader" not in [r["rolename"] for r in first["roles"]]


def test_replace_change_imports_a_document() -> None:
    state = DynsecState()
    outcome = apply(state, {"replace": example_state().to_document()})
    assert outcome.kicks.everyone and sorted(state.clients)[0] == "admin"
    assert apply_change(None, {"replace": {"clients": [{"username": "x"}]}})["clients"][0]["username"] == "x"


def test_file_loading_drops_dangling_links_and_keeps_first_duplicate() -> None:
    state = DynsecState.from_document({
        "roles": [{"rolename": "r", "acls": [{"acltype": "bogus", "topic": "a"}, {"acltype": "publishclientsend",
                                                                                   "topic": "t"}]},
                  {"rolename": "r", "textname": "dup"}],
        "clients": [{"username": "u", "roles": [{"rolename": "ghost"}, {"rolename": "r"}]}, {"noname": 1}],
        "groups": [{"groupname": "g", "clients": [{"username": "ghost"}, {"username": "u", "priority": 3}]}],
        "anonymousGroup": "missing",
    })
    doc = state.to_document()
    assert doc["roles"] == [{"rolename": "r", "acls": [
        {"acltype": "publishClientSend", "topic": "t", "priority": 0, "allow": False}]}]
    assert doc["clients"] == [{"username": "u", "roles": [{"rolename": "r"}]}]
    assert doc["groups"][0]["clients"] == [{"username": "u", "priority": 3}]
    assert "anonymousGroup" not in doc
    assert doc["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                       "subscribe": False, "unsubscribe": False}


def test_init_file_textName_is_read_case_insensitively() -> None:
    from captures import init_document

    state = DynsecState.from_document(init_document())
    assert state.clients["admin"].textname == "Dynsec admin user"
    assert request(state, {"command": "listClients"}).response["responses"][0]["data"]["clients"] == ["admin"]
