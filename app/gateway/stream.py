"""`WS /v1/predictions/stream`: push results as they arrive, accept submits, resume after a reconnect.

Query: `ids=a,b` (only these ids; ids submitted or subscribed on the socket are added), `after=CURSOR`
(first replay the stored results newer than CURSOR). Server → client: `result` (with `cursor`),
`accepted`, `error`. Client → server: `submit` (base64 image), `subscribe` (ids). Every request id is
pushed at most once per connection. Everything queued for a client (results, acks, errors) is
bounded: a client that falls too far behind is closed with code 1013 once it has received what was
queued, and one that stops reading is closed when a send waits too long; either resumes with
`after=<last cursor>` and loses nothing. The ids a socket waits for are bounded too; a refused
`subscribe` adds none.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections import OrderedDict
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app.gateway.deps import GatewayDep
from app.gateway.errors import ApiError
from app.gateway.intake import Upload, check_metadata, decode_uploads
from app.gateway.models import result_body
from app.gateway.results import StoredResult
from app.gateway.service import Gateway
from app.gateway.submission import new_request_ids
from app.logs import kv

log = logging.getLogger(__name__)
router = APIRouter(tags=["predictions"])

MAX_ID_CHARS = 128
# Echoed back in every answer to the message, so bounded: a long one would multiply what is queued.
MAX_CLIENT_REF_CHARS = 256
MAX_ECHOED_TYPE_CHARS = 40
# A close frame to a client that does not read cannot be sent; give up on it after this long.
CLOSE_WAIT_S = 1.0
# Streams last minutes; a refused client retries after this, not at once.
RETRY_AFTER_FULL_S = 5
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008


class StreamSlots:
    """How many result streams are open, against `FMNIST_STREAM_MAX_CONNECTIONS`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> None:
        """Count one more open stream; 503 + Retry-After when all slots are taken."""
        if self.open >= self.limit:
            raise ApiError(
                503,
                "busy",
                f"{self.limit} result streams are open (FMNIST_STREAM_MAX_CONNECTIONS); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_FULL_S)},
            )
        self.open += 1


@router.websocket("/v1/predictions/stream")
async def stream_predictions(websocket: WebSocket, gateway: GatewayDep) -> None:
    """Results pushed as JSON; submits over the same socket; `after=` resumes without loss."""
    slots: StreamSlots = websocket.app.state.stream_slots
    try:
        owner = gateway.api_keys.owner_of(websocket)
        ids = _parse_ids(websocket.query_params.get("ids"), gateway.settings.stream_max_ids)
        after = _parse_after(websocket.query_params.get("after"))
        slots.take()
    except ApiError as exc:
        await _deny(websocket, exc)
        return
    try:
        await websocket.accept()
        session = StreamSession(websocket, gateway, owner, ids)
        await session.run(after)
    finally:
        slots.open -= 1


def _parse_ids(raw: str | None, max_ids: int) -> set[str] | None:
    if raw is None:
        return None
    ids = {part.strip() for part in raw.split(",") if part.strip()}
    _check_ids(ids, max_ids)
    return ids


def _check_ids(ids: set[str], max_ids: int) -> None:
    if len(ids) > max_ids or any(len(request_id) > MAX_ID_CHARS for request_id in ids):
        raise ApiError(
            422,
            "validation_error",
            f"ids: at most {max_ids} ids (FMNIST_STREAM_MAX_IDS) of at most {MAX_ID_CHARS} "
            "characters; an id stops counting once its result is pushed",
        )


