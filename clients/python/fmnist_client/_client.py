"""The synchronous client, `Client`, and the `PredictionHandle` that `submit()` returns."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from ._exceptions import FmnistError
from ._images import ImageInput
from ._models import ModelInfo, Prediction, RolloutEvent, TrafficWeights
from ._stream import StreamEventCallback, StreamSession, stream_predictions_sync

logger = logging.getLogger("fmnist_client")

ProgressCallback = Callable[[int, int], None]
"""Called as `progress(done, total)` each time one image of `predict_many()` finishes."""


@dataclass(frozen=True)
class PredictionHandle:
    """A submitted request: poll it with `get()` or block on `result()`."""

    request_id: str
    client: Client = field(repr=False)

    def get(self) -> Prediction:
        """The request's current state (pending, completed or failed)."""
        return self.client.get(self.request_id)

    def result(self, timeout: float = DEFAULT_WAIT) -> Prediction:
        """Block until the result arrives; raises `PredictionFailed` or `Timeout`."""
        return self.client.result(self.request_id, timeout=timeout)


class Client:
    """Synchronous client for fmnist-service; thread-safe, use one per process.

    >>> with Client("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     print(client.predict("shirt.png").class_name)

    `base_url` defaults to `$FMNIST_URL` (else http://127.0.0.1:8000) and `api_key` to
    `$FMNIST_API_KEY`. `retries` bounds the retries of 429/503 answers and failed connections,
    with exponential backoff or the server's `Retry-After`. `transport` is any sync httpx
    transport, e.g. `httpx.MockTransport` in tests (`AsyncClient` takes `httpx.ASGITransport`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        config = ClientConfig.resolve(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            headers=headers,
        )
        self._config = config
        self.base_url = config.base_url
        self.retry_policy = config.retry_policy
        self._http = httpx.Client(transport=transport, **config.httpx_options())
        self._sleep: Callable[[float], None] = time.sleep

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- API -------------------------------------------------------------------------------

    def predict(
        self,
        image: ImageInput,
        *,
        wait: float = DEFAULT_WAIT,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> Prediction:
        """Classify one image and return the completed `Prediction`.

        Waits up to `wait` seconds in total; raises `Timeout` after that, `PredictionFailed` if
        the service could not classify the image, `BadRequest` if it refused it.
        """
        deadline = time.monotonic() + wait
        prediction = self._submit(
            image,
            wait=min(wait, self._config.longest_hold_s),
            metadata=metadata,
            idempotency_key=idempotency_key,
            model=model,
            version=version,
        )
        return self._finish(prediction, deadline, wait)

    def submit(
        self,
        image: ImageInput,
        *,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> PredictionHandle:
        """Queue one image without waiting; the handle's `result()` waits for it."""
        prediction = self._submit(
            image,
            wait=None,
            metadata=metadata,
            idempotency_key=idempotency_key,
            model=model,
            version=version,
        )
        return PredictionHandle(prediction.request_id, self)

    def get(self, request_id: str) -> Prediction:
        """The current state of a request; raises `NotFound` for unknown or expired ids."""
        return prediction_from_response(
            self._send(self._http.build_request("GET", prediction_path(request_id)))
        )

    def result(self, request_id: str, *, timeout: float = DEFAULT_WAIT) -> Prediction:
        """Wait for a submitted request to finish (polling); raises `PredictionFailed` or `Timeout`."""
        return self._finish(self.get(request_id), time.monotonic() + timeout, timeout)

    @overload
    def predict_many(
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
    def predict_many(
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

    def predict_many(
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
        """Classify many images; results keep input order.

        Images go `batch_size` per `POST /v1/predictions:batch`, `concurrency` such requests at a
        time (threads), so thousands of images cost a few dozen requests. `wait` bounds the whole
        call. A bad image does not stop the others: with `return_exceptions=True` its `FmnistError`
        takes its place (a file that cannot be read: `BadRequest` with code `unreadable_image`),
        otherwise the first error is raised once all are done.
        """
        check_many_arguments(batch_size, concurrency)
        todo = list(images)
        deadline = time.monotonic() + wait
        tracker = ProgressTracker(len(todo), progress)

        def run_chunk(chunk: Sequence[ImageInput]) -> list[Prediction | FmnistError]:
            read = read_images(chunk)
            payloads = [item for item in read if not isinstance(item, FmnistError)]
            answers: list[Prediction | FmnistError] = []
            if payloads:
                request = build_batch_request(
                    self._http,
                    payloads,
                    wait=min(wait, self._config.longest_hold_s),
                    model=model,
                    version=version,
                )
                try:
                    answers = batch_outcomes(self._send(request), len(payloads))
                except FmnistError as error:
                    answers = [error] * len(payloads)
            settled: list[Prediction | FmnistError] = []
            for outcome in fill_in(read, answers):
                if isinstance(outcome, Prediction):
                    try:
                        outcome = self._finish(outcome, deadline, wait)
                    except FmnistError as error:
                        outcome = error
                tracker.advance()
                settled.append(outcome)
            return settled

        batches = chunks(todo, batch_size)
        with ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(batches)))) as pool:
            outcomes = [outcome for chunk in pool.map(run_chunk, batches) for outcome in chunk]
        return in_order_or_raise(outcomes, return_exceptions=return_exceptions)

    def stream(
        self,
        ids: Collection[str] | None = None,
        *,
        after: int | None = None,
        reconnects: int | None = 10,
        on_event: StreamEventCallback | None = None,
    ) -> Generator[Prediction, None, None]:
        """Results as they complete, over the websocket (see `AsyncClient.stream`); a generator:
        `close()` it, or leave the `for` loop, to hang up."""
        return stream_predictions_sync(
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

    def models(self) -> list[ModelInfo]:
        """The models the service knows (`GET /v1/models`): versions, input shape, classes, readiness."""
        return models_from_response(self._send(self._http.build_request("GET", MODELS_PATH)))

    def model(self, name: str) -> ModelInfo:
        """One model (`GET /v1/models/{name}`); raises `NotFound` for an unknown name."""
        return model_from_response(self._send(self._http.build_request("GET", model_path(name))))

    def set_weights(
        self, name: str, weights: Mapping[str, int], *, reason: str = ""
    ) -> TrafficWeights:
        """Split `name`'s live traffic between versions (`PUT /v1/models/{name}/weights`, admin):
        versions by full id, unique prefix or tag, percents summing to 100; {} clears the split.
        Raises `BadRequest` (invalid_weights), `NotFound`, `Unauthorized`."""
        request = weights_request(self._http, name, weights, reason)
        return weights_from_response(self._send(request))

    def history(self, name: str) -> list[TrafficWeights | RolloutEvent]:
        """`name`'s weights changes and rollout decisions, oldest first (`GET .../history`)."""
        request = self._http.build_request("GET", f"{model_path(name)}/history")
        return history_from_response(self._send(request))

    def record_event(
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
        return event_from_response(self._send(request))

    def health(self) -> Health:
        """The gateway's liveness and readiness (`/healthz`, `/readyz`), asked once, no retries;
        raises `Unavailable` when it cannot be reached."""
        try:
            live = self._http.get(HEALTHZ_PATH)
            ready = self._http.get(READYZ_PATH)
        except httpx.TransportError as error:
            raise transport_error(error, self.base_url) from error
        return health_from_responses(live, ready)

    # --- internals -------------------------------------------------------------------------

    def _submit(
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
        return prediction_from_response(self._send(request))

    def _finish(self, prediction: Prediction, deadline: float, allowed_s: float) -> Prediction:
        """Poll until `prediction` is done or `deadline` passes."""
        for delay in poll_delays():
            if is_finished(prediction):
                return prediction
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise result_timeout(prediction.request_id, allowed_s)
            self._sleep(min(delay, remaining))
            prediction = self.get(prediction.request_id)
        raise AssertionError("unreachable: poll_delays() never ends")

    def _send(self, request: httpx.Request) -> httpx.Response:
        """Send with bounded retries on 429/503 and connection failures."""
        attempt = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as error:
                delay = retry_delay(self.retry_policy, attempt, error=error)
                if delay is None:
                    raise transport_error(error, self.base_url) from error
                reason = type(error).__name__
            else:
                delay = retry_delay(self.retry_policy, attempt, response=response)
                if delay is None:
                    return response
                response.close()
                reason = f"HTTP {response.status_code}"
            logger.info(
                "event=retry method=%s path=%s reason=%r attempt=%d delay_s=%.3f",
                request.method,
                request.url.path,
                reason,
                attempt + 1,
                delay,
            )
            self._sleep(delay)
            attempt += 1
