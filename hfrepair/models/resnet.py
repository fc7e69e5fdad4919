"""CIFAR-style ResNet (ResNet20 by default) with a width multiplier and a choice of norm."""

from __future__ import annotations

import torch
from torch import nn

from .base import MNIST_MEAN, MNIST_STD, BuiltinModel, init_weights

NORMALIZATIONS = ("batchnorm", "layernorm", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        # LayerNorm over (C, H, W) with a per-channel affine, as in LN-ResNets.
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """conv-norm-relu-conv-norm, plus identity or 1x1-conv shortcut, then add and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm1 = _norm(norm, out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.norm2 = _norm(norm, out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias), _norm(norm, out_channels)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        return self.relu2(branch + self.shortcut(x))


class ResNet(BuiltinModel):
    """Three stages of 16w, 32w, 64w channels; ``blocks_per_stage=3`` gives ResNet20."""

    model_type = "hfrepair-resnet"

    def __init__(
        self,
        width: int = 1,
        blocks_per_stage: int = 3,
        normalization: str = "batchnorm",
        base_channels: int = 16,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: tuple[float, ...] = MNIST_MEAN,
        std: tuple[float, ...] = MNIST_STD,
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"ResNet normalization must be one of {NORMALIZATIONS}, not {normalization!r}")
        self.config = dict(image_size=image_size, in_channels=in_channels, mean=list(mean), std=list(std))
        channels = [base_channels * width * 2**i for i in range(3)]
        self.conv = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=normalization == "none")
        self.norm = _norm(normalization, channels[0])
        self.relu = nn.ReLU()
        blocks = []
        previous = channels[0]
        for stage, out_channels in enumerate(channels):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(previous, out_channels, stride, normalization))
                previous = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(previous, num_classes)
        init_weights(self)
        if normalization == "none":
            # Without normalisation, start each residual branch small so the stack trains.
            for block in self.blocks:
                block.conv2.weight.data.mul_(0.1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.norm(self.conv(pixel_values))))
        return self.classifier(self.flatten(self.pool(x)))
