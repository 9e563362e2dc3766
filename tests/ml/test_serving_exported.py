"""ml.serving: exported programs (torch.export .pt2, TorchScript .pt) with a spec, end to end through ModelRunner.

The torchvision model is `examples/torchvision/mobilenet_v3_small.pt2`, a MobileNetV3-Small trained on
Fashion-MNIST by `examples/torchvision/export_mobilenet.py` (committed, so no test trains it).
"""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ml import load_fashion_mnist
from ml.runner import ModelRunner
from ml.serving import ModelLoadError, ModelSpecError, load_model, read_spec
from tests.ml.serving_contract import (
    Gated,
    check_batches,
    check_deadline_drops_before_compute,
    check_poison_fails_alone,
    poisoned,
)

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "torchvision"
MOBILENET = EXAMPLES / "mobilenet_v3_small.pt2"
SPEC = """
name = "tiny"
input_shape = [3, 8, 8]
class_names = ["a", "b", "c"]
mean = [0.5, 0.5, 0.5]
std = [0.25]
"""


class TinyNet(nn.Module):
    """A conv and a linear layer: 3×8×8 normalised floats → 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def export_tiny(directory: Path, *, dynamic: bool = True) -> Path:
    """TinyNet exported to directory/tiny.pt2 with `SPEC` beside it."""
    example = torch.zeros(2, 3, 8, 8)
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    program = torch.export.export(TinyNet().eval(), (example,), dynamic_shapes=shapes)
    path = directory / "tiny.pt2"
    torch.export.save(program, path)
    (directory / "tiny.toml").write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("exported"))


def test_an_exported_program_applies_the_spec_scaling_and_softmax(tiny: Path) -> None:
    """Probabilities are softmax(program((uint8 / 255 - mean) / std)), with the spec's metadata."""
    served = load_model(tiny, device="cpu", precision="fp32", runtime="eager")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with torch.inference_mode():
        expected = torch.softmax(TinyNet().eval()((images.float() / 255 - 0.5) / 0.25), 1)
    torch.testing.assert_close(served.predict(images), expected)
    announced = served.description.to_json()
    assert (announced["name"], announced["form"], announced["class_names"]) == (
        "tiny",
        "exported",
        ["a", "b", "c"],
    )
    assert announced["preprocessing"]["mean"] == [0.5, 0.5, 0.5]


def test_the_version_hashes_the_program_and_the_spec(tiny: Path) -> None:
    """Same files, same version; a spec change that changes the answers changes it."""
    first = load_model(tiny, device="cpu", runtime="eager").version
    assert load_model(tiny, device="cpu", runtime="eager").version == first
    tiny.with_suffix(".toml").write_text(SPEC.replace("std = [0.25]", "std = [0.3]"))
    try:
        assert load_model(tiny, device="cpu", runtime="eager").version != first
    finally:
        tiny.with_suffix(".toml").write_text(SPEC)


def test_a_json_spec_in_the_directory_is_found(tmp_path: Path) -> None:
    """model.json in the program's directory serves when no <stem>.toml exists."""
    path = export_tiny(tmp_path)
    path.with_suffix(".toml").unlink()
    spec = {"name": "tiny-json", "input_shape": [3, 8, 8], "class_names": ["a", "b", "c"]}
    (tmp_path / "model.json").write_text(json.dumps(spec))
    assert load_model(path, device="cpu", runtime="eager").name == "tiny-json"


def test_a_program_without_a_spec_names_the_files_looked_for(tmp_path: Path) -> None:
    """No spec beside the program: ModelSpecError listing where it looked."""
    path = export_tiny(tmp_path)
    path.with_suffix(".toml").unlink()
    with pytest.raises(ModelSpecError, match=r"tiny\.toml.*model\.json"):
        load_model(path, device="cpu", runtime="eager")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('colour = "rgb"', r"unknown key\(s\) \['colour'\]"),
        ("mean = [0.1, 0.2]", "mean needs 1 or 3 values"),
        ('resize = "zoom"', "resize must be one of"),
        ("std = [0.0]", "std must be positive"),
    ],
)
def test_a_spec_that_says_something_impossible_is_refused(
    tmp_path: Path, line: str, message: str
) -> None:
    """Unknown keys, wrong per-channel counts, unknown policies and zero std name the file and the fix."""
    spec = tmp_path / "model.toml"
    key = line.split(" = ")[0]
    kept = [kept for kept in SPEC.strip().splitlines() if not kept.startswith(f"{key} =")]
    spec.write_text("\n".join([*kept, line]) + "\n")
    with pytest.raises(ModelSpecError, match=message):
        read_spec(spec)


