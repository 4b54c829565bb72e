"""In-process harness for the broker engine tests: a Broker on a free loopback
port inside the test's event loop, and a raw MQTT client built on the codec
(``Parser(is_server=False)``), so each test sees exactly the packets on the wire."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import uvloop
from raftmq._codec import Connack, Connect, Parser

from raftmq.broker.server import Broker
from raftmq.config import Config, Listener
from raftmq.state.store import MemoryStore

TIMEOUT = 3.0


class RawClient:
    def __init__(self, version: int = 5) -> None:
        self.version = version
        self.parser = Parser(268435455, False)
        self.parser.protocol_version = version
        self.packets: list = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False

    async def open(self, port: int) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        return self

    def send(self, packet: Any) -> None:
        self.writer.write(packet.encode(self.version))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = TIMEOUT) -> Any:
        """The next packet; None if the connection closed."""
        while not self.packets:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self.closed = True
                return None
            self.packets.extend(self.parser.feed(data))
        return self.packets.pop(0)

    async def recv_type(self, cls: type, timeout: float = TIMEOUT) -> Any:
        p = await self.recv(timeout)
        assert isinstance(p, cls), f"expected {cls.__name__}, got {p!r}"
        return p

    async def no_packet(self, wait: float = 0.3) -> None:
        try:
            p = await self.recv(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected packet {p!r}")

    async def closed_within(self, timeout: float = TIMEOUT) -> list:
        """Read until the broker closes; returns what arrived before."""
        got = []
        while True:
            p = await self.recv(timeout)
            if p is None:
                return got
            got.append(p)

    async def connect(self, port: int, client_id: str = "c", clean: bool = True,
                      keepalive: int = 60, properties: dict | None = None, **kw: Any) -> Connack:
        await self.open(port)
        self.send(Connect(protocol_version=self.version, clean_start=clean, keepalive=keepalive,
                          client_id=client_id, properties=properties, **kw))
        return await self.recv_type(Connack)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run_with_broker(scenario, store: Any = None, **config: Any) -> Any:
    """Run ``await scenario(broker, port)`` against a fresh broker on uvloop."""

    async def main() -> Any:
        cfg = dataclasses.replace(Config(listeners=(Listener("127.0.0.1", 0),)), **config)
        broker = Broker(cfg, store if store is not None else MemoryStore())
        await broker.start()
        try:
            return await asyncio.wait_for(scenario(broker, broker.ports[0]), 30)
        finally:
            await broker.stop()

    return uvloop.run(main())
