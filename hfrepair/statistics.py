"""Activation statistics of the endpoints at every activation site, in one streamed pass.

In: two models, a spec's sites, an iterable of input batches. Out: :class:`Statistics`,
per site float64 sums ``n, sum x, sum x^2`` for each model and ``sum x_A x_B^T`` across
them. Every position of a conv feature map counts as a sample. Memory is A's activations
of one batch at the measured sites plus C x C per site, whatever the number of batches.

Each batch is reduced in float32 around a shift near its mean (per-unit mean and
variance, and the centred cross-product) and added to the float64 sums as ``count * mean``,
``count * (var + mean**2)`` and ``centred product + count * mean_A mean_B^T``: the spread
between batch means is combined in float64, so the sums stay exact to float32 rounding of
each batch's centred moments, whatever the units' offsets, while the pass never converts
an activation to float64. That conversion, and the float64 products, used to cost more
than the forward passes themselves.

Permutations do not change activations, so one pass serves every group: matching, REPAIR
goals, the closed-form variant and the variance-collapse ratios all read these sums.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from .batches import counted_rows, counting_padding
from .interpolate import mismatched_key
from .passes import Tap, all_sums, give_sums, run_pass
from .spec import ActivationSite

EPS = 1e-12
# Samples whose mean is the shift a batch is centred on: it need only lie near the units'
# mean (within a fraction of their spread) for the centred moments to carry no
# cancellation, and a full mean would be one more read of every activation.
SHIFT_SAMPLES = 4096


@dataclass
class BatchSample:
    """One batch's activations at a site: per-unit ``count``, ``mean`` and population
    ``var`` (float64), and the float32 activations minus a per-unit ``shift`` (near their batch
    mean, float32), laid out ``(units, samples)`` (``units_first``) or ``(samples, units)``;
    cross-products read ``centred`` (None when not kept). ``buffer`` is the block the
    sample was centred in, reused for the site's next batch."""

    count: int
    mean: torch.Tensor
    var: torch.Tensor
    centred: torch.Tensor | None
    shift: torch.Tensor
    units_first: bool
    buffer: torch.Tensor

    def add_product_sums(self, other: BatchSample, start: int, stop: int, total: torch.Tensor) -> None:
        """Add ``sum x_i y_j`` over the batch, for units ``start:stop`` of both, to the float64
        ``total`` in place.

        The float32 GEMM runs on the centred activations, so its rounding is relative to
        the units' spread; the shifts are added back in float64 from the exact identity
        ``sum x y^T = sum c_x c_y^T + n (s_x m_y^T + m_x s_y^T - s_x s_y^T)``."""
        if self.units_first:
            total += self.centred[start:stop] @ other.centred[start:stop].T
        else:
            total += self.centred[:, start:stop].T @ other.centred[:, start:stop]
        shift_x, shift_y = self.shift[start:stop].double(), other.shift[start:stop].double()
        mean_x, mean_y = self.mean[start:stop], other.mean[start:stop]
        total.addr_(shift_x, mean_y, alpha=self.count).addr_(mean_x, shift_y, alpha=self.count)
        total.addr_(shift_x, shift_y, alpha=-self.count)


def centre_rows(rows: torch.Tensor, out: torch.Tensor | None = None, keep: bool = True) -> tuple[torch.Tensor, ...]:
    """A ``(samples, units)`` batch minus a per-unit shift near its mean (the mean of its
    first :data:`SHIFT_SAMPLES` samples), written to ``out`` if given: the shift, the centred
    values and their per-unit sums and sums of squares (float32; differentiable without
    ``out``). Same bits whatever the thread count. Unless ``keep``, the centred values are
    squared in place (no second activation-sized block) and None is returned for them."""
    shift = rows[:SHIFT_SAMPLES].mean(0)
    centred = torch.sub(rows, shift, out=out)
    total = centred.sum(0)
    # A squared copy and a column sum: measured in a pass, twice as fast as vecdot over dim 0.
    squares = (centred.square() if keep else centred.square_()).sum(0)
    return shift, centred if keep else None, total, squares


