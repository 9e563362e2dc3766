"""The errors a `ModelRunner` gives a caller, each with a stable machine-readable `code`.

RunnerError
├── InvalidInput        the image does not fit the model (shape, dtype); at `submit`
├── DeadlineExceeded    the deadline passed before the image was computed
├── Overloaded          the queue holds `max_queue` images; at `submit`, at once
├── ModelError          the forward pass failed for this image
└── RunnerClosed        `submit` after `close()` (or before `async with`)
"""

from __future__ import annotations

__all__ = [
    "DeadlineExceeded",
    "InvalidInput",
    "ModelError",
    "Overloaded",
    "RunnerClosed",
    "RunnerError",
]


class RunnerError(Exception):
    """Base of every error the runner gives a caller; `code` is stable and machine-readable."""

    code = "runner_error"


class InvalidInput(RunnerError, ValueError):
    """The image cannot be fed to this model (wrong shape or dtype)."""

    code = "invalid_input"


class DeadlineExceeded(RunnerError):
    """The image's deadline passed before it was computed; it was dropped without compute."""

    code = "deadline_exceeded"


class Overloaded(RunnerError):
    """The runner's queue is full; retry later or raise `max_queue` / add workers."""

    code = "overloaded"


class ModelError(RunnerError):
    """The model's forward pass failed for this image."""

    code = "model_error"


class RunnerClosed(RunnerError):
    """The runner is not running (closed, or used outside `async with`)."""

    code = "runner_closed"
