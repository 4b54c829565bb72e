"""Routing: the subscription trie, shared-subscription member choice, and the
per-session delivery machinery (queue -> in flight -> acknowledged).

Delivery rules:
- one copy per matching subscription, like Mosquitto (overlapping
  subscriptions each get their copy, with their own subscription identifier);
- QoS of a delivery = min(message QoS, subscription QoS) [MQTT-3.8.4-8];
- QoS 0 goes to online subscribers only and is never stored;
- QoS 1/2 go through the session: in flight at once while the window allows
  (min(max_inflight_messages, client Receive Maximum) [MQTT-3.3.4-7]), queued
  otherwise (up to ``max_queued_messages``, then dropped and counted), queued
  while the client is offline (persistent sessions);
- a persistent session's queue changes are store ops, and its PUBLISH is
  written only once they are committed (so a message that went out is found
  again after a crash, with its packet id);
- shared subscriptions: one member per group gets each message, round-robin
  over the members, preferring connected ones.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from raftmq._codec import encode_publish
from raftmq._connection import RouterCore
from raftmq._connection import route as compiled_route
from raftmq._trie import TopicTrie
from raftmq.broker.auth import ACCESS_PUBLISH_RECEIVE
from raftmq.broker.session import SHARE_UNKNOWN, Outgoing, Session, Subscription
from raftmq.state.entries import (
    PUBREC_RECEIVED,
    SENT,
    Message,
    QueueAdd,
    QueueRemove,
    QueueUpdate,
)

if TYPE_CHECKING:
    from raftmq.broker.server import Broker

log = logging.getLogger("raftmq.broker")


class Router(RouterCore):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sessions: dict[str, Session] = broker.sessions
        self.trie = TopicTrie()
        # topic -> trie.match(topic), valid until the next subscription change:
        # a publisher sends to the same topics again and again, and a dict hit
        # costs a fraction of a trie walk.  Bounded (route clears it when full,
        # raftmq._connection.MATCH_CACHE_LIMIT).
        self._matches: dict[str, tuple[list, list]] = {}
        self.subscription_count = 0
        self._rr: dict[tuple[str, str], int] = {}
        self.max_inflight = broker.config.max_inflight_messages or 65535
        self.max_queued = broker.config.max_queued_messages

    # -- subscriptions ----------------------------------------------------------

    def subscribe(self, session: Session, sub: Subscription) -> bool:
        """Add or replace a subscription; True when it is new [MQTT-3.8.4-3]."""
        key = sub.topic_filter
        old = session.subscriptions.get(key)
        session.subscriptions[key] = sub
        self.trie.subscribe(sub.topic_filter, session.client_id, sub)
        self._matches.clear()
        if old is None:
            self.subscription_count += 1
        mesh = self.broker.mesh
        if mesh is not None:
            if old is None:
                mesh.interest(key, 1)
            self._note_durable(mesh, session, sub, old.durable if old is not None else False)
        return old is None

    @staticmethod
    def _note_durable(mesh, session: Session, sub: Subscription, had: bool) -> None:
        """Tell the siblings whether ``sub`` belongs to a persistent session: their
        QoS 1/2 messages for it are acknowledged only once it has them queued."""
        want = session.persistent
        sub.durable = want
        if want != had:
            mesh.interest(sub.topic_filter, 1 if want else -1, durable=True)

    def note_persistence(self, session: Session) -> None:
        """A resumed session's expiry changed (persistent or not any more)."""
        mesh = self.broker.mesh
        if mesh is not None:
            for sub in session.subscriptions.values():
                self._note_durable(mesh, session, sub, sub.durable)

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        sub = session.subscriptions.pop(topic_filter, None)
        if sub is None:
            return False
        self.trie.unsubscribe(topic_filter, session.client_id)
        self._matches.clear()
        self.subscription_count -= 1
        mesh = self.broker.mesh
        if mesh is not None:
            mesh.interest(topic_filter, -1)
            if sub.durable:
                mesh.interest(topic_filter, -1, durable=True)
        return True

    def unsubscribe_all(self, session: Session) -> None:
        for topic_filter in list(session.subscriptions):
            self.unsubscribe(session, topic_filter)

    # -- publishing -------------------------------------------------------------

    # Router.route(message, sender_id, ops, retain_durable=True, acl_receive=None,
    # forward=True, assigned=None) -> int: store the retained message, forward to
    # sibling workers, deliver to every matching subscription (QoS 0 fan-out to the
    # online subscribers' buffers, QoS 1/2 through ``deliver``).  The per-message
    # path, so it is compiled with the connection: ext/connection.pyx ``route``
    # (its docstring says the arguments).  It uses ``_matches`` / ``trie`` and
    # calls back the helpers below off its hot path.
    route = compiled_route

    def _receive_decision(self, decisions: dict, conn, message: Message) -> bool:
        """A miss in the fan-out: ask the hook, remember the answer."""
        broker = self.broker
        allowed = decisions[conn] = broker.acl_check(conn, ACCESS_PUBLISH_RECEIVE, message.topic,
                                                     message.qos, message.retain)
        broker.acl_cached += 1
        return allowed

    def _receive_allowed(self, message: Message, normal: list, shared: list) -> tuple[list, list]:
        """Drop the subscribers the ACLs do not let receive this message
        (Mosquitto's publishClientReceive, checked at delivery).

        Where the fan-out does not check (QoS 1/2, shared groups, a hook without
        a generation): the decisions come from the
        broker's per-topic cache (Connection -> allowed, emptied whenever the
        hook's ACL generation changes) and the hook is asked on a miss; ``normal``
        is copied only if someone is refused."""
        broker = self.broker
        topic = message.topic
        decisions = broker.acl_receive_decisions(topic)
        check = broker.acl_check
        sessions = self.sessions
        qos, retain = message.qos, message.retain
        kept: list | None = None
        for i, match in enumerate(normal):
            session = sessions[match[0]]
            conn = session.conn
            if conn is None or decisions is None:
                # An offline session is not cached: its user name changes when
                # another client takes it over.
                allowed = check(conn or session, ACCESS_PUBLISH_RECEIVE, topic, qos, retain)
            else:
                allowed = decisions.get(conn)
                if allowed is None:
                    allowed = decisions[conn] = check(conn, ACCESS_PUBLISH_RECEIVE, topic, qos,
                                                      retain)
                    broker.acl_cached += 1
            if not allowed:
                if kept is None:
                    kept = normal[:i]
            elif kept is not None:
                kept.append(match)
        if kept is not None:
            normal = kept
        if shared:
            shared = self._shared_receive_allowed(message, shared, decisions)
        return normal, shared

    def _shared_receive_allowed(self, message: Message, shared: list,
                                decisions: dict | None) -> list:
        """Shared subscriptions: the members allowed to receive, groups left empty dropped."""
        broker = self.broker
        check = broker.acl_check
        sessions = self.sessions
        topic, qos, retain = message.topic, message.qos, message.retain
        result = []
        for group, topic_filter, members in shared:
            allowed_members = []
            for member in members:
                session = sessions[member[0]]
                conn = session.conn
                cache = decisions if conn is not None else None  # offline: see above
                allowed = None if cache is None else cache.get(conn)
                if allowed is None:
                    allowed = check(conn or session, ACCESS_PUBLISH_RECEIVE, topic, qos, retain)
                    if cache is not None:
                        cache[conn] = allowed
                        broker.acl_cached += 1
                if allowed:
                    allowed_members.append(member)
            if allowed_members:
                result.append((group, topic_filter, allowed_members))
        return result

    def _pick_member(self, group: str, topic_filter: str, members: list, online_only: bool):
        """Round-robin over a share group's members, connected ones first."""
        n = len(members)
        key = (group, topic_filter)
        start = self._rr.get(key, 0)
        sessions = self.sessions
        for i in range(n):
            idx = (start + i) % n
            client_id = members[idx][0]
            conn = sessions[client_id].conn
            if conn is not None and conn.online:
                self._rr[key] = idx + 1
                return members[idx]
        if online_only or not n:
            return None
        self._rr[key] = start + 1
        return members[start % n]

    def _encode_v5(self, conn, message: Message, qos: int, retain: bool, sub_id: int,
                   packet_id: int = 0, dup: bool = False) -> bytes | None:
        return conn.encode_publish_v5(message, qos, retain, dup, packet_id,
                                      [sub_id] if sub_id else None)

    def deliver(self, session: Session, message: Message, sub: Subscription, retain: bool,
                add: QueueAdd | None, ops: list | None) -> None:
        """Deliver one message to one session for one subscription."""
        qos = message.qos if message.qos < sub.qos else sub.qos
        conn = session.conn
        broker = self.broker
        if qos == 0:
            if conn is None or not conn.online:
                return
            if conn.version == 5:
                data = self._encode_v5(conn, message, 0, retain, sub.sub_id)
                if data is None:
                    return
            else:
                data = encode_publish(message.topic, message.payload, 0, retain, False, 0, None,
                                      conn.version)
            if len(data) <= conn.client_max_packet:
                conn.write(data)
                broker.stats.publish_sent += 1
            return
        if not session.persistent and (conn is None or conn.state != 1):
            return
        if len(session.queue) >= self.max_queued and self.max_queued:
            broker.stats.publish_dropped += 1
            return
        out = Outgoing(session.take_seq(), message, qos, retain, [sub.sub_id] if sub.sub_id else None)
        if sub.share_group is not None:
            out.share = sub
        online = conn is not None and conn.online
        if online and not session.queue and len(session.inflight) < self._window(conn):
            out.packet_id = session.next_packet_id()
            out.state = SENT
            session.inflight[out.packet_id] = out
            if session.durable:
                # QoS 2: written after the QueueAdd is committed [DESIGN §2].
                # QoS 1 goes out at once: the publisher's PUBACK still waits for
                # the commit, so a crash before it costs at most a duplicate
                # (allowed at QoS 1), never a loss -- unless an earlier message
                # of the session still waits (order), or the message is too big
                # for the client (its removal must follow the add).
                if qos == 2 or session.unwritten or not conn.send_outgoing(out):
                    broker.after_commit_write(conn, out)
            else:
                conn.send_outgoing(out)
        else:
            session.enqueue(out)
        if session.durable:
            entry = [session.client_id, out.seq, out.packet_id, qos, out.sub_ids or []]
            if add is not None:
                add.deliveries.append(entry)
            else:
                target = ops if ops is not None else broker.pending_ops
                target.append(QueueAdd([entry], message))

    def _window(self, conn) -> int:
        rm = conn.client_receive_max
        return rm if rm < self.max_inflight else self.max_inflight

    def send_retained(self, session: Session, sub: Subscription) -> None:
        """Retained messages matching a new subscription, retain flag set [MQTT-3.3.1-9]."""
        broker = self.broker
        for message in broker.retained.match(sub.match_filter):
            if broker.acl_enabled and not broker.acl_check(
                    session.conn or session, ACCESS_PUBLISH_RECEIVE, message.topic, message.qos,
                    True):
                continue
            self.deliver(session, message, sub, True, None, None)

    # -- acknowledgements and flow -------------------------------------------

    def delivery_done(self, session: Session, out: Outgoing) -> None:
        """PUBACK / PUBCOMP (or a failed PUBREC): the message is delivered."""
        session.inflight.pop(out.packet_id, None)
        if session.durable:
            self.broker.pending_ops.append(QueueRemove(session.client_id, out.seq))
        if session.queue:
            self.pump(session)

    def pump(self, session: Session) -> None:
        """Move queued messages into flight while the window allows."""
        conn = session.conn
        if conn is None or not conn.online:
            return
        window = self._window(conn)
        queue = session.queue
        broker = self.broker
        now_ms = 0
        while queue and len(session.inflight) < window:
            out = queue.popleft()
            expiry = out.message.expiry_at
            if expiry:
                now_ms = now_ms or int(time.time() * 1000)
                if expiry <= now_ms:
                    # An expired message is not delivered (MQTT 5 §3.3.2.3.3).
                    if session.durable:
                        broker.pending_ops.append(QueueRemove(session.client_id, out.seq))
                    continue
            out.packet_id = session.next_packet_id()
            out.state = SENT
            session.inflight[out.packet_id] = out
            if session.durable:
                broker.pending_ops.append(QueueUpdate(session.client_id, out.seq, out.packet_id, SENT))
                # QoS 1 need not wait for the QueueUpdate: were it lost in a
                # crash, the message is sent again under a new packet id (a
                # duplicate, allowed at QoS 1).  QoS 2 must keep its packet id;
                # and nothing overtakes a message still waiting.
                if out.qos == 2 or session.unwritten or not conn.send_outgoing(out):
                    broker.after_commit_write(conn, out)
            else:
                conn.send_outgoing(out)

    def resume(self, session: Session) -> None:
        """After CONNACK: resend in-flight messages (PUBLISH with DUP, or PUBREL) in
        their original order with their packet ids [MQTT-4.4.0-1], then pump the queue."""
        conn = session.conn
        for out in list(session.inflight.values()):
            if out.state == PUBREC_RECEIVED:
                conn.write(bytes((0x62, 2, out.packet_id >> 8, out.packet_id & 0xFF)))
            elif not conn.send_outgoing(out, dup=True):
                self.delivery_done(session, out)
        self.pump(session)

    def requeue_shared(self, session: Session) -> None:
        """A session ends: each message it got through a shared subscription and
        has not acknowledged (in flight, PUBREC not received) or not been sent
        yet (queued) goes to another member of its group (MQTT 5 §4.8.2).  Call
        it before the session's subscriptions are removed."""
        pending = [o for o in (*session.inflight.values(), *session.queue)
                   if o.share is not None and o.state != PUBREC_RECEIVED]
        for out in pending:
            share = out.share
            if share is SHARE_UNKNOWN:
                group = self._loaded_share(session, out.message.topic)
                if group is None:
                    continue
            else:
                group = (share.share_group, share.match_filter)
            self._hand_over(session.client_id, out.message, *group)

    def _loaded_share(self, session: Session, topic: str) -> tuple[str, str] | None:
        """The share group a message loaded from the store came through: the
        session's one matching group, unless a normal subscription of the
        session matches too (then it may have come by that one: kept)."""
        client_id = session.client_id
        normal, shared = self.trie.match(topic)
        if any(m[0] == client_id for m in normal):
            return None
        groups = [(g, f) for g, f, members in shared if any(m[0] == client_id for m in members)]
        return groups[0] if len(groups) == 1 else None

    def _hand_over(self, leaving: str, message: Message, group: str, topic_filter: str) -> None:
        """Give ``message`` to a member of ``group`` other than ``leaving``: a
        connected one here, else one in a sibling worker, else an offline
        (persistent) one here, where it waits in its queue."""
        _normal, shared = self.trie.match(message.topic)
        others = []
        for g, f, members in shared:
            if g == group and f == topic_filter:
                others = [m for m in members if m[0] != leaving]
                break
        if others and self.broker.acl_enabled:
            allowed = self._shared_receive_allowed(message, [(group, topic_filter, others)], None)
            others = allowed[0][2] if allowed else []
        member = self._pick_member(group, topic_filter, others, online_only=True) if others \
            else None
        if member is None:
            mesh = self.broker.mesh
            if mesh is not None and mesh.forward_shared(message, group, topic_filter):
                return
            if others:
                member = self._pick_member(group, topic_filter, others, online_only=False)
        if member is None:
            log.info("No other member in share group %s for %s; message dropped.", group,
                     message.topic)
            return
        self.deliver(self.sessions[member[0]], message, member[1], False, None, None)

    def deliver_shared(self, message: Message, groups: set) -> None:
        """A message for one member of each share group in ``groups`` (a sibling
        worker's member left without acknowledging it), to a member here."""
        _normal, shared = self.trie.match(message.topic)
        shared = [g for g in shared if (g[0], g[1]) in groups]
        if shared and self.broker.acl_enabled:
            shared = self._shared_receive_allowed(message, shared, None)
        ops = self.broker.pending_ops
        for group, topic_filter, members in shared:
            member = self._pick_member(group, topic_filter, members, online_only=False)
            if member is not None:
                self.deliver(self.sessions[member[0]], message, member[1], False, None, ops)
