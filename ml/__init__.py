"""Model side of fmnist-service: data sets, the `ImageClassifier`, training, checkpoints, batched inference.

`import ml` does not import torch: each public name is imported from its module on first use
(PEP 562), so the gateway can use the torch-free `ml.readers` and the names built on it.

Exceptions:

    CheckpointError                 (ml.readers) a checkpoint could not be loaded
    ├── CheckpointNotFoundError
    ├── CorruptCheckpointError
    └── IncompatibleCheckpointError
    DataError                       (ml.readers) Fashion-MNIST files missing or corrupt
    RunnerError                     (ml.runner) one image could not be classified by the ModelRunner
    ├── DeadlineExceeded
    ├── InvalidInput
    ├── ModelError
    ├── Overloaded
    └── RunnerClosed
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ml.calibration import CalibrationReport, expected_calibration_error, fit_temperature
    from ml.classifier import ImageClassifier
    from ml.data import (
        FashionMNISTSplits,
        TensorImageDataset,
        fashion_mnist_splits,
        load_fashion_mnist,
    )
    from ml.model import ArchitectureConfig
    from ml.predictor import BatchPredictor
    from ml.readers import (
        CLASS_NAMES,
        CheckpointError,
        CheckpointNotFoundError,
        CorruptCheckpointError,
        DataError,
        IncompatibleCheckpointError,
    )
    from ml.runner import (
        DeadlineExceeded,
        InvalidInput,
        ModelError,
        ModelRunner,
        Overloaded,
        Prediction,
        RunnerClosed,
        RunnerError,
        RunnerStats,
    )
    from ml.training import EvaluationResult, TrainConfig, TrainingHistory

# Where each public name lives; the torch-free ones come from `ml.readers`.
_MODULE_OF = {
    "CLASS_NAMES": "ml.readers",
    "ArchitectureConfig": "ml.model",
    "BatchPredictor": "ml.predictor",
    "CalibrationReport": "ml.calibration",
    "CheckpointError": "ml.readers",
    "CheckpointNotFoundError": "ml.readers",
    "CorruptCheckpointError": "ml.readers",
    "DataError": "ml.readers",
    "DeadlineExceeded": "ml.runner",
    "EvaluationResult": "ml.training",
    "FashionMNISTSplits": "ml.data",
    "ImageClassifier": "ml.classifier",
    "IncompatibleCheckpointError": "ml.readers",
    "InvalidInput": "ml.runner",
    "ModelError": "ml.runner",
    "ModelRunner": "ml.runner",
    "Overloaded": "ml.runner",
    "Prediction": "ml.runner",
    "RunnerClosed": "ml.runner",
    "RunnerError": "ml.runner",
    "RunnerStats": "ml.runner",
    "TensorImageDataset": "ml.data",
    "TrainConfig": "ml.training",
    "TrainingHistory": "ml.training",
    "expected_calibration_error": "ml.calibration",
    "fashion_mnist_splits": "ml.data",
    "fit_temperature": "ml.calibration",
    "load_fashion_mnist": "ml.data",
}

__all__ = [
    "CLASS_NAMES",
    "ArchitectureConfig",
    "BatchPredictor",
    "CalibrationReport",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DataError",
    "DeadlineExceeded",
    "EvaluationResult",
    "FashionMNISTSplits",
    "ImageClassifier",
    "IncompatibleCheckpointError",
    "InvalidInput",
    "ModelError",
    "ModelRunner",
    "Overloaded",
    "Prediction",
    "RunnerClosed",
    "RunnerError",
    "RunnerStats",
    "TensorImageDataset",
    "TrainConfig",
    "TrainingHistory",
    "expected_calibration_error",
    "fashion_mnist_splits",
    "fit_temperature",
    "load_fashion_mnist",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562) and cache the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ml' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
