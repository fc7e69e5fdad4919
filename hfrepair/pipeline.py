"""``merge``: the stages wired together, for ``nn.Module`` endpoints and iterables of batches.

load (caller) -> discover spec -> collect statistics -> match -> permute (checked) ->
interpolate -> repair -> fuse -> evaluate. Each stage is a function of its own module;
this one only passes their plain outputs along and times them.
"""

from __future__ import annotations

import copy
import numbers
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from .batches import first_rows, inputs_of, model_outputs, rows, to_device
from .distributed import is_main_process, make_accelerator, progress, raise_together, require_data_everywhere
from .evaluate import IGNORED_LABEL, Scores, barriers_of, variance_ratios
from .interpolate import identical, interpolate
from .matching import MATCH_LOCATIONS, fallback_note, match_permutations, matching_sites, mean_matched_correlation
from .weight_matching import match_weights, weight_distance
from .repair import METHODS, block_output_sites, correction_sites, exact_correctors, repair, repair_block_outputs
from .allocator import release_freed_memory
from .passes import check_batches, forward_count, kept_modes, run_pass
from .prepared import DEFAULT_MEMORY, preparer
from .spec import (PermutationSpec, check_function_preserved, coupled_blocks, identity_permutations, load_into,
                   permute_state_dict, verify_spec)
from .spec_cache import checked_spec
from .report import alignment_summary, corrected_count, fixed_summary, repair_summary, unsupported_ops
from .rotation import (RotationError, fit_rotations, fold_norms, refine_rotations, refinement_note,
                       rotate_state_dict, rotation_plan, targets_fit)
from .statistics import SiteMoments, Statistics, collect_statistics

# Interpolations the evaluation can trace; "naive-repaired" is REPAIR without alignment.
CURVES = ("naive", "naive-repaired", "aligned", "repaired", "repaired+blocks")
# What the "repaired+blocks" curve is, in every result that has it.
BLOCK_OUTPUT_NOTE = (
    "repaired+blocks also corrects residual-block outputs; those corrections cannot be folded "
    "into the weights of this architecture, so it is measured in memory only and never saved"
)
DEFAULT_CURVES = ("naive", "aligned", "repaired")
# Calibration examples each REPAIR pass of a curve point reads (the saved model's reads all):
# the curve's REPAIR passes were a third of a default merge's forwards, and per-unit means and
# variances settle long before (on the demo pair, REPAIRing its points on 1,000 rather than 4,000
# examples moved the repaired curve by at most 0.2 points of test accuracy and 0.002 in loss).
CURVE_REPAIR_EXAMPLES = 1000
# Alphas of the barrier curves (0, 0.25, 0.5, 0.75, 1): evaluating the curves' points was 58,000
# of a default demo merge's 78,000 example-forwards at 11 alphas; quarter steps keep the midpoint,
# where the barriers of aligned and REPAIRed pairs peak. 11 (tenths) draws the paper's finer curves.
DEFAULT_GRID = 5
# At 0 or 1 the "merge" is an endpoint (B permuted): no collapse to correct, nothing merged.
ALPHA_RANGE = "alpha must be strictly between 0 and 1 (0 and 1 are the endpoints themselves), got {}"
# Steps refining the fitted rotations (``rotate``) towards a (REPAIRed) midpoint that predicts
# what the endpoints do: on the digits ViT pairs of docs/results.md the saved model went from
# 75-77% (Procrustes maps) to 88% (``hfrepair.rotation.REFINE_LEARNING_RATE``).
ROTATION_STEPS = 40
MATCHERS = ("activation", "weight")


class MergeError(ValueError):
    """Endpoints or inputs that cannot be merged; the message names the problem."""


@dataclass
class MergeResult:
    """Every number a merge measured; ``to_dict`` is what ``merge_results.json`` holds."""

    alpha: float
    method: str
    match_at: str
    calibration_examples: int
    matcher: str
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
    weight_distance: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    rotated: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    spec_source: str = "discovered"  # "discovered" now, "cached" from an earlier discovery, or "given"

    def to_dict(self) -> dict:
        return asdict(self)


