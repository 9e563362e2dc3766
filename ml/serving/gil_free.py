"""An AOTInductor package's model called through its C interface, with the GIL let go for the call.

Why: `torch._inductor.package.load_package` runs the compiled model through a pybind binding that
keeps the GIL for the whole forward pass, so a worker's event loop stops while a batch computes and two
passes never overlap (one thread each, side by side: no faster than one; docs/benchmarks.md). The
package's shared library exports a C interface (`AOTInductorModelContainer*`, the one torch's own
runners call); ctypes releases the GIL around a foreign call, so the same compiled code runs beside
the event loop and beside the other passes.

The library is copied out of the package once, next to it. A container is checked in a child process
before it is used here (as the package itself is, `ml.serving.compiled`), against the loader's answer
on a random batch; where anything differs or fails, the loader's program stays in use.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import tempfile
import weakref
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["GilFreeProgram", "gil_free_program"]

_Handle = ctypes.c_void_p
_Handles = ctypes.POINTER(ctypes.c_void_p)

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class GilFreeProgram:
    """Calls the model container of an AOTInductor library: one uint8 batch in, one tensor out.
    `runners` calls may compute at once (the container holds that many model instances)."""

    def __init__(self, library: Path, runners: int) -> None:
        lib = ctypes.CDLL(str(library))  # CDLL, not PyDLL: calls let go of the GIL
        create = lib.AOTInductorModelContainerCreateWithDevice
        create.argtypes = [
            ctypes.POINTER(_Handle),
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_char_p,
        ]
        create.restype = ctypes.c_int32
        run = lib.AOTInductorModelContainerRun
        run.argtypes = [
            _Handle,
            _Handles,
            ctypes.c_size_t,
            _Handles,
            ctypes.c_size_t,
            _Handle,
            _Handle,
        ]
        run.restype = ctypes.c_int32
        counts = {}
        for what in ("Inputs", "Outputs"):
            count_of = getattr(lib, f"AOTInductorModelContainerGetNum{what}")
            count_of.argtypes = [_Handle, ctypes.POINTER(ctypes.c_size_t)]
            count_of.restype = ctypes.c_int32
            counts[what] = count_of
        delete = lib.AOTInductorModelContainerDelete
        delete.argtypes = [_Handle]
        delete.restype = ctypes.c_int32

        handle = _Handle()
        _check(create(ctypes.byref(handle), max(1, runners), b"cpu", None), "create the container")
        self._finalizer = weakref.finalize(self, delete, handle)
        for what, count_of in counts.items():
            count = ctypes.c_size_t()
            _check(count_of(handle, ctypes.byref(count)), f"count the {what.lower()}")
            if count.value != 1:
                raise RuntimeError(f"the compiled program has {count.value} {what.lower()}, not 1")
        self._lib = lib  # the library stays loaded while the container lives
        self._run = run
        self._handle = handle

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The container takes ownership of the input handle and hands over the output's.
        (capsule,) = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([images.contiguous()])
        inputs = (_Handle * 1)(_capsule_pointer(capsule, None))
        outputs = (_Handle * 1)()
        _check(self._run(self._handle, inputs, 1, outputs, 1, None, None), "run")
        (probabilities,) = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [_new_capsule(outputs[0], None, None)]
        )
        return probabilities

    def close(self) -> None:
        self._finalizer()


def _check(error: int, what: str) -> None:
    if error != 0:
        raise RuntimeError(f"the compiled program could not {what} (AOTInductor error {error})")


def library_of(package: Path) -> Path:
    """The package's shared library, copied out next to it (once, atomically)."""
    library = package.with_suffix(".so")
    if library.is_file():
        return library
    with zipfile.ZipFile(package) as archive:
        names = [name for name in archive.namelist() if name.endswith(".so")]
        if len(names) != 1:
            raise RuntimeError(f"expected one shared library in {package}, found {len(names)}")
        data = archive.read(names[0])
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=package.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, library)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return library


def gil_free_program(package: Path, runners: int, example: torch.Tensor) -> GilFreeProgram | None:
    """`package`'s model behind ctypes, or None (logged) where it is unavailable or answers other
    than the package loader does. A child process checks it once per package (a marker beside it)."""
    marker = package.with_suffix(".gilfree")
    try:
        if not marker.is_file():
            # A package cached before this check: one child for it now.
            marker.write_text(verdict_of(trial_run(CHECK, package, example)))
        verdict = marker.read_text().strip()
        if verdict != "ok":
            logger.info("event=aoti_gil_free_unavailable reason=%r remembered=%s", verdict, marker)
            return None
        program = GilFreeProgram(library_of(package), runners)
        with torch.inference_mode():
            program(example)
        return program
    except Exception as exc:  # an unusual torch build or library: the loader's program still works
        logger.warning("event=aoti_gil_free_unavailable error=%r", exc)
        return None


def answers_as_the_loader(package: Path, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """None when `package` answers a random batch through the C interface exactly as through the
    package loader; else why not. Run in a child process: a wrong call can crash its process."""
    from torch._inductor.package import load_package

    images = torch.randint(0, 256, (8, *shape[1:]), dtype=torch.int32).to(dtype)
    with torch.inference_mode():
        expected = load_package(str(package))(images)
        got = GilFreeProgram(library_of(package), 1)(images)
    if got.shape != expected.shape or got.dtype != expected.dtype or not torch.equal(got, expected):
        return "the C interface answered other than the package loader"
    return None


# Prints the verdict of `answers_as_the_loader` for the package in argv.
CHECK = """
import sys, torch
from pathlib import Path
from ml.serving.gil_free import answers_as_the_loader
shape, dtype = tuple(int(d) for d in sys.argv[2].split(",")), getattr(torch, sys.argv[3])
print("gil-free:", answers_as_the_loader(Path(sys.argv[1]), shape, dtype) or "ok", flush=True)
"""


def trial_run(
    script: str, package: Path, example: torch.Tensor
) -> subprocess.CompletedProcess[str]:
    """Run `script` in a child process with the package, the example's shape and dtype in argv
    (this checkout importable); its output, whatever became of it."""
    shape = ",".join(str(d) for d in example.shape)
    dtype = str(example.dtype).removeprefix("torch.")
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script, str(package), shape, dtype],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )


def last_line(text: str) -> str:
    """The last line of a child's stderr: what it died of."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def verdict_of(result: subprocess.CompletedProcess[str]) -> str:
    """The marker's text from a child that ran `CHECK`: "ok", the reason it gave, or how it died."""
    for line in result.stdout.splitlines():
        if line.startswith("gil-free:"):
            return line.removeprefix("gil-free:").strip()
    return f"exit status {result.returncode}: {last_line(result.stderr)}"
