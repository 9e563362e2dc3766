"""The models the gateway serves: names, versions, input shapes, class names and readiness (torch-free).

A stand-in with the interface agreed for issue 14: one default model, built from the settings and the
checkpoint's header; the models branch replaces it with a registry fed by worker announcements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from app.gateway.errors import ApiError
from app.protocol import decode_shape
from app.settings import Settings

RETRY_AFTER_MODEL_S = 2


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

    @property
    def ready(self) -> bool:
        return self.live_workers > 0


class ModelRegistry:
    """The default model, from `FMNIST_MODEL_PATH`'s header and `FMNIST_INPUT_SHAPE`; live while `ready()`."""

    def __init__(self, settings: Settings, ready: Callable[[], bool]) -> None:
        self._ready = ready
        path = Path(settings.model_path)
        metadata = _checkpoint_metadata(path)
        classes = metadata.get("class_names") or [str(index) for index in range(10)]
        self._template = ModelVersion(
            name=path.stem.split(".")[0] or "fmnist",
            version=str(metadata.get("version") or "1"),
            tag=None,
            input_shape=decode_shape(settings.input_shape),
            dtype="uint8",
            class_names=tuple(str(name) for name in classes),
            preprocessing=MappingProxyType(dict(metadata.get("normalization") or {})),
        )

    def names(self) -> list[str]:
        return [self._template.name]

    @property
    def default_name(self) -> str:
        return self._template.name

    def versions(self, name: str) -> list[ModelVersion]:
        """Newest first; [] for an unknown name."""
        if name != self._template.name:
            return []
        live = 1 if self._ready() else 0
        return [
            ModelVersion(
                name=self._template.name,
                version=self._template.version,
                tag=self._template.tag,
                input_shape=self._template.input_shape,
                dtype=self._template.dtype,
                class_names=self._template.class_names,
                preprocessing=self._template.preprocessing,
                live_workers=live,
            )
        ]

    def resolve(self, name: str | None, version: str | None = None) -> ModelVersion:
        """The model `name` (None: the default) at `version` (a hash or tag; None: the newest live one)."""
        wanted = self.default_name if name is None else name
        versions = self.versions(wanted)
        if not versions:
            raise ApiError(
                404,
                "model_not_found",
                f"no model {wanted!r}; known models: {', '.join(self.names())}",
            )
        if version is not None:
            versions = [v for v in versions if version in (v.version, v.tag)]
            if not versions:
                live = [v.version for v in self.versions(wanted) if v.ready]
                raise ApiError(
                    404,
                    "version_not_found",
                    f"model {wanted!r} has no version {version!r}; live versions: {', '.join(live) or 'none'}",
                )
        ready = [v for v in versions if v.ready]
        if not ready:
            raise ApiError(
                503,
                "model_unavailable",
                f"model {wanted!r} has no live worker; retry later",
                headers={"Retry-After": str(RETRY_AFTER_MODEL_S)},
            )
        return ready[0]


def _checkpoint_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint header's metadata, or {} when the gateway cannot read it (workers hold the model)."""
    from ml.readers import CheckpointError, read_checkpoint_metadata

    try:
        return read_checkpoint_metadata(path)
    except (CheckpointError, OSError, ValueError):
        return {}
