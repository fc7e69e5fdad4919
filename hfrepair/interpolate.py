"""Linear interpolation of two state dicts: ``(1 - alpha) * A + alpha * B``."""

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
