"""Scripted interactions with the core, in the manner of etcd raft's
``testdata/*.txt`` (rafttest's interaction env).

Each ``tests/raft/testdata/*.txt`` file opens with ``#`` comments saying what
it tests, then alternates commands (lines starting with ``> ``) and their
expected output: every message delivered or dropped and every role
transition logged by the core (logger ``raftmq.raft``). A test fails when the
output differs. After a deliberate behaviour change, regenerate with
``RAFT_REWRITE=1 python -m pytest tests/raft/test_core_scripts.py`` and review
the diff.

Commands:
  add-nodes N [pre_vote=0] [check_quorum=0]   voters 1..N, bootstrapped at term 1
  campaign ID | propose ID DATA | transfer ID TO | read-index ID CTX
  tick ID [N]           N ticks on one node (no message processing)
  tick-election ID      election_tick ticks on one node
  tick-all [N]          N rounds: every node ticks, then stabilize
  stabilize             process Readies and deliver messages until quiet
  isolate ID | heal     cut a node off both ways / restore every link
  status ID             term, role, leader, commit, last index
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest

from raftmq.raft.core import Config, ProposalDropped, RawNode
from raftmq.raft.storage import MemoryStorage, bootstrap
from raftmq.raft.types import MT, Message

TESTDATA = Path(__file__).parent / "testdata"
ELECTION_TICK = 10


def describe(m: Message) -> str:
    parts = [f"{m.src}->{m.dst} {m.type.name} term={m.term}"]
    if m.type in (MT.APP, MT.VOTE, MT.PRE_VOTE):
        parts.append(f"log_term={m.log_term} index={m.index}")
    if m.type == MT.APP:
        parts.append(f"commit={m.commit} entries={[(e.term, e.index) for e in m.entries]}")
    if m.type in (MT.APP_RESP, MT.READ_INDEX_RESP):
        parts.append(f"index={m.index}")
    if m.type == MT.HEARTBEAT:
        parts.append(f"commit={m.commit}")
    if m.reject:
        parts.append(f"reject hint={m.reject_hint}")
    if m.context:
        parts.append(f"context={m.context.decode()}")
    return " ".join(parts)


class Env:
    def __init__(self) -> None:
        self.nodes: dict[int, RawNode] = {}
        self.storage: dict[int, MemoryStorage] = {}
        self.isolated: set[int] = set()
        self.out: list[str] = []

    def add_nodes(self, n: int, **cfg: int) -> None:
        voters = tuple(range(1, n + 1))
        snap, hs = bootstrap(voters)
        for i in voters:
            st = MemoryStorage()
            st.apply_snapshot(snap)
            st.set_hard_state(hs)
            self.storage[i] = st
            self.nodes[i] = RawNode(
                Config(id=i, election_tick=ELECTION_TICK,
                       pre_vote=bool(cfg.get("pre_vote", 1)),
                       check_quorum=bool(cfg.get("check_quorum", 1))),
                st, random.Random(i))

    def process(self, i: int) -> list[Message]:
        node, st = self.nodes[i], self.storage[i]
        rd = node.ready()
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        for e in rd.committed_entries:
            if e.data:
                self.out.append(f"{i} applied {e.index} {e.data.decode()}")
        for rs in rd.read_states:
            self.out.append(f"{i} read-state context={rs.context.decode()} index={rs.index}")
        node.advance(rd)
        return rd.messages

    def stabilize(self) -> None:
        for _ in range(1000):
            msgs = []
            for i in sorted(self.nodes):
                if self.nodes[i].has_ready():
                    msgs.extend(self.process(i))
            if not msgs:
                return
            for m in msgs:
                if m.src in self.isolated or m.dst in self.isolated:
                    self.out.append(f"dropped {describe(m)}")
                else:
                    self.out.append(describe(m))
                    self.nodes[m.dst].step(m)
        raise AssertionError("no quiescence")

    def run(self, cmd: str) -> None:
        name, *args = cmd.split()
        kw = dict(a.split("=") for a in args if "=" in a)
        pos = [a for a in args if "=" not in a]
        if name == "add-nodes":
            self.add_nodes(int(pos[0]), **{k: int(v) for k, v in kw.items()})
        elif name == "campaign":
            self.nodes[int(pos[0])].campaign()
        elif name == "propose":
            try:
                self.nodes[int(pos[0])].propose(pos[1].encode())
            except ProposalDropped as e:
                self.out.append(f"refused: {e}")
        elif name == "transfer":
            self.nodes[int(pos[0])].transfer_leadership(int(pos[1]))
        elif name == "read-index":
            self.nodes[int(pos[0])].read_index(pos[1].encode())
        elif name == "tick":
            for _ in range(int(pos[1]) if len(pos) > 1 else 1):
                self.nodes[int(pos[0])].tick()
        elif name == "tick-election":
            for _ in range(2 * ELECTION_TICK):  # past any randomized timeout
                self.nodes[int(pos[0])].tick()
        elif name == "tick-all":
            for _ in range(int(pos[0]) if pos else 1):
                for i in sorted(self.nodes):
                    self.nodes[i].tick()
                self.stabilize()
        elif name == "stabilize":
            self.stabilize()
        elif name == "isolate":
            self.isolated.add(int(pos[0]))
        elif name == "heal":
            self.isolated.clear()
        elif name == "status":
            s = self.nodes[int(pos[0])].status()
            self.out.append(f"{s['id']}: term={s['term']} role={s['role']} leader={s['leader']} "
                            f"commit={s['commit']} last={s['last_index']}")
        else:
            raise ValueError(f"unknown command {name}")


class _Capture(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = out

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if " became " in msg or "stepped down" in msg or "transferring" in msg:
            self.lines.append(msg)


def run_script(text: str) -> str:
    env = Env()
    handler = _Capture(env.out)
    lg = logging.getLogger("raftmq.raft")
    old_level = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    result: list[str] = []
    try:
        after_output = False
        for line in text.splitlines():
            if line.startswith("#") or line.startswith("> "):
                if after_output:
                    result.append("")
                result.append(line)
                after_output = False
                if line.startswith("> "):
                    env.out.clear()
                    env.run(line[2:])
                    result.extend(env.out)
                    after_output = True
            # expected output and blank lines are regenerated, not copied
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)
    return "\n".join(result).rstrip("\n") + "\n"


SCRIPTS = sorted(TESTDATA.glob("*.txt"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script(path: Path) -> None:
    text = path.read_text()
    got = run_script(text)
    if os.environ.get("RAFT_REWRITE"):
        path.write_text(got)
        return
    assert got == text


def test_scripts_exist() -> None:
    assert len(SCRIPTS) >= 3
