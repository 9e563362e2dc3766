"""ml.serving: one loading entry point, devices and precision, and an ImageClassifier checkpoint end to end."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ml import ImageClassifier
from ml.serving import (
    ModelLoadError,
    load_model,
    model_form,
    resolve_device,
    resolve_precision,
)
from ml.serving import device as device_module
from tests.ml.models import small_classifier
from tests.ml.serving_contract import (
    Gated,
    check_batches,
    check_deadline_drops_before_compute,
    check_poison_fails_alone,
    poisoned,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 3-channel 12×16, 4-class checkpoint with a fitted-looking temperature."""
    classifier = small_classifier(
        num_channels=3,
        num_classes=4,
        image_size=(12, 16),
        class_names=["red", "green", "blue", "grey"],
    )
    classifier.temperature = 1.5
    path = tmp_path_factory.mktemp("checkpoint") / "colours.safetensors"
    classifier.save(path)
    return path


def test_auto_device_is_cuda_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """device "auto" picks CUDA when available and the CPU otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_without_a_gpu_is_refused_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """device "cuda" on a machine without a usable GPU fails, naming "auto" and "cpu"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"no usable GPU.*'auto' or 'cpu'"):
        resolve_device("cuda")


def test_a_cuda_index_beyond_the_visible_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:3 with one visible GPU fails with the count."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="only 1 GPU"):
        resolve_device("cuda:3")


def test_an_unknown_device_is_refused_with_the_choices() -> None:
    """A typo such as "gpu" lists auto, cpu and cuda."""
    with pytest.raises(ValueError, match=r"'auto', 'cpu', 'cuda'"):
        resolve_device("gpu")


