"""The model card and plots of a merge, from ``merge_results.json``'s record.

In: the record a merge wrote (every number measured on the saved weights) and where the
endpoints came from. Out: ``README.md`` rendered from ``model_cards/merged_model.md`` with
huggingface_hub's ``ModelCard``/``ModelCardData`` (metadata: ``base_model``, tags,
``datasets``, ``library_name``, license when both endpoints agree, and a ``model-index``
of the measured barriers and accuracies), plus ``barrier_curve.png`` and
``variance_ratio.png``. Nothing here computes a number: it only presents the record.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import math
import platform
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .pipeline import REPAIRED_CURVES, saved_curve
from .report import CORRECTION_KINDS, SPEC_SOURCES, aligned_over_pairs_text, corrected_count, gap_text, rounded

# model_cards/ at the repository's top level, installed as the package hfrepair.model_cards.
TEMPLATE = importlib.resources.files("hfrepair.model_cards") / "merged_model.md"
CURVE_STYLES = {"naive": ":", "naive-repaired": "-.", "aligned": "--", "repaired": "-", "repaired+blocks": "-"}


def plot_barrier(record: dict, path: Path) -> None:
    """Test accuracy and loss over alpha for every measured interpolation."""
    from matplotlib.figure import Figure  # not pyplot: a caller's backend and open figures stay as they are

    figure = Figure(figsize=(10, 3.8))
    axes = figure.subplots(1, 2)
    for label, curves in record["curves"].items():
        points = curves["test"]
        for axis, metric in zip(axes, ("accuracy", "loss")):
            axis.plot(record["alphas"], [p[metric] for p in points], CURVE_STYLES.get(label, "-"), marker="o",
                      markersize=3, label=label)
    for axis, metric in zip(axes, ("test accuracy", "test loss")):
        axis.set_xlabel("alpha (0 = A, 1 = B)")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_variance(record: dict, path: Path) -> None:
    """Per-layer variance ratio to the endpoints (paper Fig. 2), before and after REPAIR."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.8))
    axis = figure.subplots()
    for label, ratios in record["variance_ratio"].items():
        axis.plot(range(len(ratios)), list(ratios.values()), marker="o", label=label)
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set_xlabel("layer (matched activation sites, input to output)")
    axis.set_ylabel("variance / endpoints' variance")
    axis.set_title(f"alpha = {record['alpha']}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float) -> str:
    """An accuracy gap, in percentage points (not a percentage of anything)."""
    return f"{rounded(100 * value, 1):.1f} points"


def _name(source: dict) -> str:
    """A source as the card names it: its Hub id, or a local folder's own name (never the
    absolute path of the machine that merged it)."""
    # Resolved: a folder given as "." or ".." is named by its own name (the card is written
    # where the merge ran).
    return source["repo_id"] or Path(source["reference"]).resolve().name


def _link(source: dict) -> str:
    """A model as the card's first sentence names it: linked on the Hub, or a local folder
    (a relative link would point into the merged repo, where it is not)."""
    if source["repo_id"]:
        return f"[{source['repo_id']}](https://huggingface.co/{source['repo_id']})"
    return _local_folder(source)


def _local_folder(source: dict) -> str:
    return f"`{_name(source)}` (a local folder)"


def is_language_model(record: dict) -> bool:
    return record.get("task") == "text-generation"


def calibration_unit(record: dict) -> str:
    """What the calibration count counts: packed blocks of a causal LM's text, or examples."""
    return "blocks of text" if is_language_model(record) and record.get("text_batches") != "padded" else "examples"


def saved_point(alphas: list[float], alpha: float) -> tuple[int, str]:
    """The curves' point at the saved model's ``alpha`` (always on the grid,
    :func:`~hfrepair.pipeline.curve_alphas`), and its name in a table header."""
    index = min(range(len(alphas)), key=lambda i: abs(alphas[i] - alpha))
    return index, "midpoint" if abs(alpha - 0.5) < 1e-9 else f"alpha={alpha:g}"


def barrier_table(record: dict) -> str:
    if not record["curves"]:
        return ("No interpolation curve was measured (`--no-curves`): the endpoints and the saved model only, "
                "so there is no barrier to report.")
    mid, at = saved_point(record["alphas"], record["alpha"])
    language_model = is_language_model(record)
    first = f"{at} loss | {at} perplexity" if language_model else f"{at} accuracy"
    accuracy = "next-token accuracy barrier" if language_model else "accuracy barrier"
    rows = [f"| interpolation | {first} | {accuracy} | test-loss barrier | train-loss barrier |",
            "|---|---|---|---|---|" + ("---|" if language_model else "")]
    for label, curves in record["curves"].items():
        barriers = record["barriers"][label]
        point = curves["test"][mid]
        train = f"{rounded(barriers['train']['loss']['max'], 3):.3f}" if "train" in barriers else "-"
        first = (f"{point['loss']:.3f} | {math.exp(point['loss']):.1f}" if language_model
                 else _percent(point["accuracy"]))
        rows.append(f"| {label} | {first} | {_points(barriers['test']['accuracy']['max'])} | "
                    f"{rounded(barriers['test']['loss']['max'], 3):.3f} | {train} |")
    return "\n".join(rows)


def curve_repair_text(record: dict) -> str:
    """Which calibration examples the REPAIRed curves' points other than the saved model's were
    REPAIRed on (the saved model's REPAIR reads them all)."""
    inner = record["alphas"][1:-1]
    others = [a for a in inner if abs(a - record["alpha"]) > 1e-9]  # the saved model's point aside
    saved = saved_curve(record["groups"])
    repaired = [label for label in record["curves"] if label in REPAIRED_CURVES
                and (others if label == saved else inner)]
    first = record.get("plan", {}).get("sizes", {}).get("first calibration")
    if not repaired or record["method"] not in ("repair", "reset") or first is None:
        return ""
    return (f"The points of the {' and '.join(repaired)} curve{'s' if len(repaired) > 1 else ''} other than the saved "
            f"model were REPAIRed on the first {first} calibration {calibration_unit(record)}.")


def merged_summary(record: dict) -> str:
    """The sentence on the saved model's own score against the endpoints'."""
    merged, endpoints = record["merged"]["test"], record["endpoints"]
    a, b = endpoints["A"]["test"], endpoints["B"]["test"]
    if is_language_model(record):
        return (f"The merged model saved here has a test loss of **{merged['loss']:.3f}** per token (perplexity "
                f"{math.exp(merged['loss']):.1f}, next-token accuracy {_percent(merged['accuracy'])}, over "
                f"{merged['predictions']} predicted tokens); the endpoints have {a['loss']:.3f} and {b['loss']:.3f} "
                f"(perplexity {math.exp(a['loss']):.1f} and {math.exp(b['loss']):.1f}).")
    return (f"The merged model saved here scores **{_percent(merged['accuracy'])}** test accuracy (loss "
            f"{merged['loss']:.4f}); the endpoints score {_percent(a['accuracy'])} and {_percent(b['accuracy'])}.")


def merged_metrics(merged: dict, language_model: bool) -> list[tuple[str, str, float]]:
    """The merged model's own model-index entries: (metric type, name, value)."""
    if language_model:
        return [("loss", "Merged model loss (per token)", merged["loss"]),
                ("perplexity", "Merged model perplexity", math.exp(merged["loss"])),
                ("accuracy", "Merged model next-token accuracy", merged["accuracy"])]
    return [("accuracy", "Merged model accuracy", merged["accuracy"]), ("loss", "Merged model loss", merged["loss"])]


def card_metrics(record: dict, saved: str) -> list[tuple[str, str, float]]:
    """The model-index entries of a two-model merge, named as the task's metrics: the merged
    model's, then the barriers when curves were measured."""
    metrics = merged_metrics(record["merged"]["test"], is_language_model(record))
    by_curve = record["barriers"]  # empty for a merge without curves (--no-curves)
    barriers = by_curve["repaired"]["test"] if "repaired" in by_curve else None
    aligned = by_curve["aligned"]["test"] if "aligned" in by_curve else None
    if not (barriers and aligned):
        return metrics
    if is_language_model(record):
        return metrics + [("loss_barrier", f"Loss barrier ({saved})", barriers["loss"]["max"]),
                          ("loss_barrier_aligned", "Loss barrier (aligned only)", aligned["loss"]["max"])]
    return metrics + [("accuracy_barrier", f"Accuracy barrier ({saved})", barriers["accuracy"]["max"]),
                      ("loss_barrier", f"Loss barrier ({saved})", barriers["loss"]["max"]),
                      ("accuracy_barrier_aligned", "Accuracy barrier (aligned only)", aligned["accuracy"]["max"])]


# The model-index's dataset type is a Hub dataset id; a local folder has none, and its own
# name (e.g. "mnist") would point readers at a Hub dataset the scores were not measured on.
LOCAL_DATASET_TYPE = "local-folder"


def eval_results(record: dict, metrics: list[tuple[str, str, float]]) -> list[EvalResult]:
    """Model-index entries for ``metrics``, measured on the record's evaluation split (a Hub
    dataset at the commit read; a local folder said to be one)."""
    source = record["sources"]["dataset"]
    hub = source["repo_id"]
    return [EvalResult(task_type=record.get("task", "image-classification"),
                       dataset_type=hub or LOCAL_DATASET_TYPE,
                       dataset_name=hub or f"{_name(source)} (local folder)", dataset_revision=source["revision"],
                       dataset_split=record["eval_split"], metric_type=metric,
                       metric_name=label, metric_value=round(value, 6)) for metric, label, value in metrics]


def dataset_text(source: dict) -> str:
    """The dataset as the card's tables name it: a Hub id at the commit read, or a local folder."""
    if source["repo_id"]:
        return f"`{source['repo_id']}` @ `{source['revision']}`" if source["revision"] else f"`{source['repo_id']}`"
    return _local_folder(source)


def evaluation_text(record: dict) -> str:
    """Which data every score was measured on, with the examples counted."""
    split, merged = record["eval_split"], record.get("merged") or {}
    dataset = dataset_text(record["sources"]["dataset"])
    if "test" not in merged:
        return f"split `{split}` of {dataset} (nothing evaluated)"
    text = f"{merged['test']['examples']} {calibration_unit(record)} of split `{split}` of {dataset}"
    if "train" in merged:
        text += (f"; train loss on the first {merged['train']['examples']} calibration "
                 f"{calibration_unit(record)}")
    return text


def tokenizer_text(record: dict) -> str:
    tokenizer = record.get("tokenizer")
    if not tokenizer:
        return ""
    return (f"`{tokenizer['class']}` from `{tokenizer['source']}` ({tokenizer['vocabulary']} tokens, EOS "
            f"`{tokenizer['eos_token']}`), saved with this model")


KIND_LABELS = {"stream": "residual stream", "heads": "attention heads", "head_dims": "dims within heads",
               "mlp": "MLP / hidden units", "channels": "conv channels", "units": "units"}


def alignment_text(record: dict) -> tuple[str, str]:
    """The card's sentence on alignment, and its table of aligned groups by kind."""
    aligned = record.get("aligned") or {}
    if not aligned:
        return "B's units were **not** aligned to A's (no permutation group)", "No permutation group: nothing was aligned."
    rows = ["| units | groups | units per group | matched correlation | before matching |", "|---|---|---|---|---|"]
    for kind, info in aligned.items():
        rows.append(f"| {KIND_LABELS.get(kind, kind)} | {info['groups']} | {', '.join(map(str, info['sizes']))} | "
                    f"{info['matched_correlation']:.3f} | {info['unaligned_correlation']:.3f} |")
    kinds = ", ".join(KIND_LABELS.get(k, k) for k in aligned)
    return f"B's units ({kinds}) were matched to A's by {matching_text(record)}", "\n".join(rows)


def matching_text(record: dict) -> str:
    """How units were matched, in words (weight matching with the distance it left)."""
    if record.get("matcher", "activation") == "activation":
        return f"activation correlation measured at `{record['match_at']}` sites (Hungarian algorithm)"
    distance = record.get("weight_distance") or {}
    moved = (f", relative weight distance {distance['unaligned']:.3f} -> {distance['aligned']:.3f}"
             if distance else "")
    return f"weight matching (coordinate descent over the groups, Hungarian algorithm per group, no data{moved})"


def repair_text(record: dict) -> tuple[str, str]:
    """The card's sentence on REPAIR and its list of corrected sites."""
    corrected = record.get("corrected") or {}
    counts = {k: len(corrected.get(k, [])) for k in CORRECTION_KINDS}
    total = sum(counts.values())
    if not total:
        return (f"no statistics correction was applied (method `{record['method']}`): this is plain interpolation",
                "REPAIR corrected nothing.")
    parts = [f"{n} {label}" for n, label in ((counts["affine"], "with scale and shift"),
                                             (counts["scale"], "scale-only (no bias to take a shift)"),
                                             (counts["batchnorm"], "by setting their BatchNorm's statistics in "
                                              "closed form" if record["method"] == "closed-form"
                                              else "by re-estimating their BatchNorm"),
                                             (counts["stream"], "residual-stream sums, folded back through "
                                                                "their stage")) if n]
    details = f"REPAIR corrected {total} sites: {', '.join(parts)}; the corrections are folded into the weights."
    if corrected.get("uncorrected"):
        details += (f" {len(corrected['uncorrected'])} layer outputs could not be corrected (no bias, BatchNorm "
                    f"or norm affine to fold into): {', '.join(f'`{m}`' for m in corrected['uncorrected'][:8])}"
                    + (" ..." if len(corrected["uncorrected"]) > 8 else "") + ".")
    return (f"**{record['method']}** corrected the variance collapse of the interpolated network at {total} sites "
            "(REPAIR, Jordan et al. 2022)", details)


def fixed_text(record: dict) -> str:
    fixed = record.get("fixed") or {}
    if not fixed:
        return "No weight axis stayed fixed."
    reasons = "; ".join(f"{reason} ({count})" for reason, count in list(fixed.items())[:6])
    return f"{sum(fixed.values())} weight axes stayed fixed, by reason: {reasons}."


def _versions() -> str:
    # Installed versions from the packages' metadata: importing transformers just to read its
    # version took a second of a merge that had not loaded it (image models).
    from . import __version__

    installed = ", ".join(f"{name} {importlib.metadata.version(name)}"
                          for name in ("torch", "transformers", "huggingface_hub", "datasets"))
    return f"hfrepair {__version__}, {installed}, Python {platform.python_version()}"


def dtype_text(record: dict) -> str:
    """The saved weights' dtype, and the mixed precision every measured pass ran under, if any."""
    precision = record.get("mixed_precision")
    return f"{record['dtype']}, the endpoints' dtype" + (f"; every pass (statistics, REPAIR, evaluation) ran under {precision} mixed precision"
                              if precision not in (None, "no") else "")


def model_card(record: dict, configs: tuple[dict, dict], licenses: tuple[str | None, str | None]) -> ModelCard:
    """The card of a merge; ``configs`` are the endpoints' config.json, ``licenses`` theirs."""
    a, b = record["sources"]["model_a"], record["sources"]["model_b"]
    name_a, name_b = _name(a), _name(b)
    dataset = record["sources"]["dataset"]
    hub_dataset = dataset["repo_id"]
    split = record["eval_split"]
    corrected = record.get("corrected") or {}
    repaired = corrected_count(corrected) > 0
    saved = "REPAIR" if repaired else "saved merge, uncorrected"
    task = record.get("task", "image-classification")
    is_transformers = "architectures" in configs[0]
    card_data = ModelCardData(
        base_model=[n for n in (a["repo_id"], b["repo_id"]) if n] or None,
        base_model_relation="merge" if a["repo_id"] or b["repo_id"] else None,
        tags=["merge", "hfrepair", *(["repair"] if repaired else [])],
        datasets=[hub_dataset] if hub_dataset else None,
        library_name="transformers" if is_transformers else "hfrepair",
        pipeline_tag=task if is_transformers else None,
        license=licenses[0] if licenses[0] and licenses[0] == licenses[1] else None,
        model_name=record.get("title", "merged"),
        eval_results=eval_results(record, card_metrics(record, saved)),
        base_model_revisions={n: r for n, r in ((a["repo_id"], a["revision"]), (b["repo_id"], b["revision"])) if n}
        or None,
    )
    aligned_sentence, alignment_table = alignment_text(record)
    repair_sentence, corrected_details = repair_text(record)
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE),
        title=record.get("title", f"Merge of {name_a} and {name_b}"),
        model_a=name_a, model_b=name_b,
        link_a=_link(a), link_b=_link(b),
        revision_a=a["revision"] or "local", revision_b=b["revision"] or "local",
        alpha=record["alpha"], method=record["method"], matching=matching_text(record), dtype=dtype_text(record),
        calibration_examples=record["calibration_examples"], dataset=dataset_text(dataset),
        evaluation=evaluation_text(record), split=record["split"], eval_split=split,
        num_groups=len(record["groups"]), spec_source=SPEC_SOURCES[record["spec_source"]],
        grid=len(record["alphas"]),
        curves=bool(record["curves"]), curve_repair=curve_repair_text(record),
        variance=any(record["variance_ratio"].values()),
        table=barrier_table(record), merged_summary=merged_summary(record), tokenizer=tokenizer_text(record),
        unit=calibration_unit(record),
        notes=record.get("notes", []), command=record["command"], versions=_versions(),
        aligned_text=aligned_sentence, alignment_table=alignment_table, repair_text=repair_sentence,
        corrected_text=corrected_details, fixed_text=fixed_text(record),
        config=yaml.safe_dump(record["config"], sort_keys=False) if record.get("config") else "",
    )


