"""Linearizability checker for the simulation's key-value workload.

The model is one read/write register per key, initially ``None``, every
written value unique. A history is linearizable iff each key's sub-history is
(linearizability is compositional, Herlihy & Wing 1990), so each key is
checked alone with a Wing & Gong search as refined by Lowe (memoizing the
(linearized set, register value) states already explored).

Times are global event numbers: distinct, so "a returned before b was
invoked" is ``a.ret < b.invoke``. An operation with no response (the client
timed out: the node crashed, lost leadership, ...) may have taken effect at
any time after its invocation, or never:
* a get without response constrains nothing: dropped;
* a put without response whose value nobody read: dropped (placing it "never"
  is always possible);
* a put without response whose value was read: it must have happened, at some
  time after its invocation: its return time is +infinity.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

INF = float("inf")


@dataclass(slots=True)
class Op:
    client: int
    kind: str  # "put" | "get"
    key: str
    value: str | None
    invoke: int
    ret: float | None = None  # None: no response (yet)

    def __str__(self) -> str:
        r = "?" if self.ret is None else ("inf" if self.ret == INF else str(int(self.ret)))
        return f"c{self.client} {self.kind}({self.key})={self.value!r} [{self.invoke}, {r}]"


def check(history: list[Op]) -> str | None:
    """None if linearizable, else a description of the offending key's history."""
    by_key: dict[str, list[Op]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    for key in sorted(by_key):
        err = check_key(by_key[key])
        if err:
            return f"key {key!r}: {err}"
    return None


def check_key(ops: list[Op]) -> str | None:
    read_values = {op.value for op in ops if op.kind == "get" and op.ret is not None}
    written = {op.value for op in ops if op.kind == "put"}
    prepared: list[Op] = []
    for op in ops:
        if op.kind == "get":
            if op.ret is None:
                continue
            if op.value is not None and op.value not in written:
                return f"get returned {op.value!r}, never written: {op}"
            prepared.append(op)
        else:
            if op.ret is None:
                if op.value not in read_values:
                    continue
                op = Op(op.client, op.kind, op.key, op.value, op.invoke, INF)
            prepared.append(op)
    prepared.sort(key=lambda o: o.invoke)
    if _linearizable(prepared):
        return None
    lines = "\n    ".join(str(o) for o in prepared[-40:])
    return f"not linearizable ({len(prepared)} ops; last 40):\n    {lines}"


def _linearizable(ops: list[Op]) -> bool:
    n = len(ops)
    full = (1 << n) - 1
    seen: set[tuple[int, str | None]] = set()
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 4 * n + 1000))

    def search(mask: int, value: str | None) -> bool:
        if mask == full:
            return True
        state = (mask, value)
        if state in seen:
            return False
        seen.add(state)
        # Lowest unlinearized op: everything below is done.
        lo = (~mask & (mask + 1)).bit_length() - 1
        min_ret = INF
        i = lo
        candidates = []
        while i < n:
            op = ops[i]
            if op.invoke > min_ret:
                break  # invoked after some pending op returned: cannot go first
            if not mask >> i & 1:
                candidates.append(i)
                if op.ret < min_ret:
                    min_ret = op.ret
            i += 1
        for i in candidates:
            op = ops[i]
            if op.invoke > min_ret:
                continue
            if op.kind == "get":
                if op.value == value and search(mask | 1 << i, value):
                    return True
            elif search(mask | 1 << i, op.value):
                return True
        return False

    try:
        return search(0, None)
    finally:
        sys.setrecursionlimit(old_limit)
