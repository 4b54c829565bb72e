"""The ACL behaviour table (spec/dynsec.md §6): each row is one rule that, if it
were implemented wrongly, makes that row fail.  Base configuration:
spec/dynsec-example.json (roles admin, reader, sensor-writer, status-pub)."""

from __future__ import annotations

import pytest
from helpers import example_state, ok

from raftmq.dynsec.acl import (
    PUBLISH_RECEIVE,
    PUBLISH_SEND,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Authorizer,
    pattern_covers,
    topic_matches,
)
from raftmq.dynsec.model import DynsecState

SEND, RECV, SUB, UNSUB = PUBLISH_SEND, PUBLISH_RECEIVE, SUBSCRIBE, UNSUBSCRIBE


# (username, access, topic, expected, why) on the unmodified example file
EXAMPLE_ROWS = [
    ("dave", SEND, "sensors/t1", True, "sensor-writer allows sensors/# (p5)"),
    ("dave", SEND, "sensors/secret", False, "deny p10 beats allow p5 inside one role"),
    ("dave", SEND, "status/private", True, "status-pub allows status/#"),
    ("dave", SEND, "sensors", True, "sensors/# also matches its parent level"),
    ("alice", SEND, "other/x", False, "no ACL: default publishClientSend is false"),
    ("alice", RECV, "other/x", True, "no ACL: default publishClientReceive is true"),
    ("alice", RECV, "status/private", False, "group devices -> reader denies receive"),
    ("alice", RECV, "status/public", True, "not matched by the deny: default true"),
    ("admin", RECV, "status/private", True, "admin role receives #"),
    ("alice", RECV, "$CONTROL/dynamic-security/v1/response", False, "default never grants $CONTROL"),
    ("admin", RECV, "$CONTROL/dynamic-security/v1/response", True, "explicit ACL grants it"),
    ("admin", SEND, "$CONTROL/dynamic-security/v1", True, "admin may send requests"),
    ("alice", SEND, "$CONTROL/dynamic-security/v1", False, "others may not"),
    ("alice", UNSUB, "$CONTROL/dynamic-security/v1/response", False, "default unsubscribe true, but not $CONTROL"),
    ("carol", SUB, "status/#", True, "subscribeLiteral status/# matches the exact filter"),
    ("carol", SUB, "status/a", False, "a literal ACL is not a pattern: default subscribe false"),
    ("carol", UNSUB, "status/x", False, "unsubscribePattern status/+ deny"),
    ("carol", UNSUB, "other/x", True, "default unsubscribe true"),
    ("dave", UNSUB, "status/#", True, "unsubscribeLiteral status/# allow (status-pub, p7 before reader)"),
    ("dave", SUB, "sensors/+/temp", True, "subscribePattern sensors/# covers sensors/+/temp"),
    ("dave", SUB, "sensors/#", True, "... and sensors/#"),
    ("dave", SUB, "sensors", True, "... and sensors"),
    ("dave", SUB, "$share/g/sensors/#", False, "the full shared filter is checked: sensors/# does not cover it"),
    ("admin", SUB, "$share/g/sensors/#", True, "subscribePattern # covers shared filters (2.0)"),
    ("admin", SUB, "$SYS/broker/uptime", True, "admin subscribePattern $SYS/#"),
    ("nobody", RECV, "other/x", False, "a username unknown to dynsec gets no default access"),
    ("eve", SEND, "other/x", False, "eve has no roles"),
]


@pytest.mark.parametrize(("username", "access", "topic", "expected", "why"), EXAMPLE_ROWS,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in EXAMPLE_ROWS])
def test_example_file_rows(username, access, topic, expected, why) -> None:
    assert Authorizer(example_state()).check(username, "cid", access, topic) is expected, why


def _with_roles(*commands) -> DynsecState:
    state = example_state()
    ok(state, *commands)
    return state


