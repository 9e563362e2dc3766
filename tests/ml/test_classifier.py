"""ImageClassifier: predict contract, training on real and custom data, save/load round trips."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from ml import (
    ImageClassifier,
    IncompatibleCheckpointError,
    TensorImageDataset,
    load_fashion_mnist,
)
from ml.checkpoint import write_checkpoint
from tests.ml.models import small_classifier


class QuadrantDataset(Dataset[tuple[torch.Tensor, int]]):
    """Synthetic but learnable: class k lights up quadrant k of channel k % 3 (float images in [0, 1])."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (count,), generator=generator)
        self.images = torch.rand(count, 3, 16, 16, generator=generator) * 0.4
        for index, label in enumerate(self.labels.tolist()):
            row, col = divmod(label, 2)
            self.images[index, label % 3, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] += 0.6

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def test_predict_takes_uint8_and_float_and_returns_probabilities() -> None:
    """uint8 and the same images as float [0, 1] give the same N×K rows, each summing to 1."""
    classifier = small_classifier()
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    from_uint8 = classifier.predict(images)
    from_float = classifier.predict(images.float() / 255.0)
    assert from_uint8.shape == (5, 10) and from_uint8.dtype == torch.float32
    torch.testing.assert_close(from_uint8.sum(1), torch.ones(5))
    torch.testing.assert_close(from_uint8, from_float, atol=1e-5, rtol=1e-4)


def test_predict_rejects_the_wrong_shape_with_the_expected_one() -> None:
    """A 28×28 model given 32×32 images says which shape it needs."""
    classifier = small_classifier()
    with pytest.raises(ValueError, match=r"N×1×28×28"):
        classifier.predict(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_fused_inference_matches_the_training_network() -> None:
    """Folding BatchNorm into the convs for predict does not change the probabilities."""
    classifier = small_classifier()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for module in classifier.network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    images = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        expected = torch.softmax(classifier.network.eval()(images), 1)
    torch.testing.assert_close(classifier.predict(images), expected, atol=1e-5, rtol=1e-4)


def test_inference_pass_gives_the_training_network_probabilities_for_uint8_and_float() -> None:
    """The folded whole pass `predict` runs matches the training network for uint8 and float, any N."""
    classifier = small_classifier()
    for count in (1, 7, 130):
        images = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8)
        for batch in (images, images.float() / 255.0):
            with torch.inference_mode():
                expected = torch.softmax(classifier.network.eval()(batch), 1)
            torch.testing.assert_close(classifier.predict(batch), expected, atol=1e-5, rtol=1e-4)


def test_bf16_inference_pass_gives_the_autocast_probabilities() -> None:
    """The bf16 pass (bfloat16 weights cast once) computes what eager `torch.autocast` computes."""
    classifier = small_classifier(precision="bf16")
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    served = classifier.predict(images)
    fp32_pass = classifier.inference_pass("fp32")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = fp32_pass(images).float()
    assert served.dtype == torch.float32
    torch.testing.assert_close(served, autocast, atol=1e-3, rtol=0)
    assert next(classifier.inference_pass().parameters()).dtype == torch.bfloat16


def test_shapes_are_known_at_construction() -> None:
    """No lazy modules: every parameter has its final shape before any data is seen."""
    classifier = ImageClassifier(num_channels=3, num_classes=7, image_size=(20, 12), device="cpu")
    assert not any(
        isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in classifier.network.modules()
    )
    assert all(
        not isinstance(p, nn.parameter.UninitializedParameter)
        for p in classifier.network.parameters()
    )
    assert classifier.input_shape == (3, 20, 12)
    assert classifier.predict(torch.zeros(1, 3, 20, 12)).shape == (1, 7)


@pytest.mark.data
def test_short_fit_on_real_subset_lowers_the_loss(fashion_mnist_dir: Path) -> None:
    """Three epochs on 2,000 real images lower the training loss and beat chance on validation."""
    full = load_fashion_mnist("test", fashion_mnist_dir)
    train = full.subset(torch.arange(2_000))
    val = full.subset(torch.arange(2_000, 2_500))
    classifier = small_classifier(class_names=full.class_names)
    history = classifier.fit(train, val, epochs=3, batch_size=32, lr=0.1, progress=False)
    losses = [epoch.train_loss for epoch in history.epochs]
    assert losses[-1] < losses[0] * 0.9
    assert history.epochs[-1].val_accuracy is not None and history.epochs[-1].val_accuracy > 0.5


