"""Brokers with TLS and WebSocket listeners, and clients for them.

- ``ListenerBroker``: a raftmq or Mosquitto process with its usual plain
  listener (``port``) plus named extra listeners (``ports[name]``), each a dict
  of mosquitto.conf / raftmq ``[[listener]]`` keys (``protocol``, ``certfile``,
  ``require_certificate``, ...).  Mosquitto runs with ``user root`` (as root)
  so that it can read the certificates in the tests' private directories.
- ``tls_raw`` / ``ws_raw``: support.mqttraw ``RawClient``s over TLS and over a
  WebSocket (the latter through ``WSSocket``, a socket look-alike that frames
  what is sent and unframes what is received, and keeps control frames).
- ``ws_handshake``: send an HTTP request, return the raw answer.
- ``ListenerPaho``: support.helpers ``Paho`` with a transport and TLS options.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from support.brokers import MOSQUITTO, REPO, TEST_WORKERS, BrokerProcess, _toml_value
from support.helpers import Paho, unique
from support.mqttraw import RawClient
from support.ports import free_port

MOSQUITTO_DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


class ListenerBroker(BrokerProcess):
    def __init__(self, kind: str, workdir: Path, listeners: dict[str, dict[str, Any]],
                 options: dict[str, Any] | None = None, dynsec: dict | None = None) -> None:
        """``dynsec``: a dynamic-security document (raftmq imports it at start,
        Mosquitto runs its plugin on it)."""
        super().__init__(kind, workdir, options, listener_in_config=True)
        self.listeners = listeners
        self.ports = {name: free_port() for name in listeners}
        if dynsec is not None:
            data = workdir / "data"
            data.mkdir(parents=True, exist_ok=True)
            if kind == "mosquitto":
                (data / "dynamic-security.json").write_text(json.dumps(dynsec))
                self.options.update({"user": "root", "plugin": MOSQUITTO_DYNSEC,
                                     "plugin_opt_config_file": data / "dynamic-security.json"})
            else:
                (data / "dynsec-import.json").write_text(json.dumps(dynsec))
                self.options["dynsec"] = True

    def command(self) -> list[str]:
        opts = {"allow_anonymous": True, **self.options}
        if self.kind == "mosquitto":
            # user root: Mosquitto would otherwise drop to the ``mosquitto`` user
            # before reading the certificates (kept in the 0700 test directories).
            lines = ["persistence false", "log_dest stderr", "log_type all"]
            if os.geteuid() == 0 and "user" not in opts:
                lines.append("user root")
            lines += [f"{k} {'true' if v is True else 'false' if v is False else v}"
                      for k, v in opts.items()]
            lines.append(f"listener {self.port} {self.host}")
            for name, keys in self.listeners.items():
                lines.append(f"listener {self.ports[name]} {self.host}")
                for k, v in keys.items():
                    lines.append(f"{k} {'true' if v is True else 'false' if v is False else v}")
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            return [MOSQUITTO, "-c", str(conf)]
        workers = opts.pop("workers", TEST_WORKERS)
        body = [f"{k} = {_toml_value(v)}" for k, v in opts.items()]
        body += ["[[listener]]", f'host = "{self.host}"', f"port = {self.port}"]
        for name, keys in self.listeners.items():
            body += ["[[listener]]", f'host = "{self.host}"', f"port = {self.ports[name]}"]
            body += [f"{k} = {_toml_value(str(v) if isinstance(v, Path) else v)}"
                     for k, v in keys.items()]
        conf = self.workdir / "raftmq.toml"
        conf.write_text("\n".join(body) + "\n")
        return [sys.executable, "-m", "raftmq", "serve", "-c", str(conf), "--data-dir",
                str(self.workdir / "data"), "-v", "--workers", str(workers)]

    def start(self) -> ListenerBroker:
        super().start()
        for name, port in self.ports.items():
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection((self.host, port), timeout=0.5):
                        break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"listener {name} ({port}) not open:\n"
                                           f"{self.log_tail()}") from exc
                    time.sleep(0.05)
        return self


def client_context(certs: Any, cert: tuple[Path, Path] | None = None,
                   ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or certs.ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def tls_socket(host: str, port: int, context: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname=host)


def tls_raw(host: str, port: int, context: ssl.SSLContext, version: int = 4) -> RawClient:
    """A RawClient over TLS (the handshake done)."""
    client = RawClient.__new__(RawClient)
    client.version = version
    client.sock = tls_socket(host, port, context)
    client.buf = bytearray()
    client.aliases = {}
    client.eof = False
    return client


def ws_request(key: str | None = None, protocol: str | None = "mqtt", path: str = "/mqtt",
               extra: list[str] | None = None, version: str = "13", method: str = "GET") -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}"]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines += extra or []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_http_head(sock: socket.socket, timeout: float = 3.0) -> tuple[bytes, bytes]:
    """(the response head up to the blank line, bytes after it); b"" head if closed first."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no HTTP answer: {data!r}")
        try:
            chunk = sock.recv(4096)
        except ConnectionError:
            chunk = b""
        if not chunk:
            return b"", data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def ws_handshake(host: str, port: int, request: bytes, context: ssl.SSLContext | None = None,
                 timeout: float = 3.0) -> tuple[bytes, socket.socket, bytes]:
    """Send ``request``; (answer head, the socket, bytes after the head)."""
    sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname=host)
    sock.sendall(request)
    head, rest = read_http_head(sock, timeout)
    return head, sock, rest


