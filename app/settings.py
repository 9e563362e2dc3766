"""The one settings class of the service: every knob, read from `FMNIST_*` environment variables."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.logs import kv

DEFAULT_MODEL_PATH = Path("models/fmnist.safetensors")


def installed_model_path() -> Path | None:
    """The shipped checkpoint as installed with the `ml` package (`ml/shipped/`), found without importing torch."""
    spec = importlib.util.find_spec("ml")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "shipped" / DEFAULT_MODEL_PATH.name
        if candidate.is_file():
            return candidate
    return None


logger = logging.getLogger(__name__)

DEPRECATED_NAMES: dict[str, str] = {
    "max_wait_ms": "batch_fill_wait_ms",
    "max_queue": "max_queued_images",
    "max_in_flight": "max_pending_requests",
    "max_wait_s": "max_sync_wait_s",
}
"""Old setting name -> its new name; the old `FMNIST_` variables still work, with a warning."""

_warned: set[str] = set()


def _renamed(name: str) -> AliasChoices:
    """Read `FMNIST_<NAME>`, else its deprecated old variable (a keyword takes the field's name)."""
    (old,) = (old for old, new in DEPRECATED_NAMES.items() if new == name)
    return AliasChoices(f"FMNIST_{name.upper()}", f"FMNIST_{old.upper()}")


def _warn_deprecated(environ: Mapping[str, str]) -> None:
    """One warning per process for each deprecated variable that is set, naming its replacement."""
    names = {key.upper() for key in environ}
    for old, new in DEPRECATED_NAMES.items():
        variable = f"FMNIST_{old.upper()}"
        if variable in names and variable not in _warned:
            _warned.add(variable)
            logger.warning(kv("deprecated_setting", variable=variable, use=f"FMNIST_{new.upper()}"))


def _with_kafka_options(settings: Settings) -> str:
    """FMNIST_BROKER_URL with the deprecated FMNIST_KAFKA_* settings as the `kafka://` URL options
    they stand for, where the URL does not set those itself (one warning each per process)."""
    url = settings.broker_url
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        return url
    given = dict(parse_qsl(parts.query, keep_blank_values=True))
    added: dict[str, str] = {}
    for field, option in (("kafka_idempotence", "idempotence"), ("kafka_partitions", "partitions")):
        value = getattr(settings, field)
        if value is None:
            continue
        variable = f"FMNIST_{field.upper()}"
        if variable not in _warned:
            _warned.add(variable)
            logger.warning(
                kv("deprecated_setting", variable=variable, use=f"FMNIST_BROKER_URL ?{option}=")
            )
        if option not in given:
            added[option] = str(value).lower()
    if not added:
        return url
    query = "&".join(filter(None, [parts.query, urlencode(added)]))
    return urlunsplit(parts._replace(query=query))


class BrokerSettings(BaseModel):
    """Where the messages go: read by every process that connects to the broker."""

    broker_url: str = Field(
        "memory://",
        description="Broker URL: `memory://` (embedded), `kafka://host:9092[,host2:9092]` or `gcp://PROJECT_ID`.",
    )
    broker_connect_timeout_s: float = Field(
        10.0, gt=0, description="Seconds to wait for the broker before raising `BrokerUnavailable`."
    )
    requests_topic: str = Field(
        "fmnist.requests",
        description="Prefix of the requests topics: each model's requests go to `<prefix>.<model>` "
        "(e.g. `fmnist.requests.fmnist`), requests pinned to a version to `<prefix>.<model>.v-<version>`.",
    )
    results_topic: str = Field(
        "fmnist.results", description="Topic the workers publish results to."
    )
    deadletter_topic: str = Field(
        "fmnist.deadletter", description="Topic for poison messages, with the error attached."
    )
    control_topic: str = Field(
        "fmnist.control",
        description="Topic on which workers announce the models they serve (with heartbeats) and "
        "gateways learn them.",
    )
    rollout_topic: str = Field(
        "fmnist.rollout",
        description="Topic of rollout decisions: traffic weights per model and the events of promotions "
        "(`TrafficWeights`, `RolloutEvent`). Gateways and shadow workers read it from its start.",
    )
    shadow_results_topic: str = Field(
        "fmnist.results.shadow",
        description="Topic shadow workers publish their results to; gateways compare them with the live "
        "results and never send them to clients.",
    )
    publish_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest wait for the broker to accept a submitted image before the gateway answers "
        "503 + Retry-After (during a broker outage). Raise it for a slow remote broker; never a late 202.",
    )
    kafka_idempotence: bool | None = Field(
        None,
        description="Deprecated: put `?idempotence=false` in FMNIST_BROKER_URL instead (a `kafka://` URL "
        "option, like the others). Set, it fills that option where the URL leaves it out.",
    )
    kafka_partitions: int | None = Field(
        None,
        ge=1,
        description="Deprecated: put `?partitions=N` in FMNIST_BROKER_URL instead (a `kafka://` URL "
        "option). Set, it fills that option where the URL leaves it out.",
    )