def check_number(name: str, value) -> float:
    """``value`` as a float, or a :class:`MergeError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)) or \
            (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise MergeError(f"{name} must be a number, not {value!r}")
    return float(value)


def check_count(name: str, value, minimum: int, none: str | None = None) -> None:
    """An integer argument of at least ``minimum`` (None allowed where ``none`` says what it means)."""
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an integer of at least {minimum}" + (f" (or None: {none})" if none else "")
        raise MergeError(f"{name} must be {allowed}, not {value!r}")


def check_run_options(accelerator, cache_memory, spec_cache, announce=None) -> None:
    """The arguments that say how a merge runs, of the types they must be, before any work."""
    if accelerator is not None and not isinstance(accelerator, Accelerator):
        raise MergeError(f"accelerator must be an accelerate.Accelerator (or None), not {accelerator!r}")
    check_count("cache_memory", cache_memory, minimum=1)  # bytes
    if spec_cache is not None and not isinstance(spec_cache, (str, Path)):
        raise MergeError(f"spec_cache must be a folder path (or None), not {type(spec_cache).__name__}")
    if announce is not None and not callable(announce):
        raise MergeError(f"announce must be a function of one string (or None), not {announce!r}")


def check_choices(**chosen: str) -> None:
    """``method``, ``matcher`` and ``match_at`` among their choices, before any work."""
    choices = {"method": METHODS, "matcher": MATCHERS, "match_at": tuple(MATCH_LOCATIONS)}
    for name, value in chosen.items():
        if value not in choices[name]:
            raise MergeError(f"{name} must be one of {', '.join(choices[name])}, not {value!r}")


def check_endpoints(model_a: nn.Module, model_b: nn.Module,
                    names: tuple[str, str] = ("endpoint A", "endpoint B")) -> None:
    """Same architecture, same state_dict keys, shapes and dtypes, finite weights; ``names``
    say which models the errors are about."""
    both = "endpoints" if names == ("endpoint A", "endpoint B") else " and ".join(names)
    if type(model_a) is not type(model_b):
        raise MergeError(f"{both} have different architectures: {type(model_a).__name__} vs {type(model_b).__name__}")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if state_a.keys() != state_b.keys():
        only = sorted(set(state_a) ^ set(state_b))
        raise MergeError(f"{both} have different parameters (e.g. {only[0]!r})")
    for key, value in state_a.items():
        if value.shape != state_b[key].shape:
            raise MergeError(f"{both} differ in shape at {key}: {tuple(value.shape)} vs {tuple(state_b[key].shape)}")
        if value.dtype != state_b[key].dtype:
            raise MergeError(f"{both} differ in dtype at {key}: {value.dtype} vs {state_b[key].dtype} (cast one "
                             "to the other's dtype)")
    for name, state in zip(names, (state_a, state_b)):
        for key, value in state.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise MergeError(f"{name} has non-finite values in {key}")


def statistics_plan(
    spec: PermutationSpec, method: str, match_at: str, curves: tuple[str, ...] = DEFAULT_CURVES
) -> tuple[list, dict[str, list | None]]:
    """The sites the statistics pass must visit, and those that need C x C cross-products
    (with the diagonal blocks they need, :func:`~hfrepair.spec.coupled_blocks`).

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
    sites = [s for s in spec.sites if s.module in match_modules | repair_modules]
    return sites, {s.module: coupled_blocks(spec, s) for s in sites if s.module in cross_modules}


@torch.no_grad()
def check_runs(model: nn.Module, example) -> torch.Tensor:
    """Run ``model`` once on the first calibration rows (its logits returned), so that a
    model that cannot run on the data (a classifier without a padding token id, inputs it
    does not take) is said to be that, not a spec that torch.export could not capture or
    that changed the outputs."""
    try:
        with kept_modes(model):
            return model_outputs(model, example)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        message = (str(error).splitlines() or [""])[0]
        raise MergeError(f"{type(model).__name__} cannot run on the calibration data ({type(error).__name__}: "
                         f"{message})") from error


def check_first_batches(model: nn.Module, example, evaluation: Mapping, accelerator: Accelerator) -> None:
    """:func:`check_runs` on this process's first calibration rows, then :func:`label_failure`
    on its first batch of each evaluation set (by the name errors give it), before any pass;
    a failure any process meets is raised on all of them together (:func:`raise_together`),
    so that none is left waiting for the others in a collective."""
    try:
        failure = label_failure(evaluation, check_runs(model, example).shape[-1], accelerator.num_processes)
    except ValueError as error:  # a model that cannot run, a first batch that cannot be read
        failure = error
    raise_together(failure, accelerator)


def label_failure(evaluation: Mapping, classes: int, processes: int) -> MergeError | None:
    """Why the first batch of an evaluation set ("train": the calibration prefix of
    ``train_examples``) cannot be scored by a model with ``classes`` outputs: no batch, no
    labels, or labels outside the classes; None when each can. Found before the passes, not
    after the statistics and REPAIR passes (later batches are checked as they are scored)."""
    for name, batches in evaluation.items():
        batch = next(iter(batches), None)
        if batch is None:
            if processes == 1:  # else this process's part is empty: said by the pass, for all together
                return MergeError(f"{name} holds no batch to score")
            continue
        labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if labels is None:
            return MergeError("the train evaluation (train_examples) needs labelled calibration batches: "
                              "(inputs, labels) pairs, or train_examples=0" if name == "train" else
                              f"{name} needs labelled batches: (inputs, labels) pairs (labels inside a dict of "
                              "inputs are not read)")
        try:
            scored = torch.as_tensor(labels)
        except (ValueError, TypeError, RuntimeError) as error:
            return MergeError(f"{name}: its labels are not class indices ({type(error).__name__})")
        scored = scored[scored != IGNORED_LABEL]
        outside = scored[(scored < 0) | (scored >= classes)]
        if outside.numel():
            return MergeError(f"{name} holds label {int(outside[0])}, outside the model's {classes} classes "
                              f"(0-{classes - 1})")
    return None


