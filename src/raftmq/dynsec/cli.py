"""``raftmq dynsec init|import|export``: move configurations from and to Mosquitto's file.

- ``raftmq dynsec init FILE-or-DATADIR [USER [PASSWORD]]``: what ``mosquitto_ctrl
  dynsec init`` writes (spec §9.2): one admin client with the ``admin`` role
  and the init default access.  Given a file name: writes that file (refused
  if it exists), usable by Mosquitto too.  Given a data directory: stages it
  as ``<DATADIR>/dynsec-import.json``, committed at the next start.
- ``raftmq dynsec import FILE --data-dir DIR``: checks a Mosquitto
  ``dynamic-security.json`` (2.0 or 2.1) and stages it the same way; the
  broker replaces its configuration with it at the next start (replicated
  like any other dynsec change).
- ``raftmq dynsec export FILE --data-dir DIR``: writes the committed
  configuration in Mosquitto 2.0's format (hashes unchanged, so passwords keep
  working), mode 0600.

Exit statuses follow raftmq/cli.py: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftmq.dynsec.jsontext import PayloadError, parse
from raftmq.dynsec.model import DynsecState
from raftmq.dynsec.password import hash_password

IMPORT_FILE = "dynsec-import.json"

# The admin role of `mosquitto_ctrl dynsec init` (spec §3.2), in its order.
INIT_ADMIN_ACLS = [
    ("publishClientSend", "$CONTROL/dynamic-security/#"),
    ("publishClientReceive", "$CONTROL/dynamic-security/#"),
    ("subscribePattern", "$CONTROL/dynamic-security/#"),
    ("publishClientReceive", "$SYS/#"),
    ("subscribePattern", "$SYS/#"),
    ("publishClientReceive", "#"),
    ("subscribePattern", "#"),
    ("unsubscribePattern", "#"),
]
INIT_DEFAULT_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": True,
    "subscribe": False,
    "unsubscribe": True,
}


def init_document(username: str, password: str) -> dict[str, Any]:
    """The document ``mosquitto_ctrl dynsec init FILE USER PASSWORD`` writes (new salt)."""
    return {
        "clients": [{
            "username": username,
            "textname": "Dynsec admin user",
            **hash_password(password).to_json(),
            "roles": [{"rolename": "admin"}],
        }],
        "roles": [{
            "rolename": "admin",
            "acls": [{"acltype": t, "topic": topic, "allow": True} for t, topic in INIT_ADMIN_ACLS],
        }],
        "defaultACLAccess": dict(INIT_DEFAULT_ACCESS),
    }


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a dynamic-security.json with Mosquitto's JSON rules; an empty file is an
    empty configuration.  Raises ValueError when it is not a JSON object."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        return {}
    try:
        doc = parse(raw)
    except PayloadError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object")
    return doc


def format_document(document: dict[str, Any]) -> str:
    """Tab-indented JSON like the file Mosquitto writes."""
    return json.dumps(document, indent="\t", ensure_ascii=False)


def _write_private(path: Path, text: str, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _stage(data_dir: Path, document: dict[str, Any]) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / IMPORT_FILE
    tmp = target.with_suffix(".tmp")
    _write_private(tmp, format_document(document), exclusive=False)
    os.replace(tmp, target)
    return target


def run_init(target: str, username: str, password: str | None) -> int:
    if password is None:
        password = getpass.getpass(f"New password for {username}: ")
        if password != getpass.getpass(f"Reenter password for {username}: "):
            print("Error: Passwords do not match.", file=sys.stderr)
            return 1
    if not password:
        print("Error: Empty password is not allowed.", file=sys.stderr)
        return 1
    document = init_document(username, password)
    path = Path(target)
    if path.is_dir():
        staged = _stage(path, document)
        print(f"Admin user '{username}' staged in {staged}; it is committed at the next start.")
        return 0
    try:
        _write_private(path, format_document(document), exclusive=True)
    except FileExistsError:
        print(f"Error: {target} already exists.", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"Error: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def run_import(source: str, data_dir: str) -> int:
    try:
        document = read_document(source)
    except (OSError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    state = DynsecState.from_document(document)
    staged = _stage(Path(data_dir), state.to_document())
    print(f"Imported {len(state.clients)} clients, {len(state.groups)} groups, {len(state.roles)} roles "
          f"from {source}; staged in {staged}, committed at the next start.")
    return 0


def run_export(target: str, document: dict[str, Any] | None) -> int:
    text = format_document(DynsecState.from_document(document).to_document())
    try:
        _write_private(Path(target), text, exclusive=False)
    except OSError as exc:
        print(f"Error: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


# -- argparse wiring for raftmq/cli.py -------------------------------------------------


def add_dynsec_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dynsec_command", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="create an admin client and role (like mosquitto_ctrl dynsec init)")
    p.add_argument("target", metavar="FILE-or-DATADIR")
    p.add_argument("username", nargs="?", default="admin")
    p.add_argument("password", nargs="?", help="prompted for when omitted")
    p = sub.add_parser("import", help="stage a Mosquitto dynamic-security.json for the next start")
    p.add_argument("file")
    p.add_argument("--data-dir", required=True, metavar="DIR")
    p = sub.add_parser("export", help="write the committed configuration as dynamic-security.json")
    p.add_argument("file")
    p.add_argument("--data-dir", required=True, metavar="DIR")


def load_committed_document(data_dir: str) -> dict[str, Any] | None:
    """The committed dynsec document of a node's data dir, read-only (LMDB allows it
    while the raft process runs); None when there is none yet."""
    # Imported here: the dynsec library itself sits below state/ and raft/ (DESIGN.md §7).
    from raftmq.raft.process import LMDB_DIR
    from raftmq.state.machine import load_state

    path = os.path.join(data_dir, LMDB_DIR)
    if not os.path.isdir(path):
        return None
    return load_state(path).dynsec


def run_dynsec(args: argparse.Namespace,
               load_document: Callable[[str], dict[str, Any] | None] | None = None) -> int:
    """Run ``raftmq dynsec ...``; ``load_document(data_dir)`` reads the committed
    document for ``export`` (default: :func:`load_committed_document`)."""
    if args.dynsec_command == "init":
        return run_init(args.target, args.username, args.password)
    if args.dynsec_command == "import":
        return run_import(args.file, args.data_dir)
    document = (load_document or load_committed_document)(args.data_dir)
    if document is None:
        print(f"Error: no dynamic security configuration in {args.data_dir}.", file=sys.stderr)
        return 1
    return run_export(args.file, document)