class ModelSettings(BaseModel):
    """Which model a worker serves and how it computes."""

    model_path: Path = Field(
        DEFAULT_MODEL_PATH,
        description="Checkpoint (`.safetensors`) the workers serve. The default, where the working "
        "directory has no `models/`, is the shipped checkpoint installed with the package.",
    )
    data_dir: Path | None = Field(
        None,
        description="Directory with the Fashion-MNIST IDX `.gz` files (default: search the usual places).",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where workers run their models: `auto` (CUDA when torch sees a GPU, else the CPU), "
        "`cpu`, `cuda` or `cuda:N`. Workers announce the device they use.",
    )
    inference_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Arithmetic of the workers' forward pass. `auto`: bf16 on CPU-only machines whose CPU "
        "has native bfloat16 (AVX512-BF16 or AMX), as OpenVINO does by default, else fp32. Force `fp32` "
        "for a model whose accuracy drops in bf16 (the model card compares them).",
    )


class WorkerSettings(BaseModel):
    """Read by `fmnist worker` (and the worker inside `fmnist serve`)."""

    worker_id: str | None = Field(
        None, description="Id a worker stamps on its results (default: host-pid)."
    )
    worker_group: str = Field(
        "workers",
        description="Prefix of the workers' consumer groups: `<prefix>.<model>`, one per model, so each "
        "model scales on its own.",
    )
    heartbeat_interval_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="Workers announce each model again this often; a gateway counts a worker live "
        "for three intervals after its last announcement. Lower it to notice dead workers sooner, "
        "raise it to send fewer control messages.",
    )
    worker_health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of a worker's `GET /healthz` and `GET /readyz` (on FMNIST_HOST), for "
        "orchestrator probes. Unset: no endpoint.",
    )
    inference_concurrency: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Forward passes a worker runs at once, side by side. Default: on CPU, the cores the "
        "process may use, at most 4; on a GPU, 1.",
    )
    inference_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch intra-op threads per forward pass. Default: cores / `FMNIST_INFERENCE_CONCURRENCY`, at "
        "least 1. Change it only together with FMNIST_INFERENCE_CONCURRENCY, after measuring "
        "(docs/benchmarks.md).",
    )
    max_batch_size: int = Field(
        256,
        ge=1,
        le=4096,
        description="Largest batch a worker's ModelRunner forms, when its queue is deep (bursts, the "
        "batch endpoint): larger passes cost less per image. Lower it where memory per pass is tight "
        "(a small GPU).",
    )
    preferred_batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Batch size at which a batch counts as full when the queue is shallow (at most "
        "`FMNIST_MAX_BATCH_SIZE`). Small batches answer sooner and let passes run side by side; raise "
        "it on a GPU, where one larger pass costs little more than a small one.",
    )
    batch_fill_wait_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        validation_alias=_renamed("batch_fill_wait_ms"),
        description="Longest a queued image waits for its batch to fill, from the oldest item, while "
        "a forward pass is busy (on an idle worker a lone image runs at once unless "
        "`FMNIST_BATCH_FILL_WHEN_IDLE`). Lower it for lower latency under load, raise it for fuller "
        "batches.",
    )
    batch_fill_when_idle: bool = Field(
        False,
        description="Make queued images wait `FMNIST_BATCH_FILL_WAIT_MS` for company even when every "
        "forward pass is idle. Off: an idle worker computes a lone image at once, for the lowest "
        "latency at light load. Turn it on where the worker's cores are busy with other work and "
        "fuller batches (less CPU per image) matter more than light-load latency.",
    )
    max_queued_images: int = Field(
        4096,
        ge=1,
        validation_alias=_renamed("max_queued_images"),
        description="Images a worker's ModelRunner may hold queued before refusing more (the worker "
        "then takes fewer messages from the broker). Raise it for bursts larger than this.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Tries of one request (a model error re-queues it) before it goes to the dead-letter topic.",
    )
    worker_role: Literal["serving", "shadow"] = Field(
        "serving",
        description="`serving`: answer clients. `shadow`: read a copy of the model's live traffic in a "
        "group of its own, from now on, and publish to FMNIST_SHADOW_RESULTS_TOPIC only, so gateways "
        "compare this version with the live one before it takes traffic (`fmnist worker --shadow`).",
    )