def check_samples(stats: Statistics) -> None:
    """Refuse statistics with fewer than 2 samples per unit at a site (one example through an
    MLP): no variance or correlation to match or REPAIR with."""
    for module, pair in stats.pairs.items():
        if pair.a.n < 2:
            raise MergeError(f"the calibration data gives {pair.a.n} sample{'s' if pair.a.n != 1 else ''} per unit "
                             f"at {module}: too few to measure a variance; use more calibration examples")


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
        reason = ("reset re-estimates BatchNorms, and it has none; pass --method repair to correct its "
                  "layers, or none" if method == "reset" else
                  "the spec lists no activation site to measure and correct; pass --method none" if not spec.sites
                  else "no layer output with a bias or BatchNorm, and no norm affine to fold into; pass --method none")
        raise MergeError(f"REPAIR ({method}) has nothing to correct in {name}: {reason} for plain interpolation")


def measurable_curves(curves: tuple[str, ...], method: str, spec: PermutationSpec) -> tuple[tuple[str, ...], list[str]]:
    """The curves that measure what their names say, and a note for each one left out or
    renamed: without a permutation group the aligned curve is the naive one and the REPAIRed
    curve is REPAIR without alignment (``naive-repaired``); ``method='none'`` REPAIRs nothing,
    so its REPAIRed curves would repeat the uncorrected ones."""
    kept, notes = list(curves), []
    if method == "none" and set(kept) & set(REPAIRED_CURVES):
        kept = [label for label in kept if label not in REPAIRED_CURVES]
        notes.append("method none corrects nothing: no REPAIRed curve was measured")
    if not spec.groups:
        if "aligned" in kept:
            notes.append("no permutation group: the aligned curve would be the naive one and was not measured")
        if "repaired" in kept:
            notes.append("no permutation group: the REPAIRed curve is REPAIR without alignment (naive-repaired)")
        renamed = ["naive-repaired" if label == "repaired" else label for label in kept if label != "aligned"]
        kept = list(dict.fromkeys(renamed))
    return tuple(kept), notes


def saved_curve(groups) -> str:
    """The curve the saved model is a point of: REPAIR after alignment, or without it when
    there is no permutation group (``groups``: the spec's, or a record's)."""
    return "repaired" if groups else "naive-repaired"


def repair_hurt_notes(result: MergeResult, alpha: float) -> list[str]:
    """Where the saved, REPAIRed model has a higher loss than the aligned network it was
    made from (its own curve's point at ``alpha``, uncorrected), said: REPAIR matched the
    statistics it aims at, but did not help this pair there."""
    at = next(i for i, point in enumerate(result.alphas) if _same(point, alpha))
    notes = (repair_hurt_note(metrics, result.curves["aligned"][name][at],
                              f"the aligned network at alpha={alpha:g}", f" on {name}")
             for name, metrics in result.merged.items())
    return [note for note in notes if note]


def repair_hurt_note(saved: dict, aligned: dict, aligned_text: str, where: str = "") -> str | None:
    """The note for a saved model whose loss is higher than that of the aligned network it
    was REPAIRed from (``aligned_text`` names it), or None."""
    if saved["loss"] <= aligned["loss"]:
        return None
    return (f"REPAIR made the merge worse{where}: loss {saved['loss']:.4g} against {aligned['loss']:.4g} for "
            f"{aligned_text} without it (accuracy {100 * saved['accuracy']:.1f}% against "
            f"{100 * aligned['accuracy']:.1f}%); method 'none' saves that network")


@contextmanager
def _timed(seconds: dict, stage: str):
    start = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def _same(a: float, b: float) -> bool:
    """Alphas that are one point of the grid (``i / (grid - 1)`` is not always exact)."""
    return abs(a - b) < 1e-9


def curve_alphas(grid: int, alpha: float) -> list[float]:
    """The curves' alphas: ``grid`` evenly spaced from 0 to 1, and the saved model's ``alpha``
    where it falls between them, so that the REPAIRed curve, whose barrier the results give
    as the saved model's, always passes through the saved model."""
    alphas = [i / (grid - 1) for i in range(grid)]
    return alphas if any(_same(point, alpha) for point in alphas) else sorted([*alphas, alpha])


REPAIRED_CURVES = ("naive-repaired", "repaired", "repaired+blocks")  # a REPAIR pass per point


