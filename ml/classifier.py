"""`ImageClassifier`: build, train, evaluate, predict, save and load one image classification model."""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import platform
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ml.calibration import CalibrationReport, calibration_report, fit_temperature
from ml.checkpoint import (
    IncompatibleCheckpointError,
    read_checkpoint,
    weights_version,
    write_checkpoint,
)
from ml.data import TensorImageDataset
from ml.model import (
    ArchitectureConfig,
    ConvNet,
    bf16_for_inference,
    count_parameters,
    fused_for_inference,
)
from ml.training import (
    EvaluationResult,
    TrainConfig,
    TrainingHistory,
    channel_statistics,
    fingerprint,
    materialise,
    network_logits,
)
from ml.training import evaluate as evaluate_network
from ml.training import fit as fit_network

PRECISIONS = ("fp32", "bf16")

logger = logging.getLogger(__name__)


class _Probabilities(torch.nn.Module):
    """The whole inference pass as one module: layout, network, temperature, softmax. `ml.serving`
    compiles it into one program (the temperature, a buffer, becomes a constant of that program)."""

    temperature: torch.Tensor

    def __init__(self, network: ConvNet, temperature: float) -> None:
        super().__init__()
        self.network = network
        device = network.classifier.weight.device
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.network(batch).float() / self.temperature, dim=1)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ImageClassifier:
    """A CNN image classifier for C×H×W images, with its class names and input normalisation built in.

    >>> clf = ImageClassifier(num_channels=3, num_classes=4, image_size=(16, 16))
    >>> history = clf.fit(train_set, val_set, epochs=5)      # any Dataset of (C×H×W image, label)
    >>> clf.predict(images)                                   # uint8 or float N×C×H×W → N×4 probabilities
    >>> clf.save("model.safetensors"); ImageClassifier.load("model.safetensors")

    On the CPU `predict` may be called from several threads at once (the worker runs passes side by side).
    """

    def __init__(
        self,
        num_channels: int = 1,
        num_classes: int = 10,
        image_size: tuple[int, int] = (28, 28),
        class_names: Sequence[str] | None = None,
        *,
        widths: Sequence[int] = (16, 32, 64, 128),
        convs_per_stage: Sequence[int] = (2, 2, 2, 1),
        head: str = "flatten",
        dropout: float = 0.0,
        seed: int = 0,
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> None:
        config = ArchitectureConfig(
            num_channels=num_channels,
            num_classes=num_classes,
            image_size=(int(image_size[0]), int(image_size[1])),
            widths=tuple(int(w) for w in widths),
            convs_per_stage=tuple(int(c) for c in convs_per_stage),
            head=head,
            dropout=dropout,
        )
        names = (
            [str(n) for n in class_names]
            if class_names is not None
            else [str(i) for i in range(num_classes)]
        )
        self._setup(config, names, seed, device)
        self.precision = precision

    def _setup(
        self,
        config: ArchitectureConfig,
        class_names: list[str],
        seed: int,
        device: str | torch.device | None,
    ) -> None:
        if len(class_names) != config.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {config.num_classes} classes")
        self.config = config
        self.class_names = class_names
        self.seed = seed
        self.device = torch.device(device) if device is not None else default_device()
        # Initialise from `seed` without disturbing the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = ConvNet(config)
        self.network.to(self.device).to(memory_format=torch.channels_last).eval()
        self.metrics: dict[str, float] = {}
        self.training: dict[str, Any] = {}
        # What `calibrate` measured on held-out data (temperature, NLL and ECE before and after).
        self.calibration: dict[str, Any] = {}
        self._temperature = 1.0
        # Several forward threads may ask for the same pass at once: it is built once.
        self._pass_lock = threading.Lock()
        # The whole inference pass for each precision; see `inference_pass`.
        self._passes: dict[str, _Probabilities] = {}
        self._version: str | None = None
        self._precision = "fp32"

    # --- the shared interface -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images `predict` takes."""
        return (self.config.num_channels, *self.config.image_size)

    @property
    def version(self) -> str:
        """First 12 hex chars of the sha256 of the weights: changes exactly when the weights do (the
        served version, `ml.serving`, also covers the temperature)."""
        if self._version is None:
            self._version = weights_version(self.network.state_dict())
        return self._version

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.network)

    @property
    def normalization(self) -> dict[str, list[float]]:
        mean, std = self.network.normalize.statistics()
        return {"mean": mean, "std": std}

    @property
    def precision(self) -> str:
        """Arithmetic of `predict` and `evaluate`: "fp32", or "bf16" (convs and matmuls in bfloat16).

        bf16 is several times faster on CPUs with AVX512-BF16/AMX (and on recent GPUs); probabilities
        move by < 0.01 and test accuracy by a few hundredths of a point (the model card gives both).
        """
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
        self._precision = value

    @property
    def temperature(self) -> float:
        """Logits are divided by this before the softmax: 1.0 until `calibrate` fits it on held-out data.

        It changes the probabilities `predict` returns, never their argmax, so never the accuracy.
        """
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be a positive finite number, got {value!r}")
        self._temperature = float(value)
        self._forget_compiled()

    def _forget_compiled(self) -> None:
        """Drop the inference passes, after the weights or the temperature change."""
        with self._pass_lock:
            self._passes = {}

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self._precision == "bf16"
        )

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W (0..255) or float (0..1) images → float32 N×num_classes probabilities on the CPU."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            c, h, w = self.input_shape
            raise ValueError(f"images must be N×{c}×{h}×{w}, got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
        if images.is_floating_point() and images.dtype != torch.float32:
            images = images.float()
        with torch.inference_mode():
            probabilities = self.inference_pass()(images.to(self.device))
        return probabilities.float().cpu()

    def inference_pass(self, precision: str | None = None) -> torch.nn.Module:
        """The whole pass of `predict` as one eval-mode module (BatchNorm folded into the convs,
        temperature, softmax): uint8 or float N×C×H×W on `device` → N×K probabilities, at `precision`
        (default: the classifier's). What `ml.serving` compiles for serving.

        For bf16 it holds a copy with bfloat16 convs and linear layers: the numbers `torch.autocast`
        gives, without casting the weights on every call (checked by tests), and a pass that
        `torch.export` can capture whole.
        """
        chosen = self._precision if precision is None else precision
        if chosen not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {chosen!r}")
        whole_pass = self._passes.get(chosen)
        if whole_pass is None:
            with self._pass_lock:
                whole_pass = self._passes.get(chosen)
                if whole_pass is None:
                    network = fused_for_inference(self.network)
                    if chosen == "bf16":
                        network = bf16_for_inference(network)
                    whole_pass = _Probabilities(network, self._temperature).eval()
                    self._passes[chosen] = whole_pass
        return whole_pass

    # --- training and evaluation ----------------------------------------------------------------
    def fit(
        self,
        train_dataset: Dataset[Any],
        val_dataset: Dataset[Any] | None = None,
        *,
        epochs: int = 20,
        config: TrainConfig | None = None,
        calibrate: bool = True,
        **overrides: Any,
    ) -> TrainingHistory:
        """Train on `train_dataset` (items `(C×H×W image, label)`, uint8 or float [0, 1] images).

        Reports validation accuracy after every epoch when `val_dataset` is given, and then (unless
        `calibrate=False`) fits the temperature on it (`calibrate`). Hyperparameters come
        from `config` (a `TrainConfig`) or keyword overrides such as `lr=0.1, batch_size=128`.
        Deterministic for a given seed on a given device and thread count.
        """
        settings = config or TrainConfig(epochs=epochs, seed=self.seed, **overrides)
        train_images, train_labels = materialise(train_dataset, self.input_shape, self.num_classes)
        val_images = val_labels = None
        if val_dataset is not None:
            val_images, val_labels = materialise(val_dataset, self.input_shape, self.num_classes)
        mean, std = channel_statistics(train_images)
        self.network.normalize.set_statistics(mean, std)
        self.temperature = 1.0  # a temperature fitted to other weights means nothing for these
        self.calibration = {}
        self._version = None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            history = fit_network(
                self.network,
                train_images,
                train_labels,
                val_images,
                val_labels,
                self.num_classes,
                settings,
                self.device,
            )
        history.data_hash = fingerprint(train_images, train_labels)
        self.training = {
            "config": {k: v for k, v in vars(settings).items() if k != "progress"},
            "history": history.to_json(),
            "seed": settings.seed,
            "data_hash": history.data_hash,
            "device": self._hardware(),
            "threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if history.epochs and history.epochs[-1].val_accuracy is not None:
            self.metrics["val_accuracy"] = float(history.epochs[-1].val_accuracy)
        self._forget_compiled()
        if calibrate and val_images is not None and val_labels is not None and len(val_labels):
            self.calibrate(TensorImageDataset(val_images, val_labels, self.class_names))
        return history

    def logits(
        self, dataset: Dataset[Any], batch_size: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 N×K logits (before the temperature, fp32 arithmetic) and the N labels of `dataset`."""
        images, labels = materialise(dataset, self.input_shape, self.num_classes)
        return network_logits(self.network, images, self.device, batch_size), labels

    def calibrate(self, dataset: Dataset[Any]) -> CalibrationReport:
        """Fit the temperature on held-out `dataset` (never the training set), use it from now on, and
        record what it did in `calibration`. Returns the NLL and ECE on `dataset` before and after."""
        logits, labels = self.logits(dataset)
        report = calibration_report(logits, labels, fit_temperature(logits, labels))
        self.temperature = report.temperature
        self.calibration = {**report.to_json(), "fitted_on": "validation split"}
        logger.info(
            "event=calibrated temperature=%.4f images=%d ece_before=%.4f ece_after=%.4f",
            report.temperature,
            report.num_samples,
            report.before.ece,
            report.after.ece,
        )
        return report

    def calibration_report(self, dataset: Dataset[Any]) -> CalibrationReport:
        """NLL and ECE of the probabilities on labelled `dataset` without (T = 1) and with the temperature."""
        logits, labels = self.logits(dataset)
        return calibration_report(logits, labels, self._temperature)

    def evaluate(self, dataset: Dataset[Any], batch_size: int = 1024) -> EvaluationResult:
        """Accuracy, loss, per-class accuracy and confusion matrix on a labelled dataset."""
        images, labels = materialise(dataset, self.input_shape, self.num_classes)
        with self._autocast():
            return evaluate_network(
                self.network,
                images,
                labels,
                self.num_classes,
                self.device,
                batch_size,
                temperature=self._temperature,
            )

    def _hardware(self) -> str:
        if self.device.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self.device)}"
        return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"

    # --- persistence ----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Everything stored beside the weights in a checkpoint."""
        return {
            "version": self.version,
            "architecture": self.config.to_json(),
            "input_shape": list(self.input_shape),
            "class_names": self.class_names,
            "normalization": {**self.normalization, "input": "uint8 0..255 or float 0..1, N×C×H×W"},
            "metrics": self.metrics,
            "temperature": self._temperature,
            "calibration": self.calibration,
            "training": self.training,
            "seed": self.seed,
            "data_hash": self.training.get("data_hash"),
            "num_parameters": self.num_parameters,
            "multiply_accumulates": self.config.multiply_accumulates(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a `.safetensors` checkpoint (weights + JSON metadata), atomically."""
        self.network.eval()
        write_checkpoint(path, self.network.state_dict(), self.metadata())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> ImageClassifier:
        """Read a checkpoint written by `save`; raises a `CheckpointError` subclass for a bad file.

        `precision="bf16"` makes `predict` and `evaluate` compute in bfloat16 (see `precision`).
        """
        tensors, metadata = read_checkpoint(path)
        try:
            config = ArchitectureConfig.from_json(metadata["architecture"])
            class_names = [str(n) for n in metadata["class_names"]]
            seed = int(metadata.get("seed", 0))
            # Checkpoints written before calibration existed have no temperature: plain softmax.
            temperature = float(metadata.get("temperature", 1.0))
            if not (math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"temperature must be positive, got {temperature}")
        except (KeyError, TypeError, ValueError) as exc:
            raise IncompatibleCheckpointError(
                f"{path}: the architecture metadata is missing or invalid ({exc}); retrain with `fmnist train`"
            ) from exc
        classifier = cls.__new__(cls)
        try:
            classifier._setup(config, class_names, seed, device)
        except ValueError as exc:
            raise IncompatibleCheckpointError(f"{path}: {exc}") from exc
        try:
            classifier.network.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise IncompatibleCheckpointError(
                f"{path}: the weights do not fit the architecture recorded in the same file: {exc}"
            ) from exc
        classifier.network.to(classifier.device).to(memory_format=torch.channels_last).eval()
        classifier.metrics = {k: float(v) for k, v in (metadata.get("metrics") or {}).items()}
        classifier.training = dict(metadata.get("training") or {})
        classifier.calibration = dict(metadata.get("calibration") or {})
        classifier.temperature = temperature
        classifier._version = metadata["version"]
        classifier.precision = precision
        return classifier

    def __repr__(self) -> str:
        return (
            f"ImageClassifier(input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"version={self.version!r}, device={self.device})"
        )
