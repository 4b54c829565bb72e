"""The glue between the dynsec library and a broker worker (broker/server.py hooks).

Theory of operation
-------------------
``install(broker, config)`` loads the committed document from
``broker.store.load().dynsec``, seeds it on first start (see ``seed_change``),
and hooks itself in:

- ``broker.auth`` = the plugin: ``authenticate`` at CONNECT (spec §2) and
  ``acl_check`` on every publish/subscribe/unsubscribe/delivery (spec §6);
- ``broker.control_handlers["$CONTROL/dynamic-security/v1"]`` = ``on_request``.

A request is prepared (parsed, passwords hashed) at once.  A request that can
modify the configuration becomes one ``Dynsec(change)`` op committed through
the broker's store batching; only when it is committed is it applied to this
worker's in-memory state, so the state always follows the commit order (the
same order every node's state machine applies), and only then is the response
published and are the kicks done: nothing is answered that could be lost.
A read-only request is answered after everything submitted before it, so a
pipelined ``createClient`` + ``getClient`` reads its own write.

Changes committed elsewhere (another worker, another node in dynsec-sync)
arrive through ``on_remote_ops`` and are applied the same way (without a
response: the proposer answers): each worker kicks its own connections and
moves its own ACL generation.  Start-up seeding and staged imports are done
once per node, by worker 0; the other workers receive them the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from raftmq.dynsec.acl import RC_SUCCESS, SUBSCRIBE, Authorizer
from raftmq.dynsec.commands import REQUEST_TOPIC, RESPONSE_TOPIC, Outcome, apply, prepare_request
from raftmq.dynsec.jsontext import dumps
from raftmq.dynsec.kicks import REASON_ADMINISTRATIVE_ACTION, Kicks
from raftmq.dynsec.model import DynsecState
from raftmq.state.entries import Dynsec, Message, SubRemove

log = logging.getLogger("raftmq.dynsec")

PASSWORD_ENV = "RAFTMQ_DYNSEC_PASSWORD"
SEED_USERNAME = "admin"
IMPORT_FILE = "dynsec-import.json"  # in the data dir: imported at the next start (cli.py)
_ACL_CACHE_LIMIT = 100_000  # cached decisions before the cache starts over


class DynsecPlugin:
    """The broker's auth hook and ``$CONTROL/dynamic-security/v1`` handler."""

    checks_acl = True  # the broker must ask acl_check

    def __init__(self, broker: Any, state: DynsecState, *, allow_anonymous: bool,
                 substitute: bool = False) -> None:
        self.broker = broker
        self.state = state
        self.authorizer = Authorizer(state, allow_anonymous=allow_anonymous, substitute=substitute)
        # A start-up seed applied locally but not yet submitted (needs the running loop).
        self.pending_seed: dict[str, Any] | None = None
        self.pending_import: Path | None = None
        # access -> topic -> username -> decision; emptied by every change (invalidate).
        self._acl_cache: dict[str, dict[str, dict[str | None, bool]]] = {}
        self._acl_cached = 0
        # Changes whenever any ACL decision may have changed (bumped by
        # invalidate, which every applied change calls): the broker caches
        # acl_check answers per (connection, topic) while it stays equal.  A plain
        # attribute, not a property: the broker reads it on every publish.
        self.acl_generation = 0

    def start(self) -> None:
        """Commit the start-up seed, if any (call once the event loop runs)."""
        seed, self.pending_seed = self.pending_seed, None
        if seed is None:
            return
        pending = self.pending_import

        def committed() -> None:
            if pending is not None and pending.exists():
                pending.rename(pending.with_name(IMPORT_FILE + ".imported"))

        self.broker.store.submit([Dynsec(seed)], committed)

    # -- AuthHook --------------------------------------------------------------

    def authenticate(self, client_id: str, username: str | None, password: bytes | None) -> int:
        if self.pending_seed is not None:
            self.start()
        rc = self.authorizer.authenticate(client_id, username, password)
        if rc == RC_SUCCESS and not getattr(self.broker, "rechecks_resumed_subscriptions", False):
            self._drop_disallowed_subscriptions(client_id, username)
        return rc

    def _drop_disallowed_subscriptions(self, client_id: str, username: str | None) -> None:
        """Spec §7: a resumed session keeps only the subscriptions its client may still
        make (Mosquitto checks them when the client connects again, e.g. after a kick).
        For a broker that does not do it itself: called at CONNECT, right before the
        broker attaches the session (a clean start drops them all anyway)."""
        broker = self.broker
        sessions = getattr(broker, "sessions", None)
        session = sessions.get(client_id) if sessions else None
        if session is None or not session.subscriptions:
            return
        ops: list[Any] = []
        for topic_filter in list(session.subscriptions):
            if not self.authorizer.check(username, client_id, SUBSCRIBE, topic_filter):
                broker.router.unsubscribe(session, topic_filter)
                if session.durable:
                    ops.append(SubRemove(client_id, topic_filter))
        if ops:
            broker.commit(ops, None)  # in packet handling: submitted with this read's batch

    def acl_check(self, client: Any, access: str, topic: str, qos: int, retain: bool) -> bool:
        # Hot path (every publish and every delivery): three dict lookups on a hit.
        try:
            return self._acl_cache[access][topic][client.username]
        except KeyError:
            return self._acl_miss(client, access, topic)

    def _acl_miss(self, client: Any, access: str, topic: str) -> bool:
        authorizer = self.authorizer
        decision = authorizer.check(client.username, client.client_id, access, topic)
        if not authorizer.substitute:  # with %c/%u the decision also depends on the client id
            if self._acl_cached >= _ACL_CACHE_LIMIT:
                self.invalidate()
            self._acl_cache.setdefault(access, {}).setdefault(topic, {})[client.username] = decision
            self._acl_cached += 1
        return decision

    def invalidate(self) -> None:
        """Forget every cached decision (after any change of the configuration)."""
        self._acl_cache = {}
        self._acl_cached = 0
        self.acl_generation += 1

    # -- control API -----------------------------------------------------------

    def on_request(self, conn: Any, message: Message) -> None:
        """A PUBLISH to $CONTROL/dynamic-security/v1 that passed the publish ACL check."""
        if self.pending_seed is not None:
            self.start()
        request = prepare_request(message.payload)
        broker = self.broker
        if request.error is not None:
            broker.after_commit(lambda: self._publish(request.error_response()))
            return
        change = request.change
        if request.read_only:
            broker.after_commit(lambda: self._run(change))
        else:
            broker.commit([Dynsec(change)], lambda: self._run(change))

    def on_remote_ops(self, ops: list[Any]) -> None:
        """Entries committed by another worker or node: apply their dynsec changes."""
        for op in ops:
            if isinstance(op, Dynsec):
                self._enforce(self.apply(op.change))

    def apply(self, change: dict[str, Any]) -> Outcome:
        """Apply a committed change to this worker's state; the only way it changes."""
        outcome = apply(self.state, change)
        if outcome.modified:
            self.invalidate()
        return outcome

    def _run(self, change: dict[str, Any]) -> None:
        outcome = self.apply(change)
        self._publish(outcome.response)
        self._enforce(outcome)

    def _publish(self, response: dict[str, Any]) -> None:
        # Spec §3.1: QoS 0, not retained, to every subscriber of the response topic.
        self.broker.publish_message(Message(RESPONSE_TOPIC, dumps(response), 0, False))

    def _enforce(self, outcome: Outcome) -> None:
        kicks = outcome.kicks
        if kicks:
            self.kick(kicks)

    def kick(self, kicks: Kicks) -> int:
        """Disconnect the matching connections: MQTT 5 reason 0x98, and their Will
        discarded for good -- not published, and deleted from a durable session's
        stored state, which a restart would otherwise publish (spec §7; Mosquitto
        kicks with ``with_will = false``)."""
        n = self.broker.disconnect_clients(lambda conn: kicks.matches(conn.username),
                                           REASON_ADMINISTRATIVE_ACTION, with_will=False)
        if n:
            log.info("Dynamic security: disconnected %d client(s) after a configuration change.", n)
        return n


