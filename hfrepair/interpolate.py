"""Linear interpolation of two state dicts, ``(1 - alpha) * A + alpha * B``, and weighted
averages of several."""

from __future__ import annotations

import torch


def interpolate(
    state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Interpolate floating-point tensors; integer buffers (``num_batches_tracked``) keep A's.

    Half-precision tensors are interpolated in float32 and rounded once, back to A's dtype.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return {
        key: _lerp(value, state_b[key], alpha) if value.is_floating_point() else value.clone()
        for key, value in state_a.items()
    }


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
