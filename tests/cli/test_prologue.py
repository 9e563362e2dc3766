"""app/cli/prologue.py: what every server command does first (settings, exit 2, GC tuning)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.cli.prologue import tune_garbage_collector


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_threshold_is_applied_and_startup_objects_are_frozen() -> None:
    """A positive threshold replaces the young generation's and moves live objects out of collection."""
    older = gc.get_threshold()[1:]
    tune_garbage_collector(200_000)
    assert gc.get_threshold() == (200_000, *older)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restore_gc")
def test_zero_keeps_pythons_defaults() -> None:
    """FMNIST_GC_THRESHOLD=0 leaves the collector alone."""
    before = gc.get_threshold()
    tune_garbage_collector(0)
    assert gc.get_threshold() == before


@pytest.mark.parametrize("command", ["serve", "gateway", "worker"])
def test_every_server_command_reports_an_invalid_setting_on_stderr_and_exits_2(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared prologue: an invalid FMNIST_ variable gives exit 2 and names the setting."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    monkeypatch.setenv("FMNIST_MAX_QUEUED_IMAGES", "0")
    result = subprocess.run(
        [sys.executable, "-m", "app", command],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (
        f"fmnist {command}: invalid setting" in result.stderr
        and "FMNIST_MAX_QUEUED_IMAGES" in result.stderr
    )
