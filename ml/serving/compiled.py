"""The CPU runtime of every form: the whole pass exported (`torch.export`) and compiled ahead of time by
AOTInductor into a shared library, cached on disk, run as one call that lets go of the GIL
(`ml.serving.gil_free`: the package loader's own binding keeps it for the whole call).

Why: an eager pass takes the GIL back between every op, so in a worker whose event loop keeps the GIL
busy each batch waits on the loop many times over. The frozen TorchScript graph that avoided this is
deprecated; of its successors, AOTInductor ran fastest beside a busy Python thread, and `torch.compile`
still takes the GIL between kernels (figures and commands: `bench/gil_contention.py` in
docs/benchmarks.md). Compiling needs a C++ compiler (g++) in the worker image; it costs seconds once per
(model, precision, torch build, CPU), and the package is cached so that later starts load it at once.
Where export or compilation fails, the pass stays eager and a warning says why. A new package is first
loaded and run in a child process (loading one has crashed the whole process on some torch builds and
machines, a fault no `except` catches); only a package that passed is loaded here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ml.serving import gil_free
from ml.serving.gil_free import GilFreeProgram, gil_free_program
from ml.serving.served import content_version

__all__ = ["RUNTIMES", "aot_compiled", "default_cache_dir"]

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "aoti", "eager")
Forward = Callable[[torch.Tensor], torch.Tensor]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fmnist-service/aoti` (`~/.cache/fmnist-service/aoti` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fmnist-service" / "aoti"


def aot_compiled(
    whole_pass: torch.nn.Module,
    example: torch.Tensor,
    *,
    key: str,
    cache_dir: Path | None = None,
    runners: int = 1,
) -> tuple[Forward, str]:
    """`whole_pass` (uint8 N×C×H×W → N×K, on the CPU) as an AOTInductor program, and the runtime's
    name: "aoti", or "eager" where it could not be built. `key` names what the program computes
    (model version and precision); `runners` is how many calls may run at once."""
    directory = cache_dir or default_cache_dir()
    package = directory / (
        content_version(
            key,
            torch.__version__,
            torch.backends.cpu.get_cpu_capability(),
            str(tuple(example.shape[1:])),
            str(example.dtype),
        )
        + ".pt2"
    )
    verified = package.with_suffix(".verified")
    failed = package.with_suffix(".failed")
    if failed.is_file():  # a failure is remembered, so that each start does not compile again
        logger.warning(
            "event=aoti_unavailable error=%r action=eager remembered=%s",
            failed.read_text(errors="replace").strip(),
            failed,
        )
        return whole_pass, "eager"
    started = time.perf_counter()
    try:
        cached = verified.is_file() and package.is_file()
        if not cached:
            _compile(whole_pass, example, package)
            try:
                _verify_in_child(package, example)
            except RuntimeError as exc:
                failed.write_text(f"{exc}\n")
                raise
            verified.touch()
        from torch._inductor.package import load_package

        program: Forward = load_package(str(package), num_runners=max(1, runners))
        with torch.inference_mode():
            program(example)
        program = gil_free_program(package, runners, example) or program
    except Exception as exc:  # no compiler, an op AOTInductor cannot lower, a damaged cache file
        logger.warning("event=aoti_unavailable error=%r action=eager", exc)
        return whole_pass, "eager"
    logger.info(
        "event=aoti_ready package=%s cached=%s gil_free=%s seconds=%.1f",
        package,
        cached,
        isinstance(program, GilFreeProgram),
        time.perf_counter() - started,
    )
    return program, "aoti"


# Loads a package and runs it once on zeros of the example's shape ("loaded" once it worked), then
# checks the GIL-free call (`ml.serving.gil_free.CHECK`): one child process for both checks.
_VERIFY = (
    """
import sys, torch
from torch._inductor.package import load_package
shape = tuple(int(d) for d in sys.argv[2].split(","))
with torch.inference_mode():
    load_package(sys.argv[1])(torch.zeros(shape, dtype=getattr(torch, sys.argv[3])))
print("loaded", flush=True)
"""
    + gil_free.CHECK
)


def _verify_in_child(package: Path, example: torch.Tensor) -> None:
    """Load and run `package` in a child process first; a crash there is a RuntimeError here. The
    child's verdict on the GIL-free call is remembered beside the package (`.gilfree`)."""
    result = gil_free.trial_run(_VERIFY, package, example)
    if "loaded" not in result.stdout.splitlines():
        package.unlink(missing_ok=True)
        raise RuntimeError(
            f"the compiled program failed its trial run in a child process "
            f"(exit status {result.returncode}): {gil_free.last_line(result.stderr)}"
        )
    package.with_suffix(".gilfree").write_text(gil_free.verdict_of(result))


def _compile(whole_pass: torch.nn.Module, example: torch.Tensor, package: Path) -> None:
    """Export with a dynamic batch dimension, compile, and move the package into place atomically."""
    # AUTO: the batch dimension keeps whatever bounds an exported program inside already has.
    with torch.no_grad():
        program = torch.export.export(
            whole_pass, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
        )
    package.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".pt2", dir=package.parent)
    os.close(handle)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=temporary)
        os.replace(temporary, package)
    finally:
        Path(temporary).unlink(missing_ok=True)
