"""A TCP proxy for fault drills: forwards to a real server and lets a test cut or block it."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.blocked = False
        self.replies_held = False
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for src, dst, replies in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, pair, replies))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        replies: bool,
    ) -> None:
        try:
            while data := await src.read(65536):
                if replies and self.replies_held:
                    continue  # lost on the way back
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._close(pair)

    def _close(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._pairs.discard(pair)
        for w in pair:
            with contextlib.suppress(Exception):
                w.transport.abort()

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def hold_replies(self) -> None:
        """Drops what the server sends on the open connections from now on, until cut():
        requests still arrive, their answers are lost."""
        self.replies_held = True

    def cut(self) -> int:
        """Drops every open connection at once (both directions); returns how many."""
        self.replies_held = False
        pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)
        return len(pairs)

    def block(self) -> None:
        """Refuses new connections (and cut() drops the open ones): the server looks down."""
        self.blocked = True

    def unblock(self) -> None:
        self.blocked = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
