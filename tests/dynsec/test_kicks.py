"""The kick table (spec/dynsec.md §7), one row per command, on spec/dynsec-example.json:
members of group devices are alice, bob, dave; role reader is held by carol
directly and by devices; anon is the anonymous group (no members)."""

from __future__ import annotations

import pytest
from helpers import example_state, ok, request

DEVICES = {"alice", "bob", "dave"}

ROWS = [
    ({"command": "deleteClient", "username": "alice"}, {"alice"}, False),
    ({"command": "disableClient", "username": "alice"}, {"alice"}, False),
    ({"command": "enableClient", "username": "eve"}, set(), False),
    ({"command": "setClientPassword", "username": "alice", "password": "x"}, {"alice"}, False),
    ({"command": "setClientId", "username": "alice", "clientid": "a1"}, {"alice"}, False),
    ({"command": "modifyClient", "username": "alice", "textname": "A"}, {"alice"}, False),
    ({"command": "addClientRole", "username": "alice", "rolename": "reader"}, {"alice"}, False),
    ({"command": "removeClientRole", "username": "alice", "rolename": "sensor-writer"}, {"alice"}, False),
    ({"command": "addGroupClient", "groupname": "operators", "username": "alice"}, {"alice"}, False),
    # kicked although the command fails (spec §13 item 6)
    ({"command": "addGroupClient", "groupname": "devices", "username": "alice"}, {"alice"}, False),
    ({"command": "addGroupClient", "groupname": "nope", "username": "alice"}, {"alice"}, False),
    ({"command": "removeGroupClient", "groupname": "devices", "username": "alice"}, {"alice"}, False),
    ({"command": "removeGroupClient", "groupname": "nope", "username": "carol"}, {"carol"}, False),
    ({"command": "addGroupRole", "groupname": "devices", "rolename": "status-pub"}, DEVICES, False),
    ({"command": "removeGroupRole", "groupname": "devices", "rolename": "reader"}, DEVICES, False),
    ({"command": "addGroupRole", "groupname": "anon", "rolename": "reader"}, set(), True),
    ({"command": "deleteGroup", "groupname": "devices"}, DEVICES, False),
    ({"command": "modifyGroup", "groupname": "devices", "clients": [{"username": "carol"}]},
     DEVICES | {"carol"}, False),
    ({"command": "modifyGroup", "groupname": "devices", "textname": "D"}, DEVICES, False),
    ({"command": "setAnonymousGroup", "groupname": "devices"}, set(), True),
    ({"command": "addRoleACL", "rolename": "reader", "acltype": "subscribePattern", "topic": "a/#"},
     DEVICES | {"carol"}, False),
    ({"command": "removeRoleACL", "rolename": "reader", "acltype": "subscribeLiteral", "topic": "status/#"},
     DEVICES | {"carol"}, False),
    ({"command": "deleteRole", "rolename": "status-pub"}, {"dave", "carol"}, False),  # dave direct, carol via operators
    ({"command": "modifyRole", "rolename": "reader", "acls": []}, set(), False),  # 2.0: nobody
    ({"command": "createClient", "username": "new"}, set(), False),
    ({"command": "createGroup", "groupname": "new"}, set(), False),
    ({"command": "createRole", "rolename": "new"}, set(), False),
    ({"command": "setDefaultACLAccess", "acls": [{"acltype": "subscribe", "allow": True}]}, set(), False),
    ({"command": "getClient", "username": "alice"}, set(), False),
    ({"command": "listClients"}, set(), False),
    # failed commands other than add/removeGroupClient kick nobody
    ({"command": "addClientRole", "username": "alice", "rolename": "sensor-writer"}, set(), False),
    ({"command": "deleteClient", "username": "nobody"}, set(), False),
]


@pytest.mark.parametrize(("command", "users", "anonymous"), ROWS,
                         ids=[f"{i}-{r[0]['command']}" for i, r in enumerate(ROWS)])
def test_kick_table(command, users, anonymous) -> None:
    outcome = request(example_state(), command)
    assert outcome.kicks.usernames == users
    assert outcome.kicks.anonymous is anonymous


def test_role_links_from_create_arrays_are_kicked_like_any_other() -> None:
    """Upstream bug (spec §13 item 16) not copied: a role given in createClient's
    ``roles`` array is a normal link for kicks and for deleteRole."""
    state = example_state()
    ok(state, {"command": "createRole", "rolename": "r1"},
       {"command": "createClient", "username": "u1", "roles": [{"rolename": "r1"}]},
       {"command": "createGroup", "groupname": "g1", "roles": [{"rolename": "r1"}]},
       {"command": "addGroupClient", "groupname": "g1", "username": "alice"})
    out = ok(state, {"command": "addRoleACL", "rolename": "r1", "acltype": "publishClientSend", "topic": "t"})
    assert out.kicks.usernames == {"u1", "alice"}
    out = ok(state, {"command": "deleteRole", "rolename": "r1"}, {"command": "getClient", "username": "u1"})
    assert out.kicks.usernames == {"u1", "alice"}
    assert out.response["responses"][1]["data"]["client"]["roles"] == []


def test_kicks_match_connections() -> None:
    out = request(example_state(), {"command": "setAnonymousGroup", "groupname": "anon"},
                  {"command": "disableClient", "username": "bob"})
    assert out.kicks.matches(None) and out.kicks.matches("bob") and not out.kicks.matches("alice")
