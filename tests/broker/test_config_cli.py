"""Configuration file and ``raftmq serve`` command line (issue 2, Deliver point 3).

The first part checks ``load_config`` in-process; the second runs ``python -m raftmq serve``
as a real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raftmq.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Config,
    ConfigError,
    Listener,
    config_from_mapping,
    load_config,
    parse_duration,
)
from support.brokers import REPO, BrokerProcess, free_port
from support.helpers import raw, unique

# --------------------------------------------------------------------------- load_config


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "raftmq.toml"
    path.write_text(text)
    return str(path)


def test_defaults_like_mosquitto_without_config():
    c = load_config(None, {})
    assert c.listeners == (Listener(DEFAULT_HOST, DEFAULT_PORT),) == (Listener("127.0.0.1", 1883),)
    assert c.allow_anonymous is True
    assert (c.allow_zero_length_clientid, c.max_inflight_messages, c.max_queued_messages) == (
        True, 20, 1000)
    assert (c.max_packet_size, c.max_keepalive, c.retain_available) == (0, 65535, True)
    assert (c.message_size_limit, c.persistent_client_expiration, c.sys_interval) == (0, 0, 10)
    assert (c.mode, c.durability, c.workers) == ("standalone", "sync", 0)  # 0: one per CPU


def test_listener_in_config_turns_anonymous_off(tmp_path):
    c = load_config(_write(tmp_path, "[[listener]]\nhost = '0.0.0.0'\nport = 1884\n"), {})
    assert c.listeners == (Listener("0.0.0.0", 1884),)
    assert c.allow_anonymous is False


def test_listener_with_explicit_allow_anonymous(tmp_path):
    text = "allow_anonymous = true\n[[listener]]\nport = 1884\n[[listener]]\nport = 1885\n"
    c = load_config(_write(tmp_path, text), {})
    assert c.allow_anonymous is True
    assert [lst.port for lst in c.listeners] == [1884, 1885]


def test_every_mosquitto_key_read(tmp_path):
    text = """