def test_hash_filter_acl_does_not_reach_dollar_topics() -> None:
    state = _with_roles(
        {"command": "createRole", "rolename": "all", "acls": [
            {"acltype": "publishClientReceive", "topic": "#", "allow": True}]},
        {"command": "createClient", "username": "u", "roles": [{"rolename": "all"}]},
        {"command": "setDefaultACLAccess", "acls": [{"acltype": "publishClientReceive", "allow": False}]},
    )
    auth = Authorizer(state)
    assert auth.check("u", "c", RECV, "a/b") is True
    assert auth.check("u", "c", RECV, "$SYS/broker/uptime") is False


def test_literal_beats_pattern_whatever_the_priorities() -> None:
    state = _with_roles(
        {"command": "createRole", "rolename": "t", "acls": [
            {"acltype": "subscribeLiteral", "topic": "test/a", "allow": False, "priority": -100},
            {"acltype": "subscribePattern", "topic": "test/#", "allow": True, "priority": 100}]},
        {"command": "createClient", "username": "u", "roles": [{"rolename": "t"}]},
    )
    auth = Authorizer(state)
    assert auth.check("u", "c", SUB, "test/a") is False
    assert auth.check("u", "c", SUB, "test/b") is True
    assert auth.check("u", "c", SUB, "test/+") is True
    assert auth.check("u", "c", SUB, "+/a") is False


def _two_roles(state: DynsecState, names=("allow", "deny")) -> None:
    ok(state,
       {"command": "createRole", "rolename": names[0], "acls": [
           {"acltype": "publishClientSend", "topic": "x", "allow": True}]},
       {"command": "createRole", "rolename": names[1], "acls": [
           {"acltype": "publishClientSend", "topic": "x", "allow": False}]})


def test_client_role_beats_group_role_whatever_the_priorities() -> None:
    state = example_state()
    _two_roles(state)
    ok(state,
       {"command": "createGroup", "groupname": "g", "roles": [{"rolename": "deny", "priority": 100}]},
       {"command": "createClient", "username": "u", "roles": [{"rolename": "allow", "priority": 4}],
        "groups": [{"groupname": "g", "priority": 100}]})
    assert Authorizer(state).check("u", "c", SEND, "x") is True


@pytest.mark.parametrize(("deny_priority", "expected"), [(5, False), (1, True)])
def test_client_roles_higher_priority_first(deny_priority: int, expected: bool) -> None:
    state = example_state()
    _two_roles(state)
    ok(state, {"command": "createClient", "username": "u", "roles": [
        {"rolename": "allow", "priority": 4}, {"rolename": "deny", "priority": deny_priority}]})
    assert Authorizer(state).check("u", "c", SEND, "x") is expected


@pytest.mark.parametrize(("prio_a", "prio_b", "expected"), [(1, 2, False), (2, 1, True), (0, 0, True)])
def test_groups_by_membership_priority_then_name(prio_a: int, prio_b: int, expected: bool) -> None:
    state = example_state()
    _two_roles(state)
    ok(state,
       {"command": "createGroup", "groupname": "a-allow", "roles": [{"rolename": "allow"}]},
       {"command": "createGroup", "groupname": "b-deny", "roles": [{"rolename": "deny"}]},
       {"command": "createClient", "username": "u"},
       {"command": "addGroupClient", "groupname": "a-allow", "username": "u", "priority": prio_a},
       {"command": "addGroupClient", "groupname": "b-deny", "username": "u", "priority": prio_b})
    assert Authorizer(state).check("u", "c", SEND, "x") is expected


def test_role_priority_dominates_acl_priority() -> None:
    state = example_state()
    ok(state,
       {"command": "createRole", "rolename": "hi", "acls": [
           {"acltype": "publishClientSend", "topic": "x", "allow": True, "priority": -50}]},
       {"command": "createRole", "rolename": "lo", "acls": [
           {"acltype": "publishClientSend", "topic": "x", "allow": False, "priority": 50}]},
       {"command": "createClient", "username": "u", "roles": [
           {"rolename": "hi", "priority": 2}, {"rolename": "lo", "priority": 1}]})
    assert Authorizer(state).check("u", "c", SEND, "x") is True