def _parse_after(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        cursor = int(raw)
    except ValueError:
        cursor = -1
    if cursor < 0:
        raise ApiError(
            422, "validation_error", "after must be a cursor: a non-negative integer from a result"
        )
    return cursor


async def _deny(websocket: WebSocket, exc: ApiError) -> None:
    """Refuse the handshake with our JSON error, when the server can send an HTTP answer to a websocket."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(
            JSONResponse(exc.to_body(), status_code=exc.status, headers=exc.headers)
        )
    else:
        await websocket.close(
            code=CLOSE_POLICY_VIOLATION, reason=f"{exc.status} {exc.code}: {exc.message}"[:120]
        )


class StreamSession:
    """One websocket: a listener on the result store feeding one outgoing queue, and the client's messages."""

    def __init__(
        self, websocket: WebSocket, gateway: Gateway, owner: str, ids: set[str] | None
    ) -> None:
        self.websocket = websocket
        self.gateway = gateway
        self.owner = owner
        self.ids = ids  # None: every result visible to the owner; else the ids not yet pushed
        settings = gateway.settings
        self.max_ids = settings.stream_max_ids
        self.max_queued = settings.stream_max_queued_messages
        self.send_timeout_s = settings.stream_send_timeout_s
        self.outbox: asyncio.Queue[StoredResult | dict[str, Any]] = asyncio.Queue()
        self.overflowed = False
        self.last_cursor: int | None = None
        self._pushed: OrderedDict[str, None] = OrderedDict()
        self._max_pushed = gateway.settings.result_store_size
        # Results that arrive while their submit is still publishing wait here, so that the
        # client always gets `accepted` before the `result` of the same request.
        self._held: dict[str, list[StoredResult]] = {}

    def _visible(self, stored: StoredResult) -> bool:
        result = stored.result
        return result.owner == self.owner and (self.ids is None or result.request_id in self.ids)

    def _offer(self, stored: StoredResult) -> None:
        """Store listener: queue a result for this client (runs inside the results consumer: O(1))."""
        if self.overflowed or not self._visible(stored):
            return
        held = self._held.get(stored.result.request_id)
        if held is not None:
            held.append(stored)
            return
        self._enqueue(stored)

    def _enqueue(self, item: StoredResult | dict[str, Any]) -> None:
        """Queue a message for the client; past the bound, queue the close instead (once)."""
        if self.overflowed:
            return
        if self.outbox.qsize() >= self.max_queued:
            self.overflowed = True
            self.outbox.put_nowait({"type": "overflow"})
            return
        self.outbox.put_nowait(item)

    def _queue_stored(self, request_ids: set[str] | None = None, after: int | None = None) -> None:
        store = self.gateway.store
        if after is not None:
            for stored in store.results_after(after):
                self._offer(stored)
        for request_id in request_ids or ():
            found = store.get_result(request_id)
            if found is not None:
                self._offer(found)

    async def run(self, after: int | None) -> None:
        store = self.gateway.store
        metrics = self.gateway.metrics
        shared = self.gateway.shared
        if shared is None:
            # Replay first, then listen; no await in between, so nothing falls in a gap.
            self._queue_stored(self.ids, after)
            store.add_listener(self._offer)
        elif not await self._replay_shared(after):
            return
        metrics.websockets.inc()
        sender = asyncio.create_task(self._send_loop(), name="fmnist-stream-sender")
        try:
            await self._receive_loop(sender)
            if self.overflowed:
                await asyncio.wait({sender})  # it sends what was queued, then the close
        finally:
            store.remove_listener(self._offer)
            if shared is not None:
                await shared.unwatch(self.owner)
            metrics.websockets.dec()
            sender.cancel()
            try:
                await sender
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the client went away mid-send: nothing left to tell it
                log.debug(kv("stream_send_failed", owner=self.owner, error=exc))

    async def _replay_shared(self, after: int | None) -> bool:
        """With shared state: hold live results, subscribe to the owner's, replay from Redis, then the
        held ones. False (the socket closed with 1013) when Redis cannot be reached."""
        live: list[StoredResult] = []
        store = self.gateway.store
        shared = self.gateway.shared
        assert shared is not None
        store.add_listener(live.append)
        try:
            await self.gateway.watch(self.owner)
            try:
                replayed = await self.gateway.stored_results(self.owner, self.ids, after)
            except ApiError:
                await shared.unwatch(self.owner)
                raise
        except ApiError as exc:
            store.remove_listener(live.append)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await self.websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason=exc.message[:120])
            return False
        for stored in replayed:
            self._offer(stored)
        store.remove_listener(live.append)
        store.add_listener(self._offer)
        for stored in live:
            self._offer(stored)
        return True

    async def _send_loop(self) -> None:
        websocket = self.websocket
        pushed = self._pushed
        while True:
            item = await self.outbox.get()
            if isinstance(item, StoredResult):
                request_id = item.result.request_id
                if self.ids is not None:
                    self.ids.discard(request_id)  # waited for no longer: frees room under the cap
                if request_id in pushed:
                    continue
                pushed[request_id] = None
                if len(pushed) > self._max_pushed:
                    pushed.popitem(last=False)
                self.last_cursor = item.cursor
                message = {"type": "result", "cursor": item.cursor, **result_body(item)}
            elif item.get("type") == "overflow":
                log.warning(kv("stream_overflow", owner=self.owner, last_cursor=self.last_cursor))
                await self._close_too_slow()
                return
            else:
                message = item
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await websocket.send_text(orjson.dumps(message).decode())
            except TimeoutError:
                log.warning(
                    kv(
                        "stream_send_timeout",
                        owner=self.owner,
                        timeout_s=self.send_timeout_s,
                        last_cursor=self.last_cursor,
                    )
                )
                self.overflowed = True
                await self._close_too_slow()
                return

    async def _close_too_slow(self) -> None:
        """Close with 1013 and the resume cursor; a client that does not read never gets the frame,
        so the wait is short and the server drops the connection after it."""
        reason = f"client too slow; reconnect with after={self.last_cursor or 0}"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self.websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason=reason)

    async def _receive_loop(self, sender: asyncio.Task[None]) -> None:
        websocket = self.websocket
        while (
            websocket.client_state == WebSocketState.CONNECTED
            and not sender.done()
            and not self.overflowed
        ):
            receive = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                    await receive
                return
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._send_error(
                    ApiError(422, "invalid_message", "send JSON text frames, not binary")
                )
                continue
            await self._handle(text)

    def _send_error(self, exc: ApiError, client_ref: str | None = None) -> None:
        message: dict[str, Any] = {"type": "error", "error": exc.to_body()["error"]}
        if client_ref is not None:
            message["client_ref"] = client_ref
        self._enqueue(message)

    async def _handle(self, text: str) -> None:
        client_ref: str | None = None
        try:
            try:
                message = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
                raise ApiError(422, "invalid_message", "messages must be JSON objects") from None
            if not isinstance(message, dict):
                raise ApiError(422, "invalid_message", "messages must be JSON objects")
            ref = message.get("client_ref")
            if isinstance(ref, str) and len(ref) > MAX_CLIENT_REF_CHARS:
                raise ApiError(
                    422,
                    "invalid_message",
                    f"client_ref: at most {MAX_CLIENT_REF_CHARS} characters",
                )
            if isinstance(ref, str) and not _encodes_as_utf8(ref):
                # It is echoed in every answer, and a lone surrogate cannot be sent as JSON text.
                raise ApiError(422, "invalid_message", "client_ref must be valid Unicode text")
            client_ref = ref if isinstance(ref, str) else None
            kind = message.get("type")
            if kind == "submit":
                await self._submit(message, client_ref)
            elif kind == "subscribe":
                await self._subscribe(message)
            else:
                raise ApiError(
                    422,
                    "invalid_message",
                    f"unknown message type {repr(kind)[:MAX_ECHOED_TYPE_CHARS]}; "
                    "use 'submit' or 'subscribe'",
                )
        except ApiError as exc:
            self._send_error(exc, client_ref)

    async def _subscribe(self, message: dict[str, Any]) -> None:
        ids = message.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ApiError(
                422, "invalid_message", "subscribe needs `ids`: a list of request id strings"
            )
        new_ids = set(ids)
        _check_ids(new_ids, self.max_ids)
        if self.ids is not None:
            # Checked before adding: a refused subscribe leaves the socket's ids as they were.
            _check_ids(self.ids | new_ids, self.max_ids)
            self.ids |= new_ids
        if self.gateway.shared is None:
            self._queue_stored(new_ids)
        else:
            for stored in await self.gateway.stored_results(self.owner, new_ids, None):
                self._offer(stored)

    async def _submit(self, message: dict[str, Any], client_ref: str | None) -> None:
        gateway = self.gateway
        image = message.get("image")
        if not isinstance(image, str):
            raise ApiError(
                422, "invalid_message", "submit needs `image`: the image bytes, base64-encoded"
            )
        limit = gateway.settings.max_upload_bytes
        if len(image) > (limit * 4) // 3 + 4:
            raise ApiError(
                413,
                "payload_too_large",
                f"the image is over the limit of {limit} bytes (FMNIST_MAX_UPLOAD_BYTES)",
            )
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_message", "`image` is not valid base64") from None
        metadata = message.get("metadata")
        meta = check_metadata(metadata) if metadata is not None else None
        model_name, version = message.get("model"), message.get("version")
        if not isinstance(model_name, str | None) or not isinstance(version, str | None):
            raise ApiError(422, "invalid_message", "`model` and `version` must be strings")
        model = gateway.registry.resolve(model_name, version)
        (decoded,) = await decode_uploads([Upload(data, None)], gateway.policy_for(model))
        if isinstance(decoded, ApiError):
            raise decoded
        if self.ids is not None and len(self.ids) >= self.max_ids:
            raise ApiError(
                429,
                "too_many_ids",
                f"this stream already waits for {self.max_ids} results (FMNIST_STREAM_MAX_IDS); "
                "read the pending ones first",
            )
        (request_id,) = new_request_ids(1)
        if self.ids is not None:
            self.ids.add(request_id)  # before publishing: the result may come back at once
        self._held[request_id] = []
        try:
            (outcome,) = await gateway.submit(
                self.owner,
                [decoded],
                model=model,
                pinned=version is not None,
                metadata=meta,
                request_ids=[request_id],
            )
            if isinstance(outcome, ApiError):
                raise outcome
        except ApiError:
            if self.ids is not None:
                self.ids.discard(request_id)
            raise
        finally:
            held = self._held.pop(request_id)
        self._enqueue({"type": "accepted", "request_id": request_id, "client_ref": client_ref})
        for stored in held:
            self._offer(stored)


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
