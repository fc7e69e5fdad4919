"""Built-in architectures: MLP, VGG and CIFAR-style ResNet, saved the Hub way."""

from .base import BuiltinModel
from .mlp import MLP
from .resnet import ResNet
from .vgg import VGG

BUILTIN_MODELS: dict[str, type[BuiltinModel]] = {cls.model_type: cls for cls in (MLP, VGG, ResNet)}

__all__ = ["BUILTIN_MODELS", "MLP", "VGG", "BuiltinModel", "ResNet"]
