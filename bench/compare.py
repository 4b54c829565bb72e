"""raftmq and Mosquitto side by side: the same load against both, in one run.

    python bench/compare.py [--quick] [--scenarios qos0-pairs,fanout] [--workers N]

For every scenario and round, each broker is started fresh on a free loopback
port, driven by ``bench/loadgen`` (built here with ``cc -O2``) and stopped
again; the order of the brokers alternates from round to round.  The machine
is shared and noisy, so the ratios of one run matter, not the absolute
figures.  Broker CPU time is utime+stime from /proc of the broker process and
all its children (raftmq runs several processes), sampled by loadgen at the
start and end of the measured window.

Prints a Markdown table (medians over the rounds) and writes every raw result
with the machine's description to ``bench/results/<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BENCH / "loadgen"
RESULTS = BENCH / "results"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    loadgen_args: tuple[str, ...]
    # what the issues ask of raftmq against Mosquitto: (metric, comparison, bound)
    targets: tuple[tuple[str, str, float], ...] = ()
    idle: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "qos0-pairs", "QoS 0, 10 pairs publisher→subscriber, closed loop (window 100), 64 B",
            ("-l", "pairs", "-P", "10", "-q", "0", "-w", "100"),
            (("throughput", ">=", 2.0),),
        ),
        Scenario(
            "fanout", "QoS 0, fan-out 1 publisher → 50 subscribers, closed loop (window 100)",
            ("-l", "fanout", "-P", "1", "-S", "50", "-q", "0", "-w", "100"),
            (("throughput", ">=", 3.0),),
        ),
        Scenario(
            "fanin", "QoS 0, fan-in 100 publishers → 1 subscriber (bench/+), closed loop (window 10)",
            ("-l", "fanin", "-P", "100", "-S", "1", "-q", "0", "-w", "10"),
        ),
        Scenario(
            "qos1-pairs", "QoS 1, 10 pairs, closed loop (window 50, counted to PUBACK and delivery)",
            ("-l", "pairs", "-P", "10", "-q", "1", "-w", "50"),
        ),
        Scenario(
            "qos1-durable", "QoS 1, 10 pairs, persistent subscriber sessions (every delivery is durable state)",
            ("-l", "pairs", "-P", "10", "-q", "1", "-w", "50", "--persistent-subs"),
            (("throughput", ">=", 1.0),),
        ),
        Scenario(
            "latency-10k", "QoS 0, 10 pairs, open loop at 10,000 msg/s in total: latency",
            ("-l", "pairs", "-P", "10", "-q", "0", "-r", "10000"),
            (("p99", "<=", 1.0),),
        ),
        Scenario(
            "conns-500", "QoS 0, 500 pairs at 100 msg/s each (50,000 msg/s), open loop: CPU per message",
            ("-l", "pairs", "-P", "500", "-q", "0", "-r", "50000"),
            (("cpu_per_msg", "<=", 1.2),),
        ),
        Scenario(
            "idle-10k", "10,000 idle connections: memory per connection and connection rate",
            ("-l", "idle", "-n", "10000", "--hold", "2"),
            (("bytes_per_conn", "<=abs", 3072.0), ("connects_per_s", ">=", 1.0)),
            idle=True,
        ),
    )
}


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"broker not listening on port {port} after {timeout:.0f} s")


# A clean 3.1.1 CONNECT (client id "bench-probe", keep alive 10 s) and the
# CONNACK accepting it: the broker serves, not only listens.
_PROBE_CONNECT = bytes((0x10, 23, 0, 4)) + b"MQTT" + bytes((4, 2, 0, 10, 0, 11)) + b"bench-probe"
_CONNACK_OK = bytes((0x20, 2, 0, 0))
SETTLE = 1.0  # seconds between serving and the load: start-up work of either broker is over
# --pin-broker / --pin-loadgen: CPU lists for taskset.  On this VM a wake-up
# across vCPUs costs ~80 us and ~23 us of CPU per message at 10k msg/s, for
# Mosquitto as for raftmq, and which placement the scheduler picks varies from
# run to run: a latency comparison without pinning measures that choice.
PIN: dict[str, str | None] = {"broker": None, "loadgen": None}


def pinned(cmd: list[str], who: str) -> list[str]:
    cpus = PIN[who]
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def wait_until_serving(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Until a CONNECT is accepted, then SETTLE seconds.  raftmq's supervisor
    holds the port before its workers run (connections wait in the backlog),
    and a load started during their start-up was measured in a state that
    lasted the whole run (p50 97 us instead of 16 us at 10k msg/s, both
    processes kept on one vCPU): the load starts once both brokers are idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with status {proc.returncode} before serving")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0) as s:
            s.sendall(_PROBE_CONNECT)
            s.settimeout(2.0)
            if s.recv(4) == _CONNACK_OK:
                s.sendall(bytes((0xE0, 0)))  # DISCONNECT
                time.sleep(SETTLE)
                return
        time.sleep(0.05)
    raise RuntimeError(f"broker not serving on port {port} after {timeout:.0f} s")


def raise_nofile() -> None:
    """Run in the broker child: 10,000 connections need more than 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def build_loadgen() -> None:
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    cc = os.environ.get("CC", "cc")
    if not shutil.which(cc):
        raise SystemExit(f"no C compiler ({cc}) to build bench/loadgen: apt-get install gcc")
    cmd = [cc, "-O2", "-Wall", "-o", str(LOADGEN), str(LOADGEN_SRC)]
    print("building loadgen:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def machine_info() -> dict:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    mosq_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5).stdout
        mosq_version = out.splitlines()[0] if out else ""
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_kb": mem_kb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": mosq_version,
        "raftmq_commit": commit,
        "loadavg_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- brokers


@dataclass
class Broker:
    name: str
    workers: int | None = None
    durability: str = "none"
    config: str | None = None
    extra_args: list[str] = field(default_factory=list)
    # "connects": both brokers log a line per client connect and disconnect
    # (Mosquitto's default log types; raftmq's default level) -- log writes are
    # part of the connect cost; "quiet": warnings and errors only, both.
    logs: str = "connects"

    def command(self, port: int, workdir: Path) -> list[str]:
        if self.name == "mosquitto":
            conf = workdir / "mosquitto.conf"
            # Mosquitto's own defaults otherwise; set_tcp_nodelay because
            # without it Nagle's algorithm holds its small writes and the
            # latency scenario measures TCP, not the broker (p50 ~8 ms).
            conf.write_text(
                f"listener {port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "set_tcp_nodelay true\n"
                "log_dest stderr\n"
                + ("log_type error\nlog_type warning\n" if self.logs == "quiet" else "")
            )
            return [MOSQUITTO, "-c", str(conf)]
        config = self.config
        if not config:
            # Like the Mosquitto side: anonymous clients, and by default
            # nothing durable (Mosquitto runs with persistence off).
            config = str(workdir / "raftmq.toml")
            lines = ["allow_anonymous = true", f'durability = "{self.durability}"']
            if self.workers:
                lines.append(f"workers = {self.workers}")
            if self.logs == "quiet":
                lines.append('log_level = "warning"')
            Path(config).write_text("\n".join(lines) + "\n")
        cmd = [
            sys.executable, "-m", "raftmq", "serve", "-c", config,
            "--host", "127.0.0.1", "-p", str(port), "--data-dir", str(workdir / "data"),
        ]
        return cmd + self.extra_args

    @contextlib.contextmanager
    def running(self) -> Iterator[tuple[int, int, Path]]:
        """Start a fresh broker; yield (pid, port, log file); stop it and its children."""
        port = free_port()
        with tempfile.TemporaryDirectory(prefix=f"bench-{self.name}-") as tmp:
            workdir = Path(tmp)
            log_path = workdir / "broker.log"
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    pinned(self.command(port, workdir), "broker"), stdout=log, stderr=subprocess.STDOUT, env=env,
                    cwd=workdir, preexec_fn=raise_nofile, start_new_session=True,
                )
            try:
                try:
                    wait_until_serving(port, proc, timeout=20)
                except RuntimeError as exc:
                    log_tail = log_path.read_text(errors="replace")[-800:]
                    raise RuntimeError(f"{self.name}: {exc}; log: {log_tail}") from exc
                yield proc.pid, port, log_path
            finally:
                stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the broker's own process group (it was started in a new session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def raftmq_available() -> str | None:
    """None when raftmq can be started here, else why not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-c", "import raftmq.cli, raftmq.broker.server"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["import failed"])[-1]


# --------------------------------------------------------------------------- runs


def run_one(broker: Broker, sc: Scenario, duration: float, warmup: float, mqtt: str) -> dict:
    started = time.time()
    try:
        with broker.running() as (pid, port, log_path):
            args = [str(LOADGEN), "-p", str(port), "--cpu-pid", str(pid), "--label", f"{sc.name}/{broker.name}"]
            if not sc.idle:
                args += ["-d", str(duration), "--warmup", str(warmup)]
            args += list(sc.loadgen_args) + ["--mqtt", "5" if mqtt == "5" else "4"]
            args = pinned(args, "loadgen")
            budget = duration + warmup + 60
            try:
                r = subprocess.run(args, capture_output=True, text=True, timeout=budget)
            except subprocess.TimeoutExpired:
                return {"ok": False, "error": f"loadgen did not finish in {budget:.0f} s"}
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                return {"ok": False, "error": f"loadgen printed no result (status {r.returncode}): {r.stderr[-400:]}"}
            result = json.loads(lines[-1])
            if not result.get("ok"):
                tail = log_path.read_text(errors="replace")[-600:]
                result["broker_log_tail"] = tail
            return result
    except RuntimeError as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        elapsed = time.time() - started
        print(f"  {sc.name:12s} {broker.name:10s} {elapsed:5.1f} s", file=sys.stderr)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Medians over the rounds of one broker in one scenario."""
    good = [r for r in runs if r.get("ok")]
    lat = [r.get("latency_us", {}) for r in good]
    out = {
        "rounds": len(runs),
        "ok_rounds": len(good),
        "errors": [r.get("error") for r in runs if not r.get("ok")],
        "throughput": median([r.get("msgs_per_s") for r in good]),
        "cpu_per_msg": median([r.get("broker_cpu_us_per_msg") for r in good]),
        "cpu_pct": median([r.get("broker_cpu_pct") for r in good]),
        "p50": median([x.get("p50") for x in lat]),
        "p99": median([x.get("p99") for x in lat]),
        "lost": sum(r.get("lost", 0) for r in good) if good else None,
        "loadgen_cpu_pct": median([r.get("loadgen_cpu_pct") for r in good]),
        "connects_per_s": median([r.get("connects_per_s") for r in good]),
        "bytes_per_conn": median([r.get("pss_bytes_per_conn") for r in good]),
    }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None else format(v, spec)


