"""The import layering (pyproject's [tool.importlinter]) holds, and a forbidden import breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the tree at `root`, with the SDK importable as a root package."""
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (import-linter)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "clients/python")])}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def copy_of_the_tree(destination: Path) -> Path:
    """The packages the contracts name, and pyproject.toml, copied to `destination`."""
    ignore = shutil.ignore_patterns("__pycache__", "shipped", "static")
    for package in ("app", "ml", "messaging", "clients/python/fmnist_client"):
        shutil.copytree(REPO_ROOT / package, destination / package, ignore=ignore)
    shutil.copy(REPO_ROOT / "pyproject.toml", destination)
    return destination


def test_every_layering_contract_is_kept() -> None:
    """`lint-imports` on this tree: every contract kept."""
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " broken" in result.stdout and "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "reported"),
    [
        (
            "app/gateway/errors.py",
            "import torch",
            "app.gateway is not allowed to import torch",
        ),
        (
            "app/gateway/metrics.py",
            "import app.worker.consumer",
            "app.gateway is not allowed to import app.worker",
        ),
        ("app/gateway/demo.py", "import ml.data", "app.gateway is not allowed to import ml:"),
        ("ml/readers.py", "import torch", "ml.readers is not allowed to import torch"),
        ("app/rollout/compare.py", "import torch", "app.rollout is not allowed to import torch"),
        (
            "messaging/memory.py",
            "import app.settings",
            "messaging is not allowed to import app",
        ),
        (
            "clients/python/fmnist_client/_models.py",
            "import app.protocol",
            "fmnist_client is not allowed to import app",
        ),
        (
            "app/settings.py",
            "import app.gateway.errors",
            "app.settings is not allowed to import app.gateway",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, bad_import: str, reported: str
) -> None:
    """One forbidden import added to a copy of the tree makes lint-imports fail, naming it."""
    root = copy_of_the_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{bad_import}  # noqa\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert reported in result.stdout, result.stdout
