"""A lean HTTP/1.1 load generator on asyncio streams, for overload tests.

httpx spends milliseconds of CPU per request in its connection pool; on 2 shared cores that makes
the client, not the server, the bottleneck. This sends pre-built requests over keep-alive
connections and parses only what the tests check (status, headers, a Content-Length body).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """One response: status, lower-cased headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("server closed the connection")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        raise ValueError("chunked responses are not supported by this load generator")
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body)


async def post_all(
    host: str, port: int, path: str, bodies: Sequence[bytes], *, content_type: str, connections: int
) -> list[Answer]:
    """POST every body once, `connections` at a time over keep-alive connections; answers in input order."""
    answers: list[Answer | None] = [None] * len(bodies)
    next_index = iter(range(len(bodies)))

    async def connection_loop() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for index in next_index:
                body = bodies[index]
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
                answer = await _read_answer(reader)
                answers[index] = answer
                if answer.headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    await asyncio.gather(*(connection_loop() for _ in range(connections)))
    return [answer for answer in answers if answer is not None]
