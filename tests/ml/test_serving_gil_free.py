"""A compiled program called through its C interface: the loader's answers, without the GIL."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from ml.serving import load_model
from ml.serving.gil_free import GilFreeProgram, gil_free_program
from tests.ml.models import small_classifier

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding one compiled package of a small 1-channel 28×28 checkpoint."""
    classifier = small_classifier(num_channels=1, num_classes=3, image_size=(28, 28))
    directory = tmp_path_factory.mktemp("aoti")
    classifier.save(directory / "small.safetensors")
    served = load_model(directory / "small.safetensors", device="cpu", cache_dir=directory)
    assert served.description.runtime == "aoti"
    return directory


def _package(cache: Path) -> Path:
    (package,) = cache.glob("*.pt2")
    return package


def test_a_fresh_package_is_checked_and_served_without_the_gil(cache: Path) -> None:
    """The trial run also checks the C interface; the served model then calls it."""
    package = _package(cache)
    assert package.with_suffix(".gilfree").read_text() == "ok"
    served = load_model(cache / "small.safetensors", device="cpu", cache_dir=cache)
    assert isinstance(served._forward, GilFreeProgram)


def test_it_answers_exactly_as_the_package_loader(cache: Path) -> None:
    from torch._inductor.package import load_package

    package = _package(cache)
    program = GilFreeProgram(package.with_suffix(".so"), runners=2)
    for size in (1, 7, 300):
        images = torch.randint(0, 256, (size, 1, 28, 28), dtype=torch.uint8)
        with torch.inference_mode():
            expected = load_package(str(package))(images)
            got = program(images)
        assert got.shape == (size, 3) and torch.equal(got, expected)
    program.close()


def _python_progress_during(call: object, images: torch.Tensor) -> float:
    """How fast (counts a second) a pure-Python loop counts while `call(images)` runs in another
    thread."""
    started, done = threading.Event(), threading.Event()

    def compute() -> None:
        started.set()
        with torch.inference_mode():
            for _ in range(3):
                call(images)  # type: ignore[operator]
        done.set()

    thread = threading.Thread(target=compute)
    thread.start()
    started.wait()
    began = time.perf_counter()
    count = 0
    while not done.is_set():
        count += 1
    elapsed = time.perf_counter() - began
    thread.join()
    return count / elapsed


def test_the_call_lets_other_python_threads_run(cache: Path) -> None:
    """A Python thread keeps running while a pass computes; the loader's binding stops it."""
    from torch._inductor.package import load_package

    package = _package(cache)
    images = torch.randint(0, 256, (4096, 1, 28, 28), dtype=torch.uint8)
    held = _python_progress_during(load_package(str(package)), images)
    free = _python_progress_during(GilFreeProgram(package.with_suffix(".so"), 1), images)
    assert free > 3 * held, (held, free)


def test_a_remembered_failure_keeps_the_loaders_program(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A package whose check failed once is not called through ctypes again; the log says why."""
    caplog.set_level(logging.INFO, logger="ml.serving")
    package = tmp_path / _package(cache).name
    package.write_bytes(_package(cache).read_bytes())
    package.with_suffix(".gilfree").write_text("exit status -11: ")
    example = torch.zeros((2, 1, 28, 28), dtype=torch.uint8)
    assert gil_free_program(package, 1, example) is None
    assert "aoti_gil_free_unavailable" in caplog.text and "exit status -11" in caplog.text


def test_a_package_cached_before_the_check_is_checked_once(cache: Path, tmp_path: Path) -> None:
    """A package verified by an older release (no marker) gets its check in a child on first load."""
    package = tmp_path / _package(cache).name
    package.write_bytes(_package(cache).read_bytes())
    example = torch.zeros((2, 1, 28, 28), dtype=torch.uint8)
    program = gil_free_program(package, 1, example)
    assert isinstance(program, GilFreeProgram)
    assert package.with_suffix(".gilfree").read_text() == "ok"
    assert package.with_suffix(".so").is_file()
