"""app/worker/health.py: the worker's /healthz and /readyz responder."""

from __future__ import annotations

import asyncio

import httpx

from app.worker.health import health_server


async def test_healthz_answers_while_readyz_reports_the_reason_it_is_not_ready() -> None:
    """/healthz is 200 from the start; /readyz is 503 with the reason until readiness says ready."""
    state = {"ready": (False, "loading the model")}
    async with health_server("127.0.0.1", 0, lambda: state["ready"]) as server:
        assert server is not None
        base = f"http://127.0.0.1:{server.bound_port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            assert (await client.get("/healthz")).status_code == 200
            waiting = await client.get("/readyz")
            assert waiting.status_code == 503
            assert waiting.json() == {"status": "not_ready", "reason": "loading the model"}
            state["ready"] = (True, "consuming")
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/metrics")).status_code == 404
            assert (await client.post("/healthz")).status_code == 405


async def test_a_client_that_never_finishes_its_request_is_dropped() -> None:
    """A connection that sends an endless header line is closed at the head limit, not buffered."""
    async with health_server("127.0.0.1", 0, lambda: (True, "")) as server:
        assert server is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 200_000)
        async with asyncio.timeout(5):
            try:
                answer = await reader.read()
            except ConnectionResetError:  # closed while our bytes were still unread
                answer = b""
        assert answer == b""
        writer.close()


async def test_no_port_means_no_endpoint() -> None:
    """With the port unset, nothing listens."""
    async with health_server("127.0.0.1", None, lambda: (True, "")) as server:
        assert server is None
