"""Shared fixtures and the rule for missing services: skip locally, fail in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIPPED_CHECKPOINT = REPO_ROOT / "models" / "fmnist.safetensors"

pytest_plugins = ["tests.brokers"]


def services_required() -> bool:
    """True in CI (`FMNIST_REQUIRE_SERVICES=1`): a missing broker or data set fails the run."""
    return os.environ.get("FMNIST_REQUIRE_SERVICES", "") not in ("", "0", "false", "no")


def missing_service(reason: str) -> None:
    """Skip the test, or fail it when services are required."""
    if services_required():
        pytest.fail(f"required service missing (FMNIST_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The directory holding the four real Fashion-MNIST IDX files."""
    candidates = [os.environ.get("FMNIST_DATA_DIR"), str(DEBIAN_DATA_DIR)]
    for candidate in candidates:
        if candidate and (Path(candidate) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    missing_service(
        "Fashion-MNIST files not found; run `apt-get install dataset-fashion-mnist` or set FMNIST_DATA_DIR"
    )
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    """The trained checkpoint in models/."""
    if not SHIPPED_CHECKPOINT.is_file():
        pytest.fail(f"the shipped checkpoint {SHIPPED_CHECKPOINT} is missing")
    return SHIPPED_CHECKPOINT
