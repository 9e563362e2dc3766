"""The models the gateway serves: names, versions, input shapes, class names and readiness (torch-free).

Fed by the workers' announcements on the control topic (`app.protocol.ModelAnnouncement`, read by
`Gateway`): a model is known once a worker announced it, and a version is live while at least one
worker's heartbeats for it are fresh (within `LIVENESS_INTERVALS` of its announced interval). A worker
that drains announces `leaving` and stops counting at once. Known models stay known (a 503 while no
worker serves them, not a 404). A version only shadow workers announced (`role="shadow"`) is listed
with its role but never resolved for traffic: it reads a copy of live traffic and answers nobody.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from app.gateway.errors import ApiError
from app.protocol import ModelAnnouncement

RETRY_AFTER_MODEL_S = 2
# A worker counts as live for this many of its heartbeat intervals after its last announcement:
# one late heartbeat never takes a model away.
LIVENESS_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One version of one model as the gateway knows it."""

    name: str
    version: str
    tag: str | None
    input_shape: tuple[int, int, int]  # C, H, W
    dtype: str  # what workers take on the wire
    class_names: tuple[str, ...]
    preprocessing: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    live_workers: int = 0
    """Live serving workers: those that answer clients."""
    precision: str = ""
    device: str = ""
    role: Literal["serving", "shadow"] = "serving"
    """`shadow` while only shadow workers announced this version."""
    shadow_workers: int = 0
    """Live shadow workers of this version."""

    @property
    def ready(self) -> bool:
        """Takes traffic: a live serving worker."""
        return self.live_workers > 0


@dataclass(slots=True)
class _Known:
    """A version as last announced, when it was first learned, and its workers' expiry times."""

    announcement: ModelAnnouncement
    first_seen: int  # order of learning: later is newer
    workers: dict[str, float] = field(default_factory=dict)  # worker id → live until (unix s)
    shadows: set[str] = field(default_factory=set)  # ids of the workers that announced role shadow


class ModelRegistry:
    """The models and versions workers announced, and which of them have live workers."""

    def __init__(self, default_model: str | None = None, clock: Callable[[], float] = time.time):
        self._default = default_model
        self._clock = clock
        self._models: dict[str, dict[str, _Known]] = {}  # name → version → what we know
        self._learned = 0

    def learn(self, announcement: ModelAnnouncement, received_at: float | None = None) -> bool:
        """Take one announcement (received at `received_at`, default now); True when it changed
        which workers are live (a new worker, version or model, or a worker leaving)."""
        now = self._clock() if received_at is None else received_at
        versions = self._models.setdefault(announcement.name, {})
        known = versions.get(announcement.version)
        if known is None:
            if announcement.status == "leaving":
                return False
            self._learned += 1
            known = versions[announcement.version] = _Known(announcement, self._learned)
        else:
            known.announcement = announcement
        if announcement.status == "leaving":
            known.shadows.discard(announcement.worker_id)
            return known.workers.pop(announcement.worker_id, None) is not None
        if announcement.role == "shadow":
            known.shadows.add(announcement.worker_id)
        else:
            known.shadows.discard(announcement.worker_id)
        is_new = announcement.worker_id not in known.workers or not self._live(
            known.workers[announcement.worker_id]
        )
        until = now + LIVENESS_INTERVALS * announcement.heartbeat_s
        known.workers[announcement.worker_id] = max(
            until, known.workers.get(announcement.worker_id, 0)
        )
        return is_new

    def _live(self, until: float) -> bool:
        return until > self._clock()

    def names(self) -> list[str]:
        """Known models, in the order they were first learned."""
        return list(self._models)

    @property
    def default_name(self) -> str:
        """`FMNIST_DEFAULT_MODEL`, else the first model learned ("" while none is known)."""
        if self._default:
            return self._default
        return next(iter(self._models), "")

    def versions(self, name: str) -> list[ModelVersion]:
        """Newest first; [] for an unknown name."""
        known = sorted(self._models.get(name, {}).values(), key=lambda k: -k.first_seen)
        return [self._version_of(k) for k in known]

    def _version_of(self, known: _Known) -> ModelVersion:
        a = known.announcement
        live = {worker for worker, until in known.workers.items() if self._live(until)}
        shadows = live & known.shadows
        # Serving once any worker announced it so; a version a shadow alone announced is a shadow.
        serving = bool(live - shadows) or len(known.shadows) < len(known.workers)
        return ModelVersion(
            name=a.name,
            version=a.version,
            tag=a.tag,
            input_shape=a.input_shape,
            dtype=a.dtype,
            class_names=a.class_names,
            preprocessing=MappingProxyType(dict(a.preprocessing)),
            live_workers=len(live - shadows),
            precision=a.precision,
            device=a.device,
            role="serving" if serving else "shadow",
            shadow_workers=len(shadows),
        )

    def resolve(self, name: str | None, version: str | None = None) -> ModelVersion:
        """The model `name` (None: the default) at `version` (a hash or tag; None: the newest live one)."""
        wanted = self.default_name if name is None else name
        versions = self.versions(wanted)
        if not versions:
            if name is None:
                raise ApiError(
                    503,
                    "model_unavailable",
                    "no worker has announced a model yet; retry later",
                    headers={"Retry-After": str(RETRY_AFTER_MODEL_S)},
                )
            known = ", ".join(self.names()) or "none yet"
            raise ApiError(404, "model_not_found", f"no model {wanted!r}; known models: {known}")
        if version is not None:
            versions = [v for v in versions if version in (v.version, v.tag)]
            if versions and all(v.role == "shadow" for v in versions):
                serving = [_label(v) for v in self.versions(wanted) if v.ready]
                raise ApiError(
                    409,
                    "version_is_shadow",
                    f"model {wanted!r} version {version!r} runs as a shadow: it reads a copy of live "
                    f"traffic and answers no client; pin a serving version: "
                    f"{', '.join(serving) or 'none live'}",
                )
            if not versions:
                live = [_label(v) for v in self.versions(wanted) if v.ready]
                raise ApiError(
                    404,
                    "version_not_found",
                    f"model {wanted!r} has no version {version!r}; live versions: {', '.join(live) or 'none'}",
                )
        ready = [v for v in versions if v.ready]
        if not ready:
            which = wanted if version is None else f"{wanted} version {version}"
            raise ApiError(
                503,
                "model_unavailable",
                f"model {which!r} has no live worker; retry later",
                headers={"Retry-After": str(RETRY_AFTER_MODEL_S)},
            )
        return ready[0]


def _label(version: ModelVersion) -> str:
    return version.version if version.tag is None else f"{version.version} ({version.tag})"