def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bfloat16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """precision "auto": bf16 on a bf16-capable CPU, fp32 on other CPUs and on GPUs."""
    monkeypatch.setattr(device_module, "native_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(device_module, "native_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"


def test_the_form_comes_from_the_suffix_or_the_class_path() -> None:
    """.safetensors, .pt2/.pt and package.module:Class name the three forms; anything else is refused."""
    assert model_form("models/a.safetensors") == "checkpoint"
    assert model_form("exports/b.pt2") == "exported"
    assert model_form("exports/b.pt") == "exported"
    assert model_form("examples.python_model.mirrored:MirroredFashion") == "python"
    with pytest.raises(ModelLoadError, match=r"package\.module:Class"):
        model_form("models/a.onnx")


def test_a_checkpoint_describes_itself(checkpoint: Path) -> None:
    """Name, shape, classes, normalisation, device and precision come from the checkpoint and the call."""
    served = load_model(checkpoint, device="cpu", precision="fp32", runtime="eager")
    announced = served.description.to_json()
    classifier = ImageClassifier.load(checkpoint, device="cpu")
    assert announced["name"] == "colours"
    assert announced["form"] == "checkpoint"
    assert announced["input_shape"] == [3, 12, 16]
    assert announced["input_dtype"] == "uint8"
    assert announced["class_names"] == ["red", "green", "blue", "grey"]
    assert announced["preprocessing"]["mean"] == pytest.approx(classifier.normalization["mean"])
    assert announced["preprocessing"]["channels"] == 3
    assert announced["preprocessing"]["auto_invert"] is False
    assert (announced["device"], announced["precision"]) == ("cpu", "fp32")


def test_the_served_version_changes_with_the_temperature(checkpoint: Path, tmp_path: Path) -> None:
    """Same weights, another temperature: the weights hash stays, the served version changes."""
    classifier = ImageClassifier.load(checkpoint, device="cpu")
    classifier.temperature = 0.8
    other = tmp_path / "colours.safetensors"
    classifier.save(other)
    first = load_model(checkpoint, device="cpu", runtime="eager")
    second = load_model(other, device="cpu", runtime="eager")
    assert ImageClassifier.load(other, device="cpu").version == classifier.version
    assert first.version != second.version
    assert load_model(checkpoint, device="cpu", runtime="eager").version == first.version


def test_name_and_tag_can_be_given_at_load(checkpoint: Path) -> None:
    """load_model(name=, tag=) overrides what the source says, and nothing else."""
    served = load_model(checkpoint, device="cpu", runtime="eager", name="rgb", tag="v2")
    assert (served.name, served.tag) == ("rgb", "v2")
    assert served.version == load_model(checkpoint, device="cpu", runtime="eager").version


def test_a_served_checkpoint_answers_as_the_classifier_does(checkpoint: Path) -> None:
    """The served pass gives ImageClassifier.predict's probabilities, at fp32 and at bf16."""
    images = torch.randint(0, 256, (5, 3, 12, 16), dtype=torch.uint8)
    for precision in ("fp32", "bf16"):
        served = load_model(checkpoint, device="cpu", precision=precision, runtime="eager")
        classifier = ImageClassifier.load(checkpoint, device="cpu", precision=precision)
        torch.testing.assert_close(served.predict(images), classifier.predict(images))


def test_the_served_model_refuses_float_or_misshapen_images(checkpoint: Path) -> None:
    """predict takes uint8 N×C×H×W of the model's shape and says which shape it needs."""
    served = load_model(checkpoint, device="cpu", runtime="eager")
    with pytest.raises(ValueError, match=r"N×3×12×16"):
        served.predict(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        served.predict(torch.zeros(2, 3, 12, 16))


def test_on_the_cpu_a_checkpoint_runs_as_a_cached_aoti_program(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """runtime "auto" compiles the pass with AOTInductor once, then loads it from the cache; same answers."""
    caplog.set_level(logging.INFO, logger="ml.serving")
    images = torch.randint(0, 256, (7, 3, 12, 16), dtype=torch.uint8)
    compiled = load_model(checkpoint, device="cpu", precision="fp32", cache_dir=tmp_path)
    assert compiled.description.runtime == "aoti"
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".gilfree", ".pt2", ".so", ".verified"]
    eager = load_model(checkpoint, device="cpu", precision="fp32", runtime="eager")
    torch.testing.assert_close(compiled.predict(images), eager.predict(images))
    again = load_model(checkpoint, device="cpu", precision="fp32", cache_dir=tmp_path)
    assert again.description.runtime == "aoti"
    assert "cached=True" in caplog.text


def test_a_failed_compilation_falls_back_to_eager_with_a_warning(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a working compiler the model is still served, eagerly, and the log says why."""

    def no_compiler(*args: object, **kwargs: object) -> str:
        raise RuntimeError("g++ not found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    served = load_model(checkpoint, device="cpu", cache_dir=tmp_path)
    assert served.description.runtime == "eager"
    assert "event=aoti_unavailable" in caplog.text and "g++ not found" in caplog.text
    assert served.predict(torch.zeros(1, 3, 12, 16, dtype=torch.uint8)).shape == (1, 4)


async def test_a_checkpoint_is_batched_by_the_runner(checkpoint: Path) -> None:
    """Concurrent submits to a served checkpoint form one batch with the right answers."""
    await check_batches(load_model(checkpoint, device="cpu", runtime="eager"))


async def test_a_poison_image_fails_alone_on_a_checkpoint(checkpoint: Path) -> None:
    """A served checkpoint whose pass raises for one image fails that image only."""
    await check_poison_fails_alone(poisoned(load_model(checkpoint, device="cpu", runtime="eager")))


async def test_deadlines_apply_to_a_checkpoint(checkpoint: Path) -> None:
    """An image that expires while a served checkpoint is busy is never computed."""
    served = load_model(checkpoint, device="cpu", runtime="eager")
    await check_deadline_drops_before_compute(Gated(served))


def test_a_compiled_program_that_crashes_its_trial_process_is_not_loaded(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A package whose trial run dies (as a segfault would) leaves the pass eager, never loaded here."""
    from ml.serving import compiled

    monkeypatch.setattr(compiled, "_VERIFY", "import os; os.abort()")
    served = load_model(checkpoint, device="cpu", cache_dir=tmp_path)
    assert served.description.runtime == "eager"
    assert "trial run" in caplog.text and "exit status -6" in caplog.text
    assert list(tmp_path.glob("*.pt2")) == [] and list(tmp_path.glob("*.verified")) == []


def test_a_remembered_compile_failure_skips_compiling_on_the_next_load(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a failed trial run, the next start goes straight to eager without compiling again."""
    from ml.serving import compiled

    monkeypatch.setattr(compiled, "_VERIFY", "import os; os.abort()")
    load_model(checkpoint, device="cpu", cache_dir=tmp_path)
    compiles: list[object] = []
    monkeypatch.setattr(compiled, "_compile", lambda *args: compiles.append(args))
    again = load_model(checkpoint, device="cpu", cache_dir=tmp_path)
    assert again.description.runtime == "eager" and compiles == []
    assert "remembered=" in caplog.text
