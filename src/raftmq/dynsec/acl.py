"""Authentication and authorisation decisions (spec/dynsec.md §2, §6).

Theory of operation
-------------------
``Authorizer.check(username, client_id, access, topic)`` answers one broker
question (access is one of the four check types of spec §6.1).  For a client
with a username the roles consulted are, in order (§6.2): the client's own
roles (priority desc, name asc), then for each of its groups (group priority
desc, name asc) that group's roles.  A client without a username uses the
roles of the anonymous group.  Inside a role the first matching ACL of the
relevant type decides; for (un)subscribe the role's *Literal ACL with exactly
that filter decides first, then its *Pattern ACLs in order.  Nothing matches:
the default flag, which never grants a topic starting with ``$CONTROL``.

Decisions are cached per (username, client id) and dropped as a whole when the
state's ``generation`` moves (any successful dynsec change).

Topic matching (§6.3) is Mosquitto 2.0's: publish ACLs are MQTT filters matched
against the topic name; subscribe/unsubscribe patterns compare a filter with a
filter.  ``%c``/``%u`` substitution is Mosquitto 2.1's and off by default
(2.0.22 treats them literally); ``substitute=True`` turns it on.
"""

from __future__ import annotations

from raftmq.dynsec.model import DynsecState, Role

PUBLISH_SEND = "publish_client_send"
PUBLISH_RECEIVE = "publish_client_receive"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"

# access -> (default flag, publish ACL type or (literal, pattern) ACL types)
_DEFAULT_FLAG = {
    PUBLISH_SEND: "publishClientSend",
    PUBLISH_RECEIVE: "publishClientReceive",
    SUBSCRIBE: "subscribe",
    UNSUBSCRIBE: "unsubscribe",
}
_FILTER_TYPES = {
    SUBSCRIBE: ("subscribeLiteral", "subscribePattern"),
    UNSUBSCRIBE: ("unsubscribeLiteral", "unsubscribePattern"),
}

RC_SUCCESS = 0x00
RC_NOT_AUTHORIZED = 0x87  # spec §2: every dynsec refusal is "Not authorized" [LIVE]

_CACHE_LIMIT = 4096  # decisions kept per client before the cache is reset


def topic_matches(acl: str, topic: str) -> bool:
    """MQTT matching of a topic name against a filter; a filter starting with a
    wildcard does not match ``$`` topics [MQTT-4.7.2-1]; ``a/#`` matches ``a``."""
    if topic.startswith("$") and acl[:1] in ("+", "#"):
        return False
    f = acl.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(t) == len(f)


def pattern_covers(acl: str, requested: str) -> bool:
    """Whether a subscribe/unsubscribePattern ACL covers a requested filter (2.0 rules):
    ACL ``#`` covers everything; a request ending in ``#`` needs an ACL ending in
    ``#``; ACL ``+`` covers any one level (a literal ``+`` included); other levels
    must be equal; ``foo/#`` also covers ``foo``."""
    if acl == "#":
        return True
    a = acl.split("/")
    r = requested.split("/")
    if r[-1] == "#" and a[-1] != "#":
        return False
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(r):
            return False
        if level != "+" and level != r[i]:
            return False
    return len(r) == len(a)


def _substitute(acl: str, client_id: str | None, username: str | None) -> str | None:
    """Mosquitto 2.1's %c/%u: a level that is exactly %c or %u becomes the client id
    or username; a value that is missing or contains + # / makes the ACL match nothing."""
    if "%" not in acl:
        return acl
    levels = acl.split("/")
    for i, level in enumerate(levels):
        if level in ("%c", "%u"):
            value = client_id if level == "%c" else username
            if not value or "+" in value or "#" in value or "/" in value:
                return None
            levels[i] = value
    return "/".join(levels)