def sample_batch(output: torch.Tensor, axis: int, reuse: torch.Tensor | None = None,
                 keep: bool = True) -> BatchSample | None:
    """A module output's samples at a site whose units live on ``axis``; None when the
    batch has none (a padded batch's positions are samples only where they are real
    tokens, :func:`counted_rows`). ``reuse``: a finished sample's ``buffer`` to write the
    centred activations into when it has the right size (a fresh block of megabytes per
    site and batch costs page faults). ``keep``: whether the centred activations are kept
    for a cross-product; a sample for moments alone is squared in place.

    Units innermost in memory (a transformer's (N, T, C); a conv's output in channels-last
    layout, as the passes run convs on a CPU) are read as a ``(samples, units)`` view:
    five times faster than a transposing copy. Other layouts (a contiguous (N, C, H, W))
    are centred into one units-first copy, so the C x C product is a contiguous GEMM. The
    moments are those of the centred activations plus the shift: exact whatever the
    units' offset from zero.
    The moments give the same bits whatever the thread count (torch's BatchNorm kernel
    would be faster but does not, and is less exact), so one process and several agree in
    them to float64 rounding; the cross-products' GEMM (:meth:`BatchSample.add_product_sums`)
    may split its sum between threads, so they agree to float32 rounding of each batch.
    """
    axis %= output.dim()
    units_last = output.movedim(axis, -1)
    if counting_padding():
        x, axis = counted_rows(units_last).float(), 1
    elif units_last.is_contiguous():  # a transformer's (N, T, C), or a channels-last conv output
        x, axis = units_last.reshape(-1, output.shape[axis]).float(), 1
    else:
        x = output.float()
    if not x.numel():
        return None
    count = x.numel() // x.shape[axis]
    rows = x.dim() == 2 and axis == 1
    moved = x if rows else x.movedim(axis, 0)
    fits = reuse is not None and reuse.numel() == x.numel() and reuse.device == x.device
    # A copy of its own: later in-place ops on the output (x += residual) cannot reach it.
    centred = reuse.view(moved.shape) if fits else torch.empty(moved.shape, dtype=torch.float32, device=x.device)
    buffer = centred
    if rows:
        shift, centred, total, squares = centre_rows(x, out=centred, keep=keep)
    else:
        shift = x.mean([d for d in range(x.dim()) if d != axis])
        torch.sub(moved, shift.view(-1, *[1] * (x.dim() - 1)), out=centred)
        centred = centred.view(len(shift), -1)
        # einsum runs as a batched dot product: several times faster than (x * x).sum(1).
        total, squares = centred.sum(1), torch.einsum("ij,ij->i", centred, centred)
    mean = total.double() / count  # near 0: the centred moments carry no cancellation
    var = (squares.double() / count - mean**2).clamp_min(0)
    return BatchSample(count, shift.double() + mean, var, centred if keep else None, shift, not rows, buffer)


