"""`fmnist worker` refuses what cannot work, at once, saying what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def fmnist_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_missing_checkpoint_fails_before_the_broker_is_tried(tmp_path: Path) -> None:
    """No model file: exit 1 at once (the broker address is never waited on), naming the setting."""
    missing = tmp_path / "missing.safetensors"
    result = fmnist_worker("--broker", "kafka://127.0.0.1:9", "--model", str(missing))
    assert result.returncode == 1
    assert "event=worker_failed" in result.stderr
    assert "FMNIST_MODEL_PATH" in result.stderr


def test_the_in_process_memory_broker_is_refused_with_the_alternative() -> None:
    """memory:// cannot reach another process: exit 2 and point to `fmnist serve` or Kafka."""
    result = fmnist_worker("--broker", "memory://")
    assert result.returncode == 2
    assert "fmnist serve" in result.stderr


def test_an_invalid_flag_value_names_the_setting() -> None:
    """--max-batch-size 0 is rejected before anything starts, naming the field and its limit."""
    result = fmnist_worker("--max-batch-size", "0")
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr


def test_the_worker_takes_the_batching_flags_serve_takes() -> None:
    """`fmnist worker` has serve's batching flags, and they override FMNIST_* variables."""
    from app.cli import build_parser
    from app.cli.prologue import BATCHING_FLAGS, batching_overrides, settings_from

    args = build_parser().parse_args(
        ["worker", "--preferred-batch-size", "4", "--inference-concurrency", "3"]
    )
    assert set(batching_overrides(args)) == {name for name, *_ in BATCHING_FLAGS.values()}
    settings = settings_from(batching_overrides(args))
    assert settings.preferred_batch_size == 4 and settings.inference_concurrency == 3
