"""Merging N models of one architecture into one (N >= 2), through the Python API.

In: N models, calibration batches, optional evaluation batches and weights. Out: the merged
model (the first model's class and keys, fused weights) and a :class:`ManyResult`.

Every model is aligned into one unit order, MergeMany-style: each to the first (the
reference), then each in turn to the others in their current order until a round changes
nothing. Activation matching scores model ``k``'s units by their correlation with the
others' units averaged over the others (every pair's correlations come from one
statistics pass); weight matching by inner products with the average of the others'
weights. The aligned models are averaged with ``weights``
(uniform by default), and REPAIR gives each corrected unit the weighted average of the
endpoints' means and standard deviations: the N-model form of the paper's goals
``(1 - a) mu_A + a mu_B``. For N = 2 this is the pairwise merge at ``alpha = weights[1]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from .batches import first_rows, inputs_of, rows, to_device
from .distributed import make_accelerator, require_data_everywhere
from .evaluate import evaluate
from .interpolate import average, identical
from .matching import fallback_note, match_permutations, matching_sites, mean_matched_correlation
from .pipeline import (MergeError, check_choices, check_count, check_endpoints, check_first_batches,
                       check_merge_does_something, check_number, check_run_options, check_samples,
                       repair_hurt_note, statistics_plan)
from .prepared import DEFAULT_MEMORY, preparer
from .repair import METHODS, repair
from .report import alignment_summary, fixed_summary, repair_summary
from .spec import PermutationSpec, check_function_preserved, identity_permutations, load_into, permute_state_dict
from .passes import check_batches, kept_modes, run_pass
from .spec_cache import checked_spec
from .statistics import Moments, PairMoments, SiteStatistics, Statistics
from .weight_matching import match_weights


@dataclass
class ManyResult:
    """What an N-model merge measured; ``to_dict`` for JSON."""

    models: int
    weights: list[float]
    matcher: str
    method: str
    calibration_examples: int
    groups: dict[str, int]
    corrected: dict[str, list]
    # Per kind of unit: groups, sizes, units; with activation matching also the matched
    # correlation over every pair of models (:func:`pair_correlations`).
    aligned_groups: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)  # why weight axes stayed fixed: reason -> count
    rounds: int = 0  # rounds of re-aligning each model to the others
    settled: bool = True  # False when max_rounds ended them with permutations still changing
    endpoints: list[dict] = field(default_factory=list)
    naive: dict = field(default_factory=dict)
    aligned: dict = field(default_factory=dict)
    merged: dict = field(default_factory=dict)
    gap: dict = field(default_factory=dict)
    pairwise: list[dict] = field(default_factory=list)  # each pair's midpoint, aligned in the common order
    spec_source: str = "discovered"  # "discovered" now, or "cached" from an earlier discovery
    notes: list[str] = field(default_factory=list)  # what the numbers alone do not say

    def to_dict(self) -> dict:
        return asdict(self)


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach() for key, value in model.named_parameters()}


def _weight_matched(spec: PermutationSpec, models: list[nn.Module],
                    max_rounds: int) -> tuple[list[dict], int, bool]:
    """MergeMany: each model matched to the reference, then each to the average of the
    others (aligned), until a round changes no permutation (or ``max_rounds``)."""
    params = [_parameters(model) for model in models]
    keys = set(params[0])

    def to_the_others(k, perms):
        others = [permute_state_dict(params[j], spec, perms[j], keys) for j in range(len(models)) if j != k]
        return match_weights(spec, average(others, [1 / len(others)] * len(others)), params[k])

    first = [identity_permutations(spec)] + [match_weights(spec, params[0], p) for p in params[1:]]
    return _rounds(first, to_the_others, max_rounds)


@dataclass
class _MeanCorrelation:
    """What matching reads of a site (its correlation matrix), here the correlation of one
    model's units (columns) with each other model's units in the common order (rows),
    averaged over the others: the activation form of matching to the others' mean."""

    matrix: torch.Tensor

    def correlation(self) -> torch.Tensor:
        return self.matrix


