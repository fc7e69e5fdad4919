"""Match B's hidden units to A's: activation correlation, then the Hungarian algorithm.

In: a spec and :class:`~hfrepair.statistics.Statistics`. Out: one permutation per group
(``new[i] = old[perm[i]]``: B's unit ``perm[i]`` takes slot ``i``, next to A's unit ``i``).

Where correlations are measured is a choice (``match_at``):

* ``"activation"`` (default): after the non-linearity (post-ReLU/GELU), as the REPAIR
  reference code does for VGG and ResNet20;
* ``"normalization"``: normalisation-layer outputs (pre-activation in BN networks);
* ``"linear"``: raw conv/linear outputs (pre-BN);
* ``"all"``: every site of the group.

A group without a site of the chosen kind falls back, in this order, to activation,
normalisation, then linear sites. A residual stream has no activation site. Where
LayerNorms read it (transformers), it is matched from their outputs: on three ViT pairs
trained on the digits that gave REPAIRed midpoints of 58.7 / 71.1 / 74.5% against
56.4 / 65.8 / 71.0% when every site that reads or writes the stream was averaged in
(aligned-only midpoints favour the latter; the saved, REPAIRed model is what counts).
Where convolutions read it between its sums (a stream with foldable stretches,
:class:`~hfrepair.spec.StreamFold`: ConvNeXt stages), no norm sees it whole, and it is
matched at every site of the group, its sums included: on two ConvNeXt 32-64-128 pairs
trained on the digits that took the REPAIRed midpoint from 86.6 / 84.2% (norm outputs)
to 90.6 / 89.6% (endpoints 93.8 / 93.4% and 93.3 / 92.6%). Several sites of one group
contribute the average of their correlation matrices.

Groups laid out in blocks (attention heads: each head a block of head dims) are matched as
units, coarse to fine: the cost of pairing A's head ``i`` with B's head ``j`` is the best
correlation their dims can reach (a Hungarian assignment inside the block, summed over the
q, k and v outputs), one assignment picks the heads, and the head dims are then matched
across the matched pairs.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from .spec import PermutationSpec, block_diagonal, positions
from .statistics import Statistics, check_statistics

MATCH_LOCATIONS = {
    "activation": ("activation",),
    "normalization": ("batchnorm", "norm"),
    "linear": ("linear",),
    "all": ("activation", "batchnorm", "norm", "linear", "sum"),
}
_FALLBACK = ("activation", "normalization", "linear")


class MatchingError(RuntimeError):
    """A group has no activation site to measure, or nothing measured there to match on."""


def matching_location(spec: PermutationSpec, group: str, match_at: str) -> tuple[str, list[str]]:
    """Where ``group``'s correlations are measured (``match_at``, or the location it falls
    back to) and the module names of its sites there."""
    read_by_convs = any(site.kind == "sum" for site in spec.sites_of(group))
    for location in (match_at, *(("all",) if read_by_convs else ()), *_FALLBACK):
        sites = spec.sites_of(group, MATCH_LOCATIONS[location])
        if sites:
            return location, [site.module for site in sites]
    raise MatchingError(
        f"group {group!r} has no activation site to measure; add one to the spec's sites"
    )


def matching_sites(spec: PermutationSpec, group: str, match_at: str) -> list[str]:
    """Module names whose correlations decide ``group``'s permutation."""
    return matching_location(spec, group, match_at)[1]


def fallback_note(spec: PermutationSpec, match_at: str) -> str | None:
    """Where an asked-for ``match_at`` other than the default was not where groups were
    matched (no site of that kind in them), in words; None when it was."""
    if match_at == "activation":
        return None  # the default: a stream's fallback to its norms is the documented rule
    moved = {}
    for group in spec.groups:
        location = matching_location(spec, group, match_at)[0]
        if location != match_at:
            moved[location] = moved.get(location, 0) + 1
    if not moved:
        return None
    where = ", ".join(f"{count} at {location} sites" for location, count in moved.items())
    return (f"match_at {match_at!r}: {sum(moved.values())} of {len(spec.groups)} groups have no {match_at} site "
            f"and were matched elsewhere ({where})")


def _sites(spec: PermutationSpec, modules: list[str]):
    by_module = {site.module: site for site in spec.sites}
    return [by_module[m] for m in modules]


