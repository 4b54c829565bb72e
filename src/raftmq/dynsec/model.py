"""The in-memory dynamic-security configuration (spec/dynsec.md §4, §9).

Theory of operation
-------------------
``DynsecState`` holds clients, groups, roles, the default ACL access and the
anonymous group, loaded from and dumped to Mosquitto's ``dynamic-security.json``
document (``from_document`` / ``to_document``).  It offers small mutation
primitives that keep both sides of every link consistent (a group's member list
*and* each member's group list; a role's holders are derived, never stored, so
every way of linking a role -- ``addClientRole`` or the ``roles`` array of
``createClient``/``createGroup``/``modifyGroup`` -- is seen the same way by the
kick and ACL logic; upstream's missed links, spec §13 item 16, cannot happen).

Every mutation bumps ``generation``; the ACL checker (acl.py) drops its
per-client caches when it sees a new generation.

Ordering rules (spec §4), applied on output and in ACL evaluation:
clients/groups/roles by name (code point order == strcmp on UTF-8); a
client's or group's roles by priority desc then name; a client's groups by
priority desc then name; a group's members by username; ACLs of one type by
priority desc, ties in insertion order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raftmq.dynsec import password as pw
from raftmq.dynsec.jsontext import normalize

ACL_TYPES = (
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
)
ACL_TYPE_BY_LOWER = {t.lower(): t for t in ACL_TYPES}
DEFAULT_ACCESS_TYPES = ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe")
DEFAULT_ACCESS_BY_LOWER = {t.lower(): t for t in DEFAULT_ACCESS_TYPES}

LINK_DEFAULT_PRIORITY = -1  # role and group links (spec §4, §13 item 5)
ACL_DEFAULT_PRIORITY = 0


@dataclass(slots=True)
class Acl:
    topic: str
    priority: int = ACL_DEFAULT_PRIORITY
    allow: bool = False


@dataclass(slots=True)
class Role:
    name: str
    textname: str | None = None
    textdescription: str | None = None
    # acl type -> ACLs ordered by priority desc, ties in insertion order
    acls: dict[str, list[Acl]] = field(default_factory=lambda: {t: [] for t in ACL_TYPES})

    def find_acl(self, acltype: str, topic: str) -> Acl | None:
        for acl in self.acls[acltype]:
            if acl.topic == topic:
                return acl
        return None

    def add_acl(self, acltype: str, acl: Acl) -> None:
        """Insert after every ACL of priority >= acl.priority (stable order)."""
        acls = self.acls[acltype]
        pos = len(acls)
        while pos > 0 and acls[pos - 1].priority < acl.priority:
            pos -= 1
        acls.insert(pos, acl)


@dataclass(slots=True)
class Client:
    username: str
    password: pw.PasswordHash | None = None
    clientid: str | None = None
    textname: str | None = None
    textdescription: str | None = None
    disabled: bool = False
    roles: dict[str, int] = field(default_factory=dict)  # rolename -> priority
    groups: dict[str, int] = field(default_factory=dict)  # groupname -> priority (mirror)


@dataclass(slots=True)
class Group:
    name: str
    textname: str | None = None
    textdescription: str | None = None
    roles: dict[str, int] = field(default_factory=dict)  # rolename -> priority
    clients: dict[str, int] = field(default_factory=dict)  # username -> priority


def ordered_links(links: dict[str, int]) -> list[tuple[str, int]]:
    """Links sorted by priority desc, then name asc (spec §4)."""
    return sorted(links.items(), key=lambda item: (-item[1], item[0]))


def _link_json(key: str, name: str, priority: int) -> dict[str, Any]:
    out: dict[str, Any] = {key: name}
    if priority != LINK_DEFAULT_PRIORITY:
        out["priority"] = priority
    return out


class DynsecState:
    """The whole configuration.  Not thread-safe; one owner mutates it."""

    def __init__(self) -> None:
        # A missing document means every default flag is false (spec §6.4, §13 item 9).
        self.default_access: dict[str, bool] = {t: False for t in DEFAULT_ACCESS_TYPES}
        self.clients: dict[str, Client] = {}
        self.groups: dict[str, Group] = {}
        self.roles: dict[str, Role] = {}
        self.anonymous_group: str | None = None
        self.change_index = 0
        self.generation = 0

    def touch(self) -> None:
        self.generation += 1

    # -- links ------------------------------------------------------------

    def add_group_client(self, groupname: str, username: str, priority: int) -> None:
        self.groups[groupname].clients[username] = priority
        self.clients[username].groups[groupname] = priority

    def remove_group_client(self, groupname: str, username: str) -> None:
        self.groups[groupname].clients.pop(username, None)
        self.clients[username].groups.pop(groupname, None)

    def remove_client(self, username: str) -> None:
        client = self.clients.pop(username)
        for groupname in client.groups:
            self.groups[groupname].clients.pop(username, None)

    def remove_group(self, groupname: str) -> None:
        group = self.groups.pop(groupname)
        for username in group.clients:
            self.clients[username].groups.pop(groupname, None)
        if self.anonymous_group == groupname:
            self.anonymous_group = None

    def remove_role(self, rolename: str) -> None:
        del self.roles[rolename]
        for client in self.clients.values():
            client.roles.pop(rolename, None)
        for group in self.groups.values():
            group.roles.pop(rolename, None)

    # -- who is affected by a change (spec §7) ----------------------------

    def role_holders(self, rolename: str) -> tuple[set[str], bool]:
        """Usernames holding ``rolename`` directly or through a group; and whether anonymous does."""
        users = {c.username for c in self.clients.values() if rolename in c.roles}
        anonymous = False
        for group in self.groups.values():
            if rolename in group.roles:
                users.update(group.clients)
                anonymous = anonymous or group.name == self.anonymous_group
        return users, anonymous

    # -- JSON objects as the control API returns them ----------------------

    def client_json(self, client: Client) -> dict[str, Any]:
        out = _client_head(client)
        out["groups"] = [_link_json("groupname", n, p) for n, p in ordered_links(client.groups)]
        return out

    def group_json(self, group: Group) -> dict[str, Any]:
        out = _described({"groupname": group.name}, group)
        out["clients"] = [{"username": u} for u in sorted(group.clients)]
        out["roles"] = [_link_json("rolename", n, p) for n, p in ordered_links(group.roles)]
        return out

    def role_json(self, role: Role) -> dict[str, Any]:
        out = _described({"rolename": role.name}, role)
        out["acls"] = [
            {"acltype": t, "topic": a.topic, "priority": a.priority, "allow": a.allow}
            for t in ACL_TYPES
            for a in role.acls[t]
        ]
        return out

    # -- the document (dynamic-security.json) -----------------------------

    def to_document(self) -> dict[str, Any]:
        """The document in Mosquitto 2.0's key order (spec §9.1), plus 2.1's changeIndex."""
        doc: dict[str, Any] = {}
        if self.change_index:
            doc["changeIndex"] = self.change_index
        doc["defaultACLAccess"] = dict(self.default_access)
        clients = []
        for name in sorted(self.clients):
            c = self.clients[name]
            obj = _client_head(c)
            if c.password is not None:
                obj.update(c.password.to_json())
            clients.append(obj)
        doc["clients"] = clients
        groups = []
        for name in sorted(self.groups):
            g = self.groups[name]
            obj = _described({"groupname": g.name}, g)
            obj["roles"] = [_link_json("rolename", n, p) for n, p in ordered_links(g.roles)]
            obj["clients"] = [_link_json("username", u, g.clients[u]) for u in sorted(g.clients)]
            groups.append(obj)
        doc["groups"] = groups
        if self.anonymous_group is not None:
            doc["anonymousGroup"] = self.anonymous_group
        doc["roles"] = [self.role_json(self.roles[name]) for name in sorted(self.roles)]
        return doc

    @classmethod
    def from_document(cls, document: dict[str, Any] | None) -> DynsecState:
        """Load a document as Mosquitto does (spec §9.1): keys case-insensitive,
        loading order defaults, roles, clients, groups, anonymousGroup; nameless
        entries skipped, first of duplicates wins, dangling links dropped."""
        state = cls()
        if not isinstance(document, dict):
            return state
        doc = normalize(document)
        index = doc.get("changeindex")
        if isinstance(index, int) and not isinstance(index, bool) and index > 0:
            state.change_index = index

        defaults = doc.get("defaultaclaccess")
        if isinstance(defaults, dict):
            for key, value in defaults.items():
                name = DEFAULT_ACCESS_BY_LOWER.get(key)
                if name is not None and isinstance(value, bool):
                    state.default_access[name] = value

        for robj in _objects(doc.get("roles")):
            name = robj.get("rolename")
            if not isinstance(name, str) or name in state.roles:
                continue
            role = Role(name, _opt_str(robj, "textname"), _opt_str(robj, "textdescription"))
            for acltype, acl in parse_acls(robj.get("acls")):
                role.add_acl(acltype, acl)
            state.roles[name] = role

        for cobj in _objects(doc.get("clients")):
            name = cobj.get("username")
            if not isinstance(name, str) or name in state.clients:
                continue
            clientid = _opt_str(cobj, "clientid")
            client = Client(
                name,
                password=pw.from_client_json(cobj),
                clientid=clientid or None,
                textname=_opt_str(cobj, "textname"),
                textdescription=_opt_str(cobj, "textdescription"),
                disabled=cobj.get("disabled") is True,
            )
            for rolename, priority in parse_links(cobj.get("roles"), "rolename"):
                if rolename in state.roles:
                    client.roles.setdefault(rolename, priority)
            state.clients[name] = client

        for gobj in _objects(doc.get("groups")):
            name = gobj.get("groupname")
            if not isinstance(name, str) or name in state.groups:
                continue
            group = Group(name, _opt_str(gobj, "textname"), _opt_str(gobj, "textdescription"))
            for rolename, priority in parse_links(gobj.get("roles"), "rolename"):
                if rolename in state.roles:
                    group.roles.setdefault(rolename, priority)
            state.groups[name] = group
            for username, priority in parse_links(gobj.get("clients"), "username"):
                if username in state.clients and username not in group.clients:
                    state.add_group_client(name, username, priority)

        anon = doc.get("anonymousgroup")
        if isinstance(anon, str) and anon in state.groups:
            state.anonymous_group = anon
        return state


# -- parsing helpers shared with commands.py -----------------------------------


def _objects(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def get_int(obj: dict[str, Any], key: str, default: int) -> int:
    """An optional integer; any other JSON type silently means the default (spec §3.3)."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return value


