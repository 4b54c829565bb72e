"""The batched log lines of a worker (raftmq.logsetup): held until the broker's
flush, written in order in one write, a warning at once."""

from __future__ import annotations

import logging
import os
import re

import pytest

from raftmq import _connection as core
from raftmq.logsetup import LOG_FORMAT, BatchingHandler


@pytest.fixture
def pipe_handler():
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    stream = os.fdopen(wfd, "w")
    handler = BatchingHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    core.install_log_batch(handler, True)
    yield handler, rfd
    core.install_log_batch(None, False)
    stream.close()
    os.close(rfd)


def _read(fd: int) -> str:
    try:
        return os.read(fd, 65536).decode()
    except BlockingIOError:
        return ""


def test_info_lines_wait_for_the_flush_and_keep_their_order(pipe_handler) -> None:
    handler, rfd = pipe_handler
    logger = logging.getLogger("raftmq.test.batch")
    core.info_line(logger, "New client connected from 127.0.0.1:1 as a")
    core.info_line(logger, "Client a disconnected.")
    assert _read(rfd) == ""  # nothing written before the flush
    assert handler.batch.size > 0
    core.flush_logs()
    text = _read(rfd)
    assert re.fullmatch(r"\d+: New client connected from 127.0.0.1:1 as a\n\d+: Client a disconnected\.\n",
                        text), text
    assert handler.batch.size == 0 and handler.batch.lines == []
    core.flush_logs()  # nothing waiting: nothing written
    assert _read(rfd) == ""


def test_a_warning_is_written_at_once_after_what_was_waiting(pipe_handler) -> None:
    handler, rfd = pipe_handler
    logger = logging.getLogger("raftmq.test.batch.warn")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        core.info_line(logger, "first")
        logger.warning("second")
        assert re.fullmatch(r"\d+: first\n\d+: second\n", _read(rfd))
    finally:
        logger.removeHandler(handler)


def test_without_a_batch_info_lines_go_through_logging(caplog) -> None:
    core.install_log_batch(None, False)
    logger = logging.getLogger("raftmq.test.unbatched")
    with caplog.at_level(logging.INFO, logger="raftmq.test.unbatched"):
        core.info_line(logger, "plain line")
    assert [r.getMessage() for r in caplog.records] == ["plain line"]