class GatewaySettings(BaseModel):
    """Read by `fmnist gateway` (and the gateway inside `fmnist serve`)."""

    gateway_id: str | None = Field(
        None,
        description="Stable id of this gateway instance; names its results consumer group "
        "(`gateway-<id>`), so a restarted gateway resumes where it stopped. Default: random per start.",
    )
    host: str = Field("127.0.0.1", description="Interface the HTTP server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port the HTTP server listens on.")
    grpc_enabled: bool = Field(
        True,
        description="Serve the Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`) "
        "beside HTTP in `fmnist serve` and `fmnist gateway`. Turn it off where nothing speaks gRPC or "
        "its port is taken.",
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the gRPC service, on FMNIST_HOST; 0 turns it off (as FMNIST_GRPC_ENABLED=false).",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys. Empty (default): no auth. Set: every `/v1` route needs a key.",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated admin keys: needed to change a model's traffic weights and to "
        "record rollout events whenever any key (API or admin) is configured; they work as API keys "
        "too. Without any key the admin calls are open like the rest of the API.",
    )
    rollout_window_s: float = Field(
        60.0,
        gt=0,
        description="Window of the live figures per version in `GET /v1/models/{name}` (requests, "
        "errors, latency of the results this gateway routed). Lengthen it where traffic is sparse.",
    )
    rollout_history_size: int = Field(
        1000,
        ge=1,
        description="Rollout decisions (weights changes and promotion events) each gateway keeps per "
        "model for `GET /v1/models/{name}/history`; older ones drop out.",
    )
    default_model: str | None = Field(
        None,
        description="Model that `/v1/predictions` (no model named) goes to. Default: `fmnist serve`'s "
        "first `--model`, else the first model the gateway learned. Set it on gateways of a "
        "deployment that serves several models, so that they all agree.",
    )
    max_upload_bytes: int = Field(
        5 * 1024 * 1024, ge=1, description="Largest accepted image upload (413 above)."
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest decoded image, width × height (decompression-bomb guard).",
    )
    max_image_aspect_ratio: float = Field(
        64.0,
        ge=1,
        description="Largest ratio of an image's long side to its short side (422 above), checked from "
        "the header before decoding: fitted into the model's input such an image is a line, and "
        "resizing it costs time out of proportion to its upload size. Raise it only for models whose "
        "input is itself that elongated.",
    )
    max_batch_upload_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Largest `POST /v1/predictions:batch` body (413 above)."
    )
    auto_invert: bool = Field(
        True,
        description="Single-channel models that ask for it in their preprocessing (the Fashion-MNIST "
        "checkpoints do): invert uploads whose border is mostly light, so dark-on-white photos and "
        "drawings look like Fashion-MNIST. False turns it off for every model.",
    )
    max_batch_images: int = Field(
        256, ge=1, description="Most images in one `POST /v1/predictions:batch`."
    )
    max_pending_requests: int = Field(
        10_000,
        ge=1,
        validation_alias=_renamed("max_pending_requests"),
        description="Requests accepted but not yet answered, per gateway, before it answers 429. "
        "Raise it when clients legitimately keep more requests outstanding.",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Largest request header block (names and values; the request line may add 8 KiB). "
        "The server refuses a longer or unterminated block with 431 as it arrives, before buffering it. "
        "Raise it for clients behind proxies that add many headers.",
    )
    header_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a whole request header block, counted from its first "
        "byte (or from connecting); the connection is then closed (slow-header guard).",
    )
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        description="Seconds an idle keep-alive connection is held open between requests. Raise it "
        "behind a load balancer whose own idle timeout is longer.",
    )
    body_read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a request body may take to arrive in full, from the end of its headers; "
        "slower bodies are answered 408. Raise it for clients uploading large batches over slow links.",
    )
    max_body_bytes_in_flight: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Request body bytes the gateway holds at once across all requests still being "
        "received or handled; a request that would pass it is answered 503 with `Retry-After`. Keep "
        "it at least `FMNIST_MAX_BATCH_UPLOAD_BYTES`, or full-size batches are always refused.",
    )
    stream_max_connections: int = Field(
        1_000,
        ge=1,
        description="Result streams (websockets) open at once per gateway; one more is refused with 503 "
        "and `Retry-After`. Each holds up to its queue bound in memory.",
    )
    stream_max_ids: int = Field(
        10_000,
        ge=1,
        description="Request ids one result stream may wait for at once (`ids=`, `subscribe`, "
        "submits); an id leaves the count once its result is pushed.",
    )
    stream_max_queued_messages: int = Field(
        10_000,
        ge=1,
        description="Messages (results, acks, errors) queued for one result stream; a client that "
        "falls this far behind is closed with code 1013 and resumes with `after=`.",
    )
    stream_send_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Seconds one websocket send may wait for a client that does not read; the stream "
        "is then closed with code 1013 and the connection dropped.",
    )
    max_sync_wait_s: float = Field(
        30.0,
        gt=0,
        validation_alias=_renamed("max_sync_wait_s"),
        description="Cap on `?wait=`, the seconds a synchronous request may wait for its answer "
        "(422 above). Raise it for clients that prefer one long request to polling.",
    )
    request_deadline_s: float = Field(
        60.0,
        gt=0,
        description="A request not computed within this many seconds is dropped as expired.",
    )
    result_ttl_s: float = Field(600.0, gt=0, description="How long results stay retrievable.")
    result_store_size: int = Field(
        100_000, ge=1, description="Most results kept in memory per gateway."
    )
    shadow_window: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Live/shadow pairs per candidate version a gateway keeps for `GET "
        "/v1/models/{name}/shadow` and the shadow gauges (the newest, about this many), and answers "
        "waiting for their other side. Raise it for steadier figures on busy models, lower it to "
        "follow a change sooner or to hold less memory.",
    )
    result_replay_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long a starting (or reconnecting) gateway may spend re-reading the results "
        "topic's last FMNIST_RESULT_TTL_S before it reports ready anyway; results it has not re-read by "
        "then arrive later. Raise it when a large results backlog makes /readyz turn green before the "
        "old results are served.",
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry tracing, metrics and logs (global providers). Off by "
        "default: it reads the environment and the providers on every request.",
    )


