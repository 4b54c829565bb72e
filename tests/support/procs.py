"""Process trees from /proc (Linux): which processes a node started."""

from __future__ import annotations

import os
import signal
import subprocess


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid``."""
    children = _children_by_parent()
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(proc: subprocess.Popen | None, grace: float) -> int | None:
    """SIGTERM ``proc`` and wait up to ``grace`` seconds, then SIGKILL; its exit
    status (None if it was never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