def mask_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True,
               rsv: int = 0) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


class WSSocket:
    """A socket look-alike for RawClient: ``sendall`` sends one masked binary
    frame, ``recv`` returns MQTT bytes from binary frames; other frames are kept
    in ``control`` as (opcode, payload)."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(initial)
        self.control: list[tuple[int, bytes]] = []
        self.closed_by_peer = False

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def setsockopt(self, *a: Any) -> None:
        self.sock.setsockopt(*a)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(mask_frame(0x2, data))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def frame(self) -> tuple[bool, int, bytes] | None:
        """The next complete frame in the buffer, or None."""
        buf = self.buf
        if len(buf) < 2:
            return None
        fin, opcode, n, pos = bool(buf[0] & 0x80), buf[0] & 0x0F, buf[1] & 0x7F, 2
        assert not buf[1] & 0x80, "a server frame must not be masked"
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
        if len(buf) < pos + n:
            return None
        payload = bytes(buf[pos:pos + n])
        del buf[:pos + n]
        return fin, opcode, payload

    def read_frame(self, timeout: float = 3.0) -> tuple[bool, int, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            f = self.frame()
            if f is not None:
                return f
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def recv(self, n: int) -> bytes:
        while True:
            f = self.frame()
            if f is not None:
                _fin, opcode, payload = f
                if opcode in (0x0, 0x2):
                    if payload:
                        return payload
                    continue
                self.control.append((opcode, payload))
                if opcode == 0x8:
                    return b""
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                return b""
            self.buf += chunk


def ws_raw(host: str, port: int, version: int = 4, context: ssl.SSLContext | None = None,
           protocol: str = "mqtt") -> RawClient:
    """A RawClient over a WebSocket (handshake checked: 101 with the subprotocol)."""
    head, sock, rest = ws_handshake(host, port, ws_request(protocol=protocol), context)
    assert head.startswith(b"HTTP/1.1 101"), head
    client = RawClient.__new__(RawClient)
    client.version = version
    client.sock = WSSocket(sock, rest)  # type: ignore[assignment]
    client.buf = bytearray()
    client.aliases = {}
    client.eof = False
    return client


class ListenerPaho(Paho):
    """Paho over ``transport`` ("tcp" / "websockets"), with TLS when ``tls`` is given
    (keyword arguments of ``Client.tls_set``)."""

    def __init__(self, host: str, port: int, client_id: str = "", version: int = 4,
                 transport: str = "tcp", tls: dict[str, Any] | None = None,
                 username: str | None = None, password: str | None = None,
                 expect_rc: int = 0) -> None:
        protocol = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}[version]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or unique("paho"), protocol=protocol,
                                  transport=transport)  # type: ignore[arg-type]
        if tls is not None:
            self.client.tls_set(**{k: str(v) for k, v in tls.items()})
        if username is not None:
            self.client.username_pw_set(username, password)
        self._connect(host, port, expect_rc == 0)


__all__ = ["REPO", "ListenerBroker", "ListenerPaho", "WSSocket", "client_context", "mask_frame",
           "tls_raw", "ws_handshake", "ws_raw", "ws_request"]
