"""Will messages (MQTT 5 §3.1.2.5, §3.1.3.2.2).

The will of a connection is published when the connection closes without a
DISCONNECT 0x00 (keepalive timeout, network error, protocol error, DISCONNECT
0x04, takeover) -- after the Will Delay Interval, or at once if the session
ends first [MQTT-3.1.3-9]; a reconnect to the session within the delay cancels
it.  ``Wills`` keeps the delayed ones and fires them from the broker's tick.

The delay counts from the disconnection, also across a restart of the broker:
the durable session's row records when it went offline (entries.SessionOffline)
and the will is stored (WillSet), so Broker._load schedules it for what is left
of its delay, or at once when that passed while the broker was down.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from raftmq.state.entries import Message

if TYPE_CHECKING:
    from raftmq.broker.server import Broker


def will_to_publish(message: Message) -> Message:
    """The will as it is published: its expiry counts from now (§3.1.3.2.4)."""
    props = dict(message.properties) if message.properties else None
    expiry_at = 0
    if props:
        interval = props.pop("message_expiry_interval", None)
        if interval is not None:
            expiry_at = int(time.time() * 1000) + interval * 1000
        props = props or None
    return Message(message.topic, message.payload, message.qos, message.retain, props, expiry_at)


class Wills:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.pending: dict[str, tuple[float, Message]] = {}  # client id -> (loop time, will)

    def schedule(self, client_id: str, delay: float, message: Message) -> None:
        self.pending[client_id] = (self.broker.loop.time() + delay, message)

    def cancel(self, client_id: str) -> Message | None:
        entry = self.pending.pop(client_id, None)
        return entry[1] if entry else None

    def fire(self, client_id: str) -> None:
        """Publish a pending will now (its session ended before the delay passed)."""
        message = self.cancel(client_id)
        if message is not None:
            self.broker.publish_will(client_id, message)

    def tick(self, now: float) -> None:
        due = [cid for cid, (at, _m) in self.pending.items() if at <= now]
        for client_id in due:
            self.fire(client_id)
