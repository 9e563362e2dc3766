"""Training and evaluation loops: batched augmentation, one-cycle schedule, per-epoch validation."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ml.data import TensorImageDataset

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (stored in the checkpoint's metadata).

    `batch_size`, `lr` and `warmup_fraction` default to None: `fit` then sets them from the size of the
    training set (`resolve`), so that short runs on small data sets take enough, small enough steps.
    Given explicitly they are used as they are (the shipped model's recipe gives all three)."""

    epochs: int = 20
    # Images per step; None: `auto_batch_size` of the training set.
    batch_size: int | None = None
    # Peak learning rate (SGD: ~0.02-0.4; AdamW: ~1e-3-5e-3); None: `auto_lr` of the batch size.
    lr: float | None = None
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    momentum: float = 0.9
    # Decoupled from BatchNorm and bias parameters, which decay does not help.
    weight_decay: float = 5e-4
    # Fraction of steps spent warming up to the peak learning rate; None: `auto_warmup_fraction`.
    warmup_fraction: float | None = None
    # "cosine": linear warm-up, then cosine annealing to zero, fixed momentum. "one-cycle": torch's
    # OneCycleLR (cosine warm-up from lr/25, momentum cycled), the recipe of the shipped model.
    schedule: str = "cosine"
    # Gradients are rescaled to at most this L2 norm (0: off): a bad batch early on cannot throw
    # the weights far, which on small data sets is what made the loss jump between epochs.
    grad_clip: float = 2.0
    label_smoothing: float = 0.0
    # Random-crop augmentation: pad by this many pixels, crop back at a random offset (0: off).
    crop_padding: int = 2
    # Mirror half the images left-right. Right for clothes; wrong for digits or text, so off by default.
    horizontal_flip: bool = False
    # "bf16": autocast convs and matmuls to bfloat16 while training (faster on CPUs with AVX512-BF16/AMX
    # and on GPUs); weights, BatchNorm statistics, the optimizer and evaluation stay float32.
    precision: str = "fp32"
    seed: int = 0
    eval_batch_size: int = 1024
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.batch_size is not None and self.batch_size < 2):
            raise ValueError("need epochs >= 1 and batch_size >= 2")
        if self.lr is not None and self.lr <= 0:
            raise ValueError("need lr > 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.crop_padding < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("need crop_padding >= 0 and 0 <= label_smoothing < 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.warmup_fraction is not None and not 0.0 < self.warmup_fraction < 1.0:
            raise ValueError("warmup_fraction must be in (0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")

    def resolve(self, train_size: int) -> None:
        """Fill in the automatic (None) fields for a training set of `train_size` images, in place,
        so the checkpoint records what was used."""
        if self.batch_size is None:
            self.batch_size = auto_batch_size(train_size)
        if self.lr is None:
            self.lr = auto_lr(self.batch_size, self.optimizer)
        if self.warmup_fraction is None:
            self.warmup_fraction = auto_warmup_fraction(self.epochs)

    def resolved(self) -> tuple[int, float, float]:
        """(batch_size, lr, warmup_fraction) after `resolve`."""
        if self.batch_size is None or self.lr is None or self.warmup_fraction is None:
            raise ValueError(
                "call resolve(train_size) first: batch_size, lr or warmup_fraction is unset"
            )
        return self.batch_size, self.lr, self.warmup_fraction


SCHEDULES = ("cosine", "one-cycle")
# The batch size and SGD learning rate the scaling rules start from (the shipped model's).
_REFERENCE_BATCH, _REFERENCE_LR = 256, 0.2
_ADAMW_LR = 2e-3


def auto_batch_size(train_size: int) -> int:
    """The largest power of two that gives at least 64 steps per epoch, within 32..256.

    Large sets get 256 (fast per image); a few thousand images get 32, so that a three-epoch run
    still takes a few hundred steps."""
    batch = 32
    while batch < _REFERENCE_BATCH and train_size // (2 * batch) >= 64:
        batch *= 2
    return batch


def auto_lr(batch_size: int, optimizer: str = "sgd") -> float:
    """The peak learning rate for `batch_size`: 0.2 at 256 for SGD, scaled linearly with the batch
    (Goyal et al.); AdamW's is 2e-3 at every batch size."""
    if optimizer == "adamw":
        return _ADAMW_LR
    return _REFERENCE_LR * batch_size / _REFERENCE_BATCH


def auto_warmup_fraction(epochs: int) -> float:
    """Linear warm-up over 5% of the steps or the first epoch, whichever is shorter."""
    return min(0.05, 1.0 / epochs)


@dataclass
class EpochRecord:
    """What one epoch did."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float


@dataclass
class TrainingHistory:
    """The per-epoch record of a `fit` call."""

    epochs: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    # CPU time of this process (all its threads): unlike wall time, not inflated when other processes
    # share the machine. With one intra-op thread it is what the run takes on one dedicated core.
    cpu_seconds: float = 0.0
    # 1-minute load average at the start and the end: how busy the machine was.
    load_average: tuple[float, float] = (0.0, 0.0)
    images_per_second: float = 0.0
    data_hash: str = ""
    train_size: int = 0
    val_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvaluationResult:
    """Accuracy of a classifier on a labelled dataset."""

    accuracy: float
    loss: float
    num_samples: int
    per_class_accuracy: list[float]
    # confusion_matrix[true][predicted] = count
    confusion_matrix: list[list[int]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def materialise(
    dataset: Dataset[Any], input_shape: tuple[int, int, int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 or float32, N×C×H×W) and labels of `dataset` in memory, checked against the model.

    Holding the set in memory lets augmentation run on whole batches (fast on CPU and GPU) rather than
    image by image in Python; a 60k Fashion-MNIST set is 47 MB.
    """
    if isinstance(dataset, TensorImageDataset):
        images, labels = dataset.images, dataset.labels
    else:
        chunks, label_chunks = [], []
        for batch_images, batch_labels in DataLoader(dataset, batch_size=1024, shuffle=False):
            chunks.append(batch_images)
            label_chunks.append(torch.as_tensor(batch_labels))
        if not chunks:
            raise ValueError("the dataset is empty")
        images, labels = torch.cat(chunks), torch.cat(label_chunks)
    if images.ndim != 4 or tuple(images.shape[1:]) != input_shape:
        raise ValueError(
            f"the dataset yields images of shape {tuple(images.shape[1:])}, the model expects {input_shape} "
            "(C×H×W); build the classifier with matching num_channels and image_size"
        )
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
        images = images.float()
    labels = labels.long().flatten()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels span {int(labels.min())}..{int(labels.max())}, the model has {num_classes} classes "
            "(labels must be 0..num_classes-1)"
        )
    return images, labels


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the training images and labels, recorded so a checkpoint names its data."""
    digest = hashlib.sha256()
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def channel_statistics(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images scaled to [0, 1]."""
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    channels = images.transpose(0, 1).reshape(images.shape[1], -1)
    mean = torch.zeros(images.shape[1], dtype=torch.float64)
    sq = torch.zeros(images.shape[1], dtype=torch.float64)
    for chunk in channels.split(1 << 22, dim=1):  # bounded memory for big sets
        values = chunk.double() * scale
        mean += values.sum(1)
        sq += values.square().sum(1)
    count = channels.shape[1]
    mean /= count
    std = (sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def augment(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and optional horizontal flip for a whole batch at once.

    Random numbers come from `generator` on the CPU, so a seed fixes them on any device.
    """
    count, channels, height, width = images.shape
    pad = config.crop_padding
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (2, count), generator=generator).to(images.device)
        rows = offsets[0, :, None] + torch.arange(height, device=images.device)
        cols = offsets[1, :, None] + torch.arange(width, device=images.device)
        batch = torch.arange(count, device=images.device)[:, None, None, None]
        chan = torch.arange(channels, device=images.device)[None, :, None, None]
        images = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    if config.horizontal_flip:
        flip = (torch.rand(count, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches; a short last batch is dropped when full ones exist (BatchNorm needs > 1)."""
    order = torch.randperm(count, generator=generator)
    full = count // batch_size
    if full == 0:
        yield order
        return
    yield from order[: full * batch_size].split(batch_size)


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on every platform
        return 0.0


def _optimizer(network: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in network.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in network.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    _, lr, _ = config.resolved()
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True)


@torch.inference_mode()
def network_logits(
    network: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """float32 N×K logits of `network` in eval mode for in-memory images, on the CPU."""
    was_training = network.training
    network.eval()
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = (
            images[start : start + batch_size]
            .to(device)
            .contiguous(memory_format=torch.channels_last)
        )
        chunks.append(network(batch).float().cpu())
    network.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@torch.inference_mode()
def evaluate(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    device: torch.device,
    batch_size: int = 1024,
    temperature: float = 1.0,
) -> EvaluationResult:
    """Accuracy, mean loss, per-class accuracy and confusion matrix of `network` on in-memory data.

    The loss is the NLL of `softmax(logits / temperature)`: of the calibrated probabilities when
    given the classifier's fitted temperature."""
    logits = network_logits(network, images, device, batch_size)
    count = int(labels.shape[0])
    loss = float(F.cross_entropy(logits / temperature, labels, reduction="sum")) if count else 0.0
    predicted = logits.argmax(1) if count else labels
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    matrix = confusion.view(num_classes, num_classes)
    per_class = (matrix.diag().double() / matrix.sum(1).clamp_min(1).double()).tolist()
    return EvaluationResult(
        accuracy=float(matrix.diag().sum()) / max(count, 1),
        loss=loss / max(count, 1),
        num_samples=count,
        per_class_accuracy=per_class,
        confusion_matrix=matrix.tolist(),
    )


def train_one_epoch(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    description: str,
) -> tuple[float, float]:
    """One pass over the shuffled, augmented training data; returns (mean loss, accuracy)."""
    network.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    batch_size, _, _ = config.resolved()
    batches = list(_batches(images.shape[0], batch_size, generator))
    progress = tqdm(
        batches, desc=description, leave=False, disable=not config.progress, unit="batch"
    )
    for step, indices in enumerate(progress):
        batch = images[indices].to(device, non_blocking=True)
        target = labels[indices].to(device, non_blocking=True)
        batch = augment(batch, config, generator).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            logits = network(batch)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: a .item() per step would stall a GPU every batch.
        total_loss += loss.detach() * target.shape[0]
        correct += (logits.detach().argmax(1) == target).sum()
        seen += target.shape[0]
        if config.progress and step % 20 == 0:
            progress.set_postfix(loss=f"{float(total_loss) / seen:.4f}")
    if not math.isfinite(float(total_loss)):
        raise FloatingPointError(
            f"training diverged (loss is {float(total_loss)}); lower the learning rate (--lr)"
        )
    return float(total_loss) / max(seen, 1), float(correct) / max(seen, 1)


def fit(
    network: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor | None,
    val_labels: torch.Tensor | None,
    num_classes: int,
    config: TrainConfig,
    device: torch.device,
) -> TrainingHistory:
    """Train `network` in place (warm-up, then annealing); validate after every epoch.

    Fills in `config`'s automatic fields first (`TrainConfig.resolve`)."""
    generator = torch.Generator().manual_seed(config.seed)
    samples_per_epoch, optimizer, scheduler = _optimisation(
        network, config, int(train_images.shape[0])
    )
    history = TrainingHistory(
        train_size=int(train_images.shape[0]),
        val_size=int(val_images.shape[0]) if val_images is not None else 0,
    )
    started, cpu_started, load_started = time.perf_counter(), time.process_time(), _load_average()
    epochs = tqdm(
        range(1, config.epochs + 1), desc="epochs", disable=not config.progress, unit="epoch"
    )
    for epoch in epochs:
        epoch_started = time.perf_counter()
        lr = float(scheduler.get_last_lr()[0])
        train_loss, train_accuracy = train_one_epoch(
            network,
            train_images,
            train_labels,
            optimizer,
            scheduler,
            config,
            generator,
            device,
            description=f"epoch {epoch}/{config.epochs}",
        )
        val_loss, val_accuracy = _validate(
            network, val_images, val_labels, num_classes, config, device
        )
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            lr=lr,
            seconds=time.perf_counter() - epoch_started,
        )
        history.epochs.append(record)
        _report_epoch(epochs, record, config.epochs)
    network.eval()
    history.seconds = time.perf_counter() - started
    history.cpu_seconds = time.process_time() - cpu_started
    history.load_average = (load_started, _load_average())
    history.images_per_second = config.epochs * samples_per_epoch / max(history.seconds, 1e-9)
    return history


def _optimisation(
    network: nn.Module, config: TrainConfig, train_size: int
) -> tuple[int, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """`config` resolved for `train_size` images; the images per epoch, the optimizer and its schedule."""
    config.resolve(train_size)
    batch_size, _, _ = config.resolved()
    # Whole batches only, unless the data is smaller than one batch.
    samples_per_epoch = (
        train_size - train_size % batch_size if train_size >= batch_size else train_size
    )
    optimizer = _optimizer(network, config)
    total_steps = config.epochs * max(samples_per_epoch // batch_size, 1)
    return samples_per_epoch, optimizer, _scheduler(optimizer, config, total_steps)


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate over `total_steps` (see `TrainConfig.schedule`)."""
    _, lr, warmup_fraction = config.resolved()
    if config.schedule == "cosine":
        warmup = max(1, round(warmup_fraction * total_steps))

        def factor(step: int) -> float:
            """Linear from 1/warmup up to 1 over the warm-up, then cosine down to zero."""
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total_steps - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if total_steps < 8:  # too few steps for a one-cycle warm-up and annealing (it divides by zero)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=total_steps,
        pct_start=max(warmup_fraction, 2.0 / total_steps),
        cycle_momentum=config.optimizer == "sgd",
    )


def _validate(
    network: nn.Module,
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    num_classes: int,
    config: TrainConfig,
    device: torch.device,
) -> tuple[float | None, float | None]:
    """(loss, accuracy) on the validation split; (None, None) when there is none."""
    if images is None or labels is None or not images.shape[0]:
        return None, None
    result = evaluate(network, images, labels, num_classes, device, config.eval_batch_size)
    return result.loss, result.accuracy


def _report_epoch(progress: tqdm[int], record: EpochRecord, epochs: int) -> None:
    """One log line per epoch, and its figures on the progress bar."""
    summary = f"loss={record.train_loss:.4f} train_acc={record.train_accuracy:.4f}"
    if record.val_accuracy is not None:
        summary += f" val_acc={record.val_accuracy:.4f}"
    progress.set_postfix_str(summary)
    logger.info(
        "event=epoch epoch=%d epochs=%d %s lr=%.4f seconds=%.1f",
        record.epoch,
        epochs,
        summary,
        record.lr,
        record.seconds,
    )
