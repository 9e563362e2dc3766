"""`load_model`: one entry point for the three forms a worker can serve.

```python
load_model("models/fmnist.safetensors")  # an `ImageClassifier` checkpoint
load_model("exports/resnet.pt2")  # a `torch.export` program, with a spec beside it
load_model("exports/resnet.pt")  # a TorchScript module, with a spec beside it
load_model("my_package.models:Shapes")  # a Python class (`ml.serving.protocol`)
```
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ml.layout import inference_layout, usable_cores
from ml.serving.compiled import RUNTIMES, aot_compiled
from ml.serving.device import resolve_device, resolve_precision
from ml.serving.served import Forward, ServedModel, content_version
from ml.serving.spec import (
    ModelDescription,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    Preprocessing,
    find_spec,
    read_spec,
)

__all__ = ["load_model", "model_form"]

logger = logging.getLogger(__name__)

_CLASS_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
_TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.load` is deprecated"


def model_form(source: str | Path) -> str:
    """The form of `source`: "checkpoint", "exported" or "python", from the file suffix or the `package.module:Class` form."""
    text = str(source)
    suffix = Path(text).suffix.lower()
    if suffix == ".safetensors":
        return "checkpoint"
    if suffix == ".pt2" or suffix in _TORCHSCRIPT_SUFFIXES:
        return "exported"
    if _CLASS_PATH.fullmatch(text):
        return "python"
    raise ModelLoadError(
        f"cannot tell what {text!r} is: serve an ImageClassifier checkpoint (.safetensors), an "
        "exported program (.pt2 from torch.export, or TorchScript .pt) with a model spec beside it, "
        "or a Python class as package.module:Class"
    )


def load_model(
    source: str | Path,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    name: str | None = None,
    tag: str | None = None,
    runtime: str = "auto",
    concurrency: int | None = None,
    cache_dir: Path | None = None,
) -> ServedModel:
    """Load `source` (see the module docstring) ready for a `ModelRunner` (blocking: call it in a thread).

    `device`: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". `precision`: "auto" (bf16 on
    a CPU with native bfloat16, else fp32), "fp32" or "bf16". `name`/`tag` override what the source
    says. `runtime`: "auto" (AOTInductor on the CPU where the form allows it, see
    `ml.serving.compiled`; eager elsewhere), "aoti" or "eager". `concurrency`: passes that may run at
    once (default: the worker layout's). `cache_dir`: where compiled programs are kept.

    A model that cannot answer a batch of its own input shape fails here, not on the first request.
    Raises `ModelLoadError` (a spec or class problem), a `CheckpointError`, or `ValueError` (device).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    target = resolve_device(device)
    arithmetic = resolve_precision(precision, target)
    passes = (
        concurrency or inference_layout(usable_cores(), on_gpu=target.type == "cuda").concurrency
    )
    options = _Options(target, arithmetic, runtime, passes, cache_dir)
    form = model_form(source)
    if form == "checkpoint":
        served = _load_checkpoint(Path(source), options)
    elif form == "exported":
        served = _load_exported(Path(source), options)
    else:
        served = _load_python(str(source), options)
    if name is not None or tag is not None:
        served = ServedModel(_renamed(served.description, name, tag), served._forward)
    _check_answers(served)
    logger.info(
        "event=model_loaded name=%s version=%s form=%s runtime=%s device=%s precision=%s",
        served.name,
        served.version,
        served.description.form,
        served.description.runtime,
        served.description.device,
        served.precision,
    )
    return served


class _Options:
    def __init__(
        self,
        device: torch.device,
        precision: str,
        runtime: str,
        concurrency: int,
        cache_dir: Path | None,
    ) -> None:
        self.device = device
        self.precision = precision
        self.runtime = runtime
        self.concurrency = concurrency
        self.cache_dir = cache_dir

    def compile(
        self, whole_pass: torch.nn.Module, shape: tuple[int, int, int], key: str
    ) -> tuple[Forward, str]:
        """The pass as the chosen runtime runs it, taking CPU uint8 batches; and the runtime's name."""
        device = self.device
        if device.type == "cpu" and self.runtime in ("auto", "aoti"):
            example = torch.zeros((2, *shape), dtype=torch.uint8)
            return aot_compiled(
                whole_pass,
                example,
                key=f"{key}:{self.precision}",
                cache_dir=self.cache_dir,
                runners=self.concurrency,
            )

        def eager(images: torch.Tensor) -> torch.Tensor:
            return whole_pass(images.to(device, non_blocking=True))

        return eager, "eager"


def _renamed(description: ModelDescription, name: str | None, tag: str | None) -> ModelDescription:
    from dataclasses import replace

    return replace(
        description,
        name=description.name if name is None else name,
        tag=description.tag if tag is None else tag,
    )


# --- an ImageClassifier checkpoint ---------------------------------------------------------------
def _load_checkpoint(path: Path, options: _Options) -> ServedModel:
    from ml.classifier import ImageClassifier

    classifier = ImageClassifier.load(path, device=options.device, precision=options.precision)
    # The temperature changes the probabilities, not the weights: both make the served version.
    version = content_version(classifier.version, f"temperature={classifier.temperature!r}")
    forward, runtime = options.compile(
        classifier.inference_pass(), classifier.input_shape, key=version
    )
    normalization = classifier.normalization
    channels = classifier.input_shape[0]
    description = ModelDescription(
        name=path.stem,
        version=version,
        form="checkpoint",
        source=str(path),
        input_shape=classifier.input_shape,
        class_names=tuple(classifier.class_names),
        preprocessing=Preprocessing(
            channels=channels,
            mean=tuple(normalization["mean"]),
            std=tuple(normalization["std"]),
            # Fashion-MNIST-like single-channel models see light objects on black.
            auto_invert=channels == 1,
        ),
        precision=options.precision,
        device=str(options.device),
        runtime=runtime,
    )
    return ServedModel(description, forward)


# --- an exported program with a spec beside it ---------------------------------------------------
class _SpecPass(torch.nn.Module):
    """uint8 images → the spec's scaling and normalisation → the program → probabilities."""

    scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, program: torch.nn.Module, spec: ModelSpec, device: torch.device) -> None:
        super().__init__()
        self.program = program
        p = spec.preprocessing
        self.register_buffer("scale", torch.tensor(p.scale, device=device))
        self.register_buffer("mean", torch.tensor(p.mean, device=device).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(p.std, device=device).reshape(1, -1, 1, 1))
        self.softmax = spec.output == "logits"
        self.bf16 = False
        self.device_type = device.type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() * self.scale - self.mean) / self.std
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.program(x)
        output = output.float()
        return torch.softmax(output, dim=1) if self.softmax else output


