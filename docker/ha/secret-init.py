"""Write the ha cluster's shared secret into the secret volume (compose one-shot).

    python secret-init.py DIR [--uid 1883] [--rotate]

raftmq refuses a secret file that group or others may access (mode 0600, as
ssh with a private key: raft/transport.py read_secret_file), and the nodes run
as user raftmq (uid 1883).  Compose's ``secrets:`` cannot give that: for a
compose file (no swarm) it bind-mounts the host file with the host's owner
and mode and ignores ``uid``/``gid``/``mode`` (docker/compose#9648).  So this
script runs once as root before the nodes, in a volume they mount read-only:
it keeps an existing secret (only fixing owner and mode) or writes a new
random one; ``--rotate`` replaces it.  The file is written beside and renamed
into place, so a node never reads half a secret.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

NAME = "cluster.secret"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--uid", type=int, default=1883, help="owner of the file (the image's raftmq user)")
    ap.add_argument("--rotate", action="store_true", help="replace an existing secret")
    args = ap.parse_args(argv)
    path = os.path.join(args.dir, NAME)
    # chown needs root; run as anyone else (tests) the file stays the caller's.
    uid = args.uid if os.geteuid() == 0 else os.geteuid()
    gid = uid if os.geteuid() == 0 else os.getegid()
    os.makedirs(args.dir, exist_ok=True)
    os.chown(args.dir, uid, gid)
    os.chmod(args.dir, 0o700)
    if os.path.exists(path) and not args.rotate:
        os.chown(path, uid, gid)
        os.chmod(path, 0o600)
        print(f"secret-init: keeping {path}")
        return 0
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())  # 256 random bits
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chown(tmp, uid, gid)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    print(f"secret-init: {'rotated' if args.rotate else 'wrote'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