def test_anonymous_group_roles_apply_to_clients_without_username() -> None:
    state = example_state()
    auth = Authorizer(state, allow_anonymous=True)
    assert auth.check(None, "c", SEND, "status/x") is False  # anon group has no roles: defaults
    assert auth.check(None, "c", RECV, "status/x") is True
    ok(state, {"command": "addGroupRole", "groupname": "anon", "rolename": "status-pub"})
    assert auth.check(None, "c", SEND, "status/x") is True
    # the anonymous group's roles are not given to named clients
    assert auth.check("alice", "c", SEND, "status/x") is False


def test_no_anonymous_group_means_defaults_only() -> None:
    doc = example_state().to_document()
    del doc["anonymousGroup"]
    state = DynsecState.from_document(doc)
    ok(state, {"command": "addGroupRole", "groupname": "anon", "rolename": "status-pub"})
    assert Authorizer(state).check(None, "c", SEND, "status/x") is False


def test_missing_default_keys_mean_deny() -> None:
    state = DynsecState.from_document({"roles": [], "clients": [{"username": "u"}]})
    auth = Authorizer(state)
    assert [auth.check("u", "c", a, "t") for a in (SEND, RECV, SUB, UNSUB)] == [False] * 4


def test_percent_u_is_literal_in_20_and_substituted_in_21_mode() -> None:
    state = _with_roles(
        {"command": "createRole", "rolename": "own", "acls": [
            {"acltype": "publishClientSend", "topic": "users/%u/#", "allow": True},
            {"acltype": "publishClientSend", "topic": "devices/%c", "allow": True}]},
        {"command": "addClientRole", "username": "carol", "rolename": "own"},
    )
    v20 = Authorizer(state)
    assert v20.check("carol", "c1", SEND, "users/carol/x") is False
    assert v20.check("carol", "c1", SEND, "users/%u/x") is True
    v21 = Authorizer(state, substitute=True)
    assert v21.check("carol", "c1", SEND, "users/carol/x") is True
    assert v21.check("carol", "c1", SEND, "users/alice/x") is False
    assert v21.check("carol", "c1", SEND, "devices/c1") is True
    assert v21.check("carol", "c2", SEND, "devices/c1") is False


def test_decisions_are_recomputed_after_any_change() -> None:
    state = example_state()
    auth = Authorizer(state)
    assert auth.check("dave", "dave-01", SEND, "sensors/t1") is True
    ok(state, {"command": "removeRoleACL", "rolename": "sensor-writer",
               "acltype": "publishClientSend", "topic": "sensors/#"})
    assert auth.check("dave", "dave-01", SEND, "sensors/t1") is False
    ok(state, {"command": "setDefaultACLAccess", "acls": [{"acltype": "publishClientSend", "allow": True}]})
    assert auth.check("dave", "dave-01", SEND, "sensors/t1") is True
    ok(state, {"command": "modifyRole", "rolename": "sensor-writer", "acls": [
        {"acltype": "publishClientSend", "topic": "sensors/+", "allow": False}]})
    assert auth.check("dave", "dave-01", SEND, "sensors/t1") is False


@pytest.mark.parametrize(("acl", "topic", "expected"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("+", "$SYS", False), ("#", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
    ("a/b", "a", False), ("+/+", "a/b", True), ("a", "a/b", False),
])
def test_topic_matching(acl: str, topic: str, expected: bool) -> None:
    assert topic_matches(acl, topic) is expected


@pytest.mark.parametrize(("acl", "requested", "expected"), [
    ("#", "$SYS/#", True), ("#", "$share/g/a", True), ("sensors/#", "sensors/#", True),
    ("sensors/#", "sensors/+/temp", True), ("sensors/#", "sensors", True), ("test/#", "test/+", True),
    ("test/#", "+/a", False), ("sensors/+", "sensors/#", False), ("a/+", "a/+", True), ("a/b", "a/+", False),
    ("a/+", "a/b/c", False), ("sensors/#", "#", False),
])
def test_pattern_covers(acl: str, requested: str, expected: bool) -> None:
    assert pattern_covers(acl, requested) is expected
