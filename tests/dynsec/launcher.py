"""Run one raftmq broker with dynamic security installed (until the lead wires
``dynsec = true`` into ``raftmq serve``).  Used by the real-process tests:

    python tests/dynsec/launcher.py --port P --data-dir D [--allow-anonymous]

The store is the in-memory one (nothing survives a restart); the configuration
comes from ``<data-dir>/dynsec-import.json`` or RAFTMQ_DYNSEC_PASSWORD.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop

from raftmq.broker.server import Broker
from raftmq.config import load_config
from raftmq.dynsec.plugin import install
from raftmq.state.store import MemoryStore


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--allow-anonymous", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(created).0f: %(message)s")
    config = load_config(None, {"host": "127.0.0.1", "port": args.port, "data_dir": args.data_dir,
                                "allow_anonymous": args.allow_anonymous})

    async def run() -> int:
        broker = Broker(config, MemoryStore())
        install(broker, config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.stop()
        return 0

    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())