class Authorizer:
    """Answers CONNECT and ACL questions from a :class:`DynsecState`."""

    def __init__(self, state: DynsecState, *, allow_anonymous: bool = False, substitute: bool = False) -> None:
        self.state = state
        self.allow_anonymous = allow_anonymous
        self.substitute = substitute
        self._generation = -1
        self._roles: dict[str | None, list[Role]] = {}
        self._decisions: dict[tuple[str | None, str | None], dict[tuple[str, str], bool]] = {}

    # -- authentication (spec §2) -----------------------------------------

    def authenticate(self, client_id: str, username: str | None, password: bytes | None) -> int:
        if username is None:
            # No username: accepted only when the broker allows anonymous clients.
            return RC_SUCCESS if self.allow_anonymous else RC_NOT_AUTHORIZED
        if not password:
            # No password, or a zero-length one (Mosquitto treats both as none): the
            # plugin defers, and with no other auth source the broker refuses.
            return RC_NOT_AUTHORIZED
        client = self.state.clients.get(username)
        if client is None or client.disabled or client.password is None:
            return RC_NOT_AUTHORIZED
        if client.clientid is not None and client.clientid != client_id:
            return RC_NOT_AUTHORIZED
        return RC_SUCCESS if client.password.verify(password) else RC_NOT_AUTHORIZED

    # -- authorisation (spec §6) ------------------------------------------

    def _refresh(self) -> None:
        if self._generation != self.state.generation:
            self._generation = self.state.generation
            self._roles.clear()
            self._decisions.clear()

    def roles_for(self, username: str | None) -> list[Role] | None:
        """The roles to consult, in evaluation order; None for an unknown username."""
        self._refresh()
        try:
            return self._roles[username]
        except KeyError:
            pass
        state = self.state
        roles: list[Role] = []
        if username is None:
            group = state.groups.get(state.anonymous_group) if state.anonymous_group else None
            if group is not None:
                roles = [state.roles[n] for n, _ in _ordered(group.roles)]
        else:
            client = state.clients.get(username)
            if client is None:
                return None
            roles = [state.roles[n] for n, _ in _ordered(client.roles)]
            for groupname, _ in _ordered(client.groups):
                roles.extend(state.roles[n] for n, _ in _ordered(state.groups[groupname].roles))
        self._roles[username] = roles
        return roles

    def check(self, username: str | None, client_id: str | None, access: str, topic: str) -> bool:
        """Whether the client may do ``access`` on ``topic`` (a topic name for publish
        checks, the filter as sent -- ``$share/...`` included -- for (un)subscribe)."""
        self._refresh()
        key = (username, client_id if self.substitute else None)
        cache = self._decisions.get(key)
        if cache is None:
            cache = self._decisions[key] = {}
        elif len(cache) >= _CACHE_LIMIT:
            cache.clear()
        try:
            return cache[(access, topic)]
        except KeyError:
            pass
        decision = self._decide(username, client_id, access, topic)
        cache[(access, topic)] = decision
        return decision

    def _decide(self, username: str | None, client_id: str | None, access: str, topic: str) -> bool:
        roles = self.roles_for(username)
        if roles is None:
            return False  # not a dynsec client: no decision, the broker denies (§6.2 step 1)
        filter_types = _FILTER_TYPES.get(access)
        for role in roles:
            if filter_types is None:
                acls = role.acls[_DEFAULT_FLAG[access]]
                matcher = topic_matches
            else:
                for acl in role.acls[filter_types[0]]:  # literal: exact string, first
                    if acl.topic == topic:
                        return acl.allow
                acls = role.acls[filter_types[1]]
                matcher = pattern_covers
            for acl in acls:
                pattern = acl.topic
                if self.substitute:
                    pattern = _substitute(pattern, client_id, username)
                    if pattern is None:
                        continue
                if matcher(pattern, topic):
                    return acl.allow
        # Default access never reaches $CONTROL (spec §3.2, §6.2 step 5).
        return self.state.default_access[_DEFAULT_FLAG[access]] and not topic.startswith("$CONTROL")


def _ordered(links: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(links.items(), key=lambda item: (-item[1], item[0]))