def _load_exported(path: Path, options: _Options) -> ServedModel:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    spec = read_spec(find_spec(path))
    device = options.device
    try:
        if path.suffix.lower() == ".pt2":
            exported = torch.export.load(str(path))
            if device.type != "cpu":
                from torch.export.passes import move_to_device_pass

                exported = move_to_device_pass(exported, device)
            program: torch.nn.Module = exported.module()
        else:
            with warnings.catch_warnings():
                # TorchScript is the legacy form this loader still accepts: hide exactly torch's
                # notice that it is deprecated, no other warning.
                warnings.filterwarnings(
                    "ignore", message=_TORCHSCRIPT_DEPRECATED, category=FutureWarning
                )
                program = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError or zip errors for a bad file
        raise ModelLoadError(f"{path}: cannot load the program ({exc})") from exc
    # No .eval(): an exported program refuses train()/eval() calls, and is in eval form already.
    whole_pass = _SpecPass(program, spec, device)
    whole_pass.bf16 = options.precision == "bf16"
    version = content_version(path.read_bytes(), json.dumps(spec.to_json(), sort_keys=True))
    if path.suffix.lower() == ".pt2":
        forward, runtime = options.compile(whole_pass, spec.input_shape, key=version)
    else:
        # A TorchScript module already runs its whole graph in one call; export cannot capture it.
        def forward(images: torch.Tensor) -> torch.Tensor:
            return whole_pass(images.to(device, non_blocking=True))

        runtime = "torchscript"
    description = ModelDescription(
        name=spec.name,
        version=version,
        form="exported",
        source=str(path),
        input_shape=spec.input_shape,
        class_names=spec.class_names,
        preprocessing=spec.preprocessing,
        precision=options.precision,
        device=str(device),
        tag=spec.tag,
        runtime=runtime,
    )
    return ServedModel(description, forward)


