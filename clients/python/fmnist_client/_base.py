"""What the sync and async clients share: configuration, request building, retries, response parsing."""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from ._exceptions import (
    BadRequest,
    FmnistError,
    Overloaded,
    PredictionFailed,
    Timeout,
    Unavailable,
    error_from_response,
)
from ._images import ImageInput, ImagePayload, encode_image
from ._models import ModelInfo, Prediction, RolloutEvent, TrafficWeights, history_entry
from ._version import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_WAIT = 30.0
# Longest `?wait=` the SDK asks the gateway to hold a request open; beyond it, it polls. Kept under
# the gateway's default cap (FMNIST_MAX_SYNC_WAIT_S = 30) so a longer `wait=` never earns a 422.
SERVER_WAIT_S = 10.0
# Statuses that mean "not now, the request was not taken": safe to retry even for POST.
RETRY_STATUSES = frozenset({429, 503})
MAX_METADATA_BYTES = 1024
PREDICTIONS_PATH = "/v1/predictions"
BATCH_PATH = "/v1/predictions:batch"
MODELS_PATH = "/v1/models"
# Images per `POST /v1/predictions:batch` in predict_many(); the gateway allows 256 by default
# (FMNIST_MAX_BATCH_IMAGES). One request per 32 images costs far less than 32 requests.
DEFAULT_BATCH_SIZE = 32


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass(frozen=True)
class ClientConfig:
    """A client's resolved settings (constructor arguments over `$FMNIST_URL` / `$FMNIST_API_KEY`)."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    retry_policy: RetryPolicy
    headers: dict[str, str]

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        retries: int,
        backoff: float,
        headers: Mapping[str, str] | None,
    ) -> ClientConfig:
        key = api_key or os.environ.get("FMNIST_API_KEY") or None
        return cls(
            base_url=(base_url or os.environ.get("FMNIST_URL") or DEFAULT_BASE_URL).rstrip("/"),
            api_key=key,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            retry_policy=RetryPolicy(retries=retries, backoff=backoff),
            headers={
                "User-Agent": f"fmnist-client/{__version__}",
                **auth_headers(key),
                **(headers or {}),
            },
        )

    @property
    def longest_hold_s(self) -> float:
        """Longest `?wait=` to ask for: under SERVER_WAIT_S, and well under the read timeout so a
        request the gateway holds open is never cut off by our own timeout."""
        read = self.timeout.read
        return SERVER_WAIT_S if read is None else min(SERVER_WAIT_S, 0.8 * read)

    def httpx_options(self) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client` / `httpx.AsyncClient`."""
        return {"base_url": self.base_url, "timeout": self.timeout, "headers": self.headers}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter; `Retry-After` wins when given."""

    retries: int = 3
    backoff: float = 0.25
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_delay < 0:
            raise ValueError("retries, backoff and max_delay must be >= 0")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to sleep before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return random.uniform(0, min(self.max_delay, self.backoff * 2**attempt))


def retry_delay(
    policy: RetryPolicy,
    attempt: int,
    *,
    response: httpx.Response | None = None,
    error: httpx.TransportError | None = None,
) -> float | None:
    """Seconds to wait before retrying, or None when this outcome must not be retried."""
    if attempt >= policy.retries:
        return None
    if response is not None and response.status_code in RETRY_STATUSES:
        return policy.delay(attempt, parse_retry_after(response.headers.get("Retry-After")))
    # Connection failures happen before anything is sent, so retrying cannot duplicate work.
    if error is not None and isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return policy.delay(attempt, None)
    return None


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def metadata_header(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The `X-Fmnist-Metadata` header, checked here so a bad value fails before any upload."""
    if not metadata:
        return {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str, e.g. {'label': '3'}")
    # ASCII-only JSON (non-ASCII escaped as \uXXXX): header values must be latin-1, and the
    # gateway's limit applies to exactly these bytes.
    value = json.dumps(dict(metadata), separators=(",", ":"))
    if len(value) > MAX_METADATA_BYTES:
        raise ValueError(
            f"metadata is {len(value)} bytes as JSON; the gateway's limit is {MAX_METADATA_BYTES}"
        )
    return {"X-Fmnist-Metadata": value}


def prediction_path(request_id: str) -> str:
    """`/v1/predictions/{id}`, the id quoted so that no id can reach another route."""
    return f"{PREDICTIONS_PATH}/{quote(request_id, safe='')}"


def model_path(name: str) -> str:
    """`/v1/models/{name}`, the name quoted so that no name can reach another route."""
    return f"{MODELS_PATH}/{quote(name, safe='')}"


def _submit_target(
    model: str | None, version: str | None, wait: float | None, batch: bool
) -> tuple[str, dict[str, str]]:
    """The submit route (the default model's, or `model`'s) and its query (`wait`, `version`)."""
    suffix = "/predictions:batch" if batch else "/predictions"
    path = (
        (BATCH_PATH if batch else PREDICTIONS_PATH) if model is None else model_path(model) + suffix
    )
    params = {"wait": _format_seconds(wait)} if wait else {}
    if version is not None:
        params["version"] = version
    return path, params


def build_submit_request(
    client: httpx.Client | httpx.AsyncClient,
    image: ImageInput,
    *,
    wait: float | None,
    metadata: Mapping[str, str] | None,
    idempotency_key: str | None,
    model: str | None = None,
    version: str | None = None,
) -> httpx.Request:
    """The `POST /v1/predictions` request for one image (raw body, the image's own content type);
    `wait` is how long the gateway may hold the request open for the result; `model` and `version`
    choose the model (default: the service's default model, its newest live version)."""
    payload = encode_image(image)
    headers = {
        "Content-Type": payload.content_type,
        # A key per call makes a retry after a lost response safe: the gateway answers the same id.
        "Idempotency-Key": idempotency_key or uuid.uuid4().hex,
        **metadata_header(metadata),
    }
    path, params = _submit_target(model, version, wait, batch=False)
    return client.build_request(
        "POST", path, content=payload.content, headers=headers, params=params
    )


def read_images(images: Sequence[ImageInput]) -> list[ImagePayload | FmnistError]:
    """Each image encoded for upload, or, in its place, a `BadRequest` saying why it could not be
    read (missing file, unreadable file, unsupported object), so one bad item spoils no batch."""
    read: list[ImagePayload | FmnistError] = []
    for image in images:
        try:
            read.append(encode_image(image))
        except (OSError, TypeError, ValueError) as error:
            unreadable = BadRequest(f"cannot read this image: {error}", code="unreadable_image")
            unreadable.__cause__ = error
            read.append(unreadable)
    return read


def fill_in(
    read: Sequence[ImagePayload | FmnistError], answers: Sequence[Prediction | FmnistError]
) -> list[Prediction | FmnistError]:
    """The outcome of every image of `read`, in order: its read error, or the next of `answers`
    (one per readable image, in order)."""
    pending = iter(answers)
    return [item if isinstance(item, FmnistError) else next(pending) for item in read]


def build_batch_request(
    client: httpx.Client | httpx.AsyncClient,
    payloads: Sequence[ImagePayload],
    *,
    wait: float | None,
    model: str | None = None,
    version: str | None = None,
) -> httpx.Request:
    """The `POST /v1/predictions:batch` request: one multipart `files` field per image, in order."""
    files = [("files", (p.filename, p.content, p.content_type)) for p in payloads]
    path, params = _submit_target(model, version, wait, batch=True)
    # The gateway keys each image as "<key>#<index>": a retried batch is not classified twice.
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    return client.build_request("POST", path, files=files, params=params, headers=headers)


def batch_outcomes(response: httpx.Response, expected: int) -> list[Prediction | FmnistError]:
    """One `Prediction` (any status) or refusal per image of a batch answer, in order."""
    raise_for_error(response)
    body = parse_json(response)
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or len(items) != expected:
        raise FmnistError(
            f"unexpected batch response from {response.request.url}: expected {expected} items",
            code="bad_response",
            status_code=response.status_code,
        )
    return [_batch_item(item) for item in items]


# A refused image of a batch carries only the gateway's error code; these codes are not the image's fault.
_ITEM_ERRORS: dict[str, type[FmnistError]] = {
    "too_many_requests": Overloaded,
    "broker_unavailable": Unavailable,
}


def _batch_item(item: Any) -> Prediction | FmnistError:
    if isinstance(item, dict) and "request_id" in item:
        return Prediction.from_json(item)
    error = item.get("error") if isinstance(item, dict) else None
    error = error if isinstance(error, dict) else {}
    code = str(error.get("code") or "refused")
    return _ITEM_ERRORS.get(code, BadRequest)(
        str(error.get("message") or "the gateway refused this image"),
        code=code,
        request_id=error.get("request_id"),
    )


def chunks(items: Sequence[ImageInput], size: int) -> list[Sequence[ImageInput]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def check_many_arguments(batch_size: int, concurrency: int) -> None:
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be >= 1")


class ProgressTracker:
    """Counts finished images and reports `progress(done, total)`; safe from several threads."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def advance(self) -> None:
        with self._lock:
            self.done += 1
            if self._progress is not None:
                self._progress(self.done, self.total)


def in_order_or_raise(
    outcomes: list[Prediction | FmnistError], *, return_exceptions: bool
) -> list[Prediction | FmnistError]:
    """`outcomes` as they are, or raise the first error when the caller wants no exceptions back."""
    if not return_exceptions:
        for outcome in outcomes:
            if isinstance(outcome, FmnistError):
                raise outcome
    return outcomes


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def raise_for_error(response: httpx.Response) -> None:
    """Raise the mapped `FmnistError` for any non-2xx response."""
    if response.is_success:
        return
    raise error_from_response(
        response.status_code,
        parse_json(response),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def prediction_from_response(response: httpx.Response) -> Prediction:
    raise_for_error(response)
    body = parse_json(response)
    if not isinstance(body, dict) or "request_id" not in body:
        raise FmnistError(
            f"unexpected response from {response.request.url}: {response.text[:200]!r}",
            code="bad_response",
            status_code=response.status_code,
        )
    return Prediction.from_json(body)


def transport_error(error: httpx.TransportError, base_url: str) -> FmnistError:
    """Map httpx's network errors to the SDK's tree, saying what to check."""
    if isinstance(error, httpx.TimeoutException):
        return Timeout(
            f"no response from {base_url} in time ({type(error).__name__})", code="timeout"
        )
    return Unavailable(
        f"cannot reach fmnist-service at {base_url}: {error or type(error).__name__}; "
        "is it running (`fmnist serve`) and is the URL right?",
        code="connection_error",
    )


def is_finished(prediction: Prediction) -> bool:
    """True when completed; raises `PredictionFailed` when failed; False while pending."""
    if prediction.status == "failed":
        raise PredictionFailed(prediction)
    return prediction.status == "completed"


def poll_delays(first: float = 0.02, factor: float = 1.5, cap: float = 0.5) -> Iterator[float]:
    """Gaps between polls of `GET /v1/predictions/{id}`: quick at first, then capped."""
    delay = first
    while True:
        yield delay
        delay = min(cap, delay * factor)


@dataclass(frozen=True)
class Health:
    """The gateway's liveness (`/healthz`) and readiness (`/readyz`).

    `live`: the gateway answers HTTP. `ready`: it can take work now (broker reachable, results
    consumer running); when not, `reason` says why, e.g. the broker error. `gateway_id` names the
    instance that answered.
    """

    live: bool
    ready: bool
    reason: str | None = None
    gateway_id: str | None = None


HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"


def health_from_responses(live: httpx.Response, ready: httpx.Response) -> Health:
    """`Health` from the answers of `/healthz` and `/readyz` (503 from `/readyz` means not ready)."""
    body = parse_json(ready)
    body = body if isinstance(body, dict) else {}
    is_ready = ready.status_code == 200
    reason = None
    if not is_ready:
        reason = str(body.get("broker") or f"/readyz answered HTTP {ready.status_code}")
    return Health(
        live=live.status_code == 200,
        ready=is_ready,
        reason=reason,
        gateway_id=body.get("gateway_id"),
    )


def result_timeout(request_id: str, timeout: float) -> Timeout:
    return Timeout(
        f"no result within {timeout:g} s; the request is still queued or running, "
        f"fetch it later with get({request_id!r})",
        code="result_timeout",
        request_id=request_id,
    )


def models_from_response(response: httpx.Response) -> list[ModelInfo]:
    """The `GET /v1/models` answer as `ModelInfo`s."""
    raise_for_error(response)
    body = parse_json(response)
    return [ModelInfo.from_json(item) for item in body.get("models", [])]


def model_from_response(response: httpx.Response) -> ModelInfo:
    """The `GET /v1/models/{name}` answer; raises `NotFound` for an unknown model."""
    raise_for_error(response)
    return ModelInfo.from_json(parse_json(response))


def weights_request(
    http: httpx.Client | httpx.AsyncClient, name: str, weights: Mapping[str, int], reason: str
) -> httpx.Request:
    """`PUT /v1/models/{name}/weights`: versions by full id, unique prefix or tag; {} clears."""
    body = {"weights": {str(v): int(p) for v, p in weights.items()}, "reason": reason}
    return http.build_request("PUT", f"{model_path(name)}/weights", json=body)


def weights_from_response(response: httpx.Response) -> TrafficWeights:
    """The `PUT .../weights` answer: the split in force, by full version id."""
    raise_for_error(response)
    return TrafficWeights.from_json(parse_json(response))


def history_from_response(response: httpx.Response) -> list[TrafficWeights | RolloutEvent]:
    """The `GET .../history` answer, oldest first."""
    raise_for_error(response)
    return [history_entry(item) for item in parse_json(response).get("events", [])]


def event_request(
    http: httpx.Client | httpx.AsyncClient,
    name: str,
    candidate: str,
    action: str,
    figures: Mapping[str, float] | None,
    weights: Mapping[str, int] | None,
    detail: str,
) -> httpx.Request:
    """`POST /v1/models/{name}/history`: one rollout decision (the gateway stamps time and author)."""
    body = {
        "candidate": candidate,
        "action": action,
        "figures": dict(figures or {}),
        "weights": dict(weights or {}),
        "detail": detail,
    }
    return http.build_request("POST", f"{model_path(name)}/history", json=body)


def event_from_response(response: httpx.Response) -> RolloutEvent:
    raise_for_error(response)
    return RolloutEvent.from_json(parse_json(response))
