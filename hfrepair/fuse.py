"""Fold per-channel affine corrections back into the conv/linear layer (or norm affine) before them.

In: a state dict, the ``weight``/``bias`` keys of a layer and an eval-mode BatchNorm that
acts on its output channels. Out: the state dict with that layer's weight rows scaled and
bias shifted, so the model keeps the endpoints' architecture and keys. Corrections of a
residual stream's sums fold through their whole stretch (:func:`fold_stream`). The arithmetic is
torch's own (``torch.nn.utils.fusion``); our correctors always normalise over the layer's
output-channel axis, so the Linear-on-(N, L, C) trap of those helpers does not arise.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .spec import ActivationSite, StreamFold


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
        _scale_axis(state_dict, weight_key, weight_axis, _affine(norm)[0])
        return
    if weight_axis != 0:
        state_dict[weight_key] = weight.movedim(weight_axis, 0)
        fold_batchnorm(state_dict, weight_key, bias_key, norm)
        state_dict[weight_key] = state_dict[weight_key].movedim(0, weight_axis).contiguous()
        return
    bias = state_dict[bias_key]
    args = (norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    with torch.no_grad():
        if weight.dim() == 1:  # a norm's per-unit affine: y' = s * (w n + b) + (beta - s mean)
            scale, shift = _affine(norm)
            fused_w, fused_b = weight * scale, bias * scale + shift
        elif weight.dim() > 2:
            fused_w, fused_b = fuse_conv_bn_weights(weight, bias, *args)
        else:
            fused_w, fused_b = fuse_linear_bn_weights(weight, bias, *args)
    state_dict[weight_key] = fused_w.detach().to(weight.dtype)
    state_dict[bias_key] = fused_b.detach().to(bias.dtype)


def _affine(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit ``(scale, shift)`` of an eval-mode BatchNorm, in float64."""
    with torch.no_grad():
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        return scale, norm.bias.double() - norm.running_mean.double() * scale


def _scale_axis(state_dict: dict[str, torch.Tensor], key: str, axis: int, factor: torch.Tensor) -> None:
    value = state_dict[key]
    shape = [1] * value.dim()
    shape[axis] = -1
    state_dict[key] = (value.double() * factor.to(value.device).view(shape)).to(value.dtype)


@torch.no_grad()
def fold_stream(
    state_dict: dict[str, torch.Tensor], fold: StreamFold, correctors: dict[str, _BatchNorm],
    sites: dict[str, ActivationSite],
) -> None:
    """Fold corrections of a stretch's sums (``correctors``: sum module -> eval-mode
    BatchNorm; a sum without one keeps its values) into the stretch's weights.

    With ``a_k, b_k`` the correction of sum ``k`` (``1..K``), the fused stream carries
    ``D_k = a_{k+1} ... a_K`` times the corrected one: the entry's rows and bias take
    ``D_0``, writer ``k`` its rows and bias ``D_{k-1}`` plus the shift ``D_k b_k`` (divided by
    its gain, which multiplies it afterwards), and the readers of point ``k`` take ``1 / D_k``.
    Exact: no non-linearity touches the stream inside the stretch, and the last sum is
    carried unscaled (``D_K = 1``) to whatever reads it.
    """
    units = len(next(iter(correctors.values())).weight)
    affine = [_affine(correctors[name]) if name in correctors else
              (torch.ones(units, dtype=torch.float64), torch.zeros(units, dtype=torch.float64)) for name in fold.sums]
    carried = [torch.ones(units, dtype=torch.float64)]  # D_K, then D_{K-1} = a_K D_K, ... D_0
    for scale, _ in reversed(affine):
        carried.insert(0, carried[0] * scale.cpu())
    entry = sites[fold.entry]
    _scale_axis(state_dict, entry.weight, entry.weight_axis, carried[0])
    _scale_axis(state_dict, entry.bias, 0, carried[0])
    for k, (writer, gain) in enumerate(zip(fold.writers, fold.gains), start=1):
        site = sites[writer]
        shift = carried[k] * affine[k - 1][1].cpu()
        if gain is not None:
            factor = state_dict[gain].double().cpu()
            if not bool((factor != 0).all()):
                raise ValueError(f"cannot fold the correction of {fold.sums[k - 1]}: {gain} has zero entries")
            shift = shift / factor
        _scale_axis(state_dict, site.weight, site.weight_axis, carried[k - 1])
        bias = state_dict[site.bias]
        state_dict[site.bias] = (bias.double() * carried[k - 1].to(bias.device) + shift.to(bias.device)).to(bias.dtype)
    for k, readers in enumerate(fold.readers):
        for key, axis in readers:
            _scale_axis(state_dict, key, axis, 1 / carried[k])
