"""TLS and WebSocket listeners: connect cost and QoS 0 throughput against plain
TCP, raftmq against Mosquitto, and the cost of the relay between workers.

The load generator (bench/loadgen.c) speaks plain TCP only, so the clients here
are Python (ssl module, a small RFC 6455 client): the figures are relative.
What is reported per broker and transport, medians over ``--rounds``
alternating runs (raftmq, Mosquitto, raftmq, ...):

- connect: ``--conns`` sequential connections (TCP, TLS handshake, WebSocket
  upgrade, CONNECT -> CONNACK, DISCONNECT): connects/s (wall clock) and the
  broker's CPU time per connect (utime + stime of every broker process, from /proc);
- pubsub: one publisher -> one subscriber over that transport, ``--msgs``
  QoS 0 messages of 64 bytes, a window of 2,000 in flight: messages/s and
  broker CPU µs per message.

``--relay`` adds raftmq with 2 workers, TLS and WebSocket clients whose client
ids the accepting worker owns ("local") or its sibling owns ("relayed"): the
sibling's client crosses one more unix socket each way.  Wall-clock figures on
the shared 2-vCPU machine are noisy; the CPU per connect / per message is the
steadier figure.

    python bench/listeners.py                       # 3 rounds, both brokers
    python bench/listeners.py --rounds 5 --relay
    python bench/listeners.py --brokers none --relay --msgs 200000   # the relay only
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests"), str(REPO / "tests" / "workers")]

from nodeprobe import socket_inodes, worker_pids  # noqa: E402

from raftmq.workers.ownership import owner_of  # noqa: E402
from support.certs import make_certs  # noqa: E402
from support.listeners import ListenerBroker, read_http_head, ws_request  # noqa: E402
from support.mqttraw import connect, disconnect, publish, subscribe  # noqa: E402
from support.procs import descendants  # noqa: E402

TRANSPORTS = ("plain", "tls", "ws", "wss")
CONNECT_BUDGET = 8.0  # seconds of connects per transport at most (Mosquitto's ws: ~6/s)


def cpu_seconds(root: int) -> float:
    ticks = 0
    for pid in [root, *descendants(root)]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


class Stream:
    """A client byte stream over plain TCP, TLS, WebSocket or wss."""

    def __init__(self, host: str, port: int, transport: str, context: ssl.SSLContext,
                 sock: socket.socket | None = None) -> None:
        s = sock or socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if transport in ("tls", "wss"):
            s = context.wrap_socket(s, server_hostname=host)
        self.sock = s
        self.ws = transport in ("ws", "wss")
        self.buf = b""
        if self.ws:
            s.sendall(ws_request())
            head, self.buf = read_http_head(s, 10)
            assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, data: bytes) -> None:
        if self.ws:
            n = len(data)
            head = bytes((0x82, 0x80 | n)) if n < 126 else (
                struct.pack("!BBH", 0x82, 0xFE, n) if n < 65536 else struct.pack("!BBQ", 0x82, 0xFF, n))
            key = os.urandom(4)
            masked = (int.from_bytes(data, "little")
                      ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
            data = head + key + masked
        self.sock.sendall(data)

    def recv(self) -> bytes:
        """Some MQTT bytes (b"" when closed)."""
        if not self.ws:
            return self.sock.recv(262144)
        while True:
            buf = self.buf
            if len(buf) >= 2:
                n, pos = buf[1] & 0x7F, 2
                if n == 126 and len(buf) >= 4:
                    n, pos = struct.unpack_from("!H", buf, 2)[0], 4
                elif n == 127 and len(buf) >= 10:
                    n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
                if n < 126 or pos > 2:
                    if len(buf) >= pos + n:
                        payload, self.buf = buf[pos:pos + n], buf[pos + n:]
                        if buf[0] & 0x0F in (0, 2):
                            return payload
                        if buf[0] & 0x0F == 8:
                            return b""
                        continue
            chunk = self.sock.recv(262144)
            if not chunk:
                return b""
            self.buf += chunk

    def read_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.recv()
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


def one_connect(host: str, port: int, transport: str, ctx: ssl.SSLContext, client_id: str) -> None:
    s = Stream(host, port, transport, ctx)
    s.send(connect(client_id))
    ack = s.read_exactly(4)
    assert ack[0] == 0x20 and ack[3] == 0, ack
    s.send(disconnect())
    s.close()


def bench_connect(b: ListenerBroker, transport: str, ctx: ssl.SSLContext, n: int) -> dict:
    port = b.port if transport == "plain" else b.ports[transport]
    for i in range(20):  # warm-up
        one_connect(b.host, port, transport, ctx, f"w{i}")
    cpu0, t0 = cpu_seconds(b.proc.pid), time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - t0 < CONNECT_BUDGET:
        one_connect(b.host, port, transport, ctx, f"c{done}")
        done += 1
    n = done
    wall = time.perf_counter() - t0
    time.sleep(0.3)  # the broker's side of the last closes
    cpu = cpu_seconds(b.proc.pid) - cpu0
    return {"rate": n / wall, "cpu_ms": cpu / n * 1000}


def pubsub(b: ListenerBroker, ctx: ssl.SSLContext, msgs: int, sub_s: Stream, pub_s: Stream,
           topic: str, burst: int = 200, window: int = 2000) -> dict:
    """``burst`` messages per write, at most ``window`` in flight (burst 1,
    window 0: one message at a time, every read and write carries one)."""
    sub_s.send(subscribe(1, [(topic, 0)]))
    sub_s.read_exactly(5)  # SUBACK
    packet = publish(topic, b"x" * 64, 0)
    blob = packet * burst
    received = [0]
    done = threading.Event()
    total_bytes = len(packet) * msgs

    def reader() -> None:
        got = 0
        while got < total_bytes:
            chunk = sub_s.recv()
            if not chunk:
                break
            got += len(chunk)
            received[0] = got // len(packet)
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    cpu0, t0 = cpu_seconds(b.proc.pid), time.perf_counter()
    t.start()
    sent = 0
    while sent < msgs:
        while sent - received[0] > window:
            time.sleep(0.0005 if window else 0)
        pub_s.send(blob)
        sent += burst
    if not done.wait(60):
        raise RuntimeError(f"only {received[0]} of {msgs} messages arrived")
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(b.proc.pid) - cpu0
    return {"rate": msgs / wall, "cpu_us": cpu / msgs * 1e6}


def bench_pubsub(b: ListenerBroker, transport: str, ctx: ssl.SSLContext, msgs: int,
                 ids: tuple[str, str] = ("bsub", "bpub"),
                 socks: tuple[socket.socket | None, socket.socket | None] = (None, None),
                 **flow: int) -> dict:
    port = b.port if transport == "plain" else b.ports[transport]
    streams = []
    for client_id, sock in zip(ids, socks, strict=True):
        s = Stream(b.host, port, transport, ctx, sock)
        s.send(connect(client_id))
        s.read_exactly(4)
        streams.append(s)
    try:
        return pubsub(b, ctx, msgs, streams[0], streams[1], f"bench/{transport}/{time.time_ns()}",
                      **flow)
    finally:
        for s in streams:
            s.send(disconnect())
            s.close()


def listeners_of(certs) -> dict:
    tls = {"certfile": certs.server_cert, "keyfile": certs.server_key}
    return {"tls": tls, "ws": {"protocol": "websockets"}, "wss": {"protocol": "websockets", **tls}}


def run_broker(kind: str, certs, workdir: Path, args, workers: int = 1) -> dict:
    # Mosquitto: TCP_NODELAY as raftmq (its default leaves Nagle on, which costs
    # the TLS handshake a delayed-ACK wait of ~40 ms per connect here).
    opts = {"workers": workers, "durability": "none"} if kind == "raftmq" \
        else {"set_tcp_nodelay": True}
    b = ListenerBroker(kind, workdir, listeners_of(certs), options=opts).start()
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    out = {}
    try:
        for transport in TRANSPORTS:
            out[transport] = {**bench_connect(b, transport, ctx, args.conns),
                              **{f"pub_{k}": v for k, v in
                                 bench_pubsub(b, transport, ctx, args.msgs).items()}}
    finally:
        b.stop()
    return out


def accepted_by(b: ListenerBroker, port: int, pids: dict[int, int]) -> tuple[socket.socket, int]:
    s = socket.create_connection((b.host, port), timeout=10)
    local = s.getsockname()[1]
    want_local, want_remote = f"0100007F:{port:04X}", f"0100007F:{local:04X}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if parts[1] == want_local and parts[2] == want_remote:
                    holders = [w for w, pid in pids.items() if int(parts[9]) in socket_inodes(pid)]
                    if len(holders) == 1:
                        return s, holders[0]
        time.sleep(0.01)
    raise RuntimeError("accepting worker not found")


def id_owned_by(worker: int, prefix: str) -> str:
    i = 0
    while owner_of(f"{prefix}{i}", 2) != worker:
        i += 1
    return f"{prefix}{i}"


def accepted_on(b: ListenerBroker, port: int, pids: dict[int, int], worker: int) -> socket.socket:
    for _ in range(200):
        s, w = accepted_by(b, port, pids)
        if w == worker:
            return s
        s.close()
    raise RuntimeError(f"no connection accepted by worker {worker}")


def run_relay(certs, workdir: Path, args) -> dict:
    """Both clients owned by worker 0 (no mesh hop); accepted by worker 0
    ("local") or by worker 1 ("relayed": TLS / WebSocket relayed, plain TCP
    handed over as a socket)."""
    b = ListenerBroker("raftmq", workdir, listeners_of(certs),
                       options={"workers": 2, "durability": "none"}).start()
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    pids = worker_pids(b, 2)
    out = {}
    try:
        for transport in ("plain", "tls", "ws"):
            port = b.port if transport == "plain" else b.ports[transport]
            for mode, acceptor in (("local", 0), ("relayed", 1)):
                for flow, msgs, kw in (("batched", args.msgs, {}),
                                       ("one-by-one", args.msgs // 10, {"burst": 1, "window": 0})):
                    socks = (accepted_on(b, port, pids, acceptor),
                             accepted_on(b, port, pids, acceptor))
                    stamp = time.time_ns()
                    ids = (id_owned_by(0, f"sub{stamp}-"), id_owned_by(0, f"pub{stamp}-"))
                    out[f"{transport}-{mode}-{flow}"] = bench_pubsub(b, transport, ctx, msgs, ids,
                                                                     socks, **kw)
    finally:
        b.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=300)
    p.add_argument("--msgs", type=int, default=40000)
    p.add_argument("--brokers", default="raftmq,mosquitto")
    p.add_argument("--relay", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-listeners-"))
    certs = make_certs(tmp / "certs")
    results: dict[str, list[dict]] = {}
    relays: list[dict] = []
    for r in range(args.rounds):
        for kind in [k for k in args.brokers.split(",") if k not in ("", "none")]:
            results.setdefault(kind, []).append(run_broker(kind, certs, tmp / f"{kind}{r}", args))
            print(f"round {r} {kind}: done", file=sys.stderr)
        if args.relay:
            relays.append(run_relay(certs, tmp / f"relay{r}", args))
    keys = [("rate", "connects/s", ",.0f"), ("cpu_ms", "CPU ms/connect", ".2f"),
            ("pub_rate", "msgs/s", ",.0f"), ("pub_cpu_us", "CPU µs/msg", ".2f")]
    print(f"\n{args.rounds} rounds, medians (min–max); {args.conns} connects, {args.msgs} msgs")
    if not results:
        keys = []
    print("| transport | " + " | ".join(f"{k} {label}" for k in results for _, label, _ in keys) + " |")
    for t in TRANSPORTS:
        cells = []
        for runs in results.values():
            for key, _label, spec in keys:
                vals = [run[t][key] for run in runs]
                cells.append(f"{statistics.median(vals):{spec}} ({min(vals):{spec}}–{max(vals):{spec}})")
        print(f"| {t} | " + " | ".join(cells) + " |")
    if "raftmq" in results and "mosquitto" in results:
        print("\nraftmq / Mosquitto (medians): ")
        for t in TRANSPORTS:
            parts = []
            for key, label, _ in keys:
                a = statistics.median(run[t][key] for run in results["raftmq"])
                m = statistics.median(run[t][key] for run in results["mosquitto"])
                parts.append(f"{label} {a / m:.2f}x" if m else f"{label} -")
            print(f"  {t}: " + ", ".join(parts))
    if relays:
        print("\nraftmq, 2 workers: clients owned by the accepting worker vs relayed to the other")
        for key in relays[0]:
            rates = [r[key]["rate"] for r in relays]
            cpus = [r[key]["cpu_us"] for r in relays]
            print(f"  {key}: {statistics.median(rates):,.0f} msgs/s ({min(rates):,.0f}–{max(rates):,.0f}), "
                  f"{statistics.median(cpus):.2f} CPU µs/msg ({min(cpus):.2f}–{max(cpus):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
