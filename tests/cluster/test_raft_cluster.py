"""A 3-member cluster of real raft processes on loopback (issue 3, "Real processes").

Each member is ``python -m raftmq.raft.process`` with its own LMDB data dir and
an authenticated TCP peer transport.  Entries are proposed through the leader's
local channel (the path a broker worker uses) as RetainSet ops, and what is
committed is read back from the members' state machines (LOAD).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from raft_harness import SRC, RaftNode, free_port, wait_for, write_secret

from raftmq.cluster.admin import (
    cluster_add,
    cluster_remove,
    cluster_status,
    cluster_transfer_leader,
)

pytestmark = pytest.mark.timeout(120)


def keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def retained_keys(node: RaftNode) -> set[str]:
    return {topic[2:] for topic in node.load().retained}


def caught_up(node: RaftNode, leader: RaftNode) -> bool:
    return node.status(timeout=2)["applied"] >= leader.status()["commit"]


def test_leader_killed_new_leader_keeps_every_committed_entry(make_cluster) -> None:
    """Raft §5.4 (leader completeness): entries committed under the old leader
    are in the new leader's state after the old one is killed -9."""
    cluster = make_cluster(3)
    leader = cluster.leader()
    first = leader.propose(keys("a", 300))
    assert first == set(keys("a", 300))
    leader.kill9()
    new_leader = cluster.leader(exclude=leader.id)
    assert new_leader.id != leader.id
    second = new_leader.propose(keys("b", 100))
    assert second == set(keys("b", 100))
    assert first | second <= retained_keys(new_leader)
    # The old leader comes back from its disk as a follower and catches up.
    leader.start()
    wait_for(lambda: caught_up(leader, new_leader), 30, "the old leader to catch up")
    assert first | second <= retained_keys(leader)


def test_follower_restarted_from_disk_catches_up(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes.values() if n.id != leader.id)
    before = leader.propose(keys("x", 100))
    wait_for(lambda: caught_up(follower, leader), 20, "the follower to apply")
    assert follower.terminate() == 0
    during = leader.propose(keys("y", 200))  # a majority (2 of 3) still commits
    assert during == set(keys("y", 200))
    follower.start()
    wait_for(lambda: caught_up(follower, leader), 30, "the restarted follower to catch up")
    assert before | during <= retained_keys(follower)
    assert "started at term" in follower.log_text()


def test_member_far_behind_is_caught_up_by_snapshot(make_cluster) -> None:
    """Raft §7: entries the follower needs are compacted away; the leader sends InstallSnapshot."""
    cluster = make_cluster(3, snapshot_entries=40)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes.values() if n.id != leader.id)
    leader.propose(keys("p", 20))
    follower.kill9()
    committed = set()
    for round_ in range(6):
        committed |= leader.propose(keys(f"q{round_}-", 50))
    st = leader.status()
    assert st["first_index"] > 60, st  # the log really was compacted
    follower.start()
    wait_for(lambda: caught_up(follower, leader), 30, "the follower to catch up by snapshot")
    assert committed <= retained_keys(follower)
    assert f"Sent a snapshot to node {follower.id}" in leader.log_text()
    assert "Installed snapshot at index" in follower.log_text()


def test_snapshot_of_several_mib_streams_in_chunks(make_cluster) -> None:
    """A state larger than the transport's chunk size still reaches a lagging member (Raft §7)."""
    cluster = make_cluster(3, snapshot_entries=20)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes.values() if n.id != leader.id)
    follower.kill9()
    committed = set()
    for round_ in range(4):
        committed |= leader.propose(keys(f"big{round_}-", 20), payload_size=64 * 1024)
    assert leader.status()["first_index"] > 20
    follower.start()
    wait_for(lambda: caught_up(follower, leader), 60, "the follower to catch up by a large snapshot")
    state = follower.load()
    assert committed <= {t[2:] for t in state.retained}
    assert all(len(m.payload) == 64 * 1024 for m in state.retained.values())
    assert "Installed snapshot at index" in follower.log_text()


