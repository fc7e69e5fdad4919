"""Multi-layer perceptron classifier, with optional BatchNorm that folds away after training."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval

from .base import MNIST_MEAN, MNIST_STD, BuiltinModel, init_weights


class MLP(BuiltinModel):
    """``depth`` hidden layers of ``width`` units: Linear -> [BatchNorm] -> ReLU.

    Deep plain MLPs do not train here, so (as the REPAIR paper's code does) deep ones are
    trained with ``normalization="batchnorm"`` and turned into a plain MLP with
    :meth:`fold_batchnorm` before merging.
    """

    model_type = "hfrepair-mlp"

    def __init__(
        self,
        depth: int = 3,
        width: int = 128,
        normalization: str = "none",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: tuple[float, ...] = MNIST_MEAN,
        std: tuple[float, ...] = MNIST_STD,
    ) -> None:
        super().__init__()
        if normalization not in ("batchnorm", "none"):
            raise ValueError(f"MLP normalization must be 'batchnorm' or 'none', not {normalization!r}")
        self.config = dict(
            depth=depth, width=width, normalization=normalization, num_classes=num_classes,
            in_channels=in_channels, image_size=image_size, mean=list(mean), std=list(std),
        )
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_channels * image_size * image_size
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width))
            if normalization == "batchnorm":
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.layers = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)

    def fold_batchnorm(self) -> MLP:
        """A plain (``normalization="none"``) MLP computing the same function in eval mode."""
        plain = MLP(**{**self.config, "normalization": "none"})
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        norms = [m for m in self.layers if isinstance(m, nn.BatchNorm1d)]
        targets = [m for m in plain.layers if isinstance(m, nn.Linear)]
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for i, (source, target) in enumerate(zip(linears, targets)):
                folded = fuse_linear_bn_eval(source, norms[i]) if i < len(norms) else source
                target.weight.copy_(folded.weight)
                target.bias.copy_(folded.bias)
        self.train(was_training)
        return plain.eval()
