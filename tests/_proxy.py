"""A TCP proxy on loopback that a test can cut and restore: a real network outage between the
bot and its database server, without stopping the server for the other tests."""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import suppress


class OutageProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``. :meth:`cut` closes every open connection
    and refuses new ones until :meth:`restore`; :meth:`stall` makes it a server that accepts
    and reads but never answers; :meth:`drop_reply_to` lets one statement reach the server
    and then cuts its connection before the server's reply gets back (a lost COMMIT reply).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._up = True
        self._stalled = False
        self._drop_marker: bytes | None = None
        self._drops_left = 0
        #: How many replies were dropped by drop_reply_to().
        self.dropped = 0
        #: How many times a client sent something (a request: one round trip each).
        self.requests = 0
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        back: asyncio.StreamWriter | None = None,
    ) -> None:
        """Copy ``reader`` to ``writer``; ``back`` is the other direction's writer, given for
        the client-to-server direction."""
        with suppress(Exception):
            while data := await reader.read(65536):
                if self._stalled:
                    continue  # read and never answer
                marker = self._drop_marker
                if back is not None:
                    self.requests += 1
                writer.write(data)
                await writer.drain()
                if back is not None and marker is not None and marker in data.upper():
                    self._drops_left -= 1
                    if not self._drops_left:
                        self._drop_marker = None
                    back.transport.abort()  # the client never hears the answer...
                    self.dropped += 1
                    await asyncio.sleep(0.5)  # ...that the server sends after committing
                    writer.transport.abort()
                    return
        with suppress(Exception):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, back=writer), self._pipe(up_reader, writer)
        )
        self._writers.difference_update((writer, up_writer))

    async def _cut(self) -> None:
        self._up = False
        for writer in list(self._writers):
            with suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _restore(self) -> None:
        self._up = True
        self._stalled = False

    async def _set(self, *, stalled: bool, marker: bytes | None, times: int = 0) -> None:
        self._stalled = stalled
        self._drop_marker = marker
        self._drops_left = times

    def stall(self) -> None:
        """From now on, read what clients send and never answer (a hung server)."""
        self._call(self._set(stalled=True, marker=None))

    def drop_reply_to(self, marker: bytes, times: int = 1) -> None:
        """Let the next ``times`` client messages containing ``marker`` (upper case, e.g.
        ``b"COMMIT"``) reach the server, each time cutting that connection before the reply
        comes back."""
        self._call(self._set(stalled=False, marker=marker, times=times))

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accept connections again."""
        self._call(self._restore())

    def close(self) -> None:
        self._call(self._cut())
        if self._server is not None:
            self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
