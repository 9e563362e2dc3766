"""`fit`'s defaults beyond Fashion-MNIST: batch size, learning rate and warm-up scaled to the data set."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ml.classifier import ImageClassifier
from ml.data import CLASS_NAMES, TensorImageDataset, fashion_mnist_splits
from ml.folders import stratified_split
from ml.training import (
    TrainConfig,
    _scheduler,
    auto_batch_size,
    auto_lr,
    auto_warmup_fraction,
    fit,
)
from tests.ml.shapes import SHAPE_NAMES, shapes


@pytest.fixture(autouse=True)
def _two_threads() -> object:
    """CI gives two cores: the time limits below assume them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_batch_size_grows_with_the_data_set_between_32_and_256() -> None:
    """A few thousand images get batches of 32; tens of thousands the reference 256."""
    assert auto_batch_size(500) == 32
    assert auto_batch_size(2_700) == 32
    assert auto_batch_size(5_000) == 64
    assert auto_batch_size(9_000) == 128
    assert auto_batch_size(55_000) == 256
    assert auto_batch_size(10_000_000) == 256


def test_learning_rate_scales_linearly_with_the_batch() -> None:
    """SGD: 0.2 at 256, a quarter of it at 64; AdamW keeps its own rate."""
    assert auto_lr(256) == pytest.approx(0.2)
    assert auto_lr(64) == pytest.approx(0.05)
    assert auto_lr(32, "adamw") == pytest.approx(2e-3)


def test_warmup_is_5_percent_of_steps_or_one_epoch_whichever_is_shorter() -> None:
    """Runs of up to 20 epochs warm up over 5% of the steps, longer ones over the first epoch."""
    assert auto_warmup_fraction(3) == pytest.approx(0.05)
    assert auto_warmup_fraction(20) == pytest.approx(0.05)
    assert auto_warmup_fraction(35) == pytest.approx(1 / 35)


def test_resolve_fills_only_what_was_left_automatic() -> None:
    """Explicit batch size and learning rate stay; the warm-up left None is set."""
    config = TrainConfig(epochs=3, batch_size=128, lr=0.3)
    config.resolve(2_000)
    assert (config.batch_size, config.lr, config.warmup_fraction) == (128, 0.3, 0.05)
    automatic = TrainConfig(epochs=3)
    automatic.resolve(2_000)
    assert (automatic.batch_size, automatic.lr) == (32, pytest.approx(0.025))


def test_cosine_schedule_warms_up_linearly_then_anneals_to_zero() -> None:
    """The learning rate rises in equal steps to the peak over the warm-up, then falls to zero."""
    config = TrainConfig(epochs=1, batch_size=32, lr=0.1, warmup_fraction=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = _scheduler(optimizer, config, total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])
    assert max(rates) == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] < 0.001


def test_one_cycle_schedule_is_still_available_for_the_shipped_recipe() -> None:
    """schedule="one-cycle" starts at lr/25 and peaks after the warm-up fraction, as before."""
    config = TrainConfig(
        epochs=1, batch_size=256, lr=0.2, warmup_fraction=0.25, schedule="one-cycle"
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2, momentum=0.9)
    scheduler = _scheduler(optimizer, config, total_steps=100)
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.2 / 25)


@pytest.mark.slow
def test_three_epochs_on_a_small_rgb_set_learn_four_easy_classes() -> None:
    """2,000 generated RGB 32×32 images, 4 classes, defaults, 3 epochs: >= 90% held out, no loss jump."""
    images, labels = shapes(2_000, seed=0)
    train, val = stratified_split(TensorImageDataset(images, labels, SHAPE_NAMES), 0.1, seed=0)
    held_out_images, held_out_labels = shapes(500, seed=1)
    held_out = TensorImageDataset(held_out_images, held_out_labels, SHAPE_NAMES)
    classifier = ImageClassifier(
        num_channels=3, num_classes=4, image_size=(32, 32), class_names=SHAPE_NAMES, device="cpu"
    )
    history = classifier.fit(train, val, epochs=3, progress=False)
    losses = [epoch.train_loss for epoch in history.epochs]
    assert all(later <= 1.5 * earlier for earlier, later in itertools.pairwise(losses))
    assert classifier.evaluate(held_out).accuracy >= 0.9


@pytest.mark.slow
@pytest.mark.data
def test_three_epochs_on_3000_fashion_mnist_images_pass_75_percent(
    fashion_mnist_dir: Path,
) -> None:
    """Fashion-MNIST subset=3000, epochs=3 with the defaults: >= 75% on the 10k test images."""
    splits = fashion_mnist_splits(fashion_mnist_dir, subset=3_000, seed=0)
    classifier = ImageClassifier(class_names=CLASS_NAMES, device="cpu")
    classifier.fit(splits.train, splits.val, epochs=3, progress=False)
    result = classifier.evaluate(splits.test)
    assert result.num_samples == 10_000
    assert result.accuracy >= 0.75


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_gradient_clipping_bounds_the_first_step(clip: float) -> None:
    """With grad_clip=c one SGD step moves the weights by at most lr·(1 + momentum)·c; 0 turns it off."""
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        network[1].weight.fill_(100.0)  # confident and wrong: a huge gradient
    images = torch.ones(8, 1, 2, 2)
    labels = torch.zeros(8, dtype=torch.int64)
    with torch.no_grad():
        labels[:] = 1 - network(images).argmax(1)
    config = TrainConfig(
        epochs=1,
        batch_size=8,
        lr=0.1,
        warmup_fraction=0.5,
        weight_decay=0.0,
        grad_clip=clip,
        crop_padding=0,
        progress=False,
    )
    before = network[1].weight.detach().clone()
    history = fit(network, images, labels, None, None, 2, config, torch.device("cpu"))
    moved = float((network[1].weight.detach() - before).norm())
    bound = 0.1 * (1 + 0.9) * 0.5 + 1e-6
    assert history.epochs and ((moved <= bound) if clip else (moved > bound))


def test_the_checkpoint_records_the_batch_size_and_rate_actually_used() -> None:
    """After fit, the training record holds the resolved values, not None."""
    images, labels = shapes(40, seed=0, size=8)
    classifier = ImageClassifier(3, 4, (8, 8), SHAPE_NAMES, widths=(8, 16), convs_per_stage=(1, 1))
    classifier.fit(TensorImageDataset(images, labels, SHAPE_NAMES), epochs=1, progress=False)
    recorded = classifier.metadata()["training"]["config"]
    assert (recorded["batch_size"], recorded["lr"], recorded["warmup_fraction"]) == (
        32,
        pytest.approx(0.025),
        pytest.approx(0.05),
    )
