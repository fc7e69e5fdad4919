"""What a batch's inputs are, and which of their positions count.

Inputs are a tensor (images, packed token blocks) or a mapping of named tensors, as a
tokenizer returns them for padded text (``input_ids``, ``attention_mask``, ...). Every pass
calls models through :func:`run_model` and moves inputs with :func:`to_device`, so no stage
needs to know which kind it has.

Padding never enters a statistic: while a pass runs a padded batch under
:func:`counting_real_tokens`, :func:`counted_rows` keeps only the positions its attention
mask marks as real in every activation laid out ``(batch, sequence, ...)``; the statistics
and REPAIR's correctors take their samples through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_REAL_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("real_tokens", default=None)


def run_model(model: nn.Module, inputs):
    """``model`` on a tensor, or on a mapping of keyword inputs, in its own dtype."""
    inputs = in_model_dtype(inputs, model)
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s floating-point weights (float16 for a half-precision endpoint)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def in_model_dtype(inputs, model: nn.Module):
    """Floating inputs (images) cast to the model's dtype, so that half-precision endpoints
    take the float32 batches the data streams produce; token ids and masks are left alone."""
    dtype = floating_dtype(model)

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    if isinstance(inputs, Mapping):
        return {name: cast(tensor) for name, tensor in inputs.items()}
    return cast(inputs)


def model_outputs(model: nn.Module, inputs) -> torch.Tensor:
    """The logits of a plain module or of a transformers model (``.logits``)."""
    out = run_model(model, inputs)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def inputs_of(batch):
    """The inputs of a batch given as inputs alone or as an ``(inputs, labels)`` pair."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def to_device(inputs, device: torch.device):
    if isinstance(inputs, Mapping):
        return {name: tensor.to(device) for name, tensor in inputs.items()}
    return inputs.to(device)


def rows(inputs) -> int:
    """Examples in a batch of inputs."""
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return inputs.shape[0]


def select_rows(inputs, index):
    """The examples ``index`` (a slice or indices) of a batch of inputs."""
    if isinstance(inputs, Mapping):
        return {name: tensor[index] for name, tensor in inputs.items()}
    return inputs[index]


def first_rows(inputs, count: int):
    """The first ``count`` examples of a batch of inputs."""
    return select_rows(inputs, slice(0, count))


@contextmanager
def counting_real_tokens(inputs) -> Iterator[None]:
    """Within this block, :func:`counted_rows` drops the padded positions of ``inputs``."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    token = _REAL_TOKENS.set(None if mask is None or bool(mask.all()) else mask.bool())
    try:
        yield
    finally:
        _REAL_TOKENS.reset(token)


def counting_padding() -> bool:
    """Whether a padded batch is running under :func:`counting_real_tokens` now."""
    return _REAL_TOKENS.get() is not None


def counted_rows(units_last: torch.Tensor) -> torch.Tensor:
    """``(samples, units)`` rows of an activation whose units are on its last axis: every
    position, except the padded ones of a ``(batch, sequence, ...)`` activation inside
    :func:`counting_real_tokens`."""
    mask = _REAL_TOKENS.get()
    if mask is not None and units_last.dim() >= 3 and units_last.shape[:2] == mask.shape:
        units_last = units_last[mask]
    return units_last.reshape(-1, units_last.shape[-1])
