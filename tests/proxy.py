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
        # AMQP only: the next `_resets_left` connections are reset right after the server's
        # `_reset_after`-th frame (see reset_during_handshake).
        self._reset_after = 0
        self._resets_left = 0
        self.resets = 0

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
        reset_after = 0
        if self._resets_left > 0:
            self._resets_left -= 1
            reset_after = self._reset_after
        for src, dst, replies in ((reader, up_writer, False), (up_reader, writer, True)):
            if replies and reset_after:
                pipe = self._amqp_frames(src, dst, pair, reset_after)
            else:
                pipe = self._pipe(src, dst, pair, replies)
            task = asyncio.create_task(pipe)
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

    async def _amqp_frames(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        frames: int,
    ) -> None:
        """Forwards the server's side frame by frame, then resets the connection after the
        `frames`-th (an AMQP frame: type, channel, a 4-byte size, the payload, 0xCE)."""
        try:
            # The protocol header goes client to server; the server's side is all frames.
            for _ in range(frames):
                header = await src.readexactly(7)
                rest = await src.readexactly(int.from_bytes(header[3:7], "big") + 1)
                dst.write(header + rest)
                await dst.drain()
            self.resets += 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._close(pair)

    def reset_during_handshake(self, after_frames: int, connections: int = 1) -> None:
        """The next `connections` connections die right after the server's `after_frames`-th
        frame (1: Connection.Start, 2: Tune, 3: OpenOk, 4: the first Channel.OpenOk, ...):
        a RabbitMQ connection lost at each step of opening it."""
        self._reset_after = after_frames
        self._resets_left = connections

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
