"""The Makefile's install step: torch from PyTorch's CPU index on request, from pip's own index otherwise.

`make -n` prints the commands without running them, so nothing is installed.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT


def make_dry_run(*variables: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`make -n` of the install step into a fresh virtualenv path: prints the commands, runs none."""
    venv = tmp_path / "venv"
    argv = ["make", "-n", "-B", f"VENV={venv}", *variables, f"{venv}/.installed"]
    return subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False
    )


def torch_install_line(dry_run: subprocess.CompletedProcess[str]) -> str:
    assert dry_run.returncode == 0, dry_run.stderr
    lines = [
        line for line in dry_run.stdout.splitlines() if "pip install" in line and "torch==" in line
    ]
    assert len(lines) == 1, dry_run.stdout
    return lines[0]


def test_makefile_cpu_variant_takes_torch_from_the_cpu_index(tmp_path: Path) -> None:
    """`make run TORCH_VARIANT=cpu` installs torch with pip's --index-url set to PyTorch's CPU index."""
    line = torch_install_line(make_dry_run("TORCH_VARIANT=cpu", tmp_path=tmp_path))
    assert "--index-url https://download.pytorch.org/whl/cpu" in shlex.join(shlex.split(line))


def test_makefile_default_variant_takes_torch_from_the_configured_index(tmp_path: Path) -> None:
    """Without TORCH_VARIANT the torch install names no index, so pip's own configuration applies."""
    line = torch_install_line(make_dry_run(tmp_path=tmp_path))
    assert "--index-url" not in line and "--extra-index-url" not in line


def test_makefile_refuses_an_unknown_torch_variant(tmp_path: Path) -> None:
    """A misspelt TORCH_VARIANT stops make with a message naming the accepted values."""
    result = make_dry_run("TORCH_VARIANT=cuda", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "TORCH_VARIANT=cpu" in result.stderr