def _activation_matched(spec: PermutationSpec, pairs: dict[tuple[int, int], Statistics], count: int,
                        match_at: str, max_rounds: int) -> tuple[list[dict], int, bool]:
    """MergeMany with activation correlations: each model matched to the reference, then
    each to the others in their current order, until a round changes nothing."""
    modules = {m for group in spec.groups for m in matching_sites(spec, group, match_at)}
    by_module = {site.module: site for site in spec.sites}

    def correlation(j, k, module):  # rows: model j's units, columns: model k's
        return pairs[(j, k)].pairs[module].correlation() if j < k else pairs[(k, j)].pairs[module].correlation().T

    def to_the_others(k, perms):
        mean = {}
        for module in modules:
            rows = []
            for j in range(count):
                if j != k:
                    corr = correlation(j, k, module)
                    rows.append(corr[by_module[module].order(perms[j], len(corr)).to(corr.device)])
            mean[module] = _MeanCorrelation(torch.stack(rows).mean(0))
        return match_permutations(spec, Statistics(mean), match_at)

    first = [identity_permutations(spec)] + [match_permutations(spec, pairs[(0, k)], match_at)
                                             for k in range(1, count)]
    return _rounds(first, to_the_others, max_rounds) if count > 2 else (first, 0, True)


def _rounds(perms: list[dict], to_the_others, max_rounds: int) -> tuple[list[dict], int, bool]:
    """Re-align each model to the others in turn until a round changes nothing (or
    ``max_rounds``; 0 keeps each aligned to the first): the permutations, the rounds run and
    whether they settled."""
    if max_rounds == 0:
        return perms, 0, True
    for round_ in range(1, max_rounds + 1):
        changed = False
        for k in range(len(perms)):
            found = to_the_others(k, perms)
            changed |= any(not torch.equal(found[name], perms[k][name]) for name in found)
            perms[k] = found
        if not changed:
            return perms, round_, True
    return perms, max_rounds, False


def pair_correlations(spec: PermutationSpec, pairs: dict[tuple[int, int], Statistics], perms: list[dict],
                      match_at: str) -> tuple[dict[str, float], dict[str, float]]:
    """Per group, the correlation of the units the common order puts side by side, averaged
    over every measured pair of models, and that of the units in their own orders: with
    three or more models no single pair's figure describes the alignment."""
    identity = identity_permutations(spec)
    aligned = [mean_matched_correlation(spec, stats, perms[k], match_at, reference=perms[j])
               for (j, k), stats in pairs.items()]
    unaligned = [mean_matched_correlation(spec, stats, identity, match_at) for stats in pairs.values()]
    return tuple({name: sum(found[name] for found in each) / len(each) for name in spec.groups}
                 for each in (aligned, unaligned))


def goal_statistics(spec: PermutationSpec, moments: list[dict[str, Moments]], perms: list[dict],
                    weights: list[float]) -> Statistics:
    """Statistics whose A and B sides both hold, at every site, the weighted average of the
    endpoints' (aligned) means and standard deviations: REPAIR at ``alpha = 0`` with identity
    permutations then aims every corrected unit at them."""
    pairs = {}
    for site in spec.sites:
        if site.module not in moments[0]:
            continue
        mean = std = 0
        for model_moments, model_perms, weight in zip(moments, perms, weights):
            m = model_moments[site.module]
            order = site.order(model_perms, len(m.total)).to(m.total.device)
            mean = mean + weight * m.mean[order]
            std = std + weight * m.std[order]
        goal = Moments(n=1, total=mean, squares=std**2 + mean**2)
        pairs[site.module] = PairMoments(a=goal, b=goal, with_cross=False)
    return Statistics(pairs)


def checked_weights(weights: list[float] | None, count: int) -> list[float]:
    """``count`` positive weights that add up to 1 (uniform when None). A model of weight 0
    would be aligned, measured and reported as merged while contributing nothing."""
    weights = [1 / count] * count if weights is None else [check_number("a weight", w) for w in weights]
    if len(weights) != count or not all(math.isfinite(w) and w >= 0 for w in weights) or \
            abs(sum(weights) - 1) > 1e-6:
        raise MergeError(f"weights must be {count} positive numbers that add up to 1, got {weights}")
    if 0 in weights:
        raise MergeError(f"model {weights.index(0) + 1} has weight 0: leave it out of the merge")
    return weights


