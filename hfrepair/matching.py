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
normalisation, then linear sites. Several sites of one group (a residual stream is written
by many layers) contribute the average of their correlation matrices.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from .spec import PermutationSpec
from .statistics import Statistics

MATCH_LOCATIONS = {
    "activation": ("activation",),
    "normalization": ("batchnorm", "norm"),
    "linear": ("linear",),
    "all": ("activation", "batchnorm", "norm", "linear"),
}
_FALLBACK = ("activation", "normalization", "linear")


class MatchingError(RuntimeError):
    """A group has no activation site to measure."""


def matching_sites(spec: PermutationSpec, group: str, match_at: str) -> list[str]:
    """Module names whose correlations decide ``group``'s permutation."""
    for location in (match_at, *_FALLBACK):
        sites = spec.sites_of(group, MATCH_LOCATIONS[location])
        if sites:
            return [site.module for site in sites]
    raise MatchingError(
        f"group {group!r} has no activation site to measure; add one to the spec's sites"
    )


def group_correlation(stats: Statistics, modules: list[str]) -> torch.Tensor:
    return torch.stack([stats.pairs[m].correlation() for m in modules]).mean(0)


def match_permutations(
    spec: PermutationSpec, stats: Statistics, match_at: str = "activation"
) -> dict[str, torch.Tensor]:
    """One permutation per group maximising the summed correlation of matched units."""
    if match_at not in MATCH_LOCATIONS:
        raise ValueError(f"match_at must be one of {sorted(MATCH_LOCATIONS)}, not {match_at!r}")
    perms = {}
    for name in spec.groups:
        corr = group_correlation(stats, matching_sites(spec, name, match_at))
        rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
        perm = torch.empty(len(rows), dtype=torch.long)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
        perms[name] = perm
    return perms


def mean_matched_correlation(
    spec: PermutationSpec, stats: Statistics, perms: dict[str, torch.Tensor], match_at: str = "activation"
) -> dict[str, float]:
    """Average correlation of matched unit pairs per group (identity for unaligned)."""
    result = {}
    for name, perm in perms.items():
        corr = group_correlation(stats, matching_sites(spec, name, match_at))
        result[name] = corr[torch.arange(len(perm)), perm.to(corr.device)].mean().item()
    return result
