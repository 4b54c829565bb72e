"""Logging of every raftmq process: one line per event on stderr, prefixed
like Mosquitto's with the Unix time in seconds ("1732550000: New client
connected from ..."), so log-reading habits and scripts carry over.

A broker logs a line per client connect and disconnect, so in the workers a
record must be cheap: no frame walk or thread/process lookups per record, and
lines are written in batches (``BatchingHandler``) -- by the broker once per
event-loop turn before it writes to its clients and on its 0.5 s upkeep tick
(``flush_logs``: a client that got its CONNACK finds the "New client
connected" line already in the log), at once for warnings and errors, when
``FLUSH_BYTES`` are waiting, and at exit -- instead of one write system call
per line.  No thread: a flusher thread would take the GIL from the loop.  A connect storm otherwise spends a third of a worker's
time in logging.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from typing import TextIO

# (The module, not its names: it imports this one too.)  info_line: the
# per-client lines' compiled append to the batch.
from raftmq import _connection as _core

LOG_FORMAT = "%(created).0f: %(message)s"
DEBUG_LOG_FORMAT = "%(created).3f: %(name)s %(levelname)s: %(message)s"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FLUSH_BYTES = 64 * 1024


class BatchingHandler(logging.Handler):
    """Formats each record at once; writes the lines in batches."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        # The descriptor behind ``stream``, written with os.write (a connect
        # storm flushes a batch per loop turn: the text layer's write and flush
        # cost more than the system call); None: the stream has none (tests).
        try:
            stream.flush()
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        # The formatted lines waiting for their write (compiled: the broker
        # asks at every flush whether one is waiting).
        self.batch = _core.LogBatch()
        self._lock = threading.Lock()  # logging from another thread stays safe
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        batch = self.batch
        with self._lock:
            batch.lines.append(line)
            batch.size += len(line)
            full = batch.size >= FLUSH_BYTES
        if full or record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        # Compiled (the broker writes a batch per loop turn in a connect storm).
        _core.write_batch(self)

    def close(self) -> None:
        self.flush()
        super().close()


_batching: BatchingHandler | None = None
_fast: BatchingHandler | None = None  # set when info lines may skip the logging module


def info(logger: logging.Logger, fmt: str, *args: object) -> None:
    """``logger.info(fmt, *args)``, for the lines logged per client (connect,
    disconnect): straight into the batch, same text, without a LogRecord, when
    the process logs at info level in batches."""
    if _fast is None or not logger.isEnabledFor(logging.INFO):
        logger.info(fmt, *args)
        return
    _core.info_line(logger, fmt % args)


def flush_logs() -> None:
    """Write the lines batched so far (cheap when there are none)."""
    _core.flush_logs()


def setup_logging(level: str, batched: bool = False) -> None:
    """Configure the root logger once for this process (later calls only set the level)."""
    root = logging.getLogger()
    if getattr(setup_logging, "_done", False):
        root.setLevel(LEVELS.get(level, logging.INFO))
        return
    # Skip the frame walk and the thread/process lookups the stdlib does per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _batching, _fast
    handler: logging.Handler
    if batched:
        handler = _batching = BatchingHandler(sys.stderr)
        if level != "debug":  # debug lines carry the logger name and level: the slow path
            _fast = _batching
        _core.install_log_batch(_batching, _fast is not None)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(DEBUG_LOG_FORMAT if level == "debug" else LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    setup_logging._done = True  # type: ignore[attr-defined]