def test_add_and_remove_members(make_cluster, capsys) -> None:
    cluster = make_cluster(3)
    leader = cluster.leader()
    before = leader.propose(keys("m", 50))
    newcomer = cluster.add_node(4)
    # Joins as a learner, promoted to voter once caught up (thesis §4.2.1).
    assert cluster_add(str(leader.data_dir), 4, newcomer.address, timeout=60) == 0
    st = leader.status()
    assert 4 in st["voters"] and st["learners"] == []
    wait_for(lambda: caught_up(newcomer, leader), 30, "the new member to catch up")
    assert before <= retained_keys(newcomer)
    assert newcomer.status()["voters"] == [1, 2, 3, 4]
    # With 4 voters a commit needs 3 copies: the new member counts.
    after = leader.propose(keys("n", 20))
    assert after == set(keys("n", 20))

    assert cluster_remove(str(leader.data_dir), 4, timeout=30) == 0
    assert leader.status()["voters"] == [1, 2, 3]
    wait_for(lambda: 4 not in cluster.nodes[next(i for i in (1, 2, 3) if i != leader.id)].status()["voters"],
             20, "the removal to reach a follower")
    assert cluster_status(str(leader.data_dir)) == 0
    out = capsys.readouterr().out
    assert "voters: 1, 2, 3" in out


def test_leadership_transfer(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.leader()
    target = next(n for n in cluster.nodes.values() if n.id != leader.id)
    committed = leader.propose(keys("t", 30))
    assert cluster_transfer_leader(str(leader.data_dir), target.id, timeout=10) == 0
    st = target.status()
    assert st["role"] == "leader" and st["leader"] == target.id
    assert leader.status()["role"] == "follower"
    more = target.propose(keys("u", 30))
    assert committed | more <= retained_keys(target)


def test_membership_change_refused_on_follower(make_cluster, capsys) -> None:
    cluster = make_cluster(3)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes.values() if n.id != leader.id)
    wait_for(lambda: follower.status()["leader"] == leader.id, 10, "the follower to know the leader")
    assert cluster_transfer_leader(str(follower.data_dir), leader.id) == 1
    assert f"the leader is node {leader.id}" in capsys.readouterr().err


def test_peer_with_wrong_secret_is_refused(make_cluster, tmp_path) -> None:
    cluster = make_cluster(3)
    leader = cluster.leader()
    committed = leader.propose(keys("s", 10))
    # An intruder that knows the addresses but not the secret.
    intruder = RaftNode(tmp_path, 9, free_port())
    bad_secret = write_secret(tmp_path / "wrong.secret", "not-the-cluster-secret-at-all")
    intruder.write_config([*cluster.nodes.values(), intruder], bad_secret)
    intruder.start()
    try:
        wait_for(lambda: "Refused raft peer 127.0.0.1:" in leader.log_text(), 15, "the refusal log line")
        assert ": bad authentication" in leader.log_text()
        st = intruder.status()
        assert st["leader"] == 0 and st["connected"] == []
        # The cluster is undisturbed: same leader, still commits.
        assert cluster.leader().id == leader.id
        assert leader.propose(keys("s2-", 10)) == set(keys("s2-", 10))
        assert committed <= retained_keys(leader)
    finally:
        intruder.kill9()


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_secret_file_readable_by_others_is_refused(tmp_path, mode) -> None:
    secret = write_secret(tmp_path / "cluster.secret", mode=mode)
    node = RaftNode(tmp_path, 1, free_port())
    node.write_config([node, RaftNode(tmp_path, 2, free_port())], secret)
    result = subprocess.run(
        [sys.executable, "-m", "raftmq.raft.process", "--config", str(node.config_path)],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert f"mode {mode:04o}" in result.stderr and "chmod 600" in result.stderr
    assert not (node.data_dir / "raft.sock").exists()
    # The supervisor refuses before starting anything.
    result = subprocess.run(
        [sys.executable, "-m", "raftmq.supervisor", "-c", str(node.config_path)],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "chmod 600" in result.stderr and "Supervisor" not in result.stderr


def test_follower_refuses_proposals_and_they_never_commit(make_cluster) -> None:
    """Only the leader appends client entries (Raft §5.3); a follower answers FAILED (not leader)."""
    cluster = make_cluster(3)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes.values() if n.id != leader.id)
    assert follower.propose(keys("f", 5)) == set()
    marker = leader.propose(keys("g", 5))
    wait_for(lambda: caught_up(follower, leader), 20, "the follower to apply")
    assert not {k for k in retained_keys(follower) if k.startswith("f")}
    assert marker <= retained_keys(follower)


def test_leader_stopping_on_purpose_hands_over_leadership(make_cluster) -> None:
    """SIGTERM on the leader (a rolling restart): it transfers leadership first (thesis §3.10)."""
    cluster = make_cluster(3)
    leader = cluster.leader()
    committed = leader.propose(keys("r", 20))
    assert leader.terminate() == 0
    log = leader.log_text()
    assert "Transferring leadership to node" in log
    target = int(log.split("Transferring leadership to node ")[1].split()[0])
    new_leader = cluster.leader(exclude=leader.id)
    assert new_leader.id == target
    assert f"Raft node {leader.id} is now follower (leader {target}" in log
    assert committed <= retained_keys(new_leader)
