"""Shared plumbing of the built-in architectures: Hub-style save/load and image settings.

Each built-in model saves as a folder with ``config.json`` + ``model.safetensors`` through
huggingface_hub's ``PyTorchModelHubMixin``; ``config.json`` also records ``model_type`` so
that :func:`hfrepair.io.load_model` can tell which class to rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, load_torch_model
from safetensors import safe_open
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
        sharded weights (``model.safetensors.index.json``) load too. The model keeps the
        floating dtype its weights were saved in (a float16 endpoint stays float16)."""
        config = json.loads((Path(folder) / "config.json").read_text())
        config.pop("model_type", None)
        model = cls(**config)
        load_torch_model(model, folder, strict=True, safe=True)
        return model.to(saved_floating_dtype(folder)).eval()


# safetensors' dtype names, for the floating dtypes a checkpoint is saved in
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def saved_floating_dtype(folder: str | Path) -> torch.dtype:
    """The dtype of the floating-point tensors in a folder's safetensors files (read from
    their headers); float32 when they mix several, since it holds each of them exactly."""
    found = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            found |= {weights.get_slice(key).get_dtype() for key in weights.keys()}
    floating = {SAFETENSORS_DTYPES[name] for name in found if name in SAFETENSORS_DTYPES}
    return floating.pop() if len(floating) == 1 else torch.float32


def init_weights(model: nn.Module) -> None:
    """Kaiming init for conv/linear layers: deep plain networks train from it on CPU."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