allow_anonymous = true
allow_zero_length_clientid = false
max_inflight_messages = 7
max_queued_messages = 50
max_packet_size = 4096
max_keepalive = 120
retain_available = false
message_size_limit = 1000
persistent_client_expiration = "2d"
sys_interval = 3
data_dir = "/var/lib/raftmq"
mode = "ha"
durability = "async"
workers = 2
log_level = "debug"
"""
    c = load_config(_write(tmp_path, text), {})
    assert (c.allow_zero_length_clientid, c.max_inflight_messages, c.max_queued_messages) == (
        False, 7, 50)
    assert (c.max_packet_size, c.max_keepalive, c.retain_available) == (4096, 120, False)
    assert (c.message_size_limit, c.persistent_client_expiration, c.sys_interval) == (
        1000, 2 * 86400, 3)
    assert (c.data_dir, c.mode, c.durability, c.workers, c.log_level) == (
        "/var/lib/raftmq", "ha", "async", 2, "debug")


@pytest.mark.parametrize("text,seconds", [(0, 0), (90, 90), ("3600", 3600), ("2h", 7200),
                                          ("1d", 86400), ("1w", 604800), ("1m", 30 * 86400),
                                          ("1y", 365 * 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("data,key", [
    ({"bogus": 1}, "bogus"),
    ({"max_inflight_messages": "many"}, "max_inflight_messages"),
    ({"max_keepalive": 70000}, "max_keepalive"),
    ({"max_queued_messages": -1}, "max_queued_messages"),
    ({"allow_anonymous": 1}, "allow_anonymous"),
    ({"mode": "master-master"}, "mode"),
    ({"durability": "maybe"}, "durability"),
    ({"persistent_client_expiration": "2 fortnights"}, "persistent_client_expiration"),
    ({"listener": [{"port": 70000}]}, "listener.port"),
    ({"listener": [{"host": "x"}]}, "listener"),
    ({"listener": [{"port": 1, "tls": True}]}, "listener.tls"),
    ({"cluster": {"nonsense": 1}}, "cluster.nonsense"),
    ({"workers": -1}, "workers"),
])
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_mapping(data, "some.toml")
    assert f"'{key}'" in str(err.value) and "some.toml" in str(err.value)


def test_overrides_replace_listener_like_mosquitto_p(tmp_path):
    path = _write(tmp_path, "[[listener]]\nhost = '10.0.0.1'\nport = 1884\n")
    assert load_config(path, {"port": 2000}).listeners == (Listener("10.0.0.1", 2000),)
    assert load_config(None, {"port": 2000}).listeners == (Listener("127.0.0.1", 2000),)
    assert load_config(None, {"host": "0.0.0.0"}).listeners == (Listener("0.0.0.0", 1883),)
    assert load_config(None, {"data_dir": "/d", "port": None}).data_dir == "/d"


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().max_inflight_messages = 1  # type: ignore[misc]


def test_unreadable_and_invalid_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"), {})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "allow_anonymous = = true\n"), {})


# --------------------------------------------------------------------------- the process


def _serve(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "raftmq", "serve", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("text,key", [("bogus_key = 1\n", "bogus_key"),
                                      ("max_inflight_messages = -3\n", "max_inflight_messages")])
def test_serve_refuses_bad_config_with_exit_2(tmp_path, text, key):
    proc = _serve("-c", _write(tmp_path, text), "-p", str(free_port()), cwd=tmp_path)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert key in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(tmp_path, sig):
    b = BrokerProcess("raftmq", tmp_path / "b", {}).start()
    with raw(b) as c:
        assert c.connect(unique("c")).reason == 0
        b.proc.send_signal(sig)
        b.proc.wait(10)
        c.wait_closed(timeout=5)
    assert b.proc.returncode == 0, b.log_tail()
    b.stop()


def test_serve_without_config_accepts_anonymous(tmp_path):
    port = free_port()
    proc = _serve("-p", str(port), "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    try:
        b = BrokerProcess("raftmq", tmp_path / "x")
        b.port = port
        deadline = time.monotonic() + 15
        while True:
            try:
                with raw(b) as c:
                    assert c.connect(unique("anon")).reason == 0
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_config_listener_refuses_anonymous(tmp_path):
    b = BrokerProcess("raftmq", tmp_path / "b", {}, listener_in_config=True).start()
    try:
        with raw(b, 4) as c:
            assert c.connect(unique("anon")).reason == 5
        with raw(b, 5) as c:
            assert c.connect(unique("anon")).reason == 0x87
    finally:
        b.stop()


def test_config_listener_with_allow_anonymous(tmp_path):
    b = BrokerProcess("raftmq", tmp_path / "b", {"allow_anonymous": True},
                      listener_in_config=True).start()
    try:
        with raw(b) as c:
            assert c.connect(unique("anon")).reason == 0
    finally:
        b.stop()


@pytest.mark.waits
def test_persistent_client_expiration_ends_idle_311_sessions(raftmq_factory):
    """persistent_client_expiration: a 3.1.1 persistent session whose client stays away that
    long is removed (Mosquitto's option; seconds here, Mosquitto's minimum unit is an hour)."""
    b = raftmq_factory(persistent_client_expiration=1)
    cid = unique("pce")
    with raw(b) as c:
        c.connect(cid, clean=False)
        c.disconnect()
    with raw(b) as c:
        assert c.connect(cid, clean=False).session_present
        c.disconnect()
    time.sleep(2.5)
    with raw(b) as c:
        assert not c.connect(cid, clean=False).session_present


def test_readme_config_example_loads(tmp_path):
    """The raftmq.toml example in README.md is a valid config (every key known,
    the listener table last, as TOML needs)."""
    import re

    readme = (REPO / "README.md").read_text()
    block = re.search(r"```toml\n(# raftmq\.toml.*?)```", readme, re.S)
    assert block is not None
    path = tmp_path / "raftmq.toml"
    path.write_text(block.group(1))
    c = load_config(str(path))
    assert c.listeners == (Listener("0.0.0.0", 1883),)
    assert (c.allow_anonymous, c.durability, c.workers, c.dynsec_enabled) == (False, "sync", 0, True)
    assert c.http_listener == ("127.0.0.1", 9883)