def seed_change(loaded: dict[str, Any] | None, data_dir: str | os.PathLike[str] | None,
                environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """What to commit at start-up, if anything:

    - a file ``<data_dir>/dynsec-import.json`` (written by ``raftmq dynsec init
      DATADIR`` / ``raftmq dynsec import``) replaces the configuration;
    - else, on first start (no dynsec document yet) with ``RAFTMQ_DYNSEC_PASSWORD``
      set: an ``admin`` client and role as ``mosquitto_ctrl dynsec init`` creates.
    """
    from raftmq.dynsec.cli import init_document, read_document

    if data_dir is not None:
        pending = Path(data_dir) / IMPORT_FILE
        if pending.exists():
            return {"replace": read_document(pending)}
    environ = os.environ if environ is None else environ
    password = environ.get(PASSWORD_ENV)
    if loaded is None and password:
        return {"replace": init_document(SEED_USERNAME, password)}
    return None


def install(broker: Any, config: Any, *, environ: dict[str, str] | None = None) -> DynsecPlugin:
    """Hook dynamic security into ``broker`` (before ``broker.start()``).

    Registers ``on_remote_ops`` in ``broker.remote_listeners`` (or, for a broker
    without that list, as the store's remote listener).  With several workers on
    one store, only ``broker.worker_id == 0`` seeds / imports at start-up.
    """
    loaded = broker.store.load().dynsec
    state = DynsecState.from_document(loaded)
    plugin = DynsecPlugin(broker, state, allow_anonymous=bool(getattr(config, "allow_anonymous", False)),
                          substitute=bool(getattr(config, "dynsec_substitute", False)))
    data_dir = getattr(config, "data_dir", None)
    # One node, several workers on one store: the first worker alone seeds and
    # imports; the others get the committed result through on_remote_ops.
    seed = seed_change(loaded, data_dir, environ) if getattr(broker, "worker_id", 0) == 0 else None
    if seed is not None and "replace" in seed and not getattr(broker.store, "may_seed", True):
        # dynsec-sync: the seed is made once for the cluster, by the leader's
        # worker (cluster/dsync.py); the others receive it as a committed change.
        seed = None
    if seed is not None:
        plugin.apply(seed)  # in force at once; committed as soon as the loop runs
        plugin.pending_seed = seed
        plugin.pending_import = Path(data_dir) / IMPORT_FILE if data_dir is not None else None
        log.info("Dynamic security: configuration seeded (%d clients, %d groups, %d roles).",
                 len(state.clients), len(state.groups), len(state.roles))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop yet: submitted by start() or by the first CONNECT / request
        else:
            plugin.start()
    broker.auth = plugin
    broker.control_handlers[REQUEST_TOPIC] = plugin.on_request
    listeners = getattr(broker, "remote_listeners", None)
    if listeners is not None:
        listeners.append(plugin.on_remote_ops)  # next to the broker's own listeners
    elif hasattr(broker.store, "set_remote_listener"):
        broker.store.set_remote_listener(plugin.on_remote_ops)
    return plugin