class SharedStateSettings(BaseModel):
    """Gateways behind one load balancer acting as one (Redis)."""

    shared_state_url: str | None = Field(
        None,
        description="Redis URL (`redis://[:password@]host:6379/0`, `rediss://` for TLS) that makes gateways behind "
        "one load balancer act as one: results, pending ids and idempotency keys live there, and the gateways "
        "share the results topic in one consumer group. Unset (the default): one gateway, nothing shared. "
        "Needs `pip install 'fmnist-service[redis]'`.",
    )
    shared_state_prefix: str = Field(
        "fmnist",
        min_length=1,
        description="Prefix of every Redis key and channel the gateways use. Change it when several "
        "deployments share one Redis.",
    )
    shared_state_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Seconds a Redis command may take before the gateway counts Redis as down (then /readyz "
        "answers 503 and submits 503 + Retry-After). Raise it for a Redis far away.",
    )
    shared_results_group: str = Field(
        "gateways",
        min_length=1,
        description="Consumer group the gateways share on the results topic when FMNIST_SHARED_STATE_URL is "
        "set: each result is taken by one gateway, which writes it to Redis.",
    )


class ProcessSettings(BaseModel):
    """Every process: logging and the garbage collector."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    gc_threshold: int = Field(
        200_000,
        ge=0,
        description="Allocations between Python's young-generation garbage collections in serve, gateway "
        "and worker processes (Python's default is 700; 0 keeps it). Higher cuts tail latency under load.",
    )


class Settings(
    BaseSettings,
    ProcessSettings,
    SharedStateSettings,
    GatewaySettings,
    WorkerSettings,
    ModelSettings,
    BrokerSettings,
):
    """Every setting, grouped by the process that reads it; each field is read from the environment
    variable `FMNIST_<NAME>` (one prefix, flat names, whatever the group).

    `settings.gateway`, `.worker`, `.model`, `.broker`, `.shared_state` and `.process` give one
    group alone, for code that should see only what its process reads. The README's settings table
    is generated from the groups (`python -m app.settings`).
    """

    model_config = SettingsConfigDict(
        env_prefix="FMNIST_", extra="ignore", frozen=True, populate_by_name=True
    )

    @property
    def broker(self) -> BrokerSettings:
        """The broker group alone."""
        return _group(self, BrokerSettings)

    @property
    def model(self) -> ModelSettings:
        """The model group alone."""
        return _group(self, ModelSettings)

    @property
    def worker(self) -> WorkerSettings:
        """The worker group alone."""
        return _group(self, WorkerSettings)

    @property
    def gateway(self) -> GatewaySettings:
        """The gateway group alone."""
        return _group(self, GatewaySettings)

    @property
    def shared_state(self) -> SharedStateSettings:
        """The shared-state group alone."""
        return _group(self, SharedStateSettings)

    @property
    def process(self) -> ProcessSettings:
        """The group every process reads."""
        return _group(self, ProcessSettings)

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("model_path")
    @classmethod
    def _installed_model_outside_the_checkout(cls, value: Path) -> Path:
        # The relative default names a file only in a checkout; a pip-installed wheel carries it too.
        if value == DEFAULT_MODEL_PATH and not value.exists():
            return installed_model_path() or value
        return value

    @field_validator("default_model")
    @classmethod
    def _check_model_name(cls, value: str | None) -> str | None:
        from app.protocol import check_model_name

        return None if not value else check_model_name(value)

    @model_validator(mode="after")
    def _kafka_settings_into_the_url(self) -> Settings:
        # Frozen, so the URL is replaced in place once, while the instance is being built.
        object.__setattr__(self, "broker_url", _with_kafka_options(self))
        return self

    @model_validator(mode="after")
    def _check_topics(self) -> Settings:
        _warn_deprecated(os.environ)
        for name in ("requests_topic", "results_topic", "deadletter_topic"):
            if len(getattr(self, name)) < 3:
                raise ValueError(
                    f"FMNIST_{name.upper()} must have at least 3 characters (Pub/Sub requires it)"
                )
        return self


_G = TypeVar("_G", bound=BaseModel)


def _group(settings: Settings, group: type[_G]) -> _G:
    """The fields of `group` taken from `settings` (already validated, so not validated again)."""
    return group.model_construct(**{name: getattr(settings, name) for name in group.model_fields})


GROUPS: dict[str, type[BaseModel]] = {
    "Broker": BrokerSettings,
    "Model": ModelSettings,
    "Worker": WorkerSettings,
    "Gateway": GatewaySettings,
    "Shared state": SharedStateSettings,
    "Every process": ProcessSettings,
}
"""The groups, in the order of the README's settings table (one heading each)."""


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()


def settings_table() -> str:
    """Markdown tables of every setting, one per group under its heading, for the README."""
    sections = []
    for heading, group in GROUPS.items():
        rows = [f"### {heading}", "", (group.__doc__ or "").strip(), ""]
        rows += ["| variable | default | description |", "| --- | --- | --- |"]
        for name, field in group.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "" if default is None or default == [] else f"`{default}`"
            rows.append(f"| `FMNIST_{name.upper()}` | {shown} | {field.description} |")
        sections.append("\n".join(rows))
    return "\n\n".join(sections)


TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def with_settings_table(markdown: str) -> str:
    """`markdown` with the text between the settings-table markers replaced by `settings_table()`."""
    head, start, rest = markdown.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError(f"the markers {TABLE_START} and {TABLE_END} are missing")
    return f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}"


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--update":
        target = Path(sys.argv[2])
        target.write_text(with_settings_table(target.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(settings_table())