# --- a Python class ------------------------------------------------------------------------------
def _load_python(source: str, options: _Options) -> ServedModel:
    module_name, _, qualname = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"{source}: cannot import {module_name!r} ({exc}); is its package installed or on PYTHONPATH?"
        ) from exc
    target: Any = module
    for part in qualname.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"{source}: {module_name} has no attribute {qualname!r}")
        target = getattr(target, part)
    if not inspect.isclass(target):
        raise ModelLoadError(f"{source}: {qualname} is not a class")
    missing = [m for m in ("setup", "predict") if not callable(getattr(target, m, None))]
    if missing:
        raise ModelLoadError(
            f"{source}: the class lacks {', '.join(missing)}(); see ml.serving.protocol for what it must provide"
        )
    instance: Any = target()
    instance.setup(options.device)
    shape, class_names = _class_metadata(source, instance)
    preprocessing = _class_preprocessing(source, instance, shape[0])
    version = getattr(instance, "version", None)
    if not isinstance(version, str) or not version:
        version = content_version(_source_bytes(target), qualname)
    forward = _class_forward(instance, options)
    description = ModelDescription(
        name=str(getattr(instance, "name", None) or target.__name__),
        version=version,
        form="python",
        source=source,
        input_shape=shape,
        class_names=class_names,
        preprocessing=preprocessing,
        precision=options.precision,
        device=str(options.device),
        tag=getattr(instance, "tag", None),
        runtime="python",
    )
    return ServedModel(description, forward)


def _class_metadata(source: str, instance: Any) -> tuple[tuple[int, int, int], tuple[str, ...]]:
    shape = tuple(getattr(instance, "input_shape", ()) or ())
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ModelLoadError(
            f"{source}: input_shape must be three positive ints (C, H, W) after setup(), got {shape!r}"
        )
    names = tuple(str(n) for n in (getattr(instance, "class_names", None) or ()))
    if not names:
        raise ModelLoadError(f"{source}: class_names is missing or empty after setup()")
    return (shape[0], shape[1], shape[2]), names


def _class_preprocessing(source: str, instance: Any, channels: int) -> Preprocessing:
    given = getattr(instance, "preprocessing", None)
    if given is None:
        return Preprocessing(channels=channels)
    if isinstance(given, Preprocessing):
        return given
    if not isinstance(given, Mapping):
        raise ModelLoadError(f"{source}: preprocessing must be a dict, got {type(given).__name__}")
    values = dict(given)
    for key in ("mean", "std"):
        if key in values:
            raw = values[key]
            values[key] = tuple(float(v) for v in (raw if isinstance(raw, list | tuple) else [raw]))
    try:
        return Preprocessing(channels=channels, **values)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: preprocessing: {exc}") from exc


def _source_bytes(cls: type) -> bytes:
    try:
        return Path(inspect.getfile(cls)).read_bytes()
    except (OSError, TypeError):  # defined in an interactive session: no file to hash
        return inspect.getsource(cls).encode() if hasattr(cls, "__module__") else b""


def _class_forward(instance: Any, options: _Options) -> Forward:
    preprocess: Callable[[torch.Tensor], Any] | None = getattr(instance, "preprocess", None)
    postprocess: Callable[[Any], Any] | None = getattr(instance, "postprocess", None)
    bf16 = options.precision == "bf16"
    device_type = options.device.type

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            batch: Any = images
            if preprocess is not None:
                batch = torch.stack([torch.as_tensor(preprocess(image)) for image in images])
            output = instance.predict(batch)
            if postprocess is not None:
                output = postprocess(output)
        return torch.as_tensor(output)

    return forward


# --- checked once at load ------------------------------------------------------------------------
def _check_answers(served: ServedModel) -> None:
    """Run batches of one and of three black images: the model must answer each, one row per image
    and one column per class (two sizes, so that a program exported for one batch size is caught)."""
    for count in (1, 3):
        example = torch.zeros((count, *served.input_shape), dtype=torch.uint8)
        try:
            probabilities = served.predict(example)
        except Exception as exc:
            raise ModelLoadError(
                f"{served.description.source}: the model fails on a batch of {count} "
                f"{served.input_shape} uint8 images ({exc}); check input_shape, and export with a "
                "dynamic batch dimension (torch.export.Dim) so that the runner can batch"
            ) from exc
        expected = (count, len(served.class_names))
        if tuple(probabilities.shape) != expected:
            raise ModelSpecError(
                f"{served.description.source}: the model answers shape {tuple(probabilities.shape)} "
                f"for {count} image(s); expected {expected}: one column per class name"
            )