def write_card(folder: Path, record: dict, configs: tuple[dict, dict], licenses: tuple) -> None:
    """README.md and the two plots into ``folder``."""
    if record["curves"]:
        plot_barrier(record, folder / "barrier_curve.png")
    if any(record["variance_ratio"].values()):  # none without matched sites (no permutation group)
        plot_variance(record, folder / "variance_ratio.png")
    model_card(record, configs, licenses).save(folder / "README.md")


def _metric_text(metrics: dict, language_model: bool) -> str:
    if language_model or metrics.get("accuracy") is None:
        return f"loss {metrics['loss']:.3f} (perplexity {math.exp(metrics['loss']):.1f})"
    return f"{100 * metrics['accuracy']:.1f}% (loss {metrics['loss']:.3f})"


def many_model_card(record: dict, config: dict, licenses: list[str | None]) -> ModelCard:
    """The card of an N-model merge (``merge_many``): every base model with its revision and
    weight, how they were aligned and corrected, and each measured score."""
    sources = record["sources"]["models"]
    names = [_name(source) for source in sources]
    repo_ids = [source["repo_id"] for source in sources if source["repo_id"]]
    dataset = record["sources"]["dataset"]
    corrected = record.get("corrected") or {}
    repaired = corrected_count(corrected) > 0
    language_model = is_language_model(record)
    card_data = ModelCardData(
        base_model=repo_ids or None, base_model_relation="merge" if repo_ids else None,
        tags=["merge", "hfrepair", *(["repair"] if repaired else [])],
        datasets=[dataset["repo_id"]] if dataset["repo_id"] else None,
        library_name="transformers" if "architectures" in config else "hfrepair",
        pipeline_tag=record["task"] if "architectures" in config else None,
        license=licenses[0] if licenses[0] and len(set(licenses)) == 1 else None,
        model_name=record.get("title", f"merge of {len(names)} models"),
        eval_results=eval_results(record, merged_metrics(record["merged"], language_model)),
    )
    rows = [f"| {name} | `{source['revision'] or 'local'}` | {weight:.3f} | {_metric_text(scores, language_model)} |"
            for name, source, weight, scores in zip(names, sources, record["weights"], record["endpoints"])]
    matching = ("activation correlation" if record["matcher"] == "activation" else "weight matching") + \
        ", each model matched to the first"
    if record["rounds"]:
        matching += (", then re-aligned to the others" if record["matcher"] == "activation" else
                     ", then re-aligned to the average of the others") + f" ({record['rounds']} rounds" + \
            (")" if record["settled"] else ", stopped with permutations still changing)")
    repair_line, corrected_details = repair_text(record)
    aligned = aligned_over_pairs_text(record.get("aligned_groups") or {}, len(names))
    split = record["eval_split"]
    evaluated = (f", on {record['merged']['examples']} {calibration_unit(record)} of split `{split}`"
                 if record.get("merged") else "")
    pairs = "\n".join(
        f"| midpoint of {names[i]} and {names[j]}: aligned / REPAIRed | {_metric_text(p['aligned'], language_model)} / "
        f"{_metric_text(p['repaired'], language_model)} |" if "repaired" in p else
        f"| midpoint of {names[i]} and {names[j]}, aligned | {_metric_text(p['aligned'], language_model)} |"
        for p in record.get("pairwise", []) for i, j in [p["models"]])
    body = f"""
# Merge of {len(names)} models

Made with hfrepair: the models' units were aligned into one order ({matching}; {len(record['groups'])}
permutation groups, the spec {SPEC_SOURCES[record['spec_source']]}: {aligned}), the aligned models averaged with the
weights below, and {repair_line}. {fixed_text(record)}

| base model | revision | weight | split `{split}` of {dataset_text(dataset)} |
|---|---|---|---|
{chr(10).join(rows)}

| merge | split `{split}` |
|---|---|
| plain average of the unaligned models | {_metric_text(record['naive'], language_model)} |
| aligned average{', before REPAIR' if repaired else ''} | {_metric_text(record['aligned'], language_model)} |
| **this model** | **{_metric_text(record['merged'], language_model)}** |
{pairs}

This model: {gap_text(record.get("gap") or {}, language_model)}. Every number was
measured on the weights it describes{evaluated}; calibration: {record['calibration_examples']}
{calibration_unit(record)} of split `{record['split']}`. {corrected_details}
{"".join(f"{chr(10)}Note: {note}.{chr(10)}" for note in record.get("notes", []))}
Command: `{record['command']}`

Versions: {_versions()}
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
