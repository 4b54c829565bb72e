"""Retained messages (MQTT 5 §3.3.1.3): one per topic, in a trie of their own.

A PUBLISH with RETAIN=1 replaces the topic's retained message; an empty payload
removes it [MQTT-3.3.1-6, MQTT-3.3.1-7].  Messages past their expiry are not
sent and are dropped when found.  Every change of a client's retained message
is a store op; the broker's own ``$SYS`` messages are kept in memory only.
"""

from __future__ import annotations

import time

from raftmq._trie import RetainedTrie
from raftmq.state.entries import Message, RetainDelete, RetainSet


class Retained:
    def __init__(self) -> None:
        self.trie = RetainedTrie()
        self.count = 0

    def store(self, message: Message, ops: list | None, durable: bool = True) -> None:
        topic = message.topic
        existing = self.trie.get(topic)
        if not message.payload:
            if existing is not None:
                self.trie.delete(topic)
                self.count -= 1
                if durable and ops is not None:
                    ops.append(RetainDelete(topic))
            return
        self.trie.set(topic, message)
        if existing is None:
            self.count += 1
        if durable and ops is not None:
            ops.append(RetainSet(message))

    def load(self, message: Message) -> None:
        """Rebuild from the store at start-up (no op: it is already durable)."""
        if self.trie.get(message.topic) is None:
            self.count += 1
        self.trie.set(message.topic, message)

    def match(self, topic_filter: str) -> list[Message]:
        found = self.trie.match_filter(topic_filter)
        if not found:
            return []
        now_ms = 0
        result = []
        for topic, message in found:
            if message.expiry_at:
                now_ms = now_ms or int(time.time() * 1000)
                if message.expiry_at <= now_ms:
                    self.trie.delete(topic)
                    self.count -= 1
                    continue
            result.append(message)
        return result