@dataclass
class Moments:
    """Float64 running sums of one model's activations at one site."""

    n: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, sample: BatchSample) -> None:
        if self.total is None:
            self.total = torch.zeros(len(sample.mean), dtype=torch.float64, device=sample.mean.device)
            self.squares = torch.zeros_like(self.total)
        mean = sample.mean
        self.n += sample.count
        self.total += sample.count * mean
        self.squares += sample.count * (sample.var + mean * mean)

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
    """Moments of A and B at one site and their cross-products ``sum x_A x_B^T``.

    ``blocks``: the ``(start, stop)`` ranges of the unit axis whose cross-products are
    kept (None: all of it; the stretches between blocks are blocks of their own). A fused
    QKV output is only ever matched within its q, k and v thirds; products across them
    would be a wasted 6 of 9 parts of the C x C GEMM. The entries outside the blocks read
    as NaN, so that no use of them goes unnoticed.
    """

    a: Moments = field(default_factory=Moments)
    b: Moments = field(default_factory=Moments)
    with_cross: bool = True
    blocks: list[tuple[int, int]] | None = None
    _products: list[torch.Tensor] | None = None

    def _ranges(self) -> list[tuple[int, int]]:
        ranges, covered = [], 0
        for start, stop in [*(self.blocks or []), (len(self.a.total), len(self.a.total))]:
            ranges += [(covered, start)] if start > covered else []
            ranges += [(start, stop)] if stop > start else []
            covered = stop
        return ranges

    def add(self, xa: BatchSample, xb: BatchSample) -> None:
        self.a.add(xa)
        self.b.add(xb)
        if not self.with_cross:
            return
        ranges = self._ranges()
        if self._products is None:
            self._products = [torch.zeros(stop - start, stop - start, dtype=torch.float64, device=xa.mean.device)
                              for start, stop in ranges]
        for total, (start, stop) in zip(self._products, ranges):
            xa.add_product_sums(xb, start, stop, total)

    @property
    def cross(self) -> torch.Tensor | None:
        """``sum x_A x_B^T`` for every pair of units (NaN outside ``blocks``)."""
        if self._products is None:
            return None
        if len(self._products) == 1:
            return self._products[0]
        full = torch.full((len(self.a.total),) * 2, float("nan"), dtype=torch.float64, device=self.a.total.device)
        for (start, stop), product in zip(self._ranges(), self._products):
            full[start:stop, start:stop] = product
        return full

    def sums(self) -> list[torch.Tensor]:
        return self.a.sums() + self.b.sums() + (self._products if self.with_cross else [])

    def set_sums(self, sums: list[torch.Tensor]) -> None:
        self.a.set_sums(sums[:3])
        self.b.set_sums(sums[3:6])
        if self.with_cross:
            self._products = list(sums[6:])

    def covariance(self) -> torch.Tensor:
        """Cov(A_i, B_j) for every pair of units."""
        if self._products is None:
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
    their cross-products. The pass runs A then B on each batch; A's centred activations
    are kept until B's arrive where cross-products need them.

    ``cross_sites``: the modules that need cross-products (default: every site), as a set,
    or as a mapping to the diagonal blocks to keep (None: all; see :class:`PairMoments`).
    ``pair``: which of the pass's models are A and B (the first runs first on each batch).
    """

    def __init__(self, sites: list[ActivationSite],
                 cross_sites: set[str] | Mapping[str, list[tuple[int, int]] | None] | None = None,
                 pair: tuple[int, int] = (0, 1)) -> None:
        self.sites = {site.module: site for site in sites}
        blocks = cross_sites if isinstance(cross_sites, Mapping) else {}
        self.pairs = {name: PairMoments(with_cross=cross_sites is None or name in cross_sites,
                                        blocks=blocks.get(name)) for name in self.sites}
        self._pending: dict[str, BatchSample | None] = {}
        self._buffers = SampleBuffers()
        self.pair = pair
        self._cross_sites = cross_sites

    def attach(self, models):
        model_a, model_b = (models[index] for index in self.pair)

        def keep_a(name):
            def hook(_module, _inputs, output):
                held = self.pairs[name].with_cross
                self._pending[name] = self._buffers.sample(output, self.sites[name].axis, name if held else None,
                                                           keep=held)
            return hook

        def add_b(name):
            def hook(_module, _inputs, output):
                sample_a = self._pending.pop(name)
                sample_b = self._buffers.sample(output, self.sites[name].axis, keep=self.pairs[name].with_cross)
                if sample_a is not None:
                    self.pairs[name].add(sample_a, sample_b)
            return hook

        handles = []
        for model, make in ((model_a, keep_a), (model_b, add_b)):
            modules = dict(model.named_modules())
            handles += [modules[name].register_forward_hook(make(name)) for name in self.sites]
        return handles

    def hooked(self):
        return [(index, name) for index in self.pair for name in self.sites]

    def sums(self):
        return all_sums(self.pairs.values())

    def set_sums(self, sums):
        give_sums(self.pairs.values(), sums)

    def finish(self):
        self._pending.clear()
        self._buffers.clear()

    def replica(self):
        return SiteStatistics(list(self.sites.values()), self._cross_sites, self.pair)


class SampleBuffers:
    """Where batch samples are centred: one buffer per site whose sample is held (A's, until
    B's arrives), one per size for samples used at once."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def sample(self, output: torch.Tensor, axis: int, held_as: str | None = None,
               keep: bool = True) -> BatchSample | None:
        key = held_as if held_as is not None else output.numel()
        sample = sample_batch(output, axis, reuse=self._buffers.get(key), keep=keep)
        if sample is not None:
            self._buffers[key] = sample.buffer
        return sample

    def clear(self) -> None:
        """Drop the buffers when the pass ends: a tap kept for its sums (the variance ratios'
        moments) would otherwise hold activation-sized blocks through the rest of a merge."""
        self._buffers.clear()


