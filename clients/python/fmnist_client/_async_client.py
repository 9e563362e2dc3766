"""The asyncio client, `AsyncClient`, with the websocket result stream, and `AsyncPredictionHandle`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, overload

import httpx

from ._base import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TIMEOUT,
    DEFAULT_WAIT,
    HEALTHZ_PATH,
    MODELS_PATH,
    READYZ_PATH,
    ClientConfig,
    Health,
    ProgressTracker,
    batch_outcomes,
    build_batch_request,
    build_submit_request,
    check_many_arguments,
    chunks,
    event_from_response,
    event_request,
    fill_in,
    health_from_responses,
    history_from_response,
    in_order_or_raise,
    is_finished,
    model_from_response,
    model_path,
    models_from_response,
    poll_delays,
    prediction_from_response,
    prediction_path,
    read_images,
    result_timeout,
    retry_delay,
    transport_error,
    weights_from_response,
    weights_request,
)
from ._client import ProgressCallback
from ._exceptions import FmnistError
from ._images import ImageInput
from ._models import ModelInfo, Prediction, RolloutEvent, TrafficWeights
from ._stream import StreamEventCallback, StreamSession, stream_predictions

logger = logging.getLogger("fmnist_client")


@dataclass(frozen=True)
class AsyncPredictionHandle:
    """A submitted request: poll it with `await get()` or wait with `await result()`."""

    request_id: str
    client: AsyncClient = field(repr=False)

    async def get(self) -> Prediction:
        """The request's current state (pending, completed or failed)."""
        return await self.client.get(self.request_id)

    # `timeout` mirrors the sync API and `concurrent.futures.Future.result`; on expiry we raise our
    # `Timeout` carrying the request id, which `asyncio.timeout` around the call could not do.
    async def result(self, timeout: float = DEFAULT_WAIT) -> Prediction:  # noqa: ASYNC109
        """Wait until the result arrives; raises `PredictionFailed` or `Timeout`."""
        return await self.client.result(self.request_id, timeout=timeout)


