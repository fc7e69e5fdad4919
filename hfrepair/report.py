"""What a merge did, as plain data: which groups were aligned (by kind and size), which axes
stayed fixed and why, and which sites REPAIR corrected, corrected scale-only, or could not.

In: the spec, the matched correlations, the method and the model. Out: dicts that
``merge_results.json``, the printed table and the model card show as they are, so that no
report can say "aligned" or "REPAIRed" about weights that were not.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .repair import correction_mode, correction_sites
from .spec import PermutationSpec

UNCORRECTABLE = "no bias, BatchNorm or norm affine to fold a correction into"


def units_of(size: str) -> int:
    """The units of a per-head size "heads x dims"."""
    heads, dims = size.split("x")
    return int(heads) * int(dims)


def alignment_summary(spec: PermutationSpec, matched: dict[str, float] | None = None,
                      unaligned: dict[str, float] | None = None) -> dict:
    """Per group kind: how many groups, their unit sizes, and (given a pair's correlations)
    the mean matched correlation against that of the units in their original order."""
    by_kind: dict[str, list] = defaultdict(list)
    for name, group in spec.groups.items():
        by_kind[group.kind].append(name)
    def size(group) -> int | str:  # per-head groups: "heads x dims per head"
        return group.size if group.blocks == 1 else f"{group.blocks}x{group.size // group.blocks}"

    return {
        kind: {
            "groups": len(names),
            # By units, whole groups and per-head ones alike (32 before 128, not as text).
            "sizes": sorted({size(spec.groups[n]) for n in names},
                            key=lambda s: (s if isinstance(s, int) else units_of(s), str(s))),
            "units": sum(spec.groups[n].size for n in names),
            **({"matched_correlation": sum(matched[n] for n in names) / len(names),
                "unaligned_correlation": sum(unaligned[n] for n in names) / len(names)} if matched is not None else {}),
        }
        for kind, names in by_kind.items()
    }


def gap_text(gap: dict, language_model: bool) -> str:
    """An N-model merge's ``gap`` (the endpoints' weighted mean metric minus the merged
    model's) in words whose direction cannot be misread: accuracy for a classifier, loss for a
    language model."""
    if "accuracy" in gap and not language_model:
        points = 100 * gap["accuracy"]
        side = "below" if points >= 0 else "above"
        return f"{abs(points):.1f} points of accuracy {side} the endpoints' weighted mean"
    if "loss" in gap:
        above = -gap["loss"]  # the merged model's loss minus the mean
        return f"a loss {abs(above):.3f} {'above' if above >= 0 else 'below'} the endpoints' weighted mean"
    return "not measured"


def aligned_over_pairs_text(aligned: dict, models: int) -> str:
    """:func:`aligned_text` of an N-model merge, saying what its correlations average over."""
    measured = any("matched_correlation" in kind for kind in aligned.values())
    return aligned_text(aligned) + (f"; corr: mean over the {models * (models - 1) // 2} pairs of models"
                                    if measured else "")


def aligned_text(aligned: dict) -> str:
    """Groups by kind and size, with the matched correlation where a pair's was measured."""
    return ", ".join(f"{k} {v['groups']} x {'/'.join(map(str, v['sizes']))} units"
                     + (f" (corr {v['matched_correlation']:.2f} vs {v['unaligned_correlation']:.2f})"
                        if "matched_correlation" in v else "") for k, v in aligned.items())


def fixed_line(fixed: dict[str, int]) -> list[str]:
    """The fixed axes in one line, the three most frequent reasons named (none: no line)."""
    if not fixed:
        return []
    top = "; ".join(f"{reason} ({count})" for reason, count in list(fixed.items())[:3])
    return [f"fixed: {sum(fixed.values())} weight axes, e.g. {top}"]


LEFT_OUT = "in no group of the given spec"
IN_HEAD_ORDER = "dims within each permuted head kept in order (e.g. q and k: rotary position embeddings pair them)"


def fixed_summary(spec: PermutationSpec, state: dict | None = None) -> dict[str, int]:
    """Why weight axes stayed fixed: reason -> number of axes, most frequent first. With the
    ``state`` dict of a spec written by hand, the axes it neither groups nor lists as fixed
    count too (a discovered spec lists every axis in one or the other)."""
    reasons = list(spec.fixed.values())
    # A projection laid out by a heads group with no group for the dims inside each head (a
    # Llama's q and k): its output rows move with their heads, never within them.
    heads = {name for name, group in spec.groups.items() if group.kind == "heads"}
    dims = {name for name, group in spec.groups.items() if group.kind == "head_dims"}
    reasons += [IN_HEAD_ORDER for site in spec.sites
                if site.layout and set(site.groups()) & heads and not set(site.groups()) & dims]
    if state is not None:
        grouped = {(member[0], member[1]) for group in spec.groups.values() for member in group.members}
        reasons += [LEFT_OUT for key, value in state.items() for axis in range(value.dim())
                    if (key, axis) not in grouped and (key, axis) not in spec.fixed]
    return dict(Counter(reasons).most_common())


def unsupported_ops(spec: PermutationSpec) -> list[str]:
    """Ops without a discovery rule that fixed some axes."""
    prefix = "unsupported op "
    return sorted({r[len(prefix):] for r in spec.fixed.values() if r.startswith(prefix)})


# How a site can be corrected (:func:`~hfrepair.repair.correction_mode`), as the table says it.
CORRECTION_KINDS = {"affine": "scale+shift", "scale": "scale-only", "batchnorm": "BatchNorm re-estimated",
                    "stream": "residual sums folded through their stage"}
# The closed form sets a BatchNorm's statistics from the endpoints' (paper Eq. 5), with no pass.
CLOSED_FORM_BATCHNORM = "BatchNorm set in closed form"


def correction_label(kind: str, method: str) -> str:
    return CLOSED_FORM_BATCHNORM if kind == "batchnorm" and method == "closed-form" else CORRECTION_KINDS[kind]


def repair_summary(spec: PermutationSpec, method: str, model: nn.Module) -> dict[str, list]:
    """Sites REPAIR corrected, by how (``affine``, ``scale``, ``batchnorm``), and the layer
    outputs it could not correct; ``none`` corrects nothing and ``reset`` only BatchNorms.
    The exact pass (``repair``, ``reset``) re-measures every BatchNorm of the network, the
    spec's sites or not."""
    report: dict[str, list] = {**{kind: [] for kind in CORRECTION_KINDS}, "uncorrected": []}
    if method == "none":
        return report
    measured = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if method == "reset":
        report["batchnorm"] = measured
        return report
    corrected = correction_sites(spec)
    for site in corrected:
        report[correction_mode(site)].append(site.batchnorm or site.module)
    if method == "repair":
        report["batchnorm"] += [n for n in measured if n not in report["batchnorm"]]
    done = {s.module for s in corrected}
    report["uncorrected"] = [s.module for s in spec.sites if s.kind == "linear" and s.module not in done]
    return report


def corrected_count(summary: dict[str, list]) -> int:
    return sum(len(summary.get(k, ())) for k in CORRECTION_KINDS)


# Where a merge's spec came from (``MergeResult.spec_source``), as the printed report says it.
SPEC_SOURCES = {"discovered": "discovered from the torch.export graph",
                "cached": "reused from an earlier discovery of this architecture (the spec cache)",
                "given": "given by hand"}


def rounded(value: float, digits: int) -> float:
    """``value`` rounded for display, a negative zero as zero: a barrier of -0.0004 reads
    0.0, not -0.0 (a sign no measurement supports)."""
    return round(value, digits) + 0.0


def describe(result) -> list[str]:
    """The report in a few lines, for the printed table."""
    check = ("checked: a random permutation per group leaves the outputs unchanged" if result.groups
             else "no permutation group to check")
    lines = [f"permutation spec: {SPEC_SOURCES[result.spec_source]} ({check})", *_alignment_lines(result),
             *fixed_line(result.fixed)]
    corrected = result.corrected
    if corrected_count(corrected):
        parts = [f"{len(corrected[k])} {correction_label(k, result.method)}" for k in CORRECTION_KINDS if corrected.get(k)]
        lines.append(f"REPAIR corrected {corrected_count(corrected)} sites: {', '.join(parts)}"
                     + (f"; {len(corrected['uncorrected'])} layer outputs could not be corrected ({UNCORRECTABLE})"
                        if corrected["uncorrected"] else ""))
    else:
        lines.append(f"REPAIR: nothing corrected (method {result.method})")
    return lines


def _alignment_lines(result) -> list[str]:
    """What was aligned, by group kind, and how far the weights moved."""
    if not result.aligned:
        return ["aligned: nothing (no permutation group)"]
    lines = [f"aligned: {aligned_text(result.aligned)}"]
    if result.weight_distance:
        lines.append(f"weight distance |A - P(B)| / |A|: {result.weight_distance['unaligned']:.3f} unaligned, "
                     f"{result.weight_distance['aligned']:.3f} after {result.matcher} matching")
    return lines


def describe_spec(spec: PermutationSpec, model: nn.Module, check: dict[str, float] | None = None) -> str:
    """What discovery found, for ``hfrepair spec``: the groups (kind, size, tied tensors),
    the fixed axes with their reasons, and the sites REPAIR would correct."""
    lines = [f"{type(model).__name__}: {len(spec.groups)} permutation groups, {len(spec.sites)} activation sites"]
    if check is not None:
        lines.append(f"checked: a random permutation per group leaves the outputs unchanged (max diff "
                     f"{check['max_abs_diff']:.2g}; an inconsistent one changes them by {check['inconsistent_diff']:.2g})")
    for name, group in spec.groups.items():
        size = group.size if group.blocks == 1 else f"{group.blocks} x {group.size // group.blocks} (per head)"
        tensors = list(dict.fromkeys(m[0] for m in group.members))
        shown = ", ".join(tensors[:3]) + (f", ... ({len(tensors)} tensors)" if len(tensors) > 3 else "")
        lines.append(f"  {name} [{group.kind}]: {size} units; {shown}")
    if spec.fixed:
        lines.append(f"fixed: {len(spec.fixed)} weight axes")
        examples: dict[str, list[str]] = defaultdict(list)
        for (key, axis), reason in spec.fixed.items():
            examples[reason].append(f"{key}:{axis}")
        for reason, axes in sorted(examples.items(), key=lambda item: -len(item[1])):
            lines.append(f"  {reason} ({len(axes)}): {', '.join(axes[:3])}{' ...' if len(axes) > 3 else ''}")
    corrected = repair_summary(spec, "repair", model)
    count = corrected_count(corrected)
    modes = ", ".join(f"{len(corrected[k])} {k}" for k in CORRECTION_KINDS if corrected[k])
    lines.append(f"REPAIR would correct {count} sites" + (f" ({modes})" if modes else "") +
                 (f"; {len(corrected['uncorrected'])} layer outputs cannot be corrected ({UNCORRECTABLE})"
                  if corrected["uncorrected"] else ""))
    return "\n".join(lines)
