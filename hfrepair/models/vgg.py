"""VGG-style convolutional classifier without normalisation."""

from __future__ import annotations

import torch
from torch import nn

from .base import MNIST_MEAN, MNIST_STD, BuiltinModel, init_weights


class VGG(BuiltinModel):
    """Stages of ``layers_per_stage`` 3x3 conv+ReLU layers, max-pooled between stages.

    Depth is ``len(widths) * layers_per_stage`` conv layers; global average pooling feeds a
    linear classifier, so any input size works.
    """

    model_type = "hfrepair-vgg"

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        layers_per_stage: int = 2,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: tuple[float, ...] = MNIST_MEAN,
        std: tuple[float, ...] = MNIST_STD,
    ) -> None:
        super().__init__()
        self.config = dict(image_size=image_size, in_channels=in_channels, mean=list(mean), std=list(std))
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(layers_per_stage):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(pixel_values))))
