"""Load for end-to-end tests: a lean HTTP/1.1 generator for overload tests, and a steady rate
through the SDK.

httpx spends milliseconds of CPU per request in its connection pool; on 2 shared cores that makes
the client, not the server, the bottleneck. `post_all` sends pre-built requests over keep-alive
connections and parses only what the tests check (status, headers, a Content-Length body).
`fixed_rate_load` submits at a set rate, so the backlog stays what the workers can keep up with.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fmnist_client import AsyncClient, FmnistError


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


async def fixed_rate_load(
    clients: Sequence[AsyncClient],
    images: Sequence[bytes],
    rate: float,
    accepted: dict[str, float],
    refused: list[str],
    stop: asyncio.Event,
) -> None:
    """Submit one image every 1/`rate` s until `stop`, through each client in turn, each in its own
    task so a slow answer does not slow the rate. Ids answered 202 go to `accepted` with when
    (`time.monotonic()`) they were submitted; `refused` gets the status and message of the rest."""

    async def submit(client: AsyncClient, image: bytes) -> None:
        started = time.monotonic()
        try:
            handle = await client.submit(image)
        except FmnistError as error:
            refused.append(f"{error.status_code} {error}")
            return
        accepted[handle.request_id] = started

    tasks: set[asyncio.Task[None]] = set()
    period = 1.0 / rate
    next_at = time.monotonic()
    for index in itertools.count():
        if stop.is_set():
            break
        task = asyncio.create_task(
            submit(clients[index % len(clients)], images[index % len(images)])
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*tasks)