def variance_data(datasets, curves: tuple[str, ...], inner: list[float], alpha: float) -> tuple[bool, bool]:
    """Where the variance ratios are measured: on the ``train`` evaluation passes when there
    are some (the saved network's pass runs anyway), and whether the aligned network's is
    the aligned curve's point at ``alpha`` (else a pass of its own)."""
    on_train = "train" in datasets
    return on_train, on_train and "aligned" in curves and any(_same(point, alpha) for point in inner)


def plan_merge(method: str, alpha: float, curves: tuple[str, ...], inner: list[float], sizes: dict[str, int | None],
               datasets: tuple[str, ...], rotate: bool = False, rotation_steps: int = 0,
               keep_targets: bool = False, saved: str = "repaired", variance: bool = True) -> MergePlan:
    """Every pass a merge will run over the data, in order; :func:`merge` follows it.

    ``inner``: the curves' alphas strictly between the endpoints; ``sizes``: examples per
    data set (``calibration``, ``first calibration`` (the curves' REPAIR passes) and each
    evaluation set; None when unknown before reading).
    The saved model's point is reused in its curve (``saved``, :func:`saved_curve`); the
    variance ratios are taps on passes that run anyway where there are such passes
    (:func:`variance_data`); ``variance``: whether there are sites to take them at.
    """
    plan = MergePlan(sizes=dict(sizes))
    plan.add("statistics", "calibration", 2)
    if rotate:
        plan.add("rotations (Procrustes sums)", "calibration", 2)
        if rotation_steps:
            if method == "repair":
                plan.add("statistics (rotated pair, fitted maps: REPAIR's goals while refining)", "calibration", 2)
            midpoint = f"{'REPAIRed ' if method == 'repair' else ''}midpoint"
            plan.add(f"rotations refined (A, B and the {midpoint}, with its gradient)", "first calibration", 3,
                     count=1 if keep_targets else rotation_steps + 1)
            if keep_targets:  # the endpoints' predictions kept after the first step
                plan.add(f"rotations refined (the {midpoint}, with its gradient; the endpoints' predictions kept)",
                         "first calibration", 1, count=rotation_steps)
        plan.add("statistics (rotated pair)", "calibration", 2)
    repairs = method in ("repair", "reset")
    if repairs:
        plan.add("REPAIR (saved model)", "calibration", 1)
    on_train, on_aligned_curve = variance_data(datasets, curves, inner, alpha)
    if variance and not on_train:
        if method == "none":  # the saved model is the aligned interpolation
            plan.add("variance ratios (aligned)", "calibration", 1)
        else:
            plan.add("variance ratios (aligned, saved)", "calibration", 1, count=2)
    elif variance and not on_aligned_curve:
        plan.add("variance ratios (aligned)", "train", 1)
    for name in datasets:
        plan.add("evaluation: endpoints A and B", name, 2)
        plan.add("evaluation: saved model", name, 1)
    for label in curves:
        for point in inner:
            if label == saved and _same(point, alpha):
                continue  # the saved model
            if label in REPAIRED_CURVES and repairs:
                plan.add(f"REPAIR ({label} curve)", "first calibration", 1)
            for name in datasets:
                plan.add(f"evaluation: {label} curve", name, 1)
    return plan


@dataclass
class MergePlan:
    """The passes of a merge: what, over which data, how many models each batch runs."""

    sizes: dict[str, int | None]
    passes: list[dict] = field(default_factory=list)

    def add(self, what: str, data: str, models: int, count: int = 1) -> None:
        for _ in range(count):
            self.passes.append({"what": what, "data": data, "models": models})

    def example_forwards(self) -> int | None:
        """Examples x models over all passes; None if a data set's size is not known."""
        if any(self.sizes.get(p["data"]) is None for p in self.passes):
            return None
        return sum(p["models"] * self.sizes[p["data"]] for p in self.passes)

    def describe(self) -> str:
        total = self.example_forwards()
        head = f"plan: {len(self.passes)} passes over the data"
        lines = [head + (f", {total:,} example-forwards" if total is not None else "") + ":"]
        counts: dict[tuple, int] = {}
        for p in self.passes:
            key = (p["what"], p["data"], p["models"])
            counts[key] = counts.get(key, 0) + 1
        for (what, data, models), count in counts.items():
            size = self.sizes.get(data)
            over = f"{size:,} {data} examples" if size is not None else f"the {data} data"
            if data.startswith("first "):  # a prefix of a data set
                over = (f"the first {size:,} {data[6:]} examples" if size is not None
                        else f"the first examples of the {data[6:]} data")
            times = f"{count} passes" if count > 1 else "1 pass"
            lines.append(f"  {what}: {times} x {models} model{'s' if models > 1 else ''} over {over}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passes": len(self.passes), "example_forwards": self.example_forwards(), "sizes": self.sizes,
                "steps": self.describe().splitlines()[1:]}


def _size(batches, cap: int | None) -> int | None:
    known = getattr(batches, "expected", None)
    if known is None:
        return None
    return known if cap is None else min(known, cap)


