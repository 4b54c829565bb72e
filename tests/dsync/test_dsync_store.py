"""``DsyncStore`` alone: only dynsec ops reach Raft, and answers keep submission order."""

from __future__ import annotations

from raftmq.cluster.dsync import DsyncStore, serving_role
from raftmq.state.entries import Dynsec, RetainDelete


class FakeRaft:
    """Records what would go to the raft process; the test commits or fails it."""

    def __init__(self) -> None:
        self._next_id = 1
        self._pending: dict[int, object] = {}
        self.sent: list[list] = []

    def submit(self, ops, done=None) -> None:
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = done
        self.sent.append(ops)

    def commit(self, rid: int) -> None:
        self._pending.pop(rid)()

    def fail(self, rid: int) -> None:
        self._pending.pop(rid)


def make() -> tuple[DsyncStore, FakeRaft]:
    store = DsyncStore.__new__(DsyncStore)
    fake = FakeRaft()
    store.raft = fake  # type: ignore[assignment]
    store._waiting = []
    return store, fake


def test_only_dynsec_goes_to_raft_and_order_is_kept() -> None:
    store, raft = make()
    done: list[str] = []
    store.submit([RetainDelete("a")], lambda: done.append("local-1"))
    assert done == ["local-1"] and raft.sent == []  # nothing to wait for
    store.submit([Dynsec({"commands": []}), RetainDelete("b")], lambda: done.append("dynsec-1"))
    store.submit([RetainDelete("c")], lambda: done.append("local-2"))
    store.submit([Dynsec({"commands": []})], lambda: done.append("dynsec-2"))
    store.submit([], lambda: done.append("read-after-2"))
    assert raft.sent == [[Dynsec({"commands": []})], [Dynsec({"commands": []})]]
    assert done == ["local-1"]  # local-2 waits behind dynsec-1 (read-your-write)
    raft.commit(1)
    assert done == ["local-1", "dynsec-1", "local-2"]
    raft.commit(2)
    assert done == ["local-1", "dynsec-1", "local-2", "dynsec-2", "read-after-2"]


def test_a_failed_dynsec_batch_is_not_answered_but_what_follows_is() -> None:
    store, raft = make()
    done: list[str] = []
    store.submit([Dynsec({"commands": []})], lambda: done.append("dynsec-1"))
    store.submit([], lambda: done.append("after-1"))
    store.submit([Dynsec({"commands": []})], lambda: done.append("dynsec-2"))
    store.submit([], lambda: done.append("after-2"))
    raft.fail(1)
    store.failed()
    assert done == ["after-1"]
    raft.commit(2)
    assert done == ["after-1", "dynsec-2", "after-2"]


def test_serving_roles() -> None:
    assert serving_role("leader", 1)
    assert serving_role("follower", 2)
    assert not serving_role("follower", 0)  # a leader that stepped down, or none known yet
    assert not serving_role("pre_candidate", 0)
    assert not serving_role("candidate", 2)
