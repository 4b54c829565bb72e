"""Broker configuration: one frozen ``Config`` loaded from a TOML file.

Keys follow mosquitto.conf names wherever Mosquitto has the setting, so an
operator moving from Mosquitto finds them where they expect::

    allow_anonymous = false
    max_inflight_messages = 20
    persistent_client_expiration = "2w"
    http_listener = "127.0.0.1:9883"   # /metrics, /health (off by default)

    [[listener]]
    host = "0.0.0.0"
    port = 1883

Behaviour without a config file follows Mosquitto 2.0: the broker listens on
127.0.0.1:1883 only and accepts anonymous clients.  As soon as the file names
a listener, ``allow_anonymous`` defaults to false (an operator who opens the
broker to the network must decide about authentication).

Validation is table-driven: every accepted key is one row of ``_TOP_KEYS``
(or of a section's table in ``_SECTIONS``), with the function that checks and
converts its value.  An unknown key or a bad value raises ``ConfigError``
naming the key and the file; nothing is silently ignored.

Extending: a new top-level key is one row in ``_TOP_KEYS`` plus one field of
``Config``.  Cluster keys (node_id, listen, peers, secret_file, ...) live in a
``[cluster]`` table parsed by raftmq.cluster.config (see ``_SECTIONS``);
``load_config`` needs no change for them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from raftmq.cluster.config import ClusterConfigError, ClusterSettings, cluster_from_mapping

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883

MODES = ("standalone", "ha", "dynsec-sync")
# sync: acknowledge QoS>0 / persistent state only after fsync (group commit).
# async: acknowledge once written to the OS (LMDB without fsync per commit).
# none: nothing durable (in-memory store), like Mosquitto with persistence off.
DURABILITIES = ("sync", "async", "none")
LOG_LEVELS = ("debug", "info", "notice", "warning", "error")


class ConfigError(Exception):
    """A configuration file or option is invalid; the message names the key."""


LISTENER_PROTOCOLS = ("mqtt", "websockets")
TLS_VERSIONS = ("tlsv1.2", "tlsv1.3")  # the lowest accepted (Mosquitto's meaning)


@dataclass(frozen=True, slots=True)
class Listener:
    """One ``[[listener]]`` table; the TLS keys are mosquitto.conf's (broker/tls.py)."""

    host: str
    port: int
    protocol: str = "mqtt"  # "mqtt" | "websockets" (broker/websocket.py)
    certfile: str | None = None  # set: TLS (mqtts / wss)
    keyfile: str | None = None
    cafile: str | None = None  # CAs that client certificates are verified against
    capath: str | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False  # the client certificate's CN is the user name
    use_subject_as_username: bool = False  # its subject (RFC 2253) is the user name
    tls_version: str | None = None  # the lowest TLS version accepted; None = TLS 1.2
    ciphers: str | None = None  # OpenSSL cipher list for TLS <= 1.2

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def websockets(self) -> bool:
        return self.protocol == "websockets"


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[Listener, ...] = (Listener(DEFAULT_HOST, DEFAULT_PORT),)
    allow_anonymous: bool = True
    allow_zero_length_clientid: bool = True
    max_inflight_messages: int = 20
    max_queued_messages: int = 1000
    max_packet_size: int = 0  # 0 = unlimited (the protocol's 268435455 cap still holds)
    max_keepalive: int = 65535
    retain_available: bool = True
    message_size_limit: int = 0  # 0 = unlimited
    persistent_client_expiration: int = 0  # seconds; 0 = never expire
    sys_interval: int = 10  # seconds; 0 = no $SYS topics
    data_dir: str = "./data"
    mode: str = "standalone"
    durability: str = "sync"
    workers: int = 0  # worker processes; 0 = one per CPU
    # With several workers: move a publisher's connection to the worker where its
    # messages go (raftmq.workers.colocate).  Off: connections stay where accepted.
    colocate: bool = True
    log_level: str = "info"
    dynsec_enabled: bool = False  # TOML `dynsec = true`: Mosquitto's Dynamic Security
    dynsec_substitute: bool = False  # %c / %u in ACL topics (off, as Mosquitto 2.0.22)
    # The node's HTTP endpoint (/metrics, /health, /health/leader), (host, port);
    # None = off (the default: see _http_listener).
    http_listener: tuple[str, int] | None = None
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source: str = "<defaults>"  # the file it came from, for messages


# ---------------------------------------------------------------------------
# Value checkers: each takes (value, key, where) and returns the converted
# value or raises ConfigError.

Checker = Callable[[Any, str, str], Any]


def _error(key: str, where: str, why: str) -> ConfigError:
    return ConfigError(f"{where}: invalid value for '{key}': {why}")


