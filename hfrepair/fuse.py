"""Fold per-channel affine corrections back into the conv/linear layer (or norm affine) before them.

In: a state dict, the ``weight``/``bias`` keys of a layer and an eval-mode BatchNorm that
acts on its output channels. Out: the state dict with that layer's weight rows scaled and
bias shifted, so the model keeps the endpoints' architecture and keys. The arithmetic is
torch's own (``torch.nn.utils.fusion``); our correctors always normalise over the layer's
output-channel axis, so the Linear-on-(N, L, C) trap of those helpers does not arise.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights


def fold_batchnorm(
    state_dict: dict[str, torch.Tensor], weight_key: str, bias_key: str | None, norm: _BatchNorm,
    weight_axis: int = 0,
) -> None:
    """Replace ``state_dict[weight_key]``/``[bias_key]`` by the layer fused with ``norm``.

    ``weight_axis`` is the weight's output-unit axis (1 for GPT-2's Conv1D). A scale-only
    corrector (``norm.scale_only``, for layers without a bias) folds into the weight alone.
    """
    weight = state_dict[weight_key]
    if getattr(norm, "scale_only", False):
        scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
        shape = [1] * weight.dim()
        shape[weight_axis] = -1
        state_dict[weight_key] = (weight * scale.view(shape).to(weight.device)).to(weight.dtype)
        return
    if weight_axis != 0:
        state_dict[weight_key] = weight.movedim(weight_axis, 0)
        fold_batchnorm(state_dict, weight_key, bias_key, norm)
        state_dict[weight_key] = state_dict[weight_key].movedim(0, weight_axis).contiguous()
        return
    bias = state_dict[bias_key]
    args = (norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    with torch.no_grad():
        if weight.dim() == 1:  # a norm's per-unit affine: y' = s * (w n + b - mean) + beta
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            fused_w, fused_b = weight * scale, (bias - norm.running_mean) * scale + norm.bias
        elif weight.dim() > 2:
            fused_w, fused_b = fuse_conv_bn_weights(weight, bias, *args)
        else:
            fused_w, fused_b = fuse_linear_bn_weights(weight, bias, *args)
    state_dict[weight_key] = fused_w.detach().to(weight.dtype)
    state_dict[bias_key] = fused_b.detach().to(bias.dtype)