def merge_many(
    models: list[nn.Module],
    calibration: Iterable,
    evaluation: Iterable | None = None,
    *,
    weights: list[float] | None = None,
    matcher: str = "activation",
    method: str = "repair",
    match_at: str = "activation",
    num_samples: int | None = None,
    max_rounds: int = 20,
    pairwise: bool = True,
    accelerator: Accelerator | None = None,
    cache_memory: int = DEFAULT_MEMORY,
    spec_cache: str | Path | None = None,
) -> tuple[nn.Module, ManyResult]:
    """Align, average (``weights``, uniform by default) and REPAIR ``models``.

    ``calibration`` yields input tensors or ``(inputs, labels)`` batches (``num_samples``
    caps them); ``evaluation`` labelled batches: each endpoint, the plain average of the
    unaligned models (naive), the aligned average before REPAIR and the merged model are
    measured, and ``gap`` is the endpoints' weighted mean metric minus the merged model's
    (a worse merged model: a positive accuracy gap, a negative loss gap); with ``pairwise`` (and N > 2) also every pair's
    midpoint in the common unit order, aligned and REPAIRed (one more REPAIR pass a pair).
    ``spec_cache``: a folder of specs discovered earlier, per architecture (None: discover).
    """
    if isinstance(models, nn.Module) or not isinstance(models, Iterable):
        raise MergeError(f"models must be a list of models, not {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise MergeError(f"merging needs at least 2 models, got {len(models)}")
    weights = checked_weights(weights, len(models))
    check_choices(matcher=matcher, match_at=match_at)
    if method not in METHODS or method == "closed-form":
        raise MergeError(f"an N-model merge corrects with repair, reset or none, not {method!r}")
    check_count("num_samples", num_samples, minimum=1, none="all")
    check_count("max_rounds", max_rounds, minimum=0)
    check_run_options(accelerator, cache_memory, spec_cache)
    if isinstance(evaluation, Mapping):
        raise MergeError("evaluation of an N-model merge is one iterable of labelled batches (the test set), "
                         "not a mapping")
    check_batches(calibration, name="calibration")
    if evaluation is not None:
        check_batches(evaluation, name="evaluation")
    for number, model in enumerate(models[1:], 2):
        check_endpoints(models[0], model, names=("model 1", f"model {number}"))
    accelerator = accelerator or make_accelerator()
    for model in models:
        model.to(accelerator.device)
    with ExitStack() as cleanup:
        cleanup.enter_context(kept_modes(*models))
        prepared = preparer(cleanup, accelerator, cache_memory)
        calibration = prepared(calibration)
        evaluation = prepared(evaluation) if evaluation is not None else None
        example = next(iter(calibration), None)
        if accelerator.num_processes > 1:  # all together: a process without data must not leave the others waiting
            require_data_everywhere(0 if example is None else 1, accelerator, "calibration")
        if example is None or not rows(inputs_of(example)):
            raise MergeError("the calibration data is empty" if example is None else
                             "the calibration data's first batch holds no example")
        example = to_device(first_rows(inputs_of(example), 8), accelerator.device)
        check_first_batches(models[0], example, {"evaluation": evaluation} if evaluation is not None else {},
                            accelerator)
        spec, spec_source = checked_spec(models[0], example, spec_cache)
        if not spec.groups:
            raise MergeError(f"no permutation groups found in {type(models[0]).__name__}: nothing to align")
        corrected = repair_summary(spec, method, models[0])
        check_merge_does_something(spec, method, models[0], False, corrected)

        sites, cross = statistics_plan(spec, method, match_at, curves=())
        if matcher == "weight":
            cross = {}
        # One pass runs every model on each batch: each model's forward serves every pair it
        # is in. The reference's pairs measure every site (REPAIR's goals); the other pairs,
        # needed by activation matching only, the matching sites' cross-products.
        count = len(models)
        others = [(j, k) for j in range(1, count) for k in range(j + 1, count)] if matcher == "activation" else []
        matched = [site for site in sites if site.module in cross]
        taps = {(0, k): SiteStatistics(sites, cross, pair=(0, k)) for k in range(1, count)}
        taps.update({pair: SiteStatistics(matched, cross, pair=pair) for pair in others})
        examples = run_pass(models, list(taps.values()), calibration, limit=num_samples, accelerator=accelerator,
                            desc="statistics")
        pairs = {pair: Statistics(tap.pairs, examples) for pair, tap in taps.items()}
        check_samples(pairs[(0, 1)])
        identity = identity_permutations(spec)
        if matcher == "activation":
            perms, rounds, settled = _activation_matched(spec, pairs, count, match_at, max_rounds)
        else:
            perms, rounds, settled = _weight_matched(spec, models, max_rounds)

        work = copy.deepcopy(models[0])
        states = [model.state_dict() for model in models]
        aligned = [permute_state_dict(state, spec, order) for state, order in zip(states, perms)]
        for model, state in zip(models, aligned):
            check_function_preserved(model, state, example, workspace=work)
        moments = [{name: pair.a for name, pair in pairs[(0, 1)].pairs.items()}] + \
                  [{name: pair.b for name, pair in pairs[(0, k)].pairs.items()} for k in range(1, count)]
        goals = goal_statistics(spec, moments, perms, weights)
        averaged = average(aligned, weights)
        merged_state = repair(models[0], averaged, spec, goals, identity, 0.0, method, calibration, num_samples,
                              accelerator, workspace=work)
        result = ManyResult(
            models=len(models), weights=weights, matcher=matcher, method=method,
            calibration_examples=examples, groups={name: g.size for name, g in spec.groups.items()},
            corrected=corrected, fixed=fixed_summary(spec),
            aligned_groups=alignment_summary(spec, *pair_correlations(spec, pairs, perms, match_at))
            if matcher == "activation" else alignment_summary(spec),
            rounds=rounds, settled=settled,
            spec_source=spec_source)
        if matcher == "activation" and (note := fallback_note(spec, match_at)):
            result.notes.append(note)
        result.notes += [f"models {i + 1} and {j + 1} hold the same weights: one model counted twice"
                         for i in range(count) for j in range(i + 1, count) if identical(states[i], states[j])]
        if evaluation is not None:
            def score(state):
                return evaluate(load_into(work, state), evaluation, accelerator=accelerator).to_dict()

            result.endpoints = [evaluate(model, evaluation, accelerator=accelerator).to_dict() for model in models]
            result.naive = score(average(states, weights))
            result.aligned = score(averaged)
            result.merged = score(merged_state)
            if method != "none" and (note := repair_hurt_note(result.merged, result.aligned, "the aligned average")):
                result.notes.append(note)
            for metric in ("loss", "accuracy"):
                if result.merged.get(metric) is not None:
                    mean = sum(w * e[metric] for w, e in zip(weights, result.endpoints))
                    result.gap[metric] = mean - result.merged[metric]
            if pairwise and len(models) > 2:
                for i in range(len(models)):
                    for j in range(i + 1, len(models)):
                        pair_goals = goal_statistics(spec, [moments[i], moments[j]], [perms[i], perms[j]], [0.5, 0.5])
                        midpoint = average([aligned[i], aligned[j]], [0.5, 0.5])
                        pair = {"models": [i, j], "aligned": score(midpoint)}
                        if method != "none":  # plain interpolation: the aligned midpoint is all there is
                            pair["repaired"] = score(repair(models[0], midpoint, spec, pair_goals, identity, 0.0,
                                                            method, calibration, num_samples, accelerator,
                                                            workspace=work))
                        result.pairwise.append(pair)
        merged = load_into(copy.deepcopy(models[0]), merged_state)
        return merged.eval(), result
