"""Model side of fmnist-service: data sets, the `ImageClassifier`, training, checkpoints, batched inference.

Exceptions:

    CheckpointError                 (ml.checkpoint) a checkpoint could not be loaded
    ├── CheckpointNotFoundError
    ├── CorruptCheckpointError
    └── IncompatibleCheckpointError
    DataError                       (ml.data) Fashion-MNIST files missing or corrupt
    RunnerError                     (ml.runner) one image could not be classified by the ModelRunner
    ├── DeadlineExceeded
    ├── InvalidInput
    ├── ModelError
    ├── Overloaded
    └── RunnerClosed
"""

from ml.calibration import CalibrationReport, expected_calibration_error, fit_temperature
from ml.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from ml.classifier import ImageClassifier
from ml.data import (
    CLASS_NAMES,
    DataError,
    FashionMNISTSplits,
    TensorImageDataset,
    fashion_mnist_splits,
    load_fashion_mnist,
)
from ml.model import ArchitectureConfig
from ml.runner import (
    BatchPredictor,
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
