"""The ``raftmq`` command line.

One function per subcommand, registered in ``COMMANDS``: a subcommand is a
pair (add its arguments to a parser, run it with the parsed namespace and
return the exit status).  ``cluster ...`` and ``dynsec ...`` are added the same
way.

Exit statuses: 0 success, 1 runtime failure, 2 usage or configuration error
(argparse's convention).

Logs: see raftmq.logsetup.  ``-v`` switches to debug level.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from raftmq import __version__
from raftmq.config import Config, ConfigError, load_config

log = logging.getLogger("raftmq.cli")

from raftmq.logsetup import setup_logging  # noqa: E402  (re-exported for callers)

# ---------------------------------------------------------------------------
# serve


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "-p", "--port", type=int, metavar="PORT",
        help="listen on PORT instead of the configured listeners (like mosquitto -p)",
    )
    parser.add_argument(
        "--host", metavar="HOST",
        help="address to listen on with --port (default: the first listener's, else 127.0.0.1)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="directory for durable state")
    parser.add_argument(
        "--workers", type=int, metavar="N",
        help="worker processes sharing the listeners (default: workers in the config, else one per CPU)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def serve(config: Config) -> int:
    """Run the node until SIGTERM/SIGINT: the supervisor, its raft process and workers.

    Standalone is a one-member Raft group on the same code path as a cluster;
    ``durability = "none"`` runs the workers on the in-memory store alone.
    """
    from raftmq.supervisor import serve as supervise

    return supervise(config)


def _run_serve(args: argparse.Namespace) -> int:
    overrides = {"port": args.port, "host": args.host, "data_dir": args.data_dir,
                 "workers": args.workers}
    if args.verbose:
        overrides["log_level"] = "debug"
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    log.info("raftmq version %s starting", __version__)
    if args.config:
        log.info("Config loaded from %s.", args.config)
    else:
        log.info("Using default config.")
    return serve(config)


# ---------------------------------------------------------------------------

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]

def _cluster_command() -> Command:
    from raftmq.cluster.admin import add_cluster_args, run_cluster

    return (add_cluster_args, run_cluster, "cluster status, add, remove, transfer-leader")


def _dynsec_command() -> Command:
    from raftmq.dynsec.cli import add_dynsec_args, run_dynsec

    return (
        add_dynsec_args,
        run_dynsec,
        "dynamic security: init, import, export (Mosquitto's dynamic-security.json)",
    )


COMMANDS: dict[str, Command] = {
    "serve": (_add_serve_args, _run_serve, "run the broker"),
    "cluster": _cluster_command(),
    "dynsec": _dynsec_command(),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raftmq", description="MQTT broker cluster on Raft")
    parser.add_argument("--version", action="version", version=f"raftmq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_args, _run, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _add_args, run, _help = COMMANDS[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        return 0
