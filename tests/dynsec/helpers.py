"""Small helpers for the dynsec library tests."""

from __future__ import annotations

import json
from typing import Any

from captures import example_document

from raftmq.dynsec.commands import Outcome, apply, prepare_request
from raftmq.dynsec.model import DynsecState


def example_state() -> DynsecState:
    """spec/dynsec-example.json, loaded (credentials in spec §10)."""
    return DynsecState.from_document(example_document())


def request(state: DynsecState, *commands: dict[str, Any]) -> Outcome:
    """Send one request with these commands through prepare + apply."""
    prepared = prepare_request(json.dumps({"commands": list(commands)}).encode())
    assert prepared.error is None
    return apply(state, prepared.change)


def responses(state: DynsecState, *commands: dict[str, Any]) -> list[dict[str, Any]]:
    return request(state, *commands).response["responses"]


def ok(state: DynsecState, *commands: dict[str, Any]) -> Outcome:
    """Like request(), asserting that no command failed."""
    outcome = request(state, *commands)
    errors = [r for r in outcome.response["responses"] if "error" in r]
    assert errors == []
    return outcome
