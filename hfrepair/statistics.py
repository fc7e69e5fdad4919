"""Activation statistics of the endpoints at every activation site, in one streamed pass.

In: two models, a spec's sites, an iterable of input batches. Out: :class:`Statistics`,
per site float64 sums ``n, sum x, sum x^2`` for each model and ``sum x_A x_B^T`` across
them. Every position of a conv feature map counts as a sample. Memory is A's activations
of one batch at the measured sites (float64) plus C x C per site, whatever the number of
batches.

Permutations do not change activations, so one pass serves every group: matching, REPAIR
goals, the closed-form variant and the variance-collapse ratios all read these sums.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from .batches import counted_rows, counting_padding
from .passes import Tap, all_sums, give_sums, run_pass
from .spec import ActivationSite

EPS = 1e-12


def units_first(output: torch.Tensor, axis: int) -> torch.Tensor:
    """(units, samples) float64 copy of a module output whose units live on ``axis``;
    padded positions of a padded text batch are not samples (:func:`counted_rows`).

    Units-first rows make the C x C product ``x @ y.T`` a contiguous GEMM, several times
    faster on CPU than the (samples, units) layout for the same float64 result. The layout
    change and the float64 conversion happen in one strided copy: at conv resolution this
    copy, not the arithmetic, is what the statistics pass spends most on.
    """
    units = output.shape[axis]
    if counting_padding():
        return counted_rows(output.movedim(axis, -1)).T.to(torch.float64).contiguous()
    moved = output.movedim(axis, 0)
    flat = torch.empty(moved.shape, dtype=torch.float64, device=output.device)
    flat.copy_(moved)
    return flat.view(units, -1)


@dataclass
class Moments:
    """Float64 running sums of one model's activations at one site."""

    n: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add samples given units-first, as :func:`units_first` returns them."""
        if self.total is None:
            self.total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            self.squares = torch.zeros_like(self.total)
        self.n += x.shape[1]
        self.total += x.sum(1)
        # einsum runs as a batched dot product: several times faster than (x * x).sum(1).
        self.squares += torch.einsum("ij,ij->i", x, x)

    def sums(self) -> list[torch.Tensor]:
        return [torch.tensor([float(self.n)]), self.total, self.squares]

    def set_sums(self, sums: list[torch.Tensor]) -> None:
        self.n, self.total, self.squares = int(sums[0].item()), sums[1], sums[2]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    @property
    def var(self) -> torch.Tensor:
        return (self.squares / self.n - self.mean**2).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


@dataclass
class PairMoments:
    """Moments of A and B at one site and their cross-products ``sum x_A x_B^T``."""

    a: Moments = field(default_factory=Moments)
    b: Moments = field(default_factory=Moments)
    cross: torch.Tensor | None = None
    with_cross: bool = True

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        self.a.add(xa)
        self.b.add(xb)
        if self.with_cross:
            # The C x C float64 product dominates the pass: only sites that need it pay.
            product = xa @ xb.T
            self.cross = product if self.cross is None else self.cross + product

    def sums(self) -> list[torch.Tensor]:
        return self.a.sums() + self.b.sums() + ([self.cross] if self.with_cross else [])

    def set_sums(self, sums: list[torch.Tensor]) -> None:
        self.a.set_sums(sums[:3])
        self.b.set_sums(sums[3:6])
        if self.with_cross:
            self.cross = sums[6]

    def covariance(self) -> torch.Tensor:
        """Cov(A_i, B_j) for every pair of units."""
        if self.cross is None:
            raise ValueError("cross-products were not collected at this site")
        return self.cross / self.a.n - torch.outer(self.a.mean, self.b.mean)

    def correlation(self) -> torch.Tensor:
        """Corr(A_i, B_j); dead units (zero variance) correlate 0 with everything."""
        denominator = torch.outer(self.a.std, self.b.std)
        corr = self.covariance() / denominator.clamp_min(EPS)
        return torch.where(denominator > EPS, corr, torch.zeros_like(corr))


@dataclass
class Statistics:
    """Per-site sums of the endpoints; keys are the sites' module names."""

    pairs: dict[str, PairMoments]
    examples: int = 0


class SiteStatistics(Tap):
    """Tap of the statistics pass: at each site, both endpoints' moments and (where asked)
    their cross-products. The pass runs A then B on each batch; A's activations are kept
    (as a float64 copy, so that later in-place ops such as ``x += residual`` cannot reach
    them) until B's arrive."""

    def __init__(self, sites: list[ActivationSite], cross_sites: set[str] | None = None) -> None:
        self.sites = {site.module: site for site in sites}
        self.pairs = {name: PairMoments(with_cross=cross_sites is None or name in cross_sites) for name in self.sites}
        self._pending: dict[str, torch.Tensor] = {}

    def attach(self, models):
        model_a, model_b = models

        def keep_a(name):
            def hook(_module, _inputs, output):
                self._pending[name] = units_first(output, self.sites[name].axis)
            return hook

        def add_b(name):
            def hook(_module, _inputs, output):
                self.pairs[name].add(self._pending.pop(name), units_first(output, self.sites[name].axis))
            return hook

        handles = []
        for model, make in ((model_a, keep_a), (model_b, add_b)):
            modules = dict(model.named_modules())
            handles += [modules[name].register_forward_hook(make(name)) for name in self.sites]
        return handles

    def sums(self):
        return all_sums(self.pairs.values())

    def set_sums(self, sums):
        give_sums(self.pairs.values(), sums)


class SiteMoments(Tap):
    """Tap of one model's moments at each site (the variance-collapse ratios)."""

    def __init__(self, sites: list[ActivationSite], model_index: int = 0) -> None:
        self.sites = {site.module: site for site in sites}
        self.moments = {name: Moments() for name in self.sites}
        self.model_index = model_index

    def attach(self, models):
        modules = dict(models[self.model_index].named_modules())

        def add(name):
            def hook(_module, _inputs, output):
                self.moments[name].add(units_first(output, self.sites[name].axis))
            return hook

        return [modules[name].register_forward_hook(add(name)) for name in self.sites]

    def sums(self):
        return all_sums(self.moments.values())

    def set_sums(self, sums):
        give_sums(self.moments.values(), sums)


def collect_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    sites: list[ActivationSite],
    batches: Iterable,
    max_examples: int | None = None,
    cross_sites: set[str] | None = None,
    accelerator: Accelerator | None = None,
) -> Statistics:
    """One pass of ``batches`` through both endpoints, accumulating sums at ``sites``.

    ``batches`` yields input tensors or ``(inputs, labels)`` pairs; at most
    ``max_examples`` inputs are used. Cross-products are collected at the modules named in
    ``cross_sites`` (default: every site). With an ``accelerator``, each process reads its
    part of the batches and the sums are reduced over processes at the end.
    """
    tap = SiteStatistics(sites, cross_sites)
    examples = run_pass([model_a, model_b], [tap], batches, limit=max_examples, accelerator=accelerator,
                        desc="statistics")
    return Statistics(tap.pairs, examples)


def collect_moments(
    model: nn.Module, sites: list[ActivationSite], batches: Iterable, max_examples: int | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Moments]:
    """Per-site moments of one model (used for the variance-collapse ratios)."""
    tap = SiteMoments(sites)
    run_pass([model], [tap], batches, limit=max_examples, accelerator=accelerator, desc="moments")
    return tap.moments
