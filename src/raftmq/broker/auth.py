"""The authentication / authorisation hook of the broker.

The broker asks an ``AuthHook`` two questions, in the manner of Mosquitto's
security plugins (and of its dynamic-security plugin, which raftmq.dynsec
implements with this interface):

- ``authenticate(client_id, username, password) -> int``: an MQTT 5 reason
  code; 0 accepts the connection, 0x86 (bad user name or password) or 0x87
  (not authorized) refuse it.  The broker turns the code into a 3.x CONNACK
  return code (4 / 5) for older clients.
- ``acl_check(client, access, topic, qos, retain) -> bool`` where ``access`` is
  one of ``ACCESS_*`` below (Mosquitto's dynsec ACL types publishClientSend,
  publishClientReceive, subscribe, unsubscribe), ``client`` the connection
  (``.client_id``, ``.username``).

Without a hook, ``DefaultAuth`` follows Mosquitto 2.0 with no password file
and no plugin: every client is accepted when ``allow_anonymous`` is true and
refused (not authorized) otherwise, and every ACL check passes.
"""

from __future__ import annotations

from typing import Any, Protocol

from raftmq._connection import (  # noqa: F401 (re-exported; defined with the core that uses them)
    ACCESS_PUBLISH_RECEIVE,
    ACCESS_PUBLISH_SEND,
    ACCESS_SUBSCRIBE,
    ACCESS_UNSUBSCRIBE,
    DefaultAuth,
)

RC_SUCCESS = 0x00
RC_BAD_USERNAME_OR_PASSWORD = 0x86
RC_NOT_AUTHORIZED = 0x87


class AuthHook(Protocol):
    def authenticate(self, client_id: str, username: str | None, password: bytes | None) -> int: ...

    def acl_check(self, client: Any, access: str, topic: str, qos: int, retain: bool) -> bool: ...


# DefaultAuth(allow_anonymous): Mosquitto 2.0 without a password file or a
# plugin -- compiled with the connection (ext/connection.pyx), as it is asked
# once per connect.
