"""The project's wheel, built from what the Dockerfile's builder copies, carries the shipped model and
finds it when installed outside the checkout (as in every image)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# What the Dockerfile's builder stage copies before `pip wheel .` (links in ml/shipped/ need models/).
WHEEL_SOURCES = ["pyproject.toml", "README.md", "app", "ml", "messaging", "models"]


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the paths the Dockerfile's builder copies (offline, venv's setuptools), unpacked.

    A copy, not the checkout: a stale build/ there would hide a file missing from the package data.
    """
    source = tmp_path_factory.mktemp("source")
    for path in WHEEL_SOURCES:
        if (REPO_ROOT / path).is_dir():
            shutil.copytree(
                REPO_ROOT / path,
                source / path,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy2(REPO_ROOT / path, source / path)
    wheel_dir = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run(
        [*argv, "-w", str(wheel_dir), str(source)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("fmnist_service-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


@pytest.mark.parametrize("name", ["fmnist.safetensors", "fmnist.md"])
def test_wheel_carries_the_shipped_model(unpacked_wheel: Path, name: str) -> None:
    """The wheel holds the shipped checkpoint and its model card, byte for byte as in models/."""
    shipped = unpacked_wheel / "ml" / "shipped" / name
    assert shipped.is_file(), f"the wheel has no ml/shipped/{name}"
    assert shipped.read_bytes() == (REPO_ROOT / "models" / name).read_bytes()


def test_default_model_path_is_the_installed_checkpoint_outside_the_checkout(
    unpacked_wheel: Path, tmp_path: Path
) -> None:
    """From a directory without models/, the installed package's default FMNIST_MODEL_PATH is its own copy."""
    probe = "from app.settings import Settings; print(Settings().model_path.resolve())"
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("FMNIST_") and name != "PYTHONPATH"
    }
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**environment, "PYTHONPATH": str(unpacked_wheel)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        Path(result.stdout.strip()) == (unpacked_wheel / "ml/shipped/fmnist.safetensors").resolve()
    )
