"""The ``$CONTROL/dynamic-security/v1`` API: one handler per command (spec/dynsec.md §3, §5).

Theory of operation
-------------------
A request travels in two steps, so that the state machine stays deterministic
(DESIGN.md §7, "dynsec is a library"):

1. :func:`prepare_request` (on the node that received the PUBLISH) parses the
   payload with Mosquitto's JSON rules (jsontext.py), and replaces every clear
   text ``password`` by its salted hash -- the only random step.  It returns a
   :class:`Request`: an envelope error to answer at once, or the normalised
   command list, flagged read-only when no command can modify anything.
2. :func:`apply` runs a *change* against a :class:`DynsecState`:
   ``{"commands": [...]}`` (a prepared request) or ``{"replace": document}``
   (import, seeding).  Same state + same change = same result on every node.
   It returns the response document, the kicks (kicks.py) and whether the
   state changed.  :func:`apply_change` is the pure document -> document form
   the replicated state machine uses.

Behaviour is Mosquitto 2.0.22's (error strings and their order, the quirks of
spec §13 items 1-6, 8-9, 12), plus 2.1's ``getDetails``.  Deliberately not
copied (spec §13 items 16-17 and the 2.0 envelope quirk): role links from
``roles`` arrays are ordinary links; deleting the anonymous group is refused;
"Command not an object"/"Missing command" entries carry no stale
correlationData.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raftmq.dynsec import password as pw
from raftmq.dynsec.jsontext import PayloadError, parse, valid_utf8
from raftmq.dynsec.kicks import Kicks
from raftmq.dynsec.model import (
    ACL_TYPE_BY_LOWER,
    DEFAULT_ACCESS_BY_LOWER,
    DEFAULT_ACCESS_TYPES,
    LINK_DEFAULT_PRIORITY,
    Acl,
    Client,
    DynsecState,
    Group,
    Role,
    get_bool,
    get_int,
    parse_acls,
)

REQUEST_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"

_HASH_KEY = "$hash"  # a prepared password: {"$hash": {password, salt, iterations}, "$empty": bool}


class CommandError(Exception):
    """A command failed; the message is the exact error string of the response."""


@dataclass(slots=True)
class Outcome:
    response: dict[str, Any]
    kicks: Kicks = field(default_factory=Kicks)
    modified: bool = False


@dataclass(slots=True)
class Request:
    """A parsed request: ``error`` (envelope level, answer at once) or ``commands``."""

    commands: list[Any] = field(default_factory=list)
    error: str | None = None
    read_only: bool = True

    @property
    def change(self) -> dict[str, Any]:
        return {"commands": self.commands}

    def error_response(self) -> dict[str, Any]:
        return {"responses": [{"command": "Unknown command", "error": self.error}]}


# ---------------------------------------------------------------------------
# Field helpers.  Lookups use lower-cased keys (jsontext normalised them).


def _required(cmd: dict[str, Any], key: str, missing: str, bad_utf8: str | None) -> str:
    value = cmd.get(key)
    if not isinstance(value, str):
        raise CommandError(missing)
    if bad_utf8 is not None and not valid_utf8(value):
        raise CommandError(bad_utf8)
    return value


def _username(cmd: dict[str, Any], *, utf8: bool = True) -> str:
    return _required(cmd, "username", "Invalid/missing username", "Username not valid UTF-8" if utf8 else None)


def _groupname(cmd: dict[str, Any], *, utf8: bool = True) -> str:
    return _required(cmd, "groupname", "Invalid/missing groupname", "Group name not valid UTF-8" if utf8 else None)


def _rolename(cmd: dict[str, Any], *, utf8: bool = True) -> str:
    return _required(cmd, "rolename", "Invalid/missing rolename", "Role name not valid UTF-8" if utf8 else None)


def _optional_text(cmd: dict[str, Any], key: str) -> str | None:
    """create*: an optional string of the wrong type is an error (spec §3.3)."""
    if key not in cmd:
        return None
    value = cmd[key]
    if not isinstance(value, str):
        raise CommandError(f"Invalid/missing {key}")
    return value


def _modify_text(cmd: dict[str, Any], key: str) -> str | None:
    """modify*: an optional string of the wrong type is ignored (spec §3.3)."""
    value = cmd.get(key)
    return value if isinstance(value, str) else None


def _client(state: DynsecState, username: str) -> Client:
    client = state.clients.get(username)
    if client is None:
        raise CommandError("Client not found")
    return client


def _group(state: DynsecState, groupname: str) -> Group:
    group = state.groups.get(groupname)
    if group is None:
        raise CommandError("Group not found")
    return group


def _role(state: DynsecState, rolename: str, missing: str = "Role not found") -> Role:
    role = state.roles.get(rolename)
    if role is None:
        raise CommandError(missing)
    return role


_ROLES_INVALID = "'roles' not an array or missing/invalid rolename"


def _role_links(state: DynsecState, cmd: dict[str, Any], invalid: str = _ROLES_INVALID) -> dict[str, int] | None:
    """The ``roles`` array of create/modify commands; None when absent.  Checked in
    array order; a repeated role name keeps its first priority."""
    if "roles" not in cmd:
        return None
    roles = cmd["roles"]
    if not isinstance(roles, list):
        raise CommandError(invalid)
    links: dict[str, int] = {}
    for obj in roles:
        if not isinstance(obj, dict) or not isinstance(obj.get("rolename"), str):
            raise CommandError(invalid)
        name = obj["rolename"]
        if name not in state.roles:
            raise CommandError("Role not found")
        links.setdefault(name, get_int(obj, "priority", LINK_DEFAULT_PRIORITY))
    return links


def _prepared_password(cmd: dict[str, Any]) -> tuple[bool, pw.PasswordHash | None, bool]:
    """(present, hash or None when not a string, was empty)."""
    if "password" not in cmd:
        return False, None, False
    value = cmd["password"]
    if not isinstance(value, dict) or not isinstance(value.get(_HASH_KEY), dict):
        return True, None, False
    return True, pw.from_client_json(value[_HASH_KEY]), value.get("$empty") is True


def _valid_sub_filter(topic: str) -> bool:
    """``mosquitto_sub_topic_check``: ``+`` and ``#`` fill a whole level, ``#`` is last."""
    if len(topic.encode()) > 65535:
        return False
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return False
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
    return True


