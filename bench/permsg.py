"""Where a broker's CPU goes per message in an open-loop scenario, process by process.

    python bench/permsg.py [--brokers mosquitto,w1,w2] [--rounds 3] [--window 5] [--rate 50000]
                           [--pairs 500] [--idle 0]

For each broker (fresh, as compare.py starts it) it runs loadgen's open-loop
``pairs`` layout (default: compare.py's ``conns-500``, 500 pairs × 100 msg/s)
and, during a window of ``--window`` seconds once every connection is up, reads
utime+stime of every broker process from /proc and counts, with ``perf stat``
on those processes, system calls by kind, context switches and task-clock.
Divided by the messages delivered in the window (open loop: rate × window,
loadgen checks nothing was lost) it prints per message: CPU µs by process,
system calls, wake-ups (context switches).  Rounds alternate the brokers.

``--idle S``: no load; each broker is started, left alone for S seconds and
its processes' CPU over those seconds printed (idle cost: timers, polling).

perf's tracepoints cost little (no ptrace), but they are not free: compare
brokers measured the same way, not against compare.py's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

SYSCALLS = ("read", "write", "writev", "sendmsg", "recvmsg", "epoll_wait", "epoll_ctl",
            "epoll_pwait", "futex", "getpid", "clock_gettime", "sendto", "recvfrom",
            "timerfd_settime", "poll")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                out += [int(k) for k in kids]
        except OSError:
            pass
    return out


def proc_name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(c.decode(errors="replace") for c in cmd if c)
    if "mosquitto" in text:
        return "mosquitto"
    if "resource_tracker" in text:
        return "resource_tracker"
    if "multiprocessing-fork" in text or "spawn_main" in text:
        return "child"  # a worker or the raft process (see --idle's per-process figures)
    if "raftmq" in text:
        return "supervisor"
    return text[-40:]


def cpu_ticks(pid: int, which: str = "both") -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    utime, stime = int(fields[11]), int(fields[12])
    return utime if which == "user" else stime if which == "sys" else utime + stime


def run_ns(pid: int) -> int:
    """CPU time of all the threads of ``pid`` in ns (schedstat: finer than /proc/PID/stat's ticks)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    except OSError:
        pass
    return total


def broker_for(name: str) -> compare.Broker:
    """``mosquitto``, ``wN`` (raftmq, N workers) or ``wN:SRC`` (raftmq from another
    source tree's ``src``, e.g. an export of the commit before a change)."""
    if name == "mosquitto":
        return compare.Broker("mosquitto")
    workers, _, src = name.partition(":")
    broker = compare.Broker("raftmq", workers=int(workers[1:]))
    if src:
        broker.src = src  # type: ignore[attr-defined]
    return broker


def perf_events() -> list[str]:
    return (["raw_syscalls:sys_enter", "context-switches", "task-clock"]
            + [f"syscalls:sys_enter_{s}" for s in SYSCALLS])


def parse_perf(text: str) -> dict[str, dict[str, float]]:
    """perf stat --per-thread -x, output -> {pid: {event: count}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 4 or not re.match(r".*-\d+$", parts[0]):
            continue
        tid = parts[0].rsplit("-", 1)[1]
        try:
            value = float(parts[1])
        except ValueError:
            continue
        event = parts[3].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "syscalls")
        out.setdefault(tid, {})[event] = value
    return out


def measure(name: str, args: argparse.Namespace) -> dict:
    broker = broker_for(name)
    src = getattr(broker, "src", None)
    saved = compare.REPO
    if src:  # compare.Broker runs raftmq from REPO / "src"
        compare.REPO = Path(src).resolve().parent
    try:
        return _measure(broker, name, args)
    finally:
        compare.REPO = saved


def _measure(broker: compare.Broker, name: str, args: argparse.Namespace) -> dict:
    with broker.running() as (pid, port, _log):
        time.sleep(1.0)  # raftmq: the workers and the raft process are up
        pids = tree(pid)
        names = {p: proc_name(p) for p in pids}
        if args.idle:
            time.sleep(2.0)  # start-up over
            before = {p: run_ns(p) for p in pids}
            time.sleep(args.idle)
            after = {p: run_ns(p) for p in pids}
            return {"broker": name, "idle_s": args.idle,
                    "procs": {f"{names[p]}:{p}": (after[p] - before[p]) / 1e6 / args.idle
                              for p in pids}}
        duration = args.window + 4
        lg = subprocess.Popen(
            [str(compare.LOADGEN), "-p", str(port), "-l", "pairs", "-P", str(args.pairs), "-q", "0",
             "-r", str(args.rate), "-d", str(duration), "--warmup", "1", "--cpu-pid", str(pid)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3.0)  # connections up, warm-up over
        pids = tree(pid)
        names = {p: proc_name(p) for p in pids}
        perf = subprocess.Popen(
            ["perf", "stat", "-x,", "--per-thread", "-p", ",".join(map(str, pids)),
             "-e", ",".join(perf_events()), "--", "sleep", str(args.window)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        before = {p: cpu_ticks(p) for p in pids}
        user0 = {p: cpu_ticks(p, "user") for p in pids}
        _, perf_err = perf.communicate()
        after = {p: cpu_ticks(p) for p in pids}
        user1 = {p: cpu_ticks(p, "user") for p in pids}
        out, err = lg.communicate(timeout=duration + 60)
    result = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    msgs = args.rate * args.window
    counts = parse_perf(perf_err)
    procs = {}
    for p in pids:
        c = counts.get(str(p), {})
        procs[f"{names[p]}:{p}"] = {
            "cpu_us_per_msg": (after[p] - before[p]) / CLK_TCK * 1e6 / msgs,
            "user_us_per_msg": (user1[p] - user0[p]) / CLK_TCK * 1e6 / msgs,
            "task_clock_us_per_msg": c.get("task-clock", 0) * 1000 / msgs,  # msec -> µs
            "syscalls_per_msg": c.get("syscalls", 0) / msgs,
            "ctxsw_per_msg": c.get("context-switches", 0) / msgs,
            "by_call": {s: round(c[s] / msgs, 3) for s in SYSCALLS if c.get(s)},
        }
    return {"broker": name, "ok": result.get("ok"), "lost": result.get("lost"),
            "broker_cpu_us_per_msg_seen_by_loadgen": result.get("broker_cpu_us_per_msg"),
            "p50": result.get("latency_us", {}).get("p50"), "p99": result.get("latency_us", {}).get("p99"),
            "procs": procs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="mosquitto,w1,w2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=50000)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--json", help="append every result as a JSON line to this file")
    args = ap.parse_args()
    compare.build_loadgen()
    names = args.brokers.split(",")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            r = measure(name, args)
            results[name].append(r)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            print(json.dumps(r), file=sys.stderr)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds; medians (min–max)")
    for name in names:
        runs = results[name]
        if args.idle:
            total = [sum(r["procs"].values()) for r in runs]
            print(f"{name:10s} idle CPU ms/s all processes: {statistics.median(total):.2f} "
                  f"({min(total):.2f}–{max(total):.2f}); last run: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1]["procs"].items()))
            continue
        total = [sum(p["cpu_us_per_msg"] for p in r["procs"].values()) for r in runs]
        tclk = [sum(p["task_clock_us_per_msg"] for p in r["procs"].values()) for r in runs]
        sysc = [sum(p["syscalls_per_msg"] for p in r["procs"].values()) for r in runs]
        ctx = [sum(p["ctxsw_per_msg"] for p in r["procs"].values()) for r in runs]
        p99 = [r["p99"] for r in runs if r["p99"]]

        def m(v: list[float], f: str = ".2f") -> str:
            return f"{statistics.median(v):{f}} ({min(v):{f}}–{max(v):{f}})"

        print(f"{name:10s} CPU µs/msg {m(total)}  task-clock µs/msg {m(tclk)}  syscalls/msg {m(sysc)}  "
              f"ctxsw/msg {m(ctx, '.3f')}  p99 µs {m(p99, '.0f') if p99 else '-'}  "
              f"lost {[r['lost'] for r in runs]}")
        # per process, per call, from the median run by CPU
        mid = sorted(runs, key=lambda r: sum(p["cpu_us_per_msg"] for p in r["procs"].values()))[len(runs) // 2]
        for pname, p in mid["procs"].items():
            calls = " ".join(f"{k}={v}" for k, v in sorted(p["by_call"].items(), key=lambda kv: -kv[1]))
            print(f"    {pname:22s} cpu {p['cpu_us_per_msg']:.2f} µs/msg (user {p['user_us_per_msg']:.2f})  syscalls {p['syscalls_per_msg']:.2f}"
                  f"  ctxsw {p['ctxsw_per_msg']:.3f}  {calls}")


if __name__ == "__main__":
    main()
