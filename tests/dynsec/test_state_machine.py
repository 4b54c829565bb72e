"""Dynsec changes as Raft entries: prepared requests go through encode_ops into the
real LMDB state machine (state/machine.py), which calls raftmq.dynsec's
apply_change; a worker that loads the committed document after a "restart"
sees every change, and a replica applying the same entries gets the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from captures import histories, init_document

from raftmq.dynsec.acl import RC_SUCCESS, Authorizer
from raftmq.dynsec.commands import apply, prepare_request
from raftmq.dynsec.model import DynsecState
from raftmq.raft.types import Entry
from raftmq.state.entries import Dynsec, decode_ops, encode_ops
from raftmq.state.machine import StateMachine
from raftmq.state.tables import open_environment

pytestmark = pytest.mark.timeout(60)


def _machine(path: Path) -> StateMachine:
    return StateMachine(open_environment(str(path), map_size=64 << 20, sync=False))


def _entries() -> list[bytes]:
    """Every modifying request of the sessions1-5 history, seeded with the init file."""
    batches = [encode_ops([Dynsec({"replace": init_document()})])]
    for ex in histories()[0]:
        req = prepare_request(ex.request.encode())
        if req.error is None and not req.read_only:
            batches.append(encode_ops([Dynsec(req.change)]))
    return batches


def test_changes_survive_in_the_lmdb_state_machine_and_replicas_agree(tmp_path: Path) -> None:
    batches = _entries()
    a, b = _machine(tmp_path / "a"), _machine(tmp_path / "b")
    worker = DynsecState()  # a worker applying the same committed entries in memory
    for i, data in enumerate(batches, start=1):
        a.apply([Entry(1, i, data)])
        b.apply([Entry(1, i, data)])
        for op in decode_ops(data):
            apply(worker, op.change)
    doc_a, doc_b = a.load().dynsec, b.load().dynsec
    assert doc_a == doc_b and doc_a is not None
    assert DynsecState.from_document(doc_a).to_document() == worker.to_document()
    a.env.close()
    reopened = _machine(tmp_path / "a").load().dynsec
    assert reopened == doc_a
    state = DynsecState.from_document(reopened)
    assert sorted(state.clients) == ["admin", "alice", "bob", "carol", "dave", "nopw"]
    auth = Authorizer(state)
    assert auth.authenticate("x", "carol", b"carolpass333") == RC_SUCCESS  # set in session 5
    assert auth.authenticate("bob-device", "bob", b"bobpass22") == RC_SUCCESS
    assert state.clients["carol"].textname == "Carol"
