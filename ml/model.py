"""The network: a small VGG-style CNN with BatchNorm and residual convs, and its fused inference form."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class ArchitectureConfig:
    """Everything needed to rebuild the network's shapes; stored in every checkpoint."""

    num_channels: int = 1
    num_classes: int = 10
    image_size: tuple[int, int] = (28, 28)
    # One entry per stage; a 2×2 max-pool sits between stages, so stage s runs at size / 2**s.
    widths: tuple[int, ...] = (16, 32, 64, 128)
    # Convs per stage: the first changes the width, the rest are residual (x + conv(x)).
    convs_per_stage: tuple[int, ...] = (2, 2, 2, 1)
    # "avg": global average pool then linear; "flatten": linear over the whole last feature map
    # (keeps where things are, which helps on centred images like Fashion-MNIST, at a small cost).
    head: str = "flatten"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_channels < 1 or self.num_classes < 2:
            raise ValueError("need num_channels >= 1 and num_classes >= 2")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width), got {self.image_size}")
        if not self.widths or len(self.widths) != len(self.convs_per_stage):
            raise ValueError("widths and convs_per_stage need one entry per stage")
        if min(self.convs_per_stage) < 1 or min(self.widths) < 1:
            raise ValueError("every stage needs at least one conv and a positive width")
        smallest = min(self.image_size) >> (len(self.widths) - 1)
        if smallest < 1:
            raise ValueError(
                f"{len(self.widths)} stages halve {self.image_size} to nothing; use fewer stages"
            )
        if self.head not in ("avg", "flatten"):
            raise ValueError(f"head must be 'avg' or 'flatten', got {self.head!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def feature_size(self) -> tuple[int, int]:
        """Height and width of the last stage's feature map."""
        shrink = len(self.widths) - 1
        return (self.image_size[0] >> shrink, self.image_size[1] >> shrink)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchitectureConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        values = dict(data)
        for key in ("image_size", "widths", "convs_per_stage"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def multiply_accumulates(self) -> int:
        """Multiply-accumulates of one forward pass for one image (convs and the head)."""
        height, width = self.image_size
        channels = self.num_channels
        total = 0
        for stage, (out_channels, convs) in enumerate(
            zip(self.widths, self.convs_per_stage, strict=True)
        ):
            if stage:
                height, width = height // 2, width // 2
            total += height * width * 9 * channels * out_channels
            total += (convs - 1) * height * width * 9 * out_channels * out_channels
            channels = out_channels
        head_inputs = channels * (height * width if self.head == "flatten" else 1)
        return total + head_inputs * self.num_classes


class ConvBNReLU(nn.Module):
    """3×3 conv, BatchNorm, ReLU; with `residual`, the input is added back before the ReLU."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_channels)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        if self.residual:
            out = out + x
        return torch.relu(out)


class Normalize(nn.Module):
    """uint8 0..255 or float 0..1 in, per-channel standardised float out.

    The statistics are buffers (saved with the weights, never trained); `fit` sets them from the
    training images, so callers never normalise themselves.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, num_channels, 1, 1), 0.5))
        self.register_buffer("inv_std", torch.full((1, num_channels, 1, 1), 2.0))

    def set_statistics(self, mean: list[float], std: list[float]) -> None:
        """Use these per-channel mean and standard deviation (of images scaled to [0, 1])."""
        if len(mean) != self.mean.shape[1] or len(std) != self.mean.shape[1] or min(std) <= 0:
            raise ValueError(
                f"need {self.mean.shape[1]} means and positive stds, got {mean}, {std}"
            )
        self.mean.copy_(torch.tensor(mean).view_as(self.mean))
        self.inv_std.copy_(1.0 / torch.tensor(std).view_as(self.inv_std))

    def statistics(self) -> tuple[list[float], list[float]]:
        """The per-channel (mean, std) in use."""
        return self.mean.flatten().tolist(), (1.0 / self.inv_std).flatten().tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().mul_(1.0 / 255.0)
        return (x - self.mean) * self.inv_std


class ConvNet(nn.Module):
    """The classifier network. Shapes are all known from the config at construction (no lazy modules)."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.config = config
        self.normalize = Normalize(config.num_channels)
        stages: list[nn.Module] = []
        channels = config.num_channels
        for stage, (width, convs) in enumerate(
            zip(config.widths, config.convs_per_stage, strict=True)
        ):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if stage else []
            layers.append(ConvBNReLU(channels, width, residual=False))
            layers.extend(ConvBNReLU(width, width, residual=True) for _ in range(convs - 1))
            stages.append(nn.Sequential(*layers))
            channels = width
        self.features = nn.Sequential(*stages)
        if config.head == "avg":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            head_inputs = channels
        else:
            self.pool = nn.Identity()
            height, width_px = config.feature_size
            head_inputs = channels * height * width_px
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(head_inputs, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, ConvBNReLU) and module.residual:
                # Residual branches start near zero so each block begins as the identity (as in
                # "Bag of Tricks"/Goyal et al.); deep stacks then train stably at high learning rates.
                assert isinstance(module.bn, nn.BatchNorm2d)
                nn.init.zeros_(module.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (uint8 or float [0, 1], N×C×H×W) → logits N×num_classes.

        The normalised images take the weights' dtype, so a copy with bfloat16 convs and linear
        layers (`bf16_for_inference`) runs end to end in bfloat16."""
        x = self.features(self.normalize(x).to(self.classifier.weight.dtype))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


def fused_for_inference(network: ConvNet) -> ConvNet:
    """An eval-mode copy with each BatchNorm folded into its conv: same outputs, fewer ops per image."""
    fused = copy.deepcopy(network).eval()
    for module in fused.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    for parameter in fused.parameters():
        parameter.requires_grad_(False)
    return fused


def bf16_for_inference(network: ConvNet) -> ConvNet:
    """A copy whose convs and linear layers hold bfloat16 weights: what `torch.autocast` computes
    (it casts exactly those layers' inputs and weights to bfloat16), without casting on every call,
    so the pass can be traced into one graph. Normalisation stays in float32."""
    reduced = copy.deepcopy(network).eval()
    for module in reduced.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.to(torch.bfloat16)
    return reduced


def count_parameters(network: nn.Module) -> int:
    """Number of trainable and frozen parameters (buffers excluded)."""
    return sum(p.numel() for p in network.parameters())
