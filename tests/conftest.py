"""Shared fixtures: real broker processes on free loopback ports.

- ``broker``: parametrized over ["raftmq", "mosquitto"] -- the same test runs
  against both (differential tests); ``-k raftmq`` / ``-k mosquitto`` picks one.
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


@pytest.fixture(params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_broker(broker_kind: str, broker_factory: Callable[..., BrokerProcess]) -> Callable[..., BrokerProcess]:
    def make(**options: object) -> BrokerProcess:
        return broker_factory(broker_kind, **options)

    return make


@pytest.fixture
def broker(make_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return make_broker()


@pytest.fixture
def raftmq_factory(broker_factory: Callable[..., BrokerProcess]) -> Callable[..., BrokerProcess]:
    return lambda **options: broker_factory("raftmq", **options)


@pytest.fixture
def mosquitto_factory(broker_factory: Callable[..., BrokerProcess]) -> Callable[..., BrokerProcess]:
    return lambda **options: broker_factory("mosquitto", **options)


@pytest.fixture
def raftmq(raftmq_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return raftmq_factory()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return mosquitto_factory()
