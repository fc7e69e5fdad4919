"""``merge``: the stages wired together, for ``nn.Module`` endpoints and iterables of batches.

load (caller) -> discover spec -> collect statistics -> match -> permute (checked) ->
interpolate -> repair -> fuse -> evaluate. Each stage is a function of its own module;
this one only passes their plain outputs along and times them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from .batches import first_rows, to_device
from .discovery import discover_spec
from .distributed import make_accelerator
from .evaluate import barriers_of, curve, evaluate, variance_ratios
from .interpolate import interpolate
from .matching import match_permutations, matching_sites, mean_matched_correlation
from .repair import METHODS, block_output_sites, correction_sites, repair, repair_block_outputs
from .spec import (
    PermutationSpec,
    check_function_preserved,
    permute_state_dict,
    verify_spec,
    with_state_dict,
)
from .report import alignment_summary, corrected_count, fixed_summary, repair_summary, unsupported_ops
from .statistics import collect_moments, collect_statistics, iter_inputs

# Interpolations the evaluation can trace; "naive-repaired" is REPAIR without alignment.
CURVES = ("naive", "naive-repaired", "aligned", "repaired", "repaired+blocks")
# What the "repaired+blocks" curve is, in every result that has it.
BLOCK_OUTPUT_NOTE = (
    "repaired+blocks also corrects residual-block outputs; those corrections cannot be folded "
    "into the weights of this architecture, so it is measured in memory only and never saved"
)
DEFAULT_CURVES = ("naive", "aligned", "repaired")


class MergeError(ValueError):
    """Endpoints or inputs that cannot be merged; the message names the problem."""


@dataclass
class MergeResult:
    """Every number a merge measured; ``to_dict`` is what ``merge_results.json`` holds."""

    alpha: float
    method: str
    match_at: str
    calibration_examples: int
    groups: dict[str, int]
    permuted_max_abs_diff: float
    matched_correlation: dict[str, float]
    unaligned_correlation: dict[str, float]
    aligned: dict[str, dict] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    corrected: dict[str, list] = field(default_factory=dict)
    merged: dict[str, dict] = field(default_factory=dict)
    endpoints: dict[str, dict] = field(default_factory=dict)
    alphas: list[float] = field(default_factory=list)
    curves: dict[str, dict] = field(default_factory=dict)
    barriers: dict[str, dict] = field(default_factory=dict)
    variance_ratio: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_endpoints(model_a: nn.Module, model_b: nn.Module) -> None:
    """Same architecture, same state_dict keys and shapes, finite weights."""
    if type(model_a) is not type(model_b):
        raise MergeError(f"endpoints have different architectures: {type(model_a).__name__} vs {type(model_b).__name__}")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if state_a.keys() != state_b.keys():
        only = sorted(set(state_a) ^ set(state_b))
        raise MergeError(f"endpoints have different parameters (e.g. {only[0]!r})")
    for key, value in state_a.items():
        if value.shape != state_b[key].shape:
            raise MergeError(f"endpoints differ in shape at {key}: {tuple(value.shape)} vs {tuple(state_b[key].shape)}")
    for name, state in (("A", state_a), ("B", state_b)):
        for key, value in state.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise MergeError(f"endpoint {name} has non-finite values in {key}")


def statistics_plan(
    spec: PermutationSpec, method: str, match_at: str, curves: tuple[str, ...] = DEFAULT_CURVES
) -> tuple[list, set[str]]:
    """The sites the statistics pass must visit, and those that need C x C cross-products.

    Matching needs cross-products at its sites; REPAIR needs moments at the layers it
    corrects with goals (the closed form also their matched cross-covariance). The exact
    variant corrects BN-followed layers by re-estimating the BN, so needs nothing there.
    """
    match_modules = {m for g in spec.groups for m in matching_sites(spec, g, match_at)}
    repair_modules = {
        s.module for s in correction_sites(spec)
        if method == "closed-form" or (method == "repair" and not s.batchnorm)
    }
    if "repaired+blocks" in curves:
        repair_modules |= {s.module for s in block_output_sites(spec)}
    cross_modules = match_modules | (repair_modules if method == "closed-form" else set())
    return [s for s in spec.sites if s.module in match_modules | repair_modules], cross_modules


def check_merge_does_something(spec: PermutationSpec, method: str, model: nn.Module, given_spec: bool,
                               corrected: dict[str, list]) -> None:
    """Refuse a merge that would align nothing or REPAIR nothing without being asked to.

    A discovered spec without groups means discovery failed (ops without a rule, or every
    axis at the model's boundary); a hand-written spec without groups is an explicit
    unaligned merge. ``method='none'`` is an explicit uncorrected one.
    """
    name = type(model).__name__
    if not spec.groups and not given_spec:
        ops = unsupported_ops(spec)
        cause = f"ops without a rule: {', '.join(ops[:5])}" if ops else "every axis is fixed"
        raise MergeError(f"nothing to align in {name}: discovery found no permutation group ({cause}); "
                         "pass a spec by hand (--spec) to align, or one without groups to merge unaligned")
    if method != "none" and not corrected_count(corrected):
        raise MergeError(f"REPAIR ({method}) has nothing to correct in {name}: no layer output with a bias "
                         "or BatchNorm, and no norm affine to fold into; pass --method none for plain "
                         "interpolation")


@contextmanager
def _timed(seconds: dict, stage: str):
    start = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def merge(
    model_a: nn.Module,
    model_b: nn.Module,
    calibration: Iterable,
    evaluation: dict[str, Iterable] | None = None,
    *,
    alpha: float = 0.5,
    method: str = "repair",
    match_at: str = "activation",
    spec: PermutationSpec | None = None,
    num_samples: int | None = None,
    grid: int = 11,
    eval_samples: int | None = None,
    curves: tuple[str, ...] = DEFAULT_CURVES,
    accelerator: Accelerator | None = None,
) -> tuple[nn.Module, MergeResult]:
    """Align ``model_b`` to ``model_a``, interpolate at ``alpha``, REPAIR and fuse.

    ``calibration`` yields input tensors or ``(inputs, labels)`` batches and must be
    re-iterable (a list or a DataLoader); ``num_samples`` caps the examples used.
    ``evaluation`` maps names (e.g. ``"test"``, ``"train"``) to labelled batches; when given,
    the naive / aligned / repaired curves over ``grid`` alphas and their barriers are
    measured (``curves`` picks them from :data:`CURVES`). Returns the merged model (A's class, fused weights) and a :class:`MergeResult`.

    Every pass runs on all processes of ``accelerator`` (one is created if none is given),
    each reading its part of the batches; the endpoints are moved to its device and the
    forward passes use its mixed precision, while all sums stay float64. Call it on every
    process; each gets the same merged model and result.
    """
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"alpha must be in [0, 1], got {alpha}")
    if method not in METHODS:
        raise MergeError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if grid < 3:
        raise MergeError(f"the alpha grid needs at least 3 points (0, 0.5, 1), got {grid}")
    unknown = set(curves) - set(CURVES)
    if unknown:
        raise MergeError(f"unknown curves {sorted(unknown)}; choose from {', '.join(CURVES)}")
    if "repaired+blocks" in curves and method != "repair":
        raise MergeError("block-output corrections need the exact method (method='repair')")
    check_endpoints(model_a, model_b)
    accelerator = accelerator or make_accelerator()
    model_a.to(accelerator.device).eval()
    model_b.to(accelerator.device).eval()
    seconds: dict[str, float] = {}
    example = next(iter_inputs(calibration, 8, "example"), None)
    if example is None:
        raise MergeError("the calibration data is empty")
    example = to_device(first_rows(example, 8), next(model_a.parameters()).device)

    given_spec = spec is not None
    with _timed(seconds, "discover"):
        spec = spec or discover_spec(model_a, example)
        # Every spec, discovered or by hand, must pass the random-permutation check.
        verify_spec(model_a, spec, example)
    corrected = repair_summary(spec, method, model_a)
    check_merge_does_something(spec, method, model_a, given_spec, corrected)
    if "repaired+blocks" in curves and not block_output_sites(spec):
        raise MergeError(f"{type(model_a).__name__} has no residual-block outputs (activations on a residual "
                         "stream) to correct: drop --block-outputs")
    sites, cross_modules = statistics_plan(spec, method, match_at, curves)
    with _timed(seconds, "statistics"):
        stats = collect_statistics(model_a, model_b, sites, calibration, num_samples, cross_modules, accelerator)
    with _timed(seconds, "match"):
        perms = match_permutations(spec, stats, match_at)
    with _timed(seconds, "permute"):
        state_a, state_b = model_a.state_dict(), model_b.state_dict()
        state_b_aligned = permute_state_dict(state_b, spec, perms)
        permuted_diff = check_function_preserved(model_b, state_b_aligned, example)

    identity = {name: torch.arange(g.size) for name, g in spec.groups.items()}

    def build(alpha_: float, aligned: bool = True) -> dict:
        """REPAIRed interpolation; unaligned B keeps its own unit order (identity)."""
        target, order = (state_b_aligned, perms) if aligned else (state_b, identity)
        return repair(model_a, interpolate(state_a, target, alpha_), spec, stats, order, alpha_,
                      method, calibration, num_samples, accelerator)

    with _timed(seconds, "interpolate+repair"):
        merged_state = build(alpha)
    merged = with_state_dict(model_a, merged_state).eval()
    result = MergeResult(
        alpha=alpha, method=method, match_at=match_at, calibration_examples=stats.examples,
        groups={name: g.size for name, g in spec.groups.items()},
        permuted_max_abs_diff=permuted_diff,
        matched_correlation=mean_matched_correlation(spec, stats, perms, match_at),
        unaligned_correlation=mean_matched_correlation(spec, stats, identity, match_at),
        fixed=fixed_summary(spec), corrected=corrected,
    )
    result.aligned = alignment_summary(spec, result.matched_correlation, result.unaligned_correlation)
    if not spec.groups:
        result.notes.append("the given spec has no permutation groups: B's units were not aligned to A's")

    with _timed(seconds, "variance"):
        # Figure 2's ratio, at the sites where units were matched (post-activation by default).
        matched = {m for g in spec.groups for m in matching_sites(spec, g, match_at)}
        sites = [s for s in spec.sites if s.module in matched]
        aligned_net = with_state_dict(model_a, interpolate(state_a, state_b_aligned, alpha))
        endpoints = {name: stats.pairs[name] for name in (s.module for s in sites)}
        result.variance_ratio = {
            label: variance_ratios(
                collect_moments(net, sites, calibration, num_samples, accelerator),
                {k: p.a for k, p in endpoints.items()}, {k: p.b for k, p in endpoints.items()},
            )
            for label, net in (("aligned", aligned_net), ("repaired", merged))
        }

    if evaluation:
        with _timed(seconds, "evaluate"):
            def scores(model: nn.Module) -> dict:
                return {name: evaluate(model, b, eval_samples, accelerator).to_dict() for name, b in evaluation.items()}

            result.merged = scores(merged)
            result.endpoints = {"A": scores(model_a), "B": scores(model_b)}
            alphas = [i / (grid - 1) for i in range(grid)]
            inner = alphas[1:-1]
            builders = {
                "naive": lambda a: with_state_dict(model_a, interpolate(state_a, state_b, a)),
                "naive-repaired": lambda a: with_state_dict(model_a, build(a, aligned=False)),
                "aligned": lambda a: with_state_dict(model_a, interpolate(state_a, state_b_aligned, a)),
                "repaired": lambda a: with_state_dict(model_a, build(a)),
                "repaired+blocks": lambda a: repair_block_outputs(
                    model_a, interpolate(state_a, state_b_aligned, a), spec, stats, perms, a, calibration,
                    num_samples, accelerator),
            }
            result.alphas = alphas
            for label in curves:
                make = builders[label]
                inner_points = curve(make, inner, evaluation, eval_samples, desc=label, accelerator=accelerator)
                result.curves[label] = {
                    name: [result.endpoints["A"][name], *inner_points[name], result.endpoints["B"][name]]
                    for name in evaluation
                }
                result.barriers[label] = {
                    name: barriers_of(alphas, points) for name, points in result.curves[label].items()
                }
    if "repaired+blocks" in curves:
        result.notes.append(BLOCK_OUTPUT_NOTE)
    result.seconds = seconds
    return merged, result
