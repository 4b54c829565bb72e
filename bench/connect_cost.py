"""CPU instructions and system calls per MQTT connect, raftmq against Mosquitto.

Wall-clock connection rates on this shared 2-vCPU machine move by 2x from one
minute to the next; instruction counts under callgrind do not.  For each broker:

1. start it under ``valgrind --tool=callgrind --trace-children=yes`` (every
   raftmq process: supervisor, workers);
2. warm it up with ``--warmup`` connections (first-time costs: imports, caches);
3. zero the counters of every process of the broker (``callgrind_control -z``);
4. connect ``--conns`` idle clients with ``bench/loadgen -l idle`` (CONNECT ->
   CONNACK, 50 handshakes in flight, like compare.py's idle-10k);
5. once all are established, dump the counters (``callgrind_control -d``): the
   connect phase; then let loadgen close them and dump again: the close phase.
   The connect phase is also given without the event loop's timer callbacks
   (raftmq's 0.5 s upkeep tick sweeps every connection; under valgrind a run
   lasts 50x longer, so the tick weighs 50x more than in a real connect storm).

Instructions are user space only (callgrind sees no kernel work).  With
``--strace`` the same steps run without valgrind under ``strace -c -f`` to count
system calls per connect (strace is attached after the warm-up and detached
once every connection is established).

    python bench/connect_cost.py                       # raftmq (1 worker) and Mosquitto, 2,000 connects
    python bench/connect_cost.py --workers 2 --conns 1000
    python bench/connect_cost.py --strace --conns 5000
    python bench/connect_cost.py --brokers raftmq --keep   # keep the callgrind files (callgrind_annotate)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare import free_port, wait_for_port  # bench/ is this script's sys.path[0]

REPO = Path(__file__).resolve().parent.parent
LOADGEN = REPO / "bench" / "loadgen"
MOSQUITTO = "/usr/sbin/mosquitto"


def established(port: int) -> int:
    """TCP connections established to ``port`` (the broker's side of them)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def wait_established(port: int, n: int, timeout: float, above: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = established(port)
        if (count >= n) if above else (count <= n):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{established(port)} connections established, waited for {n}")


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def broker_command(name: str, port: int, workdir: Path, workers: int, log_info: bool) -> list[str]:
    if name == "mosquitto":
        conf = workdir / "mosquitto.conf"
        text = (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "set_tcp_nodelay true\nlog_dest stderr\n"
                # As root Mosquitto switches to user "mosquitto", and callgrind_control
                # (root) can no longer reach its valgrind.
                + ("user root\n" if os.geteuid() == 0 else ""))
        if not log_info:
            text += "log_type error\nlog_type warning\n"
        conf.write_text(text)
        return [MOSQUITTO, "-c", str(conf)]
    conf = workdir / "raftmq.toml"
    conf.write_text(f'allow_anonymous = true\ndurability = "none"\nworkers = {workers}\n'
                    + ("" if log_info else 'log_level = "warning"\n'))
    return [sys.executable, "-m", "raftmq", "serve", "-c", str(conf), "--host", "127.0.0.1",
            "-p", str(port), "--data-dir", str(workdir / "data")]


def run_loadgen(port: int, n: int, hold: float, timeout: float) -> subprocess.Popen:
    return subprocess.Popen([str(LOADGEN), "-p", str(port), "-l", "idle", "-n", str(n), "--hold",
                             str(hold), "--connect-timeout", str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def dump_profiles(pids: list[int], label: str, tmp: Path, before: set[Path]) -> list[Path]:
    """Have callgrind dump every process's counters now; the new profile files."""
    for pid in pids:
        subprocess.run(["callgrind_control", "-d", label, str(pid)], capture_output=True,
                       check=False)
    time.sleep(2.0)
    return sorted(set(tmp.glob("cg.*")) - before)


def callgrind_totals(files: list[Path]) -> int:
    total = 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
                break
    return total


def timer_instructions(files: list[Path]) -> int:
    """Instructions spent in the event loop's timer callbacks (libuv's
    ``uv__run_timers``, inclusive): raftmq's 0.5 s upkeep tick, whose share of
    a run depends on how long valgrind took, not on the connects."""
    total = 0
    for path in files:
        out = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(path)],
                             capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if ":uv__run_timers [" in line:
                total += int(line.split()[0].replace(",", ""))
                break
    return total


def measure(name: str, args: argparse.Namespace) -> dict:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix=f"conncost-{name}-"))
    cmd = broker_command(name, port, tmp, args.workers, not args.no_log)
    if not args.strace:
        cmd = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--dump-instr=no",
               f"--callgrind-out-file={tmp}/cg.%p", *cmd]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    log = open(tmp / "broker.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                            start_new_session=True)
    slow = 1 if args.strace else 60
    result: dict = {"broker": name, "conns": args.conns}
    try:
        wait_for_port(port, proc, 600 if not args.strace else 30)
        time.sleep(1.0 if args.strace else 5.0)
        if args.warmup:
            lg = run_loadgen(port, args.warmup, 0.2, 30 * slow)
            lg.communicate(timeout=60 * slow)
            wait_established(port, 0, 30 * slow, above=False)
        pids = tree_pids(proc.pid)
        if args.strace:
            strace_out = tmp / "strace.txt"
            sp = subprocess.Popen(["strace", "-c", "-f", "-o", str(strace_out),
                                   *sum((["-p", str(p)] for p in pids), [])],
                                  stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        else:
            for pid in pids:
                subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True,
                               check=False)
        before = set(tmp.glob("cg.*"))
        t0 = time.monotonic()
        lg = run_loadgen(port, args.conns, 3.0 if args.strace else 10.0, 60 * slow)
        wait_established(port, args.conns, 60 * slow)
        result["setup_s"] = round(time.monotonic() - t0, 2)
        if args.strace:
            time.sleep(0.3)
            sp.send_signal(signal.SIGINT)
            sp.wait(timeout=30)
            lg.communicate(timeout=60)
            result["syscalls"] = parse_strace(strace_out.read_text(), args.conns)
            return result
        connect_files = dump_profiles(pids, "connect", tmp, before)
        result["instr_per_connect"] = callgrind_totals(connect_files) // args.conns
        timers = timer_instructions(connect_files)
        result["of_which_timers"] = timers // args.conns
        result["instr_per_connect_without_timers"] = (callgrind_totals(connect_files) - timers) \
            // args.conns
        lg.communicate(timeout=120 * slow)
        wait_established(port, 0, 60 * slow, above=False)
        time.sleep(3.0)
        close_files = dump_profiles(pids, "close", tmp, set(tmp.glob("cg.*")))
        result["instr_per_close"] = callgrind_totals(close_files) // args.conns
        result["files"] = [str(p) for p in connect_files]
        return result
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if args.keep:
            print(f"{name}: files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_strace(text: str, conns: int) -> dict:
    calls: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = round(int(m.group(1)) / conns, 2)
    calls["total"] = round(sum(calls.values()), 2)
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--brokers", default="raftmq,mosquitto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--strace", action="store_true", help="count system calls instead")
    ap.add_argument("--no-log", action="store_true",
                    help="brokers log warnings only (no 'New client connected' lines)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = ap.parse_args()
    if not LOADGEN.exists():
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(LOADGEN), str(LOADGEN) + ".c"], check=True)
    for name in args.brokers.split(","):
        print(measure(name, args), flush=True)


if __name__ == "__main__":
    main()