def merge(
    model_a: nn.Module,
    model_b: nn.Module,
    calibration: Iterable,
    evaluation: dict[str, Iterable] | None = None,
    *,
    alpha: float = 0.5,
    method: str = "repair",
    match_at: str = "activation",
    matcher: str = "activation",
    spec: PermutationSpec | str | Path | None = None,
    num_samples: int | None = None,
    grid: int = DEFAULT_GRID,
    eval_samples: int | None = None,
    train_examples: int | None = None,
    curves: tuple[str, ...] = DEFAULT_CURVES,
    curve_repair_examples: int | None = CURVE_REPAIR_EXAMPLES,
    rotate: bool = False,
    rotation_steps: int = ROTATION_STEPS,
    accelerator: Accelerator | None = None,
    cache_memory: int = DEFAULT_MEMORY,
    spec_cache: str | Path | None = None,
    announce: Callable[[str], None] | None = None,
) -> tuple[nn.Module, MergeResult]:
    """Align ``model_b`` to ``model_a``, interpolate at ``alpha``, REPAIR and fuse.

    ``calibration`` yields input tensors or ``(inputs, labels)`` batches; ``num_samples``
    caps the examples used. ``spec``: a permutation spec, or the path of one saved with
    ``spec.save``, instead of discovery (checked as any spec). ``evaluation`` maps names
    (e.g. ``"test"``) to labelled batches; ``train_examples`` adds ``"train"``: the first calibration examples. When
    there is evaluation data, the naive / aligned / repaired curves over ``grid`` alphas (and
    ``alpha`` where the grid misses it, :func:`curve_alphas`) and their barriers are measured
    (``curves`` picks them from :data:`CURVES`; ``()`` for none: the endpoints and the saved
    model only); each REPAIRed point of a curve other than the saved model is REPAIRed on
    the first ``curve_repair_examples`` calibration examples (None: all of them). ``rotate``: after the permutations, align the residual
    stream and each head's value dims by orthogonal maps (:mod:`~hfrepair.rotation`; the
    stream's norm affines are folded into the layers that read them), then refine the maps for
    ``rotation_steps`` steps of gradient descent so that the network interpolated at ``alpha``
    (REPAIRed by batch, with the exact method) predicts what the endpoints' mixed predictions
    do, on the first ``curve_repair_examples`` calibration examples (0: the Procrustes maps as
    fitted). Returns the merged
    model (A's class, fused weights) and a :class:`MergeResult`.

    Each example is read (streamed, decoded, preprocessed) once: later passes replay the
    prepared batches, held in memory up to ``cache_memory`` bytes per data set and in a
    temporary folder beyond, removed at the end. ``spec_cache``: a folder where discovered
    specs are stored per architecture and reused by later merges (see
    :mod:`~hfrepair.spec_cache`; None: discover every time). ``announce`` receives the plan of passes
    before they start. Every pass runs on all processes of ``accelerator`` (one is created
    if none is given), each reading its part of the batches; the endpoints are moved to its
    device and the forward passes use its mixed precision, while all sums stay float64.
    Call it on every process; each gets the same merged model and result.
    """
    alpha = check_number("alpha", alpha)
    if not 0.0 < alpha < 1.0:
        raise MergeError(ALPHA_RANGE.format(alpha))
    check_choices(method=method, matcher=matcher, match_at=match_at)
    for name, count in (("num_samples", num_samples), ("eval_samples", eval_samples),
                        ("curve_repair_examples", curve_repair_examples)):
        check_count(name, count, minimum=1, none="all")
    check_count("train_examples", train_examples, minimum=0, none="no train evaluation")
    check_count("rotation_steps", rotation_steps, minimum=0)
    check_count("grid", grid, minimum=3)
    if isinstance(curves, str) or not all(isinstance(label, str) for label in curves):
        raise MergeError(f"curves must be a tuple of curve names (e.g. ('aligned', 'repaired')), not {curves!r}")
    unknown = set(curves) - set(CURVES)
    if unknown:
        raise MergeError(f"unknown curves {sorted(unknown)}; choose from {', '.join(CURVES)}")
    if "repaired+blocks" in curves and method != "repair":
        raise MergeError("block-output corrections need the exact method (method='repair')")
    if evaluation is not None and not isinstance(evaluation, Mapping):
        raise MergeError("evaluation must map names to labelled batches, e.g. {'test': test_batches}, not "
                         f"{type(evaluation).__name__}")
    check_batches(calibration, name="calibration")
    for name, batches in (evaluation or {}).items():
        check_batches(batches, name=f"evaluation[{name!r}]")
    check_run_options(accelerator, cache_memory, spec_cache, announce)
    if spec is not None and not isinstance(spec, (str, Path, PermutationSpec)):
        raise MergeError(f"spec must be a PermutationSpec or the path of one saved with spec.save, not "
                         f"{type(spec).__name__}")
    spec = PermutationSpec.load(spec) if isinstance(spec, (str, Path)) else spec
    check_endpoints(model_a, model_b)
    accelerator = accelerator or make_accelerator()
    model_a.to(accelerator.device)
    model_b.to(accelerator.device)
    with ExitStack() as cleanup:
        cleanup.enter_context(kept_modes(model_a, model_b))
        prepared = preparer(cleanup, accelerator, cache_memory)
        calibration = prepared(calibration)
        evaluation = {name: prepared(batches) for name, batches in (evaluation or {}).items()}
        if train_examples:
            evaluation["train"] = calibration.prefix(min(train_examples, num_samples or train_examples))
        curve_cap = curve_repair_examples if num_samples is None else min(curve_repair_examples or num_samples,
                                                                           num_samples)
        curve_calibration = calibration.prefix(curve_cap) if curve_cap else calibration
        return _merge(model_a, model_b, calibration, curve_calibration, evaluation, alpha, method, match_at, matcher,
                      spec, spec_cache, num_samples, grid, eval_samples, curves, rotate, rotation_steps, accelerator,
                      announce)