def test_custom_three_channel_dataset_trains_and_round_trips(tmp_path: Path) -> None:
    """A 3×16×16, 4-class dataset trains to high accuracy; save/load gives identical predictions."""
    names = ["red-tl", "green-tr", "blue-bl", "red-br"]
    classifier = small_classifier(
        num_channels=3, num_classes=4, image_size=(16, 16), class_names=names
    )
    train, val = QuadrantDataset(1024, seed=0), QuadrantDataset(128, seed=1)
    history = classifier.fit(
        train, val, epochs=4, batch_size=32, lr=0.05, crop_padding=1, progress=False
    )
    assert history.epochs[-1].val_accuracy is not None and history.epochs[-1].val_accuracy >= 0.9
    result = classifier.evaluate(QuadrantDataset(128, seed=2))
    assert result.accuracy >= 0.9 and len(result.confusion_matrix) == 4

    path = tmp_path / "quadrants.safetensors"
    classifier.save(path)
    loaded = ImageClassifier.load(path, device="cpu")
    images = QuadrantDataset(32, seed=3).images
    assert torch.equal(loaded.predict(images), classifier.predict(images))
    assert (loaded.class_names, loaded.input_shape, loaded.num_classes) == (names, (3, 16, 16), 4)
    assert loaded.version == classifier.version and len(loaded.version) == 12
    assert loaded.metrics["val_accuracy"] == pytest.approx(history.epochs[-1].val_accuracy)


def test_training_is_deterministic_for_a_seed() -> None:
    """The same seed and data give bit-identical weights; another seed gives different ones."""
    data = QuadrantDataset(128, seed=0)
    versions = []
    for seed in (5, 5, 6):
        classifier = small_classifier(num_channels=3, num_classes=4, image_size=(16, 16), seed=seed)
        classifier.fit(data, epochs=1, batch_size=32, progress=False)
        versions.append(classifier.version)
    assert versions[0] == versions[1] != versions[2]


def test_fit_rejects_images_of_the_wrong_shape() -> None:
    """A dataset whose images do not match the model fails before training, saying both shapes."""
    dataset = TensorImageDataset(
        torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.zeros(8), ["a", "b"]
    )
    classifier = small_classifier(num_classes=2)
    with pytest.raises(ValueError, match=r"\(1, 16, 16\).*\(1, 28, 28\)"):
        classifier.fit(dataset, epochs=1, progress=False)


def test_fit_rejects_labels_outside_the_classes() -> None:
    """Label 5 for a 2-class model is a clear error, not an index crash mid-epoch."""
    dataset = TensorImageDataset(
        torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.full((8,), 5), ["a", "b"]
    )
    with pytest.raises(ValueError, match="labels"):
        small_classifier(num_classes=2).fit(dataset, epochs=1, progress=False)


def test_bf16_inference_returns_float32_probabilities_close_to_fp32() -> None:
    """precision="bf16" keeps the output contract (float32 rows summing to 1) and stays near fp32."""
    classifier = small_classifier()
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    exact = classifier.predict(images)
    classifier.precision = "bf16"
    approximate = classifier.predict(images)
    assert approximate.dtype == torch.float32
    torch.testing.assert_close(approximate.sum(1), torch.ones(8))
    assert (approximate - exact).abs().max() < 0.05


def test_unknown_precision_is_refused() -> None:
    """A typo in precision fails at once with the allowed values."""
    with pytest.raises(ValueError, match="fp32"):
        small_classifier(precision="fp16")


def test_temperature_divides_the_logits_inside_the_inference_pass() -> None:
    """With temperature 0.5 the whole pass returns softmax(logits / 0.5) for uint8 and float input."""
    classifier = small_classifier()
    classifier.temperature = 0.5
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    for batch in (images, images.float() / 255.0):
        served = classifier.predict(batch)
        with torch.inference_mode():
            expected = torch.softmax(classifier.network.eval()(batch) / 0.5, 1)
        torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)


def test_changing_the_temperature_rebuilds_the_inference_pass() -> None:
    """A pass built at T = 1 is not reused after the temperature changes."""
    classifier = small_classifier()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    plain = classifier.predict(images)
    classifier.temperature = 2.0
    with torch.inference_mode():
        logits = classifier.network.eval()(images)
    torch.testing.assert_close(plain, torch.softmax(logits, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        classifier.predict(images), torch.softmax(logits / 2.0, 1), atol=1e-5, rtol=1e-4
    )


def test_temperature_must_be_positive() -> None:
    """A zero, negative or infinite temperature is refused with the value in the message."""
    classifier = small_classifier()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="positive"):
            classifier.temperature = bad


