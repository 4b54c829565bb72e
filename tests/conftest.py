"""Shared fixtures: real broker processes on free loopback ports.

- ``broker``: parametrized over ["raftmq", "mosquitto"] -- the same test runs
  against both (differential tests); ``-k raftmq`` / ``-k mosquitto`` picks one.
  With default options one broker process of each kind is shared by the tests of
  a module (tests use unique topics and client ids); a test after which that
  broker is no longer running gets an error in its teardown, and the next test
  gets a fresh broker.
- ``make_broker(**options)``: a broker of the same parametrized kind with
  mosquitto.conf-named options (e.g. ``max_inflight_messages=5``).
- ``raftmq`` / ``mosquitto``: one broker of that kind with default options;
  ``raftmq_factory`` / ``mosquitto_factory`` make more with options.
Every process started here is stopped (SIGTERM, then SIGKILL) at teardown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.brokers import MOSQUITTO, BrokerProcess

BROKER_KINDS = ["raftmq", "mosquitto"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "waits: waits seconds on purpose (keep alive, expiry, will delay, $SYS interval); "
        "in the default run, `-m 'not waits'` for a quick one",
    )


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []

    def make(kind: str, listener_in_config: bool = False, **options: object) -> BrokerProcess:
        if kind == "mosquitto" and not os.path.exists(MOSQUITTO):
            pytest.skip("mosquitto is not installed")
        b = BrokerProcess(kind, tmp_path / f"{kind}{len(started)}", options, listener_in_config)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


@pytest.fixture(scope="module", params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_broker(broker_kind: str, broker_factory: Callable[..., BrokerProcess]) -> Callable[..., BrokerProcess]:
    def make(**options: object) -> BrokerProcess:
        return broker_factory(broker_kind, **options)

    return make


@pytest.fixture(scope="module")
def _shared_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BrokerProcess]]:
    running: dict[str, BrokerProcess] = {}
    yield running
    for b in running.values():
        b.stop()


@pytest.fixture
def broker(broker_kind: str, _shared_brokers: dict[str, BrokerProcess],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    if broker_kind == "mosquitto" and not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto is not installed")
    b = _shared_brokers.get(broker_kind)
    if b is None or not b.alive():
        b = BrokerProcess(broker_kind, tmp_path_factory.mktemp(f"shared-{broker_kind}")).start()
        _shared_brokers[broker_kind] = b
    yield b
    if not b.alive():
        del _shared_brokers[broker_kind]
        b.stop()
        pytest.fail(f"{broker_kind} exited during this test (status {b.proc.returncode}):\n"
                    + b.log_tail())


# Validation aid: RAFTMQ_TESTS_RAFTMQ_IS=mosquitto runs the raftmq-only tests against
# Mosquitto, to see them fail where Mosquitto lacks the feature they check.
_RAFTMQ_KIND = os.environ.get("RAFTMQ_TESTS_RAFTMQ_IS", "raftmq")


@pytest.fixture
def raftmq_factory(broker_factory: Callable[..., BrokerProcess]) -> Callable[..., BrokerProcess]:
    return lambda **options: broker_factory(_RAFTMQ_KIND, **options)


@pytest.fixture
def mosquitto_factory(broker_factory: Callable[..., BrokerProcess]) -> Callable[..., BrokerProcess]:
    return lambda **options: broker_factory("mosquitto", **options)


@pytest.fixture
def raftmq(raftmq_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return raftmq_factory()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return mosquitto_factory()
