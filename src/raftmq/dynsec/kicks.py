"""Which connections a dynsec change disconnects (spec/dynsec.md §7).

A kicked MQTT 5 client gets DISCONNECT 0x98 (Administrative action); a 3.x
client sees its socket closed; the Will is not published.  The command
handlers (commands.py) collect kicks here while they run, *before* they
mutate the state where the affected set is the one before the change:

| command (success unless noted)                  | kicked                                           |
| ----------------------------------------------- | ------------------------------------------------ |
| deleteClient, disableClient, setClientPassword,  | that username                                    |
| setClientId, modifyClient, addClientRole,        |                                                  |
| removeClientRole                                 |                                                  |
| addGroupClient, removeGroupClient                | that username, also when the command failed     |
| addGroupRole, removeGroupRole, deleteGroup       | the group's members (+ anonymous for the         |
|                                                  | anonymous group)                                 |
| modifyGroup                                      | members before (if ``clients`` given) and after  |
| setAnonymousGroup                                | anonymous                                        |
| addRoleACL, removeRoleACL, deleteRole            | every holder of the role, direct or via a group, |
|                                                  | anonymous if the anonymous group holds it        |
| modifyRole (2.0), enableClient, create*, get*,   | nobody                                           |
| list*, set/getDefaultACLAccess, ...              |                                                  |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raftmq.dynsec.model import DynsecState

REASON_ADMINISTRATIVE_ACTION = 0x98  # MQTT 5 DISCONNECT reason code


@dataclass(slots=True)
class Kicks:
    """Connections to disconnect: by username, and/or every connection without one."""

    usernames: set[str] = field(default_factory=set)
    anonymous: bool = False
    everyone: bool = False  # a whole new configuration was imported

    def __bool__(self) -> bool:
        return bool(self.usernames) or self.anonymous or self.everyone

    def user(self, username: str) -> None:
        self.usernames.add(username)

    def group_members(self, state: DynsecState, groupname: str) -> None:
        group = state.groups.get(groupname)
        if group is None:
            return
        self.usernames.update(group.clients)
        if groupname == state.anonymous_group:
            self.anonymous = True

    def role_holders(self, state: DynsecState, rolename: str) -> None:
        users, anonymous = state.role_holders(rolename)
        self.usernames.update(users)
        self.anonymous = self.anonymous or anonymous

    def update(self, other: Kicks) -> None:
        self.usernames.update(other.usernames)
        self.anonymous = self.anonymous or other.anonymous
        self.everyone = self.everyone or other.everyone

    def matches(self, username: str | None) -> bool:
        """Whether a connection authenticated as ``username`` (None: anonymous) is kicked."""
        if self.everyone:
            return True
        if username is None:
            return self.anonymous
        return username in self.usernames