class AsyncClient:
    """Asyncio client for fmnist-service; same API as `Client`, awaitable.

    >>> async with AsyncClient() as client:  # doctest: +SKIP
    ...     handle = await client.submit("shirt.png")
    ...     async for result in client.stream(ids=[handle.request_id]):
    ...         print(result.class_name)

    `transport` is any async httpx transport, e.g. `httpx.ASGITransport(app)` in tests (the
    websocket stream always uses a real socket to `base_url`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._config = ClientConfig.resolve(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            headers=headers,
        )
        self.base_url = self._config.base_url
        self.retry_policy = self._config.retry_policy
        self._http = httpx.AsyncClient(transport=transport, **self._config.httpx_options())
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    # --- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- API -------------------------------------------------------------------------------

    async def predict(
        self,
        image: ImageInput,
        *,
        wait: float = DEFAULT_WAIT,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> Prediction:
        """Classify one image and return the completed `Prediction` (see `Client.predict`)."""
        deadline = time.monotonic() + wait
        prediction = await self._submit(
            image,
            wait=min(wait, self._config.longest_hold_s),
            metadata=metadata,
            idempotency_key=idempotency_key,
            model=model,
            version=version,
        )
        return await self._finish(prediction, deadline, wait)

    async def submit(
        self,
        image: ImageInput,
        *,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> AsyncPredictionHandle:
        """Queue one image without waiting; follow it with `stream(ids=...)` or `handle.result()`."""
        prediction = await self._submit(
            image,
            wait=None,
            metadata=metadata,
            idempotency_key=idempotency_key,
            model=model,
            version=version,
        )
        return AsyncPredictionHandle(prediction.request_id, self)

    async def get(self, request_id: str) -> Prediction:
        """The current state of a request; raises `NotFound` for unknown or expired ids."""
        request = self._http.build_request("GET", prediction_path(request_id))
        return prediction_from_response(await self._send(request))

    async def result(self, request_id: str, *, timeout: float = DEFAULT_WAIT) -> Prediction:  # noqa: ASYNC109
        """Wait for a submitted request to finish (polling); raises `PredictionFailed` or `Timeout`."""
        return await self._finish(await self.get(request_id), time.monotonic() + timeout, timeout)

    @overload
    async def predict_many(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int = ...,
        concurrency: int = ...,
        wait: float = ...,
        progress: ProgressCallback | None = ...,
        return_exceptions: Literal[False] = ...,
        model: str | None = ...,
        version: str | None = ...,
    ) -> list[Prediction]: ...

    @overload
    async def predict_many(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int = ...,
        concurrency: int = ...,
        wait: float = ...,
        progress: ProgressCallback | None = ...,
        return_exceptions: Literal[True],
        model: str | None = ...,
        version: str | None = ...,
    ) -> list[Prediction | FmnistError]: ...

    async def predict_many(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = 4,
        wait: float = DEFAULT_WAIT,
        progress: ProgressCallback | None = None,
        return_exceptions: bool = False,
        model: str | None = None,
        version: str | None = None,
    ) -> list[Prediction] | list[Prediction | FmnistError]:
        """Classify many images, `batch_size` per batch request, `concurrency` requests at a time;
        results keep input order (see `Client.predict_many`)."""
        check_many_arguments(batch_size, concurrency)
        todo = list(images)
        deadline = time.monotonic() + wait
        tracker = ProgressTracker(len(todo), progress)
        slots = asyncio.Semaphore(concurrency)

        async def settle(outcome: Prediction | FmnistError) -> Prediction | FmnistError:
            if isinstance(outcome, Prediction):
                try:
                    outcome = await self._finish(outcome, deadline, wait)
                except FmnistError as error:
                    outcome = error
            tracker.advance()
            return outcome

        async def run_chunk(chunk: Sequence[ImageInput]) -> list[Prediction | FmnistError]:
            read = read_images(chunk)
            payloads = [item for item in read if not isinstance(item, FmnistError)]
            answers: list[Prediction | FmnistError] = []
            if payloads:
                async with slots:
                    request = build_batch_request(
                        self._http,
                        payloads,
                        wait=min(wait, self._config.longest_hold_s),
                        model=model,
                        version=version,
                    )
                    try:
                        answers = batch_outcomes(await self._send(request), len(payloads))
                    except FmnistError as error:
                        answers = [error] * len(payloads)
            # Polling stragglers happens outside the slot: the next batch is already on its way.
            outcomes = fill_in(read, answers)
            return list(await asyncio.gather(*(settle(outcome) for outcome in outcomes)))

        results = await asyncio.gather(*(run_chunk(chunk) for chunk in chunks(todo, batch_size)))
        outcomes = [outcome for chunk in results for outcome in chunk]
        return in_order_or_raise(outcomes, return_exceptions=return_exceptions)

    def stream(
        self,
        ids: Collection[str] | None = None,
        *,
        after: int | None = None,
        reconnects: int | None = 10,
        on_event: StreamEventCallback | None = None,
    ) -> AsyncGenerator[Prediction, None]:
        """Results as they complete, over the websocket.

        Without `ids`: every result visible to this API key from now on (or, with `after`, from
        that cursor on), until you stop iterating. With `ids`: only those, ending once each has
        arrived (including ones already finished). A dropped connection is re-opened and resumed
        after the last cursor; `reconnects` bounds consecutive failed attempts (None: unbounded).
        `on_event` is called with a `StreamEvent` at each change of the connection (connecting,
        connected, lost, retrying), e.g. to show it.
        """
        return stream_predictions(
            StreamSession(
                self.base_url,
                ids=ids,
                after=after,
                reconnects=reconnects,
                retry_policy=self.retry_policy,
                on_event=on_event,
            ),
            api_key=self._config.api_key,
            open_timeout=self._config.timeout.connect or 10.0,
        )

    async def models(self) -> list[ModelInfo]:
        """The models the service knows (`GET /v1/models`): versions, input shape, classes, readiness."""
        return models_from_response(await self._send(self._http.build_request("GET", MODELS_PATH)))

    async def model(self, name: str) -> ModelInfo:
        """One model (`GET /v1/models/{name}`); raises `NotFound` for an unknown name."""
        return model_from_response(
            await self._send(self._http.build_request("GET", model_path(name)))
        )

    async def set_weights(
        self, name: str, weights: Mapping[str, int], *, reason: str = ""
    ) -> TrafficWeights:
        """Split `name`'s live traffic between versions (`PUT /v1/models/{name}/weights`, admin):
        versions by full id, unique prefix or tag, percents summing to 100; {} clears the split.
        Raises `BadRequest` (invalid_weights), `NotFound`, `Unauthorized`."""
        request = weights_request(self._http, name, weights, reason)
        return weights_from_response(await self._send(request))

    async def history(self, name: str) -> list[TrafficWeights | RolloutEvent]:
        """`name`'s weights changes and rollout decisions, oldest first (`GET .../history`)."""
        request = self._http.build_request("GET", f"{model_path(name)}/history")
        return history_from_response(await self._send(request))

    async def record_event(
        self,
        name: str,
        candidate: str,
        action: str,
        *,
        figures: Mapping[str, float] | None = None,
        weights: Mapping[str, int] | None = None,
        detail: str = "",
    ) -> RolloutEvent:
        """Record one rollout decision on `name`'s history (`POST .../history`, admin)."""
        request = event_request(self._http, name, candidate, action, figures, weights, detail)
        return event_from_response(await self._send(request))

    async def health(self) -> Health:
        """The gateway's liveness and readiness (see `Client.health`)."""
        try:
            live = await self._http.get(HEALTHZ_PATH)
            ready = await self._http.get(READYZ_PATH)
        except httpx.TransportError as error:
            raise transport_error(error, self.base_url) from error
        return health_from_responses(live, ready)

    # --- internals (mirror Client's; the two differ only in awaiting) ----------------------

    async def _submit(
        self,
        image: ImageInput,
        *,
        wait: float | None,
        metadata: Mapping[str, str] | None,
        idempotency_key: str | None,
        model: str | None = None,
        version: str | None = None,
    ) -> Prediction:
        request = build_submit_request(
            self._http,
            image,
            wait=wait,
            metadata=metadata,
            idempotency_key=idempotency_key,
            model=model,
            version=version,
        )
        return prediction_from_response(await self._send(request))

    async def _finish(
        self, prediction: Prediction, deadline: float, allowed_s: float
    ) -> Prediction:
        for delay in poll_delays():
            if is_finished(prediction):
                return prediction
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise result_timeout(prediction.request_id, allowed_s)
            await self._sleep(min(delay, remaining))
            prediction = await self.get(prediction.request_id)
        raise AssertionError("unreachable: poll_delays() never ends")

    async def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as error:
                delay = retry_delay(self.retry_policy, attempt, error=error)
                if delay is None:
                    raise transport_error(error, self.base_url) from error
                reason = type(error).__name__
            else:
                delay = retry_delay(self.retry_policy, attempt, response=response)
                if delay is None:
                    return response
                await response.aclose()
                reason = f"HTTP {response.status_code}"
            logger.info(
                "event=retry method=%s path=%s reason=%r attempt=%d delay_s=%.3f",
                request.method,
                request.url.path,
                reason,
                attempt + 1,
                delay,
            )
            await self._sleep(delay)
            attempt += 1
