"""Session bookkeeping without sockets: packet identifiers and queue order."""

from __future__ import annotations

from raftmq.broker.session import Outgoing, Session
from raftmq.state.entries import Message


def test_packet_ids_skip_those_in_flight_and_wrap():
    s = Session("c", 5, 0)
    first = s.next_packet_id()
    assert first == 1
    s.inflight[2] = Outgoing(1, Message("t", b""), 1, False, None, 2)
    assert s.next_packet_id() == 3  # 2 is in flight [MQTT-2.2.1-3]
    s._next_pid = 65534
    assert s.next_packet_id() == 65535
    assert s.next_packet_id() == 1  # wraps, never 0 [MQTT-2.2.1-2]


def test_sequence_numbers_increase():
    s = Session("c", 4, 60)
    assert [s.take_seq() for _ in range(3)] == [1, 2, 3]
    assert s.persistent and not Session("d", 4, 0).persistent
