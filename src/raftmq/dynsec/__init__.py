"""Dynamic security, compatible with Mosquitto's plugin and ``mosquitto_ctrl`` (spec/dynsec.md).

A library (DESIGN.md §7): a ``$CONTROL/dynamic-security/v1`` request in,
a replicated change and a response out.

- ``model``: the configuration (clients, groups, roles, ACLs, default access),
  loaded from / dumped to Mosquitto's ``dynamic-security.json``;
- ``commands``: one handler per command; ``prepare_request`` (parse, hash
  passwords) and ``apply`` / the pure ``apply_change(document, change)`` used
  by the state machine;
- ``password``: PBKDF2-SHA512 hashes in Mosquitto's 2.0 and 2.1 forms;
- ``acl``: CONNECT authentication and ACL decisions, cached;
- ``kicks``: who is disconnected after which change;
- ``plugin``: the glue to a broker worker (``install(broker, config)``);
- ``cli``: ``raftmq dynsec init|import|export``.
"""