class SiteMoments(Tap):
    """Tap of one model's moments at each site (the variance-collapse ratios)."""

    def __init__(self, sites: list[ActivationSite], model_index: int = 0) -> None:
        self.sites = {site.module: site for site in sites}
        self.moments = {name: Moments() for name in self.sites}
        self.model_index = model_index
        self._buffers = SampleBuffers()

    def attach(self, models):
        modules = dict(models[self.model_index].named_modules())

        def add(name):
            def hook(_module, _inputs, output):
                sample = self._buffers.sample(output, self.sites[name].axis, keep=False)
                if sample is not None:
                    self.moments[name].add(sample)
            return hook

        return [modules[name].register_forward_hook(add(name)) for name in self.sites]

    def hooked(self):
        return [(self.model_index, name) for name in self.sites]

    def sums(self):
        return all_sums(self.moments.values())

    def set_sums(self, sums):
        give_sums(self.moments.values(), sums)

    def finish(self):
        self._buffers.clear()

    def replica(self):
        return SiteMoments(list(self.sites.values()), self.model_index)


def collect_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    sites: list[ActivationSite],
    batches: Iterable,
    max_examples: int | None = None,
    cross_sites: set[str] | Mapping[str, list[tuple[int, int]] | None] | None = None,
    accelerator: Accelerator | None = None,
) -> Statistics:
    """One pass of ``batches`` through both endpoints, accumulating sums at ``sites``.

    ``batches`` yields input tensors or ``(inputs, labels)`` pairs; at most
    ``max_examples`` inputs are used. Cross-products are collected at the modules named in
    ``cross_sites`` (default: every site; a mapping also names the blocks to keep). With an
    ``accelerator``, each process reads its part of the batches and the sums are reduced
    over processes at the end.
    """
    check_same_architecture(model_a, model_b)
    modules = dict(model_a.named_modules())
    missing = [site.module for site in sites if site.module not in modules]
    if missing:
        raise ValueError(f"{type(model_a).__name__} has no module {missing[0]!r} (a site of another model's spec?)")
    tap = SiteStatistics(sites, cross_sites)
    examples = run_pass([model_a, model_b], [tap], batches, limit=max_examples, accelerator=accelerator,
                        desc="statistics")
    return Statistics(tap.pairs, examples)


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Two models of one class with the same tensors, so that each site means the same
    units in both."""
    if type(model_a) is not type(model_b):
        raise ValueError(f"the models have different architectures: {type(model_a).__name__} vs "
                         f"{type(model_b).__name__}")
    different = mismatched_key(model_a.state_dict(), model_b.state_dict())
    if different is not None:
        raise ValueError(f"the models differ at {different!r}: same class, other sizes")


def collect_moments(
    model: nn.Module, sites: list[ActivationSite], batches: Iterable, max_examples: int | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Moments]:
    """Per-site moments of one model (used for the variance-collapse ratios)."""
    tap = SiteMoments(sites)
    run_pass([model], [tap], batches, limit=max_examples, accelerator=accelerator, desc="moments")
    return tap.moments


def check_statistics(stats, modules: Iterable[str], name: str = "stats") -> None:
    """``stats`` measured at every one of ``modules``: a stage that reads a site they lack is
    refused in words, not with a KeyError from inside it."""
    if not isinstance(stats, Statistics):
        raise ValueError(f"{name} must be the Statistics that collect_statistics returns, not {type(stats).__name__}")
    missing = [module for module in modules if module not in stats.pairs]
    if missing:
        raise ValueError(f"{name} has no statistics at {missing[0]!r} ({len(missing)} of the sites needed are "
                         "missing): collect them at the spec's sites")
