"""REPAIR: restore the activation statistics that interpolation collapses (paper Section 4).

In: the interpolated state dict, the endpoints' :class:`~hfrepair.statistics.Statistics`,
the permutations, ``alpha`` and (exact variant) calibration batches. Out: a state dict with
the endpoints' keys whose conv/linear outputs have mean ``(1-a) mu_A + a mu_B`` and
standard deviation ``(1-a) s_A + a s_B`` per channel.

One BatchNorm does every job (paper appendix B.2): a :class:`ChannelBatchNorm` with affine
``(std_goal, mean_goal)`` is added after each corrected layer. In train mode with
cumulative statistics it measures the interpolated network (``repair``); with analytic
running statistics it is the closed-form correction (``closed-form``); in eval mode it is
an affine map that :mod:`hfrepair.fuse` folds into the layer. Layers already followed by a
BatchNorm are corrected by that BatchNorm: its statistics are re-estimated (``reset``).

Methods:

* ``repair``: exact; one pass of calibration batches through the interpolated network.
* ``closed-form``: no forward pass in the merged network; exact for the first layer only.
* ``reset``: re-estimate the existing BatchNorm statistics only.
* ``none``: plain interpolation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batches import counted_rows, counting_padding
from .fuse import fold_batchnorm, fold_stream
from .passes import Tap, run_pass
from .spec import (ActivationSite, PermutationSpec, check_permutations, check_state_dict, load_into,
                   with_state_dict)
from .statistics import Statistics, centre_rows, check_statistics

METHODS = ("repair", "closed-form", "reset", "none")
BN_EPS = 1e-5


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the units on ``axis`` of any tensor (conv: 1, linear: -1).

    In train mode it normalises each batch with that batch's statistics (the paper's exact
    variant: later layers already see corrected inputs) and accumulates, in float64, each
    batch's example count, ``count * mean`` and ``count * (var + mean**2)``, so the statistics
    it folds weight all examples alike whatever the batch sizes (a cumulative BatchNorm
    weights batches alike: a last batch of 2 would count as much as one of 256) and include
    the spread between batch means. The batch's own mean and variance (float32)
    are needed to normalise anyway; combining them in float64 keeps the result exact to
    float32 rounding without converting every activation to float64, which used to cost
    more than the forward pass itself. A batch with one example, which has no statistics of
    its own, is normalised with those accumulated so far. :meth:`finish` turns the sums into
    the running statistics used in eval mode and folded into the layer.

    ``scale_only``: the corrector of a layer without a bias (Llama's projections, RMSNorm):
    it only rescales, ``x * weight / std``, so that it folds into weight rows alone.
    """

    def __init__(self, channels: int, axis: int, eps: float = BN_EPS, scale_only: bool = False) -> None:
        super().__init__(channels, eps=eps, momentum=None)
        self.axis = axis
        self.scale_only = scale_only
        self.register_buffer("sums", torch.zeros(3, channels, dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim()
        count = x.numel() // x.shape[axis]
        units_last = x.movedim(axis, -1)
        if self.training and count > 1 and not self.scale_only and not counting_padding():
            if units_last.is_contiguous():
                # Units innermost in memory (a transformer's (N, T, C), a channels-last conv
                # output) are read as a (samples, units) view and normalised in that layout:
                # torch's BatchNorm kernel over it gives different bits for different thread
                # counts, a units-first copy costs more than the rest, and the output keeps
                # the layout the next conv is fastest on.
                rows = units_last.reshape(-1, x.shape[axis]).float()
                centred, offset, var = self._row_moments(rows)
                scale = self.weight / torch.sqrt(var + self.eps)
                shift = self.bias - offset * scale
                # Unless differentiated, the centred copy becomes the output, in one sweep: no
                # second activation-sized block (each new one costs page faults on a CPU).
                differentiated = centred.requires_grad or scale.requires_grad
                out = torch.addcmul(shift, centred, scale, out=None if differentiated else centred)
                return out.view(units_last.shape).movedim(-1, axis).to(x.dtype)
            if axis == 1:  # a contiguous conv or (N, C) output: torch's own kernel normalises
                # and measures in one pass; it returns the mean and 1 / sqrt(var + eps).
                out, mean, inverse_std = torch.native_batch_norm(x.float(), self.weight, self.bias, None, None, True,
                                                                 0.0, self.eps)
                self._add(count, mean, (inverse_std.double() ** -2 - self.eps).clamp_min(0))
                return out.to(x.dtype)
        if self.training:
            count, mean, var = self._batch_moments(x, axis)
            if count:
                self._add(count, mean, var)
            if count < 2:
                mean, var = self.accumulated()
        else:
            mean, var = self.running_mean, self.running_var
        # Per-unit vectors shaped to broadcast over x in its own layout: no transposed copy.
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = (self.weight / torch.sqrt(var + self.eps)).view(shape)
        wide = x.float()
        out = wide * scale if self.scale_only else (wide - mean.view(shape)) * scale + self.bias.view(shape)
        return out.to(x.dtype)

    def _add(self, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Add a batch's ``count`` samples with per-unit ``mean`` and population ``var`` (as
        numbers: a network differentiated through its correctors keeps no graph in the sums)."""
        wide_mean = mean.detach().double()
        self.sums += torch.stack([torch.full_like(wide_mean, count), count * wide_mean,
                                  count * (var.detach().double() + wide_mean * wide_mean)])

    def _row_moments(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``(samples, units)`` batch centred (:func:`~hfrepair.statistics.centre_rows`), the
        centred values' per-unit mean and population variance (float32, differentiable); the
        batch's mean and variance are added to the float64 sums. Centring first leaves the
        variance no cancellation whatever the units' offsets."""
        shift, centred, total, squares = centre_rows(rows)
        offset, squares = total / len(rows), squares / len(rows)
        wide_offset = offset.detach().double()
        self._add(len(rows), shift.detach().double() + wide_offset,
                  (squares.detach().double() - wide_offset**2).clamp_min(0))
        return centred, offset, (squares - offset * offset).clamp_min(0)

    @staticmethod
    def _batch_moments(x: torch.Tensor, axis: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """Samples in the batch and their per-unit mean and population variance (float32).

        Reduced over every other axis in the tensor's own layout (a conv's (N, C, H, W) over
        N, H, W), several times faster than the same reduction over a units-last copy; a
        padded text batch counts its real positions only (padding is normalised, never counted).
        """
        if counting_padding():
            samples = counted_rows(x.movedim(axis, -1)).float()
            if not len(samples):
                return 0, None, None
            return len(samples), samples.mean(0), samples.var(0, unbiased=False)
        others = [d for d in range(x.dim()) if d != axis]
        var, mean = torch.var_mean(x.float(), dim=others, unbiased=False)
        return x.numel() // x.shape[axis], mean, var

    def accumulated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (population) variance of every example seen in train mode."""
        count, total, squares = self.sums
        mean = total / count
        return mean.float(), (squares / count - mean * mean).clamp_min(0).float()

    def finish(self) -> None:
        mean, var = self.accumulated()
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)


def corrector_eps(goal_std: torch.Tensor) -> float:
    """BatchNorm's eps, shrunk for sites whose variance is tiny (early attention outputs can
    have variances near 1e-4, where an absolute 1e-5 would miss the goal by over 10%)."""
    return min(BN_EPS, 1e-3 * float((goal_std.double() ** 2).mean()) + 1e-12)


@dataclass
class Goal:
    """Target and predicted statistics of one site in the interpolated network."""

    mean: torch.Tensor
    std: torch.Tensor
    predicted_var: torch.Tensor | None  # closed form (Eq. 5); needs cross-products


def site_goal(stats: Statistics, site: ActivationSite, perm: torch.Tensor, alpha: float) -> Goal:
    pair = stats.pairs[site.module]
    perm = perm.to(pair.a.mean.device)
    mean_a, std_a = pair.a.mean, pair.a.std
    mean_b, std_b = pair.b.mean[perm], pair.b.std[perm]
    var = None
    if pair.cross is not None:
        cov = pair.covariance()[torch.arange(len(perm)), perm]
        var = ((1 - alpha) ** 2 * std_a**2 + alpha**2 * std_b**2 + 2 * alpha * (1 - alpha) * cov).clamp_min(0)
    return Goal(mean=(1 - alpha) * mean_a + alpha * mean_b, std=(1 - alpha) * std_a + alpha * std_b, predicted_var=var)


def correction_sites(spec: PermutationSpec) -> list[ActivationSite]:
    """Outputs REPAIR can correct and fold: conv/linear outputs with a bias or a BN, and the
    outputs of per-unit-affine norms (LayerNorm, GroupNorm) whose input is not already a
    corrected output: a norm after a bias-free conv (the correction folds into the norm),
    or a norm that reads a transformer's residual stream. A norm right after a corrected
    layer (ConvNeXt's LayerNorm after its depthwise conv) is left alone.
    Networks with no bias anywhere (Llama: bias-free projections, RMSNorm) get a scale-only
    correction of every projection output and norm output (:func:`correction_mode`).
    The sums of the spec's foldable stream stretches (:class:`~hfrepair.spec.StreamFold`)
    are corrected too: their corrections fold back through the stretch."""
    sites, corrected = [], set()
    biased = any(s.bias or s.batchnorm for s in spec.sites if s.kind in ("linear", "norm"))
    sums = {name for fold in spec.streams for name in fold.sums}
    for site in spec.sites:  # graph order: a norm's input comes before it
        if site.kind == "linear" and (site.batchnorm or site.bias or (not biased and site.weight)):
            sites.append(site)
            corrected.add(site.module)
        elif site.kind == "norm" and site.weight and (site.bias or not biased) and site.source not in corrected:
            sites.append(site)
        elif site.kind == "sum" and site.module in sums:
            sites.append(site)
    return sites


def correction_mode(site: ActivationSite) -> str:
    """How a site is corrected: ``batchnorm`` (re-estimate the BN after it), ``affine``
    (scale and shift, folded into weight rows and bias), ``scale`` (no bias to take a
    shift: the scale alone, folded into weight rows or the norm's weight) or ``stream`` (a
    residual sum's scale and shift, folded back through its stretch of the stream)."""
    if site.batchnorm:
        return "batchnorm"
    if site.kind == "sum":
        return "stream"
    return "affine" if site.bias else "scale"


def block_output_sites(spec: PermutationSpec) -> list[ActivationSite]:
    """Activations on a residual stream (a group written by several layers): block outputs."""
    streams = {name for name in spec.groups if len(spec.sites_of(name, ("linear",))) > 1}
    return [s for s in spec.sites if s.kind == "activation" and s.group in streams]


@torch.no_grad()
def repair(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    spec: PermutationSpec,
    stats: Statistics,
    perms: dict[str, torch.Tensor],
    alpha: float,
    method: str = "repair",
    batches: Iterable | None = None,
    max_examples: int | None = None,
    accelerator: Accelerator | None = None,
    sites: list[ActivationSite] | None = None,
    workspace: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The corrected, fused state dict of the interpolated network ``state_dict``.

    ``model`` only supplies the architecture; it is not modified. With an ``accelerator``
    the exact variant's pass runs on every process and its statistics are reduced.
    ``sites`` overrides :func:`correction_sites` (for ablations: a subset, or sites with
    ``bias=None`` for scale-only corrections). ``workspace``: a copy of the architecture to
    load the network into and measure in, instead of a new deep copy of ``model``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (0 = A, 1 = B), not {alpha}")
    check_state_dict(state_dict, spec)
    check_permutations(spec, perms, every_group=True)
    if method == "none":
        return dict(state_dict)
    if method == "reset":
        sites = []
    elif sites is None:
        sites = correction_sites(spec)
    needed = [site.module for site in sites if not (site.batchnorm and method == "repair")]  # BNs re-estimate
    if needed:
        check_statistics(stats, needed)
    net, added = _corrected_network(model, state_dict, sites, stats, perms, alpha, method, batches, max_examples,
                                    accelerator, workspace)
    return _fold(_own_state(net, workspace), spec, sites, added)


@torch.no_grad()
def repair_block_outputs(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    spec: PermutationSpec,
    stats: Statistics,
    perms: dict[str, torch.Tensor],
    alpha: float,
    batches: Iterable,
    max_examples: int | None = None,
    accelerator: Accelerator | None = None,
    workspace: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], Tap]:
    """Exact REPAIR that also corrects residual-block outputs (after add and activation).

    The identity path carries a block-output correction into every later block, so in a
    plain ResNet it cannot be folded into the weights: returns the fused state dict of the
    foldable corrections and a tap that applies the block-output ones during a pass (pass
    it to :func:`~hfrepair.passes.run_pass` with that state loaded). Use it to measure
    what they add; it is never saved.
    """
    layer_sites = correction_sites(spec)
    blocks = block_output_sites(spec)
    net, added = _corrected_network(model, state_dict, layer_sites + blocks, stats, perms, alpha, "repair",
                                    batches, max_examples, accelerator, workspace)
    state = _fold(_own_state(net, workspace), spec, layer_sites, added)
    block_correctors = {site.module: added[site.module].eval() for site in blocks}
    return state, Corrections(block_correctors, {})


class Corrections(Tap):
    """Correctors applied to a model's layer outputs during a pass (``correctors``: module
    name -> :class:`ChannelBatchNorm`, whose output replaces the layer's), and trackers
    re-measuring the model's own BatchNorms (``trackers``: BatchNorm module name -> tracker,
    which stands in for that BatchNorm during the pass). Correctors and
    trackers in train mode measure, and their float64 sums are reduced over processes;
    in eval mode they only apply an affine map (the in-memory block-output corrections).
    """

    def __init__(self, correctors: dict[str, ChannelBatchNorm], trackers: dict[str, ChannelBatchNorm],
                 model_index: int = 0) -> None:
        self.correctors, self.trackers, self.model_index = correctors, trackers, model_index

    def _measuring(self) -> list[ChannelBatchNorm]:
        return [m for m in (*self.correctors.values(), *self.trackers.values()) if m.training]

    def attach(self, models):
        model = models[self.model_index]
        modules = dict(model.named_modules())
        handles = [modules[name].register_forward_hook(lambda _m, _i, out, c=corrector: c(out))
                   for name, corrector in self.correctors.items()]
        # Each tracker stands in for its BatchNorm during the pass (a hook would have the
        # BatchNorm's own output computed and thrown away: a second activation-sized tensor).
        return handles + [_StandIn(model, name, tracker) for name, tracker in self.trackers.items()]

    def hooked(self):
        return [(self.model_index, name) for name in (*self.correctors, *self.trackers)]

    def sums(self):
        return [m.sums for m in self._measuring()]

    def set_sums(self, sums):
        for module, total in zip(self._measuring(), sums):
            module.sums.copy_(total)

    def finish(self):
        for module in self._measuring():
            module.finish()

    def replica(self):
        return Corrections(copy.deepcopy(self.correctors), copy.deepcopy(self.trackers), self.model_index)


class _StandIn:
    """Puts ``module`` in place of the submodule ``name`` of ``model`` until ``remove``."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module) -> None:
        parent, _, self.child = name.rpartition(".")
        self.parent = model.get_submodule(parent)
        self.original = getattr(self.parent, self.child)
        setattr(self.parent, self.child, module)

    def remove(self) -> None:
        setattr(self.parent, self.child, self.original)


def goal_corrector(site: ActivationSite, goal: Goal) -> ChannelBatchNorm:
    """The corrector of ``site``: a :class:`ChannelBatchNorm` whose affine is the goal."""
    corrector = ChannelBatchNorm(len(goal.mean), site.axis, corrector_eps(goal.std),
                                 scale_only=correction_mode(site) == "scale").to(goal.mean.device)
    with torch.no_grad():
        corrector.weight.copy_(goal.std)
        corrector.bias.copy_(goal.mean)
    return corrector


def exact_correctors(spec: PermutationSpec, stats: Statistics, perms: dict[str, torch.Tensor],
                     alpha: float) -> dict[str, ChannelBatchNorm]:
    """Exact REPAIR's correctors of every site it corrects with a goal (not the BatchNorm
    re-estimates), in train mode: a network run with them is the one REPAIR measures."""
    correctors = {}
    for site in correction_sites(spec):
        if not site.batchnorm:
            order = site.order(perms, len(stats.pairs[site.module].a.total))
            correctors[site.module] = goal_corrector(site, site_goal(stats, site, order, alpha)).train()
    return correctors


def _corrected_network(model, state_dict, sites, stats, perms, alpha, method, batches, max_examples, accelerator,
                       workspace=None):
    """The interpolated network with its BatchNorms and added correctors set for ``method``."""
    if method in ("repair", "reset") and batches is None:
        raise ValueError(f"method {method!r} needs calibration batches for its forward pass")
    net = (load_into(workspace, state_dict) if workspace is not None else with_state_dict(model, state_dict)).eval()
    modules = dict(net.named_modules())
    added: dict[str, ChannelBatchNorm] = {}
    for site in sites:
        if site.batchnorm and method == "repair":
            continue  # corrected by re-estimating that BatchNorm below
        goal = site_goal(stats, site, site.order(perms, len(stats.pairs[site.module].a.total)), alpha)
        if method == "closed-form" and goal.predicted_var is None:
            raise ValueError(f"closed-form REPAIR needs cross-products at {site.module}: "
                             "collect statistics with it in cross_sites")
        if site.batchnorm:
            if method == "closed-form":
                norm = modules[site.batchnorm]
                norm.running_mean.copy_(goal.mean)
                norm.running_var.copy_(goal.predicted_var)
            continue
        corrector = goal_corrector(site, goal)
        if method == "closed-form":
            corrector.running_mean.copy_(goal.mean)
            corrector.running_var.copy_(goal.predicted_var)
        added[site.module] = corrector
    if method in ("repair", "reset"):
        reset = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        _estimate(net, modules, added, reset, batches, max_examples, accelerator)
    return net, added


def _own_state(net: nn.Module, workspace: nn.Module | None) -> dict:
    """``net``'s state dict, copied when ``net`` is the workspace: the next network loaded
    into it overwrites its tensors (a deep copy made for one network is ours already)."""
    state = net.state_dict()
    return {key: value.clone() for key, value in state.items()} if workspace is not None else dict(state)


def _fold(state: dict, spec: PermutationSpec, sites: list[ActivationSite], added: dict) -> dict:
    """Fold every added corrector of a conv/linear or norm site into that layer's weights,
    then those of the stream sums back through their stretches."""
    for site in sites:
        if site.module in added and site.kind in ("linear", "norm"):
            corrector = added[site.module]
            corrector.to(state[site.weight].device).eval()
            fold_batchnorm(state, site.weight, site.bias, corrector, site.weight_axis)
    chosen = {site.module for site in sites if site.kind == "sum" and site.module in added}
    by_module = {site.module: site for site in spec.sites}
    for fold in spec.streams:
        if chosen & set(fold.sums):
            fold_stream(state, fold, {name: added[name].eval() for name in fold.sums if name in chosen}, by_module)
    return state


def _estimate(net, modules, added, reset, batches, max_examples, accelerator) -> None:
    """Forward pass with correctors measuring, and the network's own BatchNorms re-measured.

    The correctors normalise with batch statistics during the pass, so each layer already
    sees corrected inputs, as in the paper's exact variant. Each existing BatchNorm is
    measured the same way: kept in eval mode, its output is replaced by that of a
    :class:`ChannelBatchNorm` with its affine, which normalises like a training-mode
    BatchNorm and counts every example alike (a cumulative BatchNorm would weight batches
    alike, and fail on a last batch of one example). Each process sees whole batches, so
    its batch statistics are those of a single-process run; the float64 sums are then added
    over processes.
    """
    device = next(net.parameters()).device
    names = {module: name for name, module in modules.items()}
    trackers = {}
    for norm in reset:
        tracker = ChannelBatchNorm(norm.num_features, axis=1, eps=norm.eps)
        if norm.affine:
            tracker.weight.copy_(norm.weight)
            tracker.bias.copy_(norm.bias)
        trackers[names[norm]] = tracker
    for tracker in [*added.values(), *trackers.values()]:
        tracker.to(device).train()  # copies of float32 goals and affines, on the network's device
    run_pass([net], [Corrections(added, trackers)], batches, limit=max_examples, accelerator=accelerator,
             desc="REPAIR pass")
    for name, tracker in trackers.items():
        norm, count = modules[name], tracker.sums[0]
        norm.running_mean.copy_(tracker.running_mean)
        # BatchNorm keeps the unbiased variance for eval mode
        norm.running_var.copy_((tracker.running_var.double() * count / (count - 1).clamp_min(1)).float())
