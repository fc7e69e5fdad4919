"""Shared plumbing of the built-in architectures: Hub-style save/load and image settings.

Each built-in model saves as a folder with ``config.json`` + ``model.safetensors`` through
huggingface_hub's ``PyTorchModelHubMixin``; ``config.json`` also records ``model_type`` so
that :func:`hfrepair.io.load_model` can tell which class to rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import PyTorchModelHubMixin, load_torch_model
from torch import nn

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class BuiltinModel(nn.Module, PyTorchModelHubMixin, library_name="hfrepair", tags=["hfrepair"]):
    """Base of the built-in classifiers; subclasses set ``model_type``."""

    model_type: str = ""

    def __init__(self) -> None:
        super().__init__()
        # Written into config.json by the mixin, read back by hfrepair.io.load_model.
        self._hub_mixin_config["model_type"] = self.model_type

    @classmethod
    def from_folder(cls, folder: str | Path) -> BuiltinModel:
        """Load a saved folder strictly (the mixin's loader ignores missing keys by default);
        sharded weights (``model.safetensors.index.json``) load too."""
        config = json.loads((Path(folder) / "config.json").read_text())
        config.pop("model_type", None)
        model = cls(**config)
        load_torch_model(model, folder, strict=True, safe=True)
        return model.eval()


def init_weights(model: nn.Module) -> None:
    """Kaiming init for conv/linear layers: deep plain networks train from it on CPU."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
