"""What a served model tells the worker and the gateways about itself: `Preprocessing`, `ModelDescription`,
and the spec file (`.toml` or `.json`) that describes an exported program.

A spec, beside `model.pt2` (or `model.pt`) as `model.toml`, `model.json`, or the directory's own
`model.toml`/`model.json`:

```toml
name = "shapes"                 # required
input_shape = [3, 32, 32]       # required: C, H, W of the uint8 images the program is given
class_names = ["circle", "square", "triangle"]   # required: one per output column
tag = "v1"                      # optional: a human label beside the content-hash version
output = "logits"               # "logits" (a softmax is applied) or "probabilities"
scale = 0.00392156862745098     # x = uint8 * scale ...
mean = [0.5, 0.5, 0.5]          # ... then (x - mean) / std, per channel; one value means every channel
std = [0.25, 0.25, 0.25]
resize = "fit"                  # how the gateway brings an upload to H×W: "fit", "stretch" or "crop"
auto_invert = false             # invert light-background uploads (single-channel models only)
```
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESIZE_POLICIES",
    "ModelDescription",
    "ModelLoadError",
    "ModelSpec",
    "ModelSpecError",
    "Preprocessing",
    "find_spec",
    "read_spec",
]

RESIZE_POLICIES = ("fit", "stretch", "crop")
OUTPUTS = ("logits", "probabilities")
SPEC_SUFFIXES = (".toml", ".json")


class ModelLoadError(ValueError):
    """A model cannot be served as given; the message names the source and what to change."""


class ModelSpecError(ModelLoadError):
    """A model spec is missing, unreadable, or says something impossible; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """How the model turns the uint8 C×H×W image it is given into its input, and how a gateway brings an
    upload to that image. Every form takes uint8: the arithmetic below runs inside the model's pass."""

    channels: int
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    # "fit": inside H×W keeping the aspect ratio, padded with black; "stretch": to H×W;
    # "crop": the shorter side to fit, then the centre.
    resize: str = "fit"
    auto_invert: bool = False

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"{label} needs 1 or {self.channels} values (one per channel), got {len(values)}"
                )
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{label} must be finite numbers, got {list(values)}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std must be positive, got {list(self.std)}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ModelDescription:
    """What a worker announces for a model it serves (a plain JSON object via `to_json`)."""

    name: str
    version: str  # content hash of everything that changes the answers
    form: str  # "checkpoint", "exported" or "python"
    source: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    precision: str
    device: str
    tag: str | None = None
    input_dtype: str = "uint8"
    runtime: str = "eager"  # how the pass runs: "eager", "torchscript", ...

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["class_names"] = list(self.class_names)
        data["preprocessing"] = self.preprocessing.to_json()
        return data


@dataclass(frozen=True)
class ModelSpec:
    """The contents of a spec file: what an exported program cannot say about itself."""

    name: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    output: str = "logits"
    tag: str | None = None
    source: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        """Canonical contents (part of an exported model's version)."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_json(),
            "output": self.output,
            "tag": self.tag,
        }


_KEYS = {
    "name",
    "input_shape",
    "class_names",
    "tag",
    "output",
    "scale",
    "mean",
    "std",
    "resize",
    "auto_invert",
}


def find_spec(program: str | os.PathLike[str]) -> Path:
    """The spec beside `program`: `<stem>.toml`/`.json`, else the directory's `model.toml`/`.json`."""
    path = Path(program)
    candidates = [path.with_suffix(s) for s in SPEC_SUFFIXES]
    candidates += [path.parent / f"model{s}" for s in SPEC_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ModelSpecError(
        f"{path}: an exported program needs a model spec beside it (name, input_shape, class_names; "
        f"see docs/model.md); looked for {tried}"
    )


def read_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Parse and check a `.toml` or `.json` spec; a `ModelSpecError` naming the file and the problem."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
        data = tomllib.loads(text) if source.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelSpecError(f"{source}: cannot read the model spec ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelSpecError(
            f"{source}: a model spec is a table of keys, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ModelSpecError(f"{source}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    try:
        return _spec_from(data, str(source))
    except (KeyError, TypeError, ValueError) as exc:
        missing = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelSpecError(f"{source}: {missing}") from exc


def _floats(value: Any) -> tuple[float, ...]:
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return tuple(float(v) for v in values)


def _spec_from(data: dict[str, Any], source: str) -> ModelSpec:
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    shape = tuple(data["input_shape"])
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be three positive ints [C, H, W], got {list(shape)}")
    class_names = tuple(str(n) for n in data["class_names"])
    if not class_names:
        raise ValueError("class_names is empty")
    output = data.get("output", "logits")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    tag = data.get("tag")
    preprocessing = Preprocessing(
        channels=shape[0],
        scale=float(data.get("scale", 1.0 / 255.0)),
        mean=_floats(data.get("mean", 0.0)),
        std=_floats(data.get("std", 1.0)),
        resize=str(data.get("resize", "fit")),
        auto_invert=bool(data.get("auto_invert", False)),
    )
    return ModelSpec(
        name=name,
        input_shape=(shape[0], shape[1], shape[2]),
        class_names=class_names,
        preprocessing=preprocessing,
        output=output,
        tag=None if tag is None else str(tag),
        source=source,
    )