def verdict(sc: Scenario, mosq: dict, raft: dict) -> str:
    marks = []
    for metric, op, bound in sc.targets:
        if op == "<=abs":
            v = raft.get(metric)
            if v is None:
                continue
            marks.append(f"{metric} {fmt(v, ',.0f')} ≤ {bound:,.0f} {'✓' if v <= bound else '✗'}")
            continue
        r = ratio(raft.get(metric), mosq.get(metric))
        if r is None:
            continue
        ok = r >= bound if op == ">=" else r <= bound
        marks.append(f"{metric} {r:.2f}x {op} {bound}x {'✓' if ok else '✗'}")
    return "; ".join(marks)


def table(scenarios: list[Scenario], summary: dict, brokers: list[str]) -> str:
    """One row per scenario and raftmq variant (``raftmq``, or ``raftmq-w1``, ``raftmq-w2``...)."""
    m = "mosquitto"
    variants = [b for b in brokers if b != m] or ["raftmq"]
    rows = [
        "| scenario | mosquitto msg/s | raftmq msg/s | ratio | CPU µs/msg mosq | CPU µs/msg raftmq | CPU ratio "
        "| p50 µs mosq / raftmq | p99 µs mosq / raftmq | lost mosq / raftmq | broker CPU % mosq / raftmq | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    idle_rows = []
    for sc in scenarios:
        ms = summary[sc.name].get(m, {})
        for r in variants:
            rs = summary[sc.name].get(r, {})
            label = sc.name if len(variants) == 1 else f"{sc.name} ({r.removeprefix('raftmq-')})"
            if sc.idle:
                idle_rows.append(
                    f"| {label} | {fmt(ms.get('connects_per_s'))} | {fmt(rs.get('connects_per_s'))} "
                    f"| {fmt(ratio(rs.get('connects_per_s'), ms.get('connects_per_s')), '.2f')} "
                    f"| {fmt(ms.get('bytes_per_conn'))} | {fmt(rs.get('bytes_per_conn'))} | {verdict(sc, ms, rs)} |"
                )
                continue
            rows.append(
                f"| {label} | {fmt(ms.get('throughput'))} | {fmt(rs.get('throughput'))} "
                f"| {fmt(ratio(rs.get('throughput'), ms.get('throughput')), '.2f')} "
                f"| {fmt(ms.get('cpu_per_msg'), '.2f')} | {fmt(rs.get('cpu_per_msg'), '.2f')} "
                f"| {fmt(ratio(rs.get('cpu_per_msg'), ms.get('cpu_per_msg')), '.2f')} "
                f"| {fmt(ms.get('p50'), ',.0f')} / {fmt(rs.get('p50'), ',.0f')} "
                f"| {fmt(ms.get('p99'), ',.0f')} / {fmt(rs.get('p99'), ',.0f')} "
                f"| {fmt(ms.get('lost') if ms else None, ',')} / {fmt(rs.get('lost') if rs else None, ',')} "
                f"| {fmt(ms.get('cpu_pct'))} / {fmt(rs.get('cpu_pct'))} "
                f"| {verdict(sc, ms, rs)} |"
            )
    out = "\n".join(rows)
    if idle_rows:
        out += (
            "\n\n| scenario | mosquitto conn/s | raftmq conn/s | ratio | mosquitto B/conn | raftmq B/conn | target |\n"
            "|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(idle_rows)
        )
    errors = [
        f"- {sc.name} / {b}: {' | '.join(ln.strip() for ln in e.splitlines() if ln.strip())[-400:]}"
        for sc in scenarios for b in brokers
        for e in summary[sc.name].get(b, {}).get("errors", []) if e
    ]
    if errors:
        out += "\n\nErrors:\n" + "\n".join(errors)
    busy = [
        f"- {sc.name} / {b}: loadgen at {s['loadgen_cpu_pct']:.0f} % of a core"
        for sc in scenarios for b in brokers
        if (s := summary[sc.name].get(b, {})).get("loadgen_cpu_pct") and s["loadgen_cpu_pct"] > 85
    ]
    if busy:
        out += "\n\nLoad generator near saturation (that broker's figure may be loadgen-bound):\n" + "\n".join(busy)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round of 3 s per scenario and broker")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--brokers", default="mosquitto,raftmq", help="comma-separated subset of mosquitto,raftmq")
    ap.add_argument("--workers", help="raftmq worker processes (workers = N in its config); "
                    "a list like 1,2 runs one raftmq per value, all in the same run")
    ap.add_argument("--durability", choices=["none", "async", "sync"], default="none",
                    help="raftmq durability (none: like Mosquitto with persistence off; default)")
    ap.add_argument("--raftmq-config", help="raftmq TOML config to use instead of the generated one")
    ap.add_argument("--mqtt", choices=["3.1.1", "5"], default="3.1.1", help="protocol of loadgen's clients")
    ap.add_argument("--raftmq-arg", action="append", default=[], help="extra argument for raftmq serve")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 3, --quick 1)")
    ap.add_argument("--duration", type=float, help="measured seconds per run (default 5, --quick 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (1)")
    ap.add_argument("--logs", choices=["connects", "quiet"], default="connects",
                    help="connects (default): both brokers log each client connect/disconnect "
                    "(Mosquitto's default log types, raftmq's info level); quiet: warnings only, both")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    ap.add_argument("--pin-broker", help="CPU list (taskset -c) for both brokers and their children")
    ap.add_argument("--pin-loadgen", help="CPU list (taskset -c) for the load generator")
    args = ap.parse_args(argv)
    try:
        worker_counts: list[int | None] = [int(w) for w in args.workers.split(",")] if args.workers else [None]
    except ValueError:
        ap.error(f"--workers expects a number or a list like 1,2, got {args.workers!r}")
    if args.raftmq_config and (args.workers or args.durability != "none"):
        ap.error("--workers/--durability go into the generated config; put them in --raftmq-config instead")

    PIN["broker"], PIN["loadgen"] = args.pin_broker, args.pin_loadgen
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    scenarios = [SCENARIOS[n] for n in names]
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (3.0 if args.quick else 5.0)

    wanted = [b.strip() for b in args.brokers.split(",") if b.strip()]
    brokers: list[Broker] = []
    skipped: dict[str, str] = {}
    for name in wanted:
        if name == "mosquitto":
            if not os.access(MOSQUITTO, os.X_OK):
                skipped[name] = f"{MOSQUITTO} not found (apt-get install mosquitto)"
                continue
            brokers.append(Broker("mosquitto", logs=args.logs))
        elif name == "raftmq":
            why = raftmq_available()
            if why:
                skipped[name] = why
                continue
            for w in worker_counts:
                variant = "raftmq" if len(worker_counts) == 1 else f"raftmq-w{w}"
                brokers.append(Broker(variant, w, args.durability, args.raftmq_config, args.raftmq_arg,
                                      logs=args.logs))
        else:
            ap.error(f"unknown broker {name}")
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    if not brokers:
        print("no broker to benchmark", file=sys.stderr)
        return 2

    build_loadgen()
    info = machine_info()
    print(
        f"{info['date']}  {info['nproc']} × {info['cpu_model']}  kernel {info['kernel']}  "
        f"{info['mosquitto']}  raftmq {info['raftmq_commit']}"
        + (f" workers={args.workers}" if args.workers else "")
        + f" durability={args.durability} mqtt={args.mqtt} logs={args.logs}"
        + (f" pin broker={args.pin_broker} loadgen={args.pin_loadgen}" if args.pin_broker or args.pin_loadgen else ""),
        file=sys.stderr,
    )
    raw: dict[str, dict[str, list[dict]]] = {sc.name: {b.name: [] for b in brokers} for sc in scenarios}
    for sc in scenarios:
        for rnd in range(rounds):
            order = brokers if rnd % 2 == 0 else list(reversed(brokers))
            for b in order:
                res = run_one(b, sc, duration, args.warmup, args.mqtt)
                res["round"] = rnd
                raw[sc.name][b.name].append(res)

    summary = {sc.name: {b: summarize(runs) for b, runs in raw[sc.name].items()} for sc in scenarios}
    text = table(scenarios, summary, [b.name for b in brokers])
    print(
        f"\n{info['date'][:10]}, {info['nproc']} × {info['cpu_model']}, kernel {info['kernel']}, "
        f"{info['mosquitto']}, raftmq {info['raftmq_commit']}"
        + (f", {args.workers} workers" if args.workers else "")
        + f", durability {args.durability}, MQTT {args.mqtt}, logs {args.logs}"
        + f"; {rounds} round(s) × {duration:g} s, medians\n"
    )
    print(text)

    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%S")
        path = RESULTS / f"{stamp}-{info['host'] or 'host'}.json"
        path.write_text(json.dumps({
            "machine": info,
            "settings": {
                "rounds": rounds, "duration_s": duration, "warmup_s": args.warmup,
                "workers": args.workers, "durability": args.durability, "mqtt": args.mqtt,
                "logs": args.logs, "pin_broker": args.pin_broker, "pin_loadgen": args.pin_loadgen,
                "raftmq_config": args.raftmq_config,
                "skipped_brokers": skipped,
            },
            "scenarios": {sc.name: {"title": sc.title, "loadgen_args": list(sc.loadgen_args)} for sc in scenarios},
            "summary": summary,
            "runs": raw,
        }, indent=1))
        print(f"\nraw results: {path.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