def _acl_type_and_topic(cmd: dict[str, Any]) -> tuple[str, str]:
    acltype = cmd.get("acltype")
    if not isinstance(acltype, str):
        raise CommandError("Invalid/missing acltype")
    canonical = ACL_TYPE_BY_LOWER.get(acltype.lower())
    if canonical is None:
        raise CommandError("Unknown acltype")
    topic = cmd.get("topic")
    if not isinstance(topic, str):
        raise CommandError("Invalid/missing topic")
    if not valid_utf8(topic):
        raise CommandError("Topic not valid UTF-8")
    if not _valid_sub_filter(topic):
        raise CommandError("Invalid ACL topic")
    return canonical, topic


def _list_page(items: list[Any], cmd: dict[str, Any]) -> list[Any]:
    """``count``/``offset`` as upstream counts them: ``count: 0`` still yields one item
    (spec §13 item 4); a negative count means all."""
    count = get_int(cmd, "count", -1)
    offset = get_int(cmd, "offset", 0)
    page = items[max(offset, 0):]
    if count >= 0:
        page = page[: max(count, 1)]
    return page


# ---------------------------------------------------------------------------
# General


def cmd_set_default_acl_access(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    acls = cmd.get("acls")
    if not isinstance(acls, list):
        raise CommandError("Missing/invalid actions array")
    for obj in acls:
        if not isinstance(obj, dict):
            continue
        acltype, allow = obj.get("acltype"), obj.get("allow")
        if not isinstance(acltype, str) or not isinstance(allow, bool):
            continue  # silently skipped (spec §5.1)
        name = DEFAULT_ACCESS_BY_LOWER.get(acltype.lower())
        if name is not None:
            state.default_access[name] = allow


def cmd_get_default_acl_access(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return {"acls": [{"acltype": t, "allow": state.default_access[t]} for t in DEFAULT_ACCESS_TYPES]}


def cmd_get_details(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return {
        "clientCount": len(state.clients),
        "groupCount": len(state.groups),
        "roleCount": len(state.roles),
        "changeIndex": state.change_index,
    }


# ---------------------------------------------------------------------------
# Clients


def cmd_create_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    username = _username(cmd)
    present, password, _empty = _prepared_password(cmd)
    if present and password is None:
        raise CommandError("Invalid/missing password")
    clientid = None
    if "clientid" in cmd:
        clientid = cmd["clientid"]
        if not isinstance(clientid, str):
            raise CommandError("Invalid/missing client id")
        if not valid_utf8(clientid):
            raise CommandError("Client ID not valid UTF-8")
    textname = _optional_text(cmd, "textname")
    textdescription = _optional_text(cmd, "textdescription")
    if username in state.clients:
        raise CommandError("Client already exists")
    roles = _role_links(state, cmd) or {}
    groups: dict[str, int] = {}
    if isinstance(cmd.get("groups"), list):
        for obj in cmd["groups"]:
            if not isinstance(obj, dict) or not isinstance(obj.get("groupname"), str):
                continue
            if obj["groupname"] not in state.groups:
                raise CommandError("Group not found")
            groups.setdefault(obj["groupname"], get_int(obj, "priority", LINK_DEFAULT_PRIORITY))
    state.clients[username] = Client(
        username, password, clientid or None, textname, textdescription, roles=roles
    )
    for groupname, priority in groups.items():
        state.add_group_client(groupname, username, priority)


def cmd_delete_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    username = _username(cmd, utf8=False)
    _client(state, username)
    kicks.user(username)
    state.remove_client(username)


def cmd_set_client_password(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    username = _username(cmd)
    present, password, empty = _prepared_password(cmd)
    if password is None:
        raise CommandError("Invalid/missing password")
    if empty:
        raise CommandError("Empty password is not allowed")
    client = _client(state, username)
    client.password = password
    kicks.user(username)


def cmd_set_client_id(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    username = _username(cmd)
    clientid = None
    if "clientid" in cmd:
        clientid = cmd["clientid"]
        if not isinstance(clientid, str):
            raise CommandError("Invalid/missing client ID")
        if not valid_utf8(clientid):
            raise CommandError("Client ID not valid UTF-8")
    client = _client(state, username)
    client.clientid = clientid or None
    kicks.user(username)


def cmd_modify_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    username = _username(cmd)
    client = _client(state, username)
    # Validate everything first: on any error nothing changes (2.0.15+).
    _present, password, empty = _prepared_password(cmd)
    roles = _role_links(state, cmd)
    groups: dict[str, int] | None = None
    if isinstance(cmd.get("groups"), list):
        groups = {}
        for obj in cmd["groups"]:
            name = obj.get("groupname") if isinstance(obj, dict) else None
            if not isinstance(name, str):
                raise CommandError("'groups' contains an object with an invalid 'groupname'")
            if name not in state.groups:
                raise CommandError("'groups' contains an object with a 'groupname' that does not exist")
            groups.setdefault(name, get_int(obj, "priority", LINK_DEFAULT_PRIORITY))

    if isinstance(cmd.get("clientid"), str):
        client.clientid = cmd["clientid"] or None
    if password is not None and not empty:
        client.password = password
    textname = _modify_text(cmd, "textname")
    if textname is not None:
        client.textname = textname
    textdescription = _modify_text(cmd, "textdescription")
    if textdescription is not None:
        client.textdescription = textdescription
    if roles is not None:
        client.roles = roles
    if groups is not None:
        for groupname in list(client.groups):
            state.remove_group_client(groupname, username)
        for groupname, priority in groups.items():
            state.add_group_client(groupname, username, priority)
    kicks.user(username)


def _set_disabled(state: DynsecState, cmd: dict[str, Any], disabled: bool) -> str:
    username = _username(cmd)
    _client(state, username).disabled = disabled
    return username


def cmd_enable_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    _set_disabled(state, cmd, False)


def cmd_disable_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    kicks.user(_set_disabled(state, cmd, True))


def cmd_get_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return {"client": state.client_json(_client(state, _username(cmd)))}


def _listing(objects: dict[str, Any], to_json: Any, key: str, cmd: dict[str, Any]) -> dict[str, Any]:
    """listClients / listGroups / listRoles: a sorted page of names, or of objects when verbose."""
    names = _list_page(sorted(objects), cmd)
    items: list[Any] = [to_json(objects[n]) for n in names] if get_bool(cmd, "verbose", False) else names
    return {"totalCount": len(objects), key: items}


def cmd_list_clients(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return _listing(state.clients, state.client_json, "clients", cmd)


def _client_role_args(state: DynsecState, cmd: dict[str, Any]) -> tuple[Client, str]:
    username = _username(cmd)
    rolename = _rolename(cmd)
    client = _client(state, username)
    _role(state, rolename)
    return client, rolename


def cmd_add_client_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    client, rolename = _client_role_args(state, cmd)
    if rolename in client.roles:
        raise CommandError("Internal error")  # sic: upstream's answer (spec §13 item 1)
    client.roles[rolename] = get_int(cmd, "priority", LINK_DEFAULT_PRIORITY)
    kicks.user(client.username)


def cmd_remove_client_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    client, rolename = _client_role_args(state, cmd)
    client.roles.pop(rolename, None)
    kicks.user(client.username)


# ---------------------------------------------------------------------------
# Groups


def cmd_create_group(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    groupname = _groupname(cmd)
    textname = _optional_text(cmd, "textname")
    textdescription = _optional_text(cmd, "textdescription")
    if groupname in state.groups:
        raise CommandError("Group already exists")
    roles = _role_links(state, cmd, invalid="Internal error") or {}
    state.groups[groupname] = Group(groupname, textname, textdescription, roles=roles)


def cmd_delete_group(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    groupname = _groupname(cmd)
    _group(state, groupname)
    if groupname == state.anonymous_group:
        raise CommandError("Deleting the anonymous group is forbidden")
    kicks.group_members(state, groupname)
    state.remove_group(groupname)


def cmd_get_group(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return {"group": state.group_json(_group(state, _groupname(cmd)))}


def cmd_list_groups(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return _listing(state.groups, state.group_json, "groups", cmd)


def cmd_modify_group(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    groupname = _groupname(cmd)
    group = _group(state, groupname)
    roles = _role_links(state, cmd)
    members: dict[str, int] | None = None
    if isinstance(cmd.get("clients"), list):
        members = {}
        for obj in cmd["clients"]:
            name = obj.get("username") if isinstance(obj, dict) else None
            if not isinstance(name, str):
                raise CommandError("'clients' contains an object with an invalid 'username'")
            if name not in state.clients:
                raise CommandError("'clients' contains an object with a 'username' that does not exist")
            members.setdefault(name, get_int(obj, "priority", LINK_DEFAULT_PRIORITY))

    textname = _modify_text(cmd, "textname")
    if textname is not None:
        group.textname = textname
    textdescription = _modify_text(cmd, "textdescription")
    if textdescription is not None:
        group.textdescription = textdescription
    if roles is not None:
        group.roles = roles
    if members is not None:
        kicks.group_members(state, groupname)  # the members before the change
        for username in list(group.clients):
            state.remove_group_client(groupname, username)
        for username, priority in members.items():
            state.add_group_client(groupname, username, priority)
    kicks.group_members(state, groupname)


def _group_client_args(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> tuple[Group, str]:
    username = _username(cmd)
    groupname = _groupname(cmd)
    # From here on the username is kicked even if the command fails (spec §7, §13 item 6).
    kicks.user(username)
    _client(state, username)
    return _group(state, groupname), username


def cmd_add_group_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    group, username = _group_client_args(state, cmd, kicks)
    if username in group.clients:
        raise CommandError("Client is already in this group")
    state.add_group_client(group.name, username, get_int(cmd, "priority", LINK_DEFAULT_PRIORITY))


def cmd_remove_group_client(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    group, username = _group_client_args(state, cmd, kicks)
    if username in group.clients:
        state.remove_group_client(group.name, username)


def _group_role_args(state: DynsecState, cmd: dict[str, Any]) -> tuple[Group, str]:
    groupname = _groupname(cmd)
    rolename = _rolename(cmd)
    group = _group(state, groupname)
    _role(state, rolename)
    return group, rolename


def cmd_add_group_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    group, rolename = _group_role_args(state, cmd)
    if rolename in group.roles:
        raise CommandError("Group is already in this role")
    group.roles[rolename] = get_int(cmd, "priority", LINK_DEFAULT_PRIORITY)
    kicks.group_members(state, group.name)


def cmd_remove_group_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    group, rolename = _group_role_args(state, cmd)
    group.roles.pop(rolename, None)
    kicks.group_members(state, group.name)


def cmd_set_anonymous_group(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    groupname = _groupname(cmd)
    _group(state, groupname)
    state.anonymous_group = groupname
    kicks.anonymous = True


def cmd_get_anonymous_group(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return {"group": {"groupname": state.anonymous_group or ""}}


# ---------------------------------------------------------------------------
# Roles


def cmd_create_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    rolename = _rolename(cmd)
    textname = _optional_text(cmd, "textname")
    textdescription = _optional_text(cmd, "textdescription")
    if rolename in state.roles:
        raise CommandError("Role already exists")
    role = Role(rolename, textname, textdescription)
    for acltype, acl in parse_acls(cmd.get("acls")):
        role.add_acl(acltype, acl)
    state.roles[rolename] = role


def cmd_delete_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    rolename = _rolename(cmd)
    _role(state, rolename)
    kicks.role_holders(state, rolename)
    state.remove_role(rolename)


def cmd_get_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return {"role": state.role_json(_role(state, _rolename(cmd)))}


def cmd_list_roles(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> dict[str, Any]:
    return _listing(state.roles, state.role_json, "roles", cmd)


def cmd_modify_role(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    role = _role(state, _rolename(cmd), missing="Role does not exist")  # sic (spec §13 item 2)
    textname = _modify_text(cmd, "textname")
    if textname is not None:
        role.textname = textname
    textdescription = _modify_text(cmd, "textdescription")
    if textdescription is not None:
        role.textdescription = textdescription
    if isinstance(cmd.get("acls"), list):
        fresh = Role(role.name)
        for acltype, acl in parse_acls(cmd["acls"]):
            fresh.add_acl(acltype, acl)
        role.acls = fresh.acls
    # Mosquitto 2.0 kicks nobody here (spec §7); the ACL cache is still invalidated.


def cmd_add_role_acl(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    role = _role(state, _rolename(cmd))
    acltype, topic = _acl_type_and_topic(cmd)
    if role.find_acl(acltype, topic) is not None:
        raise CommandError("ACL with this topic already exists")
    role.add_acl(acltype, Acl(topic, get_int(cmd, "priority", 0), get_bool(cmd, "allow", False)))
    kicks.role_holders(state, role.name)


def cmd_remove_role_acl(state: DynsecState, cmd: dict[str, Any], kicks: Kicks) -> None:
    role = _role(state, _rolename(cmd))
    acltype, topic = _acl_type_and_topic(cmd)
    acl = role.find_acl(acltype, topic)
    if acl is None:
        raise CommandError("ACL not found")
    role.acls[acltype].remove(acl)
    kicks.role_holders(state, role.name)


# ---------------------------------------------------------------------------
# Dispatch


Handler = Callable[[DynsecState, dict[str, Any], Kicks], "dict[str, Any] | None"]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str  # canonical spelling, echoed in responses
    handler: Handler
    modifies: bool


_SPECS = [
    CommandSpec("setDefaultACLAccess", cmd_set_default_acl_access, True),
    CommandSpec("getDefaultACLAccess", cmd_get_default_acl_access, False),
    CommandSpec("getDetails", cmd_get_details, False),
    CommandSpec("createClient", cmd_create_client, True),
    CommandSpec("deleteClient", cmd_delete_client, True),
    CommandSpec("getClient", cmd_get_client, False),
    CommandSpec("listClients", cmd_list_clients, False),
    CommandSpec("modifyClient", cmd_modify_client, True),
    CommandSpec("setClientPassword", cmd_set_client_password, True),
    CommandSpec("setClientId", cmd_set_client_id, True),
    CommandSpec("addClientRole", cmd_add_client_role, True),
    CommandSpec("removeClientRole", cmd_remove_client_role, True),
    CommandSpec("enableClient", cmd_enable_client, True),
    CommandSpec("disableClient", cmd_disable_client, True),
    CommandSpec("addGroupClient", cmd_add_group_client, True),
    CommandSpec("createGroup", cmd_create_group, True),
    CommandSpec("deleteGroup", cmd_delete_group, True),
    CommandSpec("getGroup", cmd_get_group, False),
    CommandSpec("listGroups", cmd_list_groups, False),
    CommandSpec("modifyGroup", cmd_modify_group, True),
    CommandSpec("removeGroupClient", cmd_remove_group_client, True),
    CommandSpec("addGroupRole", cmd_add_group_role, True),
    CommandSpec("removeGroupRole", cmd_remove_group_role, True),
    CommandSpec("setAnonymousGroup", cmd_set_anonymous_group, True),
    CommandSpec("getAnonymousGroup", cmd_get_anonymous_group, False),
    CommandSpec("createRole", cmd_create_role, True),
    CommandSpec("getRole", cmd_get_role, False),
    CommandSpec("listRoles", cmd_list_roles, False),
    CommandSpec("modifyRole", cmd_modify_role, True),
    CommandSpec("deleteRole", cmd_delete_role, True),
    CommandSpec("addRoleACL", cmd_add_role_acl, True),
    CommandSpec("removeRoleACL", cmd_remove_role_acl, True),
]
# Command names are matched case-insensitively (spec §3.3).
COMMANDS: dict[str, CommandSpec] = {spec.name.lower(): spec for spec in _SPECS}
_PASSWORD_COMMANDS = frozenset(("createclient", "setclientpassword", "modifyclient"))


def prepare_request(payload: bytes | str) -> Request:
    """Parse a request and hash its passwords (the non-deterministic part)."""
    try:
        doc = parse(payload)
    except PayloadError:
        return Request(error="Payload not valid JSON")
    commands = doc.get("commands") if isinstance(doc, dict) else None
    if not isinstance(commands, list):
        return Request(error="Invalid/missing commands")
    read_only = True
    for cmd in commands:
        if not isinstance(cmd, dict) or not isinstance(cmd.get("command"), str):
            continue
        name = cmd["command"].lower()
        spec = COMMANDS.get(name)
        if spec is not None and spec.modifies:
            read_only = False
        if name in _PASSWORD_COMMANDS and "password" in cmd:
            clear = cmd["password"]
            if isinstance(clear, str):
                cmd["password"] = {_HASH_KEY: pw.hash_password(clear).to_json(), "$empty": clear == ""}
            else:
                cmd["password"] = 0  # present but not a string; never a caller-supplied hash
    return Request(commands=commands, read_only=read_only)


def execute(state: DynsecState, commands: list[Any]) -> Outcome:
    """Run prepared commands in order: one response entry each (spec §3.3, §3.4)."""
    responses: list[dict[str, Any]] = []
    outcome = Outcome({"responses": responses})
    for cmd in commands:
        if not isinstance(cmd, dict):
            responses.append({"command": "Unknown command", "error": "Command not an object"})
            continue
        name = cmd.get("command")
        if not isinstance(name, str):
            responses.append({"command": "Unknown command", "error": "Missing command"})
            continue
        correlation = cmd.get("correlationdata")
        if "correlationdata" in cmd and not isinstance(correlation, str):
            responses.append({"command": name, "error": "Invalid correlationData data type."})
            break  # the remaining commands are not processed
        spec = COMMANDS.get(name.lower())
        if spec is None:
            entry: dict[str, Any] = {"command": name, "error": "Unknown command"}
        else:
            entry = {"command": spec.name}
            try:
                data = spec.handler(state, cmd, outcome.kicks)
            except CommandError as exc:
                entry["error"] = str(exc)
            else:
                if data is not None:
                    entry["data"] = data
                if spec.modifies:
                    outcome.modified = True
                    state.change_index += 1
                    state.touch()
        if correlation is not None:
            entry["correlationData"] = correlation
        responses.append(entry)
    return outcome


def apply(state: DynsecState, change: dict[str, Any]) -> Outcome:
    """Apply one replicated change to ``state`` in place (deterministic)."""
    if "replace" in change:
        fresh = DynsecState.from_document(change["replace"])
        generation = state.generation
        vars(state).update(vars(fresh))
        state.generation = generation + 1
        # Anybody may have lost rights: every connection re-authenticates.
        return Outcome({"responses": []}, Kicks(everyone=True), modified=True)
    return execute(state, change.get("commands") or [])


def apply_change(document: dict[str, Any] | None, change: dict[str, Any]) -> dict[str, Any]:
    """The pure form for the state machine: the document after ``change``.

    ``document`` is not modified; None means "no dynsec data yet".
    """
    state = DynsecState.from_document(document)
    apply(state, change)
    return state.to_document()