def test_saved_temperature_is_served_after_load(tmp_path: Path) -> None:
    """save/load keeps the temperature and the exact calibrated probabilities."""
    classifier = small_classifier()
    classifier.temperature = 0.7
    path = tmp_path / "tempered.safetensors"
    classifier.save(path)
    loaded = ImageClassifier.load(path, device="cpu")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert loaded.temperature == pytest.approx(0.7)
    assert torch.equal(loaded.predict(images), classifier.predict(images))


def test_checkpoint_without_a_temperature_serves_plain_softmax(tmp_path: Path) -> None:
    """A checkpoint written before calibration existed loads with T = 1."""
    classifier = small_classifier()
    metadata = classifier.metadata()
    del metadata["temperature"], metadata["calibration"]
    path = tmp_path / "old.safetensors"
    write_checkpoint(path, classifier.network.state_dict(), metadata)
    loaded = ImageClassifier.load(path, device="cpu")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert loaded.temperature == 1.0
    torch.testing.assert_close(loaded.predict(images), classifier.predict(images))


def test_checkpoint_with_a_negative_temperature_is_incompatible(tmp_path: Path) -> None:
    """A recorded temperature of -1 is an IncompatibleCheckpointError naming the file."""
    classifier = small_classifier()
    path = tmp_path / "negative.safetensors"
    write_checkpoint(
        path, classifier.network.state_dict(), {**classifier.metadata(), "temperature": -1.0}
    )
    with pytest.raises(IncompatibleCheckpointError, match=r"negative\.safetensors.*temperature"):
        ImageClassifier.load(path, device="cpu")


def test_first_predict_calls_from_two_threads_build_one_inference_pass() -> None:
    """Two forward threads asking for the pass at once share one module, with no warning."""
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    classifier = small_classifier()
    start = threading.Barrier(2)
    built: list[torch.nn.Module] = []

    def first_call() -> None:
        start.wait()
        classifier.predict(images)
        built.append(classifier.inference_pass())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=first_call) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(built) == 2 and built[0] is built[1]
    assert [str(w.message) for w in caught] == []


@pytest.fixture(scope="module")
def calibrated_on_real_data(fashion_mnist_dir: Path) -> ImageClassifier:
    """A small net trained 3 epochs on 2,000 real images; `fit` calibrates it on 500 held-out ones."""
    full = load_fashion_mnist("train", fashion_mnist_dir)
    classifier = small_classifier(class_names=full.class_names)
    classifier.fit(
        full.subset(torch.arange(2_000)),
        full.subset(torch.arange(2_000, 2_500)),
        epochs=3,
        batch_size=32,
        lr=0.1,
        progress=False,
    )
    return classifier


@pytest.mark.data
def test_fit_calibrates_so_test_ece_drops(
    calibrated_on_real_data: ImageClassifier, fashion_mnist_dir: Path
) -> None:
    """After a short real run the fitted temperature lowers the test-set ECE below the raw softmax's."""
    test = load_fashion_mnist("test", fashion_mnist_dir).subset(torch.arange(2_000))
    report = calibrated_on_real_data.calibration_report(test)
    assert calibrated_on_real_data.temperature != 1.0
    assert calibrated_on_real_data.calibration["num_samples"] == 500
    assert report.after.ece < report.before.ece, report.to_json()


@pytest.mark.data
def test_temperature_changes_no_prediction_and_no_accuracy(
    calibrated_on_real_data: ImageClassifier, fashion_mnist_dir: Path
) -> None:
    """Calibrated and raw probabilities pick the same class for every test image: same accuracy."""
    test = load_fashion_mnist("test", fashion_mnist_dir).subset(torch.arange(2_000))
    fitted = calibrated_on_real_data.temperature
    calibrated = calibrated_on_real_data.predict(test.images)
    calibrated_accuracy = calibrated_on_real_data.evaluate(test).accuracy
    calibrated_on_real_data.temperature = 1.0
    try:
        raw = calibrated_on_real_data.predict(test.images)
        raw_accuracy = calibrated_on_real_data.evaluate(test).accuracy
    finally:
        calibrated_on_real_data.temperature = fitted
    assert not torch.allclose(calibrated, raw)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))
    assert calibrated_accuracy == raw_accuracy
