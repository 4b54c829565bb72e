"""Walk an encoded op batch without building op or Message objects.

Compiled (ext/rawops.pyx, every entry the raft process applies goes through
it); this module is its Python face.  ``iter_raw_ops(data)`` returns the
batch's ``(tag, fields, message)`` triples, checked whole first (a malformed
batch raises MalformedBatch, nothing of it applied); ``plain_fields`` turns a
compact queue op's fields back into the JSON form's header list.
"""

from raftmq._rawops import (
    C_QUEUE_ADD,
    C_QUEUE_REMOVE,
    C_QUEUE_UPDATE,
    COMPACT,
    INLINE_MAX,
    MalformedBatch,
    iter_raw_ops,
    message_topic,
    plain_fields,
    split_queue_key,
)

__all__ = ["C_QUEUE_ADD", "C_QUEUE_REMOVE", "C_QUEUE_UPDATE", "COMPACT", "INLINE_MAX", "MalformedBatch",
           "iter_raw_ops", "message_topic", "plain_fields", "split_queue_key"]
