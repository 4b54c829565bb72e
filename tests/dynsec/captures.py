"""Read spec/dynsec-captures.txt: real request/response pairs from Mosquitto 2.0.11.

Each exchange keeps its session name, the mosquitto_ctrl command line that
produced it (None for raw paho requests), and the exact REQ and RESP payloads.
Sessions 1-5 form one history starting from ``mosquitto_ctrl dynsec init``;
the two ``example-build`` sessions form a second one, also from init, whose
end state is spec/dynsec-example.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPEC = Path("/work/shared/spec")
CAPTURES = SPEC / "dynsec-captures.txt"
INIT_DOCUMENT = SPEC / "dynsec-init-example.json"
EXAMPLE_DOCUMENT = SPEC / "dynsec-example.json"
ADMIN_PASSWORD = "adminpass123"

# Where Mosquitto 2.0.11 (captured) and 2.0.22 (the target, spec §5.2/§5.3) differ:
# (session, request) -> the 2.0.22 response.
VERSION_DIFFERENCES = {
    ("session5.txt", '{"commands":[{"command":"modifyClient","username":"carol","groups":[{"groupname":"nope"}]}]}'):
        '{"responses":[{"command":"modifyClient","error":"\'groups\' contains an object with a \'groupname\' that does not exist"}]}',
    ("session5.txt", '{"commands":[{"command":"modifyClient","username":"carol","groups":[{"priority":1}]}]}'):
        '{"responses":[{"command":"modifyClient","error":"\'groups\' contains an object with an invalid \'groupname\'"}]}',
    ("session5.txt", '{"commands":[{"command":"modifyGroup","groupname":"g2","clients":[{"username":"ghost"}]}]}'):
        '{"responses":[{"command":"modifyGroup","error":"\'clients\' contains an object with a \'username\' that does not exist"}]}',
    ("session5.txt", '{"commands":[{"command":"modifyGroup","groupname":"g2","clients":[{"priority":3}]}]}'):
        '{"responses":[{"command":"modifyGroup","error":"\'clients\' contains an object with an invalid \'username\'"}]}',
}


@dataclass
class Exchange:
    session: str
    ctrl: str | None  # the mosquitto_ctrl command line, if any
    request: str
    response: str
    ctrl_output: list[str]  # lines the CLI printed

    @property
    def expected(self) -> str:
        return VERSION_DIFFERENCES.get((self.session, self.request), self.response)


def load_exchanges() -> list[Exchange]:
    out: list[Exchange] = []
    session = ""
    ctrl: str | None = None
    printed: list[str] = []
    request: str | None = None
    for raw in CAPTURES.read_text().splitlines():
        line = raw.strip()
        if line.startswith("######## "):
            session = line[9:]
            ctrl, printed, request = None, [], None
        elif line.startswith("$ mosquitto_ctrl"):
            ctrl, printed, request = line[2:], [], None
        elif line.startswith("| "):
            printed.append(raw.split("| ", 1)[1])
        elif line == "|":
            printed.append("")
        elif line.startswith("REQ "):
            body = line[4:].strip()
            if body.startswith("$CONTROL/dynamic-security/v1: "):
                body = body.split(": ", 1)[1]
            request = body
        elif line.startswith("RESP "):
            body = line[5:].strip()
            if body.startswith("$CONTROL/dynamic-security/v1/response: "):
                body = body.split(": ", 1)[1]
            assert request is not None, raw
            out.append(Exchange(session, ctrl, request, body, printed))
            ctrl, printed, request = None, [], None
    return out


def histories() -> list[list[Exchange]]:
    """The two independent histories, each to be replayed from the init document."""
    first, second = [], []
    for ex in load_exchanges():
        (second if ex.session.startswith("example-build") else first).append(ex)
    return [first, second]


def init_document() -> dict:
    return json.loads(INIT_DOCUMENT.read_text())


def example_document() -> dict:
    return json.loads(EXAMPLE_DOCUMENT.read_text())