def _best_assignment(block: torch.Tensor) -> float:
    """The summed correlation of the best one-to-one pairing of two blocks' units."""
    rows, cols = linear_sum_assignment(block.numpy(), maximize=True)
    return float(block.numpy()[rows, cols].sum())


def _group_cost(spec, stats, group: str, sites, perms: dict) -> torch.Tensor:
    """Mean over ``sites`` of the unit-to-unit cost of ``group`` (B's side already ordered by
    the groups matched before it)."""
    size = spec.groups[group].size
    costs = []
    for site in sites:
        corr = stats.pairs[site.module].correlation().cpu()
        if site.group == group:
            costs.append(corr)
            continue
        undecided = {name: torch.arange(spec.groups[name].size) for name in site.groups() if name not in perms}
        corr = corr[:, site.order({**undecided, **perms}, corr.shape[0])]
        cost = torch.zeros(size, size, dtype=torch.float64)
        for name, offset, outers, inner, *units in site.layout:
            if name != group:
                continue
            where = positions(size, offset, outers, inner, *units)
            free = any(other in undecided and other != group and b[2] < inner for other, *b in site.layout)
            if not free:  # units (or blocks whose inside is settled) pair position by position
                cost += corr[where[:, :, None, :], where[:, None, :, :]].sum((0, 3))
                continue
            for copy in where:
                for u in range(size):
                    for v in range(size):
                        cost[u, v] += _best_assignment(corr[copy[u]][:, copy[v]])
        costs.append(cost)
    return torch.stack(costs).mean(0)


def assignment(cost: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i cost[i, perm[i]]`` (Hungarian algorithm)."""
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def blockwise_assignment(cost: torch.Tensor, blocks: int) -> torch.Tensor:
    """One assignment per diagonal block of ``cost`` (a block-diagonal group: each head's dims)."""
    step = len(cost) // blocks
    return block_diagonal([assignment(cost[i:i + step, i:i + step]) for i in range(0, len(cost), step)])


def _coarse_to_fine(spec: PermutationSpec) -> list[str]:
    """Groups ordered so that a block (a head) is matched before the units inside it."""
    def inner(name):
        sizes = [b[3] for site in spec.sites if site.layout for b in site.layout if b[0] == name]
        return -max(sizes, default=1)

    return sorted(spec.groups, key=inner)


def match_permutations(
    spec: PermutationSpec, stats: Statistics, match_at: str = "activation"
) -> dict[str, torch.Tensor]:
    """One permutation per group maximising the summed correlation of matched units."""
    if match_at not in MATCH_LOCATIONS:
        raise ValueError(f"match_at must be one of {sorted(MATCH_LOCATIONS)}, not {match_at!r}")
    check_statistics(stats, [module for name in spec.groups for module in matching_sites(spec, name, match_at)])
    perms = {}
    for name in _coarse_to_fine(spec):
        sites = _sites(spec, matching_sites(spec, name, match_at))
        cost = _group_cost(spec, stats, name, sites, perms)
        if not cost.any():  # every correlation is 0: any permutation would be as good as another
            samples = stats.pairs[sites[0].module].a.n
            raise MatchingError(f"group {name!r} cannot be matched: none of its units varies over the calibration "
                                f"data ({samples:,} sample{'s' if samples != 1 else ''} per unit at "
                                f"{sites[0].module}); use more, or more varied, calibration examples")
        perms[name] = blockwise_assignment(cost, spec.groups[name].blocks)
    return {name: perms[name] for name in spec.groups}


def mean_matched_correlation(
    spec: PermutationSpec, stats: Statistics, perms: dict[str, torch.Tensor], match_at: str = "activation",
    reference: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Average correlation of the unit pairs a group's permutation puts side by side, at its
    matching sites (with every other group's permutation applied too). ``reference``: A's
    own permutations when both models were put into a common order (None: A's order is it)."""
    result = {}
    for name in perms:
        values = []
        for site in _sites(spec, matching_sites(spec, name, match_at)):
            corr = stats.pairs[site.module].correlation().cpu()
            order = site.order(perms, corr.shape[0])
            order_a = site.order(reference, corr.shape[0]) if reference is not None else torch.arange(len(order))
            if site.group == name:
                where = torch.arange(corr.shape[0])
            else:
                where = torch.cat([positions(len(perms[name]), *block).reshape(-1)
                                   for g, *block in site.layout if g == name])
            values.append(corr[order_a[where], order[where]].mean())
        result[name] = torch.stack(values).mean().item()
    return result