def test_a_spec_with_the_wrong_number_of_classes_fails_at_load(tmp_path: Path) -> None:
    """Four class names for a three-logit program: refused at load, not on the first request."""
    path = export_tiny(tmp_path)
    path.with_suffix(".toml").write_text(SPEC.replace('"c"]', '"c", "d"]'))
    with pytest.raises(ModelSpecError, match=r"expected \(1, 4\)"):
        load_model(path, device="cpu", runtime="eager")


def test_a_program_exported_for_one_batch_size_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A static batch dimension cannot be batched: load says to export with torch.export.Dim."""
    path = export_tiny(tmp_path, dynamic=False)
    with pytest.raises(ModelLoadError, match=r"dynamic batch dimension"):
        load_model(path, device="cpu", runtime="eager")
    static = torch.export.export(TinyNet().eval(), (torch.zeros(1, 3, 8, 8),))
    torch.export.save(static, path)
    with pytest.raises(ModelLoadError, match=r"torch\.export\.Dim"):
        load_model(path, device="cpu", runtime="eager")


async def test_an_exported_program_is_batched_by_the_runner(tiny: Path) -> None:
    """Concurrent submits to a served .pt2 form one batch with the right answers."""
    await check_batches(load_model(tiny, device="cpu", runtime="eager"))


async def test_a_poison_image_fails_alone_on_an_exported_program(tiny: Path) -> None:
    """A served .pt2 whose pass raises for one image fails that image only."""
    await check_poison_fails_alone(poisoned(load_model(tiny, device="cpu", runtime="eager")))


async def test_deadlines_apply_to_an_exported_program(tiny: Path) -> None:
    """An image that expires while a served .pt2 is busy is never computed."""
    await check_deadline_drops_before_compute(
        Gated(load_model(tiny, device="cpu", runtime="eager"))
    )


def test_an_exported_program_compiles_with_aoti_to_the_same_answers(
    tiny: Path, tmp_path: Path
) -> None:
    """On the CPU a .pt2 runs as an AOTInductor program with the eager program's probabilities."""
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    compiled = load_model(tiny, device="cpu", precision="fp32", cache_dir=tmp_path)
    eager = load_model(tiny, device="cpu", precision="fp32", runtime="eager")
    assert compiled.description.runtime == "aoti"
    torch.testing.assert_close(compiled.predict(images), eager.predict(images))


@pytest.mark.data
async def test_an_exported_torchvision_model_classifies_real_images(
    fashion_mnist_dir: Path,
) -> None:
    """The trained MobileNetV3 .pt2, served through the runner, classifies real test images."""
    served = load_model(MOBILENET, device="cpu", precision="fp32", runtime="eager")
    test = load_fashion_mnist("test", fashion_mnist_dir)
    images, labels = test.images[:500], test.labels[:500]
    async with ModelRunner(served, max_batch_size=64, max_wait_ms=20) as runner:
        predictions = await asyncio.gather(*(runner.submit(image) for image in images))
    accuracy = sum(p.label == int(y) for p, y in zip(predictions, labels, strict=True)) / 500
    assert accuracy > 0.7  # chance is 0.1; the export script reports 0.77 on all 10,000
    assert max(p.batch_size for p in predictions) > 1
    assert served.name == "mobilenet-fmnist" and served.tag == "v1"


@pytest.mark.data
def test_the_torchscript_export_answers_as_the_pt2(fashion_mnist_dir: Path) -> None:
    """The same network saved as TorchScript .pt gives the .pt2's probabilities, without a warning."""
    images = load_fashion_mnist("test", fashion_mnist_dir).images[:16]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scripted = load_model(MOBILENET.with_suffix(".pt"), device="cpu", precision="fp32")
    exported = load_model(MOBILENET, device="cpu", precision="fp32", runtime="eager")
    assert scripted.description.runtime == "torchscript"
    torch.testing.assert_close(
        scripted.predict(images), exported.predict(images), atol=1e-5, rtol=0
    )