def _merge(model_a, model_b, calibration, curve_calibration, evaluation, alpha, method, match_at, matcher, spec,
           spec_cache, num_samples, grid, eval_samples, curves, rotate, rotation_steps, accelerator, announce):
    """:func:`merge` on prepared data: the plan, then the stages."""
    seconds: dict[str, float] = {}
    example = next(iter(calibration), None)  # this process's first batch: read once, kept for the passes
    if accelerator.num_processes > 1:  # all together: a process without data must not leave the others waiting
        require_data_everywhere(0 if example is None else 1, accelerator, "calibration")
    if example is None or not rows(inputs_of(example)):
        raise MergeError("the calibration data is empty" if example is None else
                         "the calibration data's first batch holds no example")
    example = to_device(first_rows(inputs_of(example), 8), accelerator.device)
    named = {name if name == "train" else f"evaluation[{name!r}]": batches for name, batches in evaluation.items()}
    check_first_batches(model_a, example, named, accelerator)

    given_spec = spec is not None
    with _timed(seconds, "discover"):
        # Every spec, discovered, cached or by hand, must pass the random-permutation check.
        if given_spec:
            verify_spec(model_a, spec, example)
            spec_source = "given"
        else:
            spec, spec_source = checked_spec(model_a, example, spec_cache)
    corrected = repair_summary(spec, method, model_a)
    check_merge_does_something(spec, method, model_a, given_spec, corrected)
    curves, curve_notes = measurable_curves(curves, method, spec)
    if "repaired+blocks" in curves and not block_output_sites(spec):
        raise MergeError(f"{type(model_a).__name__} has no residual-block outputs (activations on a residual "
                         "stream) to correct: drop --block-outputs")
    work = copy.deepcopy(model_a)  # the one working copy every built network is loaded into
    rotation = None
    if rotate:  # decided before any pass over the data
        try:
            rotation = rotation_plan(model_a, spec, example, workspace=work)
        except RotationError as error:
            raise MergeError(f"cannot rotate: {error}") from None

    alphas = curve_alphas(grid, alpha)
    inner = alphas[1:-1] if evaluation else []
    curves = curves if evaluation else ()
    variance_on_train, variance_on_aligned_curve = variance_data(evaluation, curves, inner, alpha)
    sizes = {"calibration": _size(calibration, num_samples), "first calibration": _size(curve_calibration, num_samples),
             **{name: _size(batches, eval_samples) for name, batches in evaluation.items()}}
    # At most the prefix's cap when the stream's size is not known beforehand.
    refined_examples = sizes["first calibration"] or getattr(curve_calibration, "limit", None) or num_samples
    keep_targets = bool(rotation and rotation_steps) and targets_fit(model_a, example, refined_examples)
    # Figure 2's ratio, at the sites where units were matched (post-activation by default).
    matched = {m for g in spec.groups for m in matching_sites(spec, g, match_at)}
    variance_sites = [s for s in spec.sites if s.module in matched]
    saved = saved_curve(spec.groups)  # the curve whose point at alpha is the saved model
    plan = plan_merge(method, alpha, curves, inner, sizes, tuple(evaluation), rotate, rotation_steps, keep_targets,
                      saved, bool(variance_sites))
    if announce is not None and is_main_process(accelerator):
        announce(plan.describe())

    forwards_before = forward_count()
    sites, cross_modules = statistics_plan(spec, method, match_at, curves)
    with _timed(seconds, "statistics"):
        stats = collect_statistics(model_a, model_b, sites, calibration, num_samples, cross_modules, accelerator)
    check_samples(stats)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    with _timed(seconds, "match"):
        perms = match_permutations(spec, stats, match_at) if matcher == "activation" else \
            match_weights(spec, dict(model_a.named_parameters()), dict(model_b.named_parameters()))
    with _timed(seconds, "permute"):
        state_b_aligned = permute_state_dict(state_b, spec, perms)
        permuted_diff = check_function_preserved(model_b, state_b_aligned, example, workspace=work)

    identity = identity_permutations(spec)
    # The aligned pair as interpolated and REPAIRed: permuted B (and A) by default; with
    # ``rotate``, both with the stream's norms folded and B rotated, measured anew.
    state_a_aligned, aligned_stats, aligned_perms = state_a, stats, perms
    if rotation is not None:
        with _timed(seconds, "rotate"):
            maps = fit_rotations(model_a, load_into(work, state_b_aligned), spec, rotation, calibration, num_samples,
                                 accelerator)
            state_a_aligned = fold_norms(state_a, rotation, spec)
            folded_b = fold_norms(state_b_aligned, rotation, spec)
            folded_a = load_into(copy.deepcopy(model_a), state_a_aligned)
        if rotation_steps:
            correctors = {}
            if method == "repair":  # refined for the REPAIRed midpoint, its goals from the fitted maps' pair
                with _timed(seconds, "statistics"):
                    fitted_stats = collect_statistics(
                        folded_a, load_into(work, rotate_state_dict(folded_b, spec, rotation, maps)), sites,
                        calibration, num_samples, cross_modules, accelerator)
                correctors = exact_correctors(spec, fitted_stats, identity, alpha)
            with _timed(seconds, "rotate"):
                maps, refined = refine_rotations(model_a, model_b, state_a_aligned, folded_b, spec, rotation, maps,
                                                 curve_calibration, rotation_steps, alpha, num_samples, accelerator,
                                                 correctors, keep_targets)
        with _timed(seconds, "rotate"):
            state_b_aligned = rotate_state_dict(folded_b, spec, rotation, maps)
            rotated_diff = check_function_preserved(model_b, state_b_aligned, example, workspace=work)
        with _timed(seconds, "statistics"):
            aligned_stats = collect_statistics(folded_a, load_into(work, state_b_aligned), sites, calibration,
                                               num_samples, cross_modules, accelerator)
        aligned_perms = identity
        del folded_a

    def repaired_state(alpha_: float, aligned: bool = True, data=curve_calibration) -> dict:
        """REPAIRed interpolation; unaligned B keeps its own unit order (identity)."""
        base, target, measured, order = ((state_a_aligned, state_b_aligned, aligned_stats, aligned_perms) if aligned
                                         else (state_a, state_b, stats, identity))
        return repair(model_a, interpolate(base, target, alpha_), spec, measured, order, alpha_, method,
                      data, num_samples, accelerator, workspace=work)

    with _timed(seconds, "interpolate+repair"):
        merged_state = repaired_state(alpha, data=calibration)
    result = MergeResult(
        alpha=alpha, method=method, match_at=match_at, calibration_examples=stats.examples, matcher=matcher,
        groups={name: g.size for name, g in spec.groups.items()},
        permuted_max_abs_diff=permuted_diff,
        matched_correlation=mean_matched_correlation(spec, stats, perms, match_at),
        unaligned_correlation=mean_matched_correlation(spec, stats, identity, match_at),
        fixed=fixed_summary(spec, state_a if given_spec else None), corrected=corrected, spec_source=spec_source,
        weight_distance={label: weight_distance(spec, dict(model_a.named_parameters()), state_b, order)
                         for label, order in (("unaligned", identity), ("aligned", perms))} if spec.groups else {},
    )
    result.aligned = alignment_summary(spec, result.matched_correlation, result.unaligned_correlation)
    if rotation is not None:
        # The aligned figures above are of the permutations alone; these, of the pair interpolated.
        by_kind = alignment_summary(spec, mean_matched_correlation(spec, aligned_stats, identity, match_at),
                                    result.unaligned_correlation)
        result.rotated = {**rotation.describe(spec), "rotated_max_abs_diff": rotated_diff,
                          "matched_correlation": {kind: v["matched_correlation"] for kind, v in by_kind.items()},
                          "weight_distance": weight_distance(spec, state_a_aligned, state_b_aligned, identity)}
        result.notes.append(rotation.note(spec))
        result.notes.append(
            "measured on the rotated, norm-folded pair that was interpolated: matched correlation "
            + ", ".join(f"{kind} {value:.2f}" for kind, value in result.rotated["matched_correlation"].items())
            + f", weight distance {result.rotated['weight_distance']:.3f} (the aligned figures are after the "
            "permutations alone)")
        if rotation_steps:
            result.rotated["refined"] = refined
            result.notes.append(refinement_note(refined))
    if identical(state_a, state_b):
        result.notes.append("A and B hold the same weights: this merge is A, with REPAIR's corrections")
    if not spec.groups:
        result.notes.append("the given spec has no permutation groups: B's units were not aligned to A's")
    elif matcher == "activation" and (note := fallback_note(spec, match_at)):
        result.notes.append(note)
    result.notes += curve_notes

    # Plain interpolation saves the aligned network itself: one series, not two of the same.
    variance_taps = {label: SiteMoments(variance_sites) for label in ("aligned", "repaired")[:1 if method == "none" else 2]}
    if variance_sites and not variance_on_aligned_curve:
        with _timed(seconds, "variance"):
            load_into(work, interpolate(state_a_aligned, state_b_aligned, alpha))
            data, limit = (evaluation["train"], eval_samples) if variance_on_train else (calibration, num_samples)
            run_pass([work], [variance_taps["aligned"]], data, limit=limit, accelerator=accelerator,
                     desc="variance (aligned)")
            if not variance_on_train and "repaired" in variance_taps:
                load_into(work, merged_state)
                run_pass([work], [variance_taps["repaired"]], calibration, limit=num_samples,
                         accelerator=accelerator, desc="variance (saved)")

    def scores_of(models, in_memory=(), on_train=()):
        """Metrics of ``models`` on every evaluation set, one pass per set. ``in_memory``
        taps change the network in every pass (block-output corrections); the ``train``
        pass also feeds ``on_train`` (the variance ratios)."""
        out = [{} for _ in models]
        for name, batches in evaluation.items():
            taps = [*(Scores(i) for i in range(len(models))), *in_memory, *(on_train if name == "train" else ())]
            run_pass(models, taps, batches, limit=eval_samples, accelerator=accelerator,
                     desc=f"evaluating on {name}", release=False)
            for i in range(len(models)):
                out[i][name] = taps[i].metrics.to_dict()
        return out

    def load_point(label: str, point: float) -> list:
        """Load ``label``'s network at ``point`` into the working copy; returns the taps that
        apply its in-memory corrections during a pass (block outputs), if any."""
        if label == "naive":
            load_into(work, interpolate(state_a, state_b, point))
        elif label == "aligned":
            load_into(work, interpolate(state_a_aligned, state_b_aligned, point))
        elif label == "repaired+blocks":
            state, in_memory = repair_block_outputs(model_a, interpolate(state_a_aligned, state_b_aligned, point),
                                                    spec, aligned_stats, aligned_perms, point, curve_calibration,
                                                    num_samples, accelerator,
                                                    workspace=work)
            load_into(work, state)
            return [in_memory]
        else:
            load_into(work, repaired_state(point, aligned=label == "repaired"))
        return []

    if evaluation:
        with _timed(seconds, "evaluate"):
            result.endpoints = dict(zip("AB", scores_of([model_a, model_b])))
            load_into(work, merged_state)
            saved_taps = [variance_taps["repaired"]] if variance_on_train and "repaired" in variance_taps else []
            result.merged = scores_of([work], on_train=saved_taps)[0]
            result.alphas = alphas
            for label in curves:
                points = []
                for point in progress(inner, accelerator, desc=f"curve {label}", unit="alpha"):
                    if label == saved and _same(point, alpha):
                        points.append(result.merged)
                        continue
                    in_memory = load_point(label, point)
                    on_train = [variance_taps["aligned"]] if (variance_on_aligned_curve and label == "aligned"
                                                              and _same(point, alpha)) else []
                    points.append(scores_of([work], in_memory, on_train)[0])
                result.curves[label] = {
                    name: [result.endpoints["A"][name], *[p[name] for p in points], result.endpoints["B"][name]]
                    for name in evaluation
                }
                result.barriers[label] = {
                    name: barriers_of(alphas, values) for name, values in result.curves[label].items()
                }
            release_freed_memory()  # the evaluation passes kept theirs for one another
    endpoints = {site.module: aligned_stats.pairs[site.module] for site in variance_sites}
    result.variance_ratio = {
        label: variance_ratios(tap.moments, {k: p.a for k, p in endpoints.items()},
                               {k: p.b for k, p in endpoints.items()})
        for label, tap in variance_taps.items()
    } if variance_sites else {}
    if "repaired+blocks" in curves:
        result.notes.append(BLOCK_OUTPUT_NOTE)
    if saved == "repaired" and "aligned" in result.curves and method != "none":
        result.notes += repair_hurt_notes(result, alpha)
    plan.sizes["calibration"] = stats.examples  # measured: the plan's figures now hold whatever was known
    plan.sizes["first calibration"] = min(stats.examples, getattr(curve_calibration, "limit", stats.examples))
    for name in evaluation:
        plan.sizes[name] = result.merged[name]["examples"]
    result.plan = {**plan.to_dict(), "example_forwards_run": forward_count() - forwards_before,
                   "variance_data": "train" if variance_on_train else "calibration"}
    result.seconds = seconds
    return load_into(work, merged_state).eval(), result