def _bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _error(key, where, f"expected true or false, got {value!r}")


def _int_range(lo: int, hi: int) -> Checker:
    def check(value: Any, key: str, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(key, where, f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise _error(key, where, f"{value} is outside {lo}..{hi}")
        return value

    return check


def _choice(options: tuple[str, ...]) -> Checker:
    def check(value: Any, key: str, where: str) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise _error(key, where, f"{value!r} is not one of {', '.join(options)}")
        return value.lower()

    return check


def _string(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _error(key, where, f"expected a non-empty string, got {value!r}")
    return value


# Mosquitto's persistent_client_expiration units: h, d, w, m (month), y.
# Plain seconds ("s") and an integer are accepted too.
_DURATION_UNITS = {"s": 1, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([shdwmy])\s*$")


def parse_duration(value: Any, key: str = "duration", where: str = "<option>") -> int:
    """Seconds from an int or a Mosquitto-style duration string like "1d", "2h", "1w"."""
    if isinstance(value, bool):
        raise _error(key, where, f"expected seconds or a duration like '2h', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise _error(key, where, f"{value} is negative")
        return value
    if isinstance(value, str):
        if value.strip().isdigit():
            return int(value)
        match = _DURATION_RE.match(value)
        if match:
            return int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise _error(key, where, f"expected seconds or a duration like '2h', '1d', '1w', got {value!r}")


def _listeners(value: Any, key: str, where: str) -> tuple[Listener, ...]:
    # TOML `[[listener]]` gives a list of tables; a single `[listener]` table is accepted too.
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise _error(key, where, "expected one or more tables {host, port}")
    result = []
    for item in items:
        if not isinstance(item, dict):
            raise _error(key, where, f"expected a table {{host, port}}, got {item!r}")
        unknown = set(item) - set(_LISTENER_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key 'listener.{sorted(unknown)[0]}'")
        if "port" not in item:
            raise _error(key, where, "a listener needs a port")
        values = {name: _LISTENER_KEYS[name](raw, f"listener.{name}", where)
                  for name, raw in item.items()}
        values.setdefault("host", "0.0.0.0")
        result.append(_check_listener(Listener(**values), where))
    return tuple(result)


def _readable_file(value: Any, key: str, where: str) -> str:
    path = _string(value, key, where)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _error(key, where, f"cannot read {path}: {exc.strerror}") from exc
    return path


def _readable_dir(value: Any, key: str, where: str) -> str:
    path = _string(value, key, where)
    if not os.path.isdir(path) or not os.access(path, os.R_OK | os.X_OK):
        raise _error(key, where, f"{path} is not a readable directory")
    return path


# [[listener]] key -> checker (the Listener field has the key's name)
_LISTENER_KEYS: dict[str, Checker] = {
    "host": _string,
    "port": _int_range(0, 65535),
    "protocol": _choice(LISTENER_PROTOCOLS),
    "certfile": _readable_file,
    "keyfile": _readable_file,
    "cafile": _readable_file,
    "capath": _readable_dir,
    "require_certificate": _bool,
    "use_identity_as_username": _bool,
    "use_subject_as_username": _bool,
    "tls_version": _choice(TLS_VERSIONS),
    "ciphers": _string,
}


def _check_listener(listener: Listener, where: str) -> Listener:
    """The combinations Mosquitto refuses (or silently ignores) stop the start here."""
    def need(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: listener {listener.host}:{listener.port}: "
                           f"invalid value for 'listener.{key}': {why}")

    if listener.keyfile is not None and listener.certfile is None:
        raise need("keyfile", "keyfile without certfile")
    if listener.certfile is not None and listener.keyfile is None:
        raise need("certfile", "certfile without keyfile")
    if not listener.tls:
        # Without certfile the listener is plain: a TLS key there would be ignored.
        for name in ("cafile", "capath", "require_certificate", "use_identity_as_username",
                     "use_subject_as_username", "tls_version", "ciphers"):
            if getattr(listener, name) not in (None, False):
                raise need(name, "needs certfile and keyfile (a TLS listener)")
    if listener.require_certificate and listener.cafile is None and listener.capath is None:
        raise need("require_certificate", "needs cafile or capath to verify certificates with")
    if listener.use_identity_as_username and listener.use_subject_as_username:
        raise need("use_subject_as_username", "use_identity_as_username is set too")
    if (listener.use_identity_as_username or listener.use_subject_as_username) \
            and not listener.require_certificate:
        # Without it no client certificate is asked for, so every client would
        # be refused (Mosquitto starts and refuses them all).
        name = "use_identity_as_username" if listener.use_identity_as_username \
            else "use_subject_as_username"
        raise need(name, "needs require_certificate = true")
    return listener


def _http_listener(value: Any, key: str, where: str) -> tuple[str, int] | None:
    # Off unless asked for, like every listener but the MQTT one: several nodes
    # (or test brokers) on one host would otherwise fight over one default port,
    # and a node opens no port its operator did not name.  "" or "off" = off.
    if not isinstance(value, str):
        raise _error(key, where, f'expected "HOST:PORT" or "off", got {value!r}')
    if value.strip().lower() in ("", "off"):
        return None
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")  # "[::1]:9883"
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _error(key, where, f'expected "HOST:PORT" (port 0..65535) or "off", got {value!r}')
    return host, int(port)


_MAX_REMAINING_LENGTH = 268_435_455  # MQTT's largest Remaining Length (4-byte varint)

# key -> (Config field, checker)
_TOP_KEYS: dict[str, tuple[str, Checker]] = {
    "listener": ("listeners", _listeners),
    "allow_anonymous": ("allow_anonymous", _bool),
    "allow_zero_length_clientid": ("allow_zero_length_clientid", _bool),
    "max_inflight_messages": ("max_inflight_messages", _int_range(0, 65535)),
    "max_queued_messages": ("max_queued_messages", _int_range(0, 2**31 - 1)),
    "max_packet_size": ("max_packet_size", _int_range(0, _MAX_REMAINING_LENGTH + 5)),
    "max_keepalive": ("max_keepalive", _int_range(0, 65535)),
    "retain_available": ("retain_available", _bool),
    "message_size_limit": ("message_size_limit", _int_range(0, _MAX_REMAINING_LENGTH)),
    "persistent_client_expiration": ("persistent_client_expiration", parse_duration),
    "sys_interval": ("sys_interval", _int_range(0, 2**31 - 1)),
    "data_dir": ("data_dir", _string),
    "mode": ("mode", _choice(MODES)),
    "durability": ("durability", _choice(DURABILITIES)),
    "workers": ("workers", _int_range(0, 256)),
    "colocate": ("colocate", _bool),
    "log_level": ("log_level", _choice(LOG_LEVELS)),
    "dynsec": ("dynsec_enabled", _bool),
    "dynsec_substitute": ("dynsec_substitute", _bool),
    "http_listener": ("http_listener", _http_listener),
}

# section name -> builder of its settings (raises ClusterConfigError naming the key)
_SECTIONS: dict[str, tuple[Callable[[Any, str], Any], str]] = {
    "cluster": (cluster_from_mapping, "cluster"),
}


def _check_table(
    table: Mapping[str, Any], rows: dict[str, tuple[str, Checker]], where: str, prefix: str = ""
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in rows:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'")
        attr, check = rows[key]
        values[attr] = check(raw, prefix + key, where)
    return values


def config_from_mapping(data: Mapping[str, Any], where: str = "<config>") -> Config:
    """Validate a parsed TOML document and build the ``Config``."""
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, raw in data.items():
        if key in _SECTIONS:
            build, attr = _SECTIONS[key]
            if not isinstance(raw, dict):
                raise _error(key, where, "expected a table")
            try:
                sections[attr] = build(raw, where)
            except ClusterConfigError as exc:
                raise ConfigError(str(exc)) from exc
        else:
            top.update(_check_table({key: raw}, _TOP_KEYS, where))
    if "listeners" in top and "allow_anonymous" not in top:
        # Mosquitto 2.0: a configured listener means no anonymous access unless asked for.
        top["allow_anonymous"] = False
    return Config(**top, **sections, source=where)


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``path`` (TOML; None = defaults) and apply command-line ``overrides``.

    ``overrides`` uses Config attribute names (``data_dir``, ``log_level``, ...)
    plus ``host`` and ``port``, which replace the listeners by a single one, like
    mosquitto's ``-p``: the missing half comes from the first configured
    listener, else 127.0.0.1 / 1883.  None values are ignored.
    """
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = path
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    config = config_from_mapping(data, where)

    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    host = changes.pop("host", None)
    port = changes.pop("port", None)
    if host is not None or port is not None:
        first = config.listeners[0]
        port = _int_range(0, 65535)(port if port is not None else first.port, "port", "<command line>")
        changes["listeners"] = (Listener(host if host is not None else first.host, port),)
    names = {f.name for f in fields(Config)}
    for key, value in list(changes.items()):
        if key not in names:
            raise ConfigError(f"<command line>: unknown option '{key}'")
        row = next((r for r in _TOP_KEYS.values() if r[0] == key), None)
        if row is not None and key != "listeners":
            changes[key] = row[1](value, key, "<command line>")
    return replace(config, **changes)
