"""The `ml` package: its public names, and that importing it leaves torch unloaded."""

from __future__ import annotations

import subprocess
import sys

import ml

PUBLIC_NAMES = [
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


def modules_loaded_after(code: str) -> set[str]:
    """The module names a fresh interpreter holds after running `code`."""
    report = "import sys; print('\\n'.join(sys.modules))"
    finished = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}"], capture_output=True, text=True, check=True
    )
    return set(finished.stdout.split())


def test_import_ml_and_ml_readers_leave_torch_unloaded() -> None:
    """`import ml` and `import ml.readers` import no torch in a fresh interpreter."""
    loaded = modules_loaded_after("import ml\nimport ml.readers")
    assert "ml.readers" in loaded
    assert "torch" not in loaded


def test_a_torch_backed_name_imports_torch_on_first_use() -> None:
    """Using `ml.ImageClassifier` imports its module (and torch) only then."""
    loaded = modules_loaded_after("import ml\nml.ImageClassifier")
    assert {"torch", "ml.classifier"} <= loaded


def test_public_names_are_unchanged_and_each_resolves() -> None:
    """`ml.__all__` is the same sorted list as before the lazy import, and every name resolves."""
    assert ml.__all__ == PUBLIC_NAMES
    for name in ml.__all__:
        assert getattr(ml, name) is not None, name


def test_exceptions_are_the_same_class_from_every_module() -> None:
    """`ml.DataError` and the checkpoint errors are the classes `ml.data`/`ml.checkpoint` raise."""
    import ml.checkpoint
    import ml.data

    assert ml.data.DataError is ml.DataError
    assert ml.checkpoint.CorruptCheckpointError is ml.CorruptCheckpointError


def test_an_unknown_name_is_an_attribute_error() -> None:
    """A name `ml` does not export raises AttributeError naming it."""
    try:
        ml.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("ml.NoSuchThing resolved")
