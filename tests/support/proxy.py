"""A TCP proxy on loopback that tests start, stop, cut and blackhole to simulate broker faults."""

from __future__ import annotations

import asyncio
import contextlib

from support.processes import free_port


class TcpProxy:
    """A loopback TCP proxy the test controls: `cut()` resets every open connection,
    `stop()` also stops accepting until `start()` (on the same port), `blackhole()` keeps the
    connections open but forwards nothing (a silently dead peer) until `cut()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut()

    def cut(self) -> int:
        links, self._links = self._links, []
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        self._flowing.set()
        return len(links)

    def blackhole(self) -> None:
        self._flowing.clear()

    def upstream_ports(self) -> list[int]:
        """Local ports of the proxy's connections to the target (what the broker sees)."""
        return [upstream.get_extra_info("sockname")[1] for _, upstream in self._links]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.append((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                await self._flowing.wait()
                if sink.transport.is_closing():
                    break
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
