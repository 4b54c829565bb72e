"""RaftStore (raft/client.py): the broker's Store over the channel to a real raft process.

Two stores play two workers of one standalone node: what one submits is
acknowledged to it (done) and fanned out to the other (remote listener), never
echoed back; load() returns the committed tables; a restart of the raft
process fails the pending proposals (never acknowledged) and is reported.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from raft_harness import RaftNode, free_port, wait_for

from raftmq.raft.client import CHANNEL_LOST, RaftStore
from raftmq.state.entries import Dynsec, Message, RetainSet, SubAdd

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def standalone(tmp_path):
    node = RaftNode(tmp_path, 1, free_port())
    node.config_path.write_text(f'data_dir = "{node.data_dir}"\n')
    node.start()
    yield node
    node.kill9()


def test_submit_acknowledges_the_proposer_and_fans_out_node_wide_ops_to_siblings(standalone) -> None:
    """Every proposal is acknowledged to its proposer, in order; a batch with a
    node-wide op (Dynsec) reaches the node's other workers, a batch of a
    worker's own state (retained, subscriptions, queues) does not: no sibling
    decodes it (PROPOSE_LOCAL)."""
    async def main() -> tuple[list, list, list, object, list]:
        w1 = RaftStore(str(standalone.data_dir), worker_id=1, connect_timeout=20)
        w2 = RaftStore(str(standalone.data_dir), worker_id=2, connect_timeout=20)
        w1.load()
        w2.load()
        seen1: list = []
        seen2: list = []
        done: list[int] = []
        roles: list = []
        w1.set_role_listener(lambda *r: roles.append(r))
        w1.set_remote_listener(seen1.append)
        w2.set_remote_listener(seen2.append)
        for i in range(50):
            ops = [RetainSet(Message(f"r/{i}", b"v", 1, True))]
            if i % 5 == 0:
                ops.append(Dynsec({"commands": [], "n": i}))
            w1.submit(ops, lambda i=i: done.append(i))
        w2.submit([SubAdd("c", "a/#", 1)])
        w2.submit([Dynsec({"commands": [], "n": -1})])
        deadline = asyncio.get_running_loop().time() + 20
        while (len(done) < 50 or len(seen2) < 10 or not seen1 or not roles) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # anything that should not come has had its chance
        w3 = RaftStore(str(standalone.data_dir), worker_id=3)
        state = w3.load()
        await w3.close()
        await w1.close()
        await w2.close()
        return done, seen1, seen2, state, roles

    done, seen1, seen2, state, roles = asyncio.run(main())
    assert roles[-1][:2] == ("leader", 1)
    assert done == list(range(50))  # in submission order
    # w2 sees w1's batches that carry a Dynsec op, whole, and nothing else
    assert [(ops[0].message.topic, ops[1].change["n"]) for ops in seen2] == \
        [(f"r/{i}", i) for i in range(0, 50, 5)]
    assert seen1 == [[Dynsec({"commands": [], "n": -1})]]  # not w2's SubAdd, never its own
    assert set(state.retained) == {f"r/{i}" for i in range(50)}  # all committed


def test_raft_process_restart_fails_pending_and_reports(standalone) -> None:
    async def main() -> tuple[list, list]:
        store = RaftStore(str(standalone.data_dir), worker_id=1, connect_timeout=20)
        store.load()
        failures: list = []
        store.set_failure_listener(lambda kind, detail: failures.append(kind))
        acked: list[int] = []
        store.submit([RetainSet(Message("x", b"1", 1, True))], lambda: acked.append(1))
        while not acked:
            await asyncio.sleep(0.01)
        standalone.proc.send_signal(signal.SIGSTOP)  # the next proposal cannot commit
        store.submit([RetainSet(Message("y", b"2", 1, True))], lambda: acked.append(2))
        await asyncio.sleep(0.2)
        standalone.kill9()  # dies with the proposal pending
        while not failures:
            await asyncio.sleep(0.01)
        await store.close()
        return acked, failures

    acked, failures = asyncio.run(main())
    assert acked == [1]
    assert failures == [CHANNEL_LOST]
    standalone.start()
    wait_for(lambda: standalone.status(timeout=2)["role"] == "leader", 20, "the restart")


def test_channel_socket_and_data_are_private(standalone) -> None:
    """Only the node's user may propose (socket 0600) or read the log (LMDB files 0600)."""
    import os
    import stat

    wait_for(lambda: (standalone.data_dir / "raft.sock").exists(), 10, "the channel socket")
    assert stat.S_IMODE(os.stat(standalone.data_dir / "raft.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(standalone.data_dir).st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE(os.stat(standalone.data_dir / "raft.lmdb" / name).st_mode) == 0o600
