"""Replay every captured Mosquitto request against the library; the responses must
be byte-identical (spec/dynsec-captures.txt; the spec sorts every list, so no
list is compared order-insensitively).  Four captures differ on purpose: the
target is Mosquitto 2.0.22, which rejects unknown/nameless entries in
modifyClient ``groups`` / modifyGroup ``clients`` (captures.VERSION_DIFFERENCES)."""

from __future__ import annotations

import pytest
from captures import example_document, histories, init_document

from raftmq.dynsec.commands import apply, prepare_request
from raftmq.dynsec.jsontext import dumps
from raftmq.dynsec.model import DynsecState


def _replay(history):
    state = DynsecState.from_document(init_document())
    results = []
    for ex in history:
        request = prepare_request(ex.request.encode())
        if request.error is not None:
            got = dumps(request.error_response()).decode()
        else:
            got = dumps(apply(state, request.change).response).decode()
        results.append((ex, got))
    return state, results


@pytest.mark.parametrize("which", [0, 1], ids=["sessions1-5", "example-build"])
def test_every_capture_gives_the_same_response(which: int) -> None:
    _state, results = _replay(histories()[which])
    mismatches = [(ex.session, ex.request, ex.expected, got) for ex, got in results if got != ex.expected]
    assert mismatches == []
    assert len(results) > 20


def _without_passwords(doc: dict) -> dict:
    doc = dict(doc)
    doc.pop("changeIndex", None)
    doc["clients"] = [
        {k: v for k, v in c.items() if k not in ("password", "salt", "iterations")} for c in doc["clients"]
    ]
    return doc


def test_example_build_ends_in_the_example_file() -> None:
    """Replaying the commands that built dynsec-example.json gives the same document
    (every key, order included), up to the random password salts."""
    state, _ = _replay(histories()[1])
    assert _without_passwords(state.to_document()) == _without_passwords(example_document())
    assert list(state.to_document())[1:] == list(example_document())
    ours = {c["username"]: c for c in state.to_document()["clients"]}
    assert [list(c) for c in state.to_document()["clients"]] == [list(c) for c in example_document()["clients"]]
    assert ours["nopw"].get("password") is None and ours["alice"]["iterations"] == 101
