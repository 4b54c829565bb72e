"""``raftmq cluster status|add|remove|transfer-leader``: talk to the local raft process.

Each command connects to ``<data_dir>/raft.sock`` of a node on this host (the
socket is 0600: only the node's user may administer it) and sends one ADMIN
request (raft/channel.py).  Membership changes and transfers must be made on
the leader; asked on a follower, the command says which node leads.

The functions return the process exit status and print one line per fact, so
the lead can register them in cli.py's COMMANDS table as they are.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from raftmq.cluster.config import ClusterConfigError, parse_hostport
from raftmq.raft.channel import BlockingChannel


def _request(data_dir: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    ch = BlockingChannel(data_dir, timeout=timeout, connect_timeout=2.0)
    try:
        return ch.admin(request)
    finally:
        ch.close()


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"node {st['id']}: {st['role']}, leader {st['leader'] or 'unknown'}, term {st['term']}",
        f"log: first {st['first_index']}, last {st['last_index']}, commit {st['commit']}, applied {st['applied']}",
        f"voters: {', '.join(map(str, st['voters'])) or '-'}; learners: {', '.join(map(str, st['learners'])) or '-'}",
    ]
    for nid, addr in sorted(st.get("peers", {}).items(), key=lambda kv: int(kv[0])):
        state = "connected" if int(nid) in st.get("connected", []) else "not connected"
        pr = st.get("progress", {}).get(nid)
        extra = f", match {pr['match']}" if pr else ""
        lines.append(f"peer {nid} at {addr}: {state}{extra}")
    return "\n".join(lines)


def _run(data_dir: str, request: dict[str, Any], timeout: float, out: TextIO | None, ok_text: str | None) -> int:
    out = out or sys.stdout
    try:
        reply = _request(data_dir, request, timeout + 5)
    except OSError as exc:
        print(f"Error: cannot reach the raft process of {data_dir}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        err = reply.get("error", "failed")
        if err == "not leader":
            where = reply.get("leader_address") or "unknown address"
            print(f"Error: this node is not the leader; the leader is node {reply.get('leader') or '?'} ({where})",
                  file=sys.stderr)
        else:
            print(f"Error: {err}", file=sys.stderr)
        return 1
    if ok_text:
        print(ok_text, file=out)
    if "message" in reply:
        print(reply["message"], file=out)
    if "status" in reply:
        print(format_status(reply["status"]), file=out)
    return 0


def cluster_status(data_dir: str, out: TextIO | None = None) -> int:
    return _run(data_dir, {"op": "status"}, 5.0, out, None)


def cluster_add(data_dir: str, node_id: int, address: str, timeout: float = 60.0, out: TextIO | None = None) -> int:
    """Add ``node_id`` (its raft address HOST:PORT) as a learner; it is promoted
    to voter once caught up (Raft thesis §4.2.1).  Returns when it is a voter."""
    try:
        parse_hostport(address, "address")
    except ClusterConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    req = {"op": "add", "id": node_id, "address": address, "timeout": timeout}
    return _run(data_dir, req, timeout, out, f"Node {node_id} added as a voter.")


def cluster_remove(data_dir: str, node_id: int, timeout: float = 30.0, out: TextIO | None = None) -> int:
    req = {"op": "remove", "id": node_id, "timeout": timeout}
    return _run(data_dir, req, timeout, out, f"Node {node_id} removed.")


def cluster_transfer_leader(data_dir: str, node_id: int, timeout: float = 10.0, out: TextIO | None = None) -> int:
    req = {"op": "transfer", "id": node_id, "timeout": timeout}
    return _run(data_dir, req, timeout, out, f"Leadership transferred to node {node_id}.")


# -- argparse glue for cli.py's COMMANDS table ------------------------------------------


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="./data", help="the node's data directory (its raft.sock)")
    sub = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    sub.add_parser("status", help="role, leader, term, log and peers of this node")
    p = sub.add_parser("add", help="add a member (run on the leader)")
    p.add_argument("node_id", type=int)
    p.add_argument("address", help="the new member's raft address HOST:PORT")
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("remove", help="remove a member (run on the leader)")
    p.add_argument("node_id", type=int)
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("transfer-leader", help="hand leadership to a member (run on the leader)")
    p.add_argument("node_id", type=int)
    p.add_argument("--timeout", type=float, default=10.0)


def run_cluster(args: argparse.Namespace) -> int:
    cmd = args.cluster_command
    if cmd == "status":
        return cluster_status(args.data_dir)
    if cmd == "add":
        return cluster_add(args.data_dir, args.node_id, args.address, args.timeout)
    if cmd == "remove":
        return cluster_remove(args.data_dir, args.node_id, args.timeout)
    return cluster_transfer_leader(args.data_dir, args.node_id, args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raftmq cluster")
    add_cluster_args(parser)
    return run_cluster(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
