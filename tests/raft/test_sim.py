"""The deterministic simulation: seeds pass, replay exactly, and a broken core
is caught (the checkers can fail).

CI runs SEEDS seeds (about 0.1-0.2 s each); ``-m slow`` runs many more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raftmq.raft import core, log
from raftmq.raft.types import MT, Message
from raftmq.sim.__main__ import main
from raftmq.sim.linearizability import INF, Op, check
from raftmq.sim.options import swarm
from raftmq.sim.simulator import Simulation, run_seed

SEEDS = 300


def test_many_seeds_pass() -> None:
    """A few hundred swarm-tested seeds: every safety invariant at every step,
    liveness after healing, linearizable client history."""
    failures = []
    for seed in range(SEEDS):
        res = run_seed(swarm(seed))
        if not res.ok:
            failures.append(f"seed {seed}: {res.error}")
    assert not failures, "\n".join(failures[:3])


@pytest.mark.slow
def test_thousands_of_seeds_pass(request: pytest.FixtureRequest) -> None:
    """2,000 more seeds; only with ``-m slow`` (about 4 minutes)."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: run with -m slow")
    failures = []
    for seed in range(10_000, 12_000):
        res = run_seed(swarm(seed))
        if not res.ok:
            failures.append(f"seed {seed}: {res.error}")
    assert not failures, "\n".join(failures[:3])


def test_seeds_exercise_every_fault() -> None:
    """The swarm actually produces the faults it claims (crashes, partitions,
    conf changes, transfers, snapshots, ReadIndex reads, timeouts)."""
    total: dict[str, int] = {}
    for seed in range(30):
        res = run_seed(swarm(seed))
        assert res.ok, res.error
        for k, v in res.stats.items():
            total[k] = total.get(k, 0) + v
    for k in ("crashes", "restarts", "partitions", "conf_changes", "transfers", "snapshots",
              "reads_index", "ops_ok", "ops_timeout"):
        assert total[k] > 0, (k, total)


def test_seed_replays_exactly() -> None:
    """One seed -> one run: the same history, messages and stats twice."""
    def run(seed: int) -> tuple[list[str], dict, int]:
        sim = Simulation(swarm(seed))
        sim.run()
        return [str(op) for op in sim.history], dict(sim.stats), sim.net.sent

    for seed in (3, 17):
        assert run(seed) == run(seed)
    assert run(3) != run(17)


def test_seed_replays_across_processes() -> None:
    """No hash-order dependence: two processes with different PYTHONHASHSEED
    print the same event log for one seed."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    outs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=src)
        p = subprocess.run([sys.executable, "-m", "raftmq.sim", "--seed", "77", "-v"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        outs.append([ln for ln in p.stdout.splitlines() if "seeds passed in" not in ln])
    assert len(outs[0]) > 20
    assert outs[0] == outs[1]


def _grant_every_vote(self: core.RawNode, m: Message) -> None:
    # BROKEN on purpose: no one-vote-per-term, no up-to-date check.
    resp = MT.VOTE_RESP if m.type == MT.VOTE else MT.PRE_VOTE_RESP
    self._send(Message(resp, dst=m.src, term=m.term))
    if m.type == MT.VOTE:
        self.vote = m.src


def test_broken_vote_granting_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: a core that grants every vote must be reported (election
    safety, leader completeness or state-machine safety)."""
    monkeypatch.setattr(core.RawNode, "_handle_vote_request", _grant_every_vote)
    errors = [r.error for r in (run_seed(swarm(s)) for s in range(20)) if not r.ok]
    assert errors
    assert any("election safety" in e or "leader completeness" in e or
               "state machine safety" in e for e in errors)


def test_broken_up_to_date_check_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: ignoring §5.4.1's up-to-date check lets a stale node win and
    overwrite committed entries: the leader-completeness check must fire."""
    monkeypatch.setattr(log.RaftLog, "is_up_to_date", lambda self, index, term: True)
    errors = [r.error for r in (run_seed(swarm(s)) for s in range(20)) if not r.ok]
    assert any("leader completeness" in e or "state machine safety" in e for e in errors)


def test_cli_reports_seed_and_exits_nonzero(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m raftmq.sim`: prints the seed and knobs first, exit 0 when all
    pass; on a violation prints the reproduction command and exits 1."""
    assert main(["--seeds", "2", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SEED=5 seed=5 nodes=")
    assert "2 seeds passed" in out
    monkeypatch.setattr(core.RawNode, "_handle_vote_request", _grant_every_vote)
    assert main(["--seeds", "20", "--seed", "0"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION seed=" in out
    assert "reproduce this failure with: python -m raftmq.sim --seed " in out


# -- the linearizability checker itself ---------------------------------------------------------


def _put(c: int, v: str, inv: int, ret: float | None) -> Op:
    return Op(c, "put", "k", v, inv, ret)


def _get(c: int, v: str | None, inv: int, ret: float | None) -> Op:
    return Op(c, "get", "k", v, inv, ret)


def test_checker_accepts_linearizable_histories() -> None:
    assert check([_put(1, "a", 1, 2), _get(2, "a", 3, 4)]) is None
    # Concurrent put and get: either value is fine.
    assert check([_put(1, "a", 1, 4), _get(2, None, 2, 3)]) is None
    assert check([_put(1, "a", 1, 4), _get(2, "a", 2, 3)]) is None
    # A put without response that was read took effect; one never read is ignored.
    assert check([_put(1, "a", 1, None), _get(2, "a", 5, 6), _put(3, "b", 7, None)]) is None


def test_checker_rejects_non_linearizable_histories() -> None:
    # Stale read after a completed write.
    assert check([_put(1, "a", 1, 2), _get(2, None, 3, 4)]) is not None
    # Reads going back in time: a then b observed, then a again.
    h = [_put(1, "a", 1, 2), _put(1, "b", 3, 4), _get(2, "b", 5, 6), _get(3, "a", 7, 8)]
    assert check(h) is not None
    # A value nobody wrote.
    assert check([_get(1, "zz", 1, 2)]) is not None
    # An indeterminate put read before it was invoked.
    assert check([_get(2, "a", 1, 2), _put(1, "a", 3, None)]) is not None
    assert INF > 10**12