def get_bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key)
    return value if isinstance(value, bool) else default


def parse_links(value: Any, key: str) -> list[tuple[str, int]]:
    """``[{"<key>": name, "priority": n}, ...]`` -> [(name, priority)], loosely (file loading)."""
    out = []
    for obj in _objects(value):
        name = obj.get(key)
        if isinstance(name, str):
            out.append((name, get_int(obj, "priority", LINK_DEFAULT_PRIORITY)))
    return out


def parse_acls(value: Any) -> list[tuple[str, Acl]]:
    """The loose ACL list of createRole/modifyRole and of the file (spec §5.4, §13 item 8):
    entries with an unknown type or without a string topic, and repeats of an
    earlier (type, topic), are dropped; topics are not validated."""
    out: list[tuple[str, Acl]] = []
    seen: set[tuple[str, str]] = set()
    for obj in _objects(value):
        acltype = obj.get("acltype")
        topic = obj.get("topic")
        if not isinstance(acltype, str) or not isinstance(topic, str):
            continue
        canonical = ACL_TYPE_BY_LOWER.get(acltype.lower())
        if canonical is None or (canonical, topic) in seen:
            continue
        seen.add((canonical, topic))
        out.append(
            (canonical, Acl(topic, get_int(obj, "priority", ACL_DEFAULT_PRIORITY), get_bool(obj, "allow", False)))
        )
    return out


def _described(head: dict[str, Any], obj: Client | Group | Role) -> dict[str, Any]:
    """``head`` with the object's optional textname / textdescription, in Mosquitto's key order."""
    if obj.textname is not None:
        head["textname"] = obj.textname
    if obj.textdescription is not None:
        head["textdescription"] = obj.textdescription
    return head


def _client_head(client: Client) -> dict[str, Any]:
    """The keys a client has both in control responses and in the document, in that order."""
    out: dict[str, Any] = {"username": client.username}
    if client.clientid is not None:
        out["clientid"] = client.clientid
    _described(out, client)
    if client.disabled:
        out["disabled"] = True
    out["roles"] = [_link_json("rolename", n, p) for n, p in ordered_links(client.roles)]
    return out
