"""Linear interpolation of two state dicts, ``(1 - alpha) * A + alpha * B``, and weighted
averages of several."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch


def interpolate(
    state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Interpolate floating-point tensors; integer buffers (``num_batches_tracked``) keep A's.

    Half-precision tensors are interpolated in float32 and rounded once, back to A's dtype.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    check_same_tensors(state_a, state_b)
    return {
        key: _lerp(value, state_b[key], alpha) if value.is_floating_point() else value.clone()
        for key, value in state_a.items()
    }


def check_same_tensors(state_a, state_b) -> None:
    """Two state dicts with the same keys and shapes (a mismatch named, not a KeyError or a
    size error from inside the arithmetic)."""
    for name, state in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(state, Mapping):
            raise ValueError(f"{name} must be a state dict (a mapping of names to tensors), not {type(state).__name__}")
    key = mismatched_key(state_a, state_b)
    if key is not None and (key not in state_a or key not in state_b):
        raise ValueError(f"the state dicts hold different tensors (e.g. {key!r} is in one only)")
    if key is not None:
        raise ValueError(f"the state dicts differ in shape at {key}: {tuple(state_a[key].shape)} vs "
                         f"{tuple(state_b[key].shape)}")


def mismatched_key(state_a, state_b) -> str | None:
    """The first name that one state dict lacks (in sorted order), else the first whose
    tensors differ in shape; None when both hold the same names and shapes."""
    only = sorted(set(state_a) ^ set(state_b))
    if only:
        return only[0]
    return next((key for key, value in state_a.items() if value.shape != state_b[key].shape), None)


def identical(state_a, state_b) -> bool:
    """Whether two state dicts of the same names hold equal tensors (a model merged with itself)."""
    return all(torch.equal(value, state_b[key]) for key, value in state_a.items())


def _lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    wide = torch.promote_types(a.dtype, torch.float32)
    return torch.lerp(a.to(wide), b.to(wide), alpha).to(a.dtype)


def average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """``sum_k weights[k] * states[k]`` for floating tensors (in at least float32, rounded once
    to the first state's dtype); integer buffers keep the first state's."""
    first = states[0]
    result = {}
    for key, value in first.items():
        if not value.is_floating_point():
            result[key] = value.clone()
            continue
        wide = torch.promote_types(value.dtype, torch.float32)
        total = sum(weight * state[key].to(wide) for weight, state in zip(weights, states))
        result[key] = total.to(value.dtype)
    return result
