"""Barriers of ResNet20s with BatchNorm, LayerNorm and no normalisation, across widths.

    python examples/paper/normalization_width.py [--quick] [--output DIR] [--cache DIR]
                                                 [--threads N]

Paper Figure 4: without REPAIR, interpolated BatchNorm ResNets collapse while LayerNorm
ones are already fair; REPAIR lowers the barrier of all three, and barriers shrink as
width grows. ResNet20 (3 blocks per stage) on sklearn's 8x8 digits, so that widths 1, 2
and 4 train on one CPU core within the time limit; width 1 here has 8-16-32 channels
(half the paper's 16-32-64), so width 4 is the paper's width 2. Two REPAIR curves: the
fused one that hfrepair saves (it corrects conv outputs, or for the bias-free LayerNorm
nets the norm outputs, folded into the norm's affine) and the paper's full ResNet REPAIR
that also corrects the residual-block outputs (measured in memory by ``merge``; it cannot
be folded).
"""

from __future__ import annotations

import sys

from paper_common import (
    TRAINED_ACCURACY,
    Run,
    at_alpha,
    endpoint_mean,
    endpoint_pair,
    load_data,
    markdown_table,
    merge_pair,
    percent,
    run_experiment,
    trained_label,
)

NORMALIZATIONS = ("batchnorm", "layernorm", "none")
CURVES = ("aligned", "repaired", "repaired+blocks")
TITLE = "Normalisation and width (paper Fig. 4)"


def settings_for(quick: bool) -> dict:
    """Quick runs: one width of ResNet8s on a coarser alpha grid."""
    return {
        "data": "digits",
        "widths": (1,) if quick else (1, 2, 4),
        "blocks_per_stage": 1 if quick else 3,
        "base_channels": 8,
        "grid": 5 if quick else 11,
        "training": {"epochs": 10, "lr": 0.05},
    }


def main(argv: list[str] | None = None) -> int:
    return run_experiment("normalization_width", __doc__, settings_for, report, argv)


def measure(run: Run, settings: dict) -> list[dict]:
    """One row per (normalisation, width): midpoints and Eq. 1 barriers, aligned and REPAIRed."""
    data = load_data(settings["data"], run.cache)
    rows = []
    for normalization in NORMALIZATIONS:
        for width in settings["widths"]:
            model = {
                "width": width,
                "blocks_per_stage": settings["blocks_per_stage"],
                "normalization": normalization,
                "base_channels": settings["base_channels"],
            }
            pair = endpoint_pair(run.cache, data, "ResNet", model, settings["training"])
            result = merge_pair(pair, data, method="repair", grid=settings["grid"], curves=CURVES)
            row = {
                "normalization": normalization,
                "width": width,
                "endpoints": endpoint_mean(result),
            }
            for curve in CURVES:
                barriers = result.barriers[curve]["test"]
                row[curve] = {
                    "midpoint": at_alpha(result, curve),
                    "loss_barrier": barriers["loss"]["max"],
                    "accuracy_barrier": barriers["accuracy"]["max"],
                }
            rows.append(row)
            print(
                f"{normalization} x{width}: endpoints {percent(row['endpoints'])}, "
                f"midpoint aligned {percent(row['aligned']['midpoint'])}, "
                f"REPAIR {percent(row['repaired']['midpoint'])}, "
                f"with block outputs {percent(row['repaired+blocks']['midpoint'])}",
                flush=True,
            )
    return rows


def report(run: Run, settings: dict) -> int:
    """Check the paper's claims on the measured barriers; write the table and figure."""
    rows = measure(run, settings)
    trained = [r for r in rows if r["endpoints"] >= TRAINED_ACCURACY]
    by_norm = {n: [r for r in trained if r["normalization"] == n] for n in NORMALIZATIONS}
    widest = {n: group[-1] for n, group in by_norm.items() if group}
    run.claim(
        "BatchNorm: REPAIR midpoint beats aligned-only at every trained width by 20+ points",
        bool(by_norm["batchnorm"])
        and all(
            r["repaired"]["midpoint"] > r["aligned"]["midpoint"] + 0.2 for r in by_norm["batchnorm"]
        ),
    )
    run.claim(
        "without REPAIR, BatchNorm's loss barrier exceeds LayerNorm's (widest trained width)",
        {"batchnorm", "layernorm"} <= set(widest)
        and widest["batchnorm"]["aligned"]["loss_barrier"]
        > widest["layernorm"]["aligned"]["loss_barrier"],
    )
    for curve in ("repaired", "repaired+blocks"):
        run.claim(
            f"{curve} lowers the loss barrier for all three normalisations at every width",
            all(r[curve]["loss_barrier"] < r["aligned"]["loss_barrier"] for r in trained),
            required=False,
        )
    for normalization, group in by_norm.items():
        if len(group) < 2:
            continue
        for curve in ("aligned", "repaired+blocks"):
            run.claim(
                f"{normalization}: the {curve} loss barrier shrinks "
                "from the narrowest to the widest trained width",
                group[-1][curve]["loss_barrier"] < group[0][curve]["loss_barrier"],
                required=False,
            )
    table = markdown_table(
        [
            "normalisation",
            "width",
            "endpoints",
            "midpoint: aligned / REPAIR / + blocks",
            "loss barrier: aligned / REPAIR / + blocks",
            "acc. barrier (points): aligned / REPAIR / + blocks",
        ],
        [
            [
                r["normalization"],
                trained_label(r["width"], r["endpoints"]),
                percent(r["endpoints"]),
                " / ".join(percent(r[c]["midpoint"]) for c in CURVES),
                " / ".join(f"{r[c]['loss_barrier']:.3f}" for c in CURVES),
                " / ".join(f"{100 * r[c]['accuracy_barrier']:.1f}" for c in CURVES),
            ]
            for r in rows
        ],
    )
    summary = (
        f"ResNet{6 * settings['blocks_per_stage'] + 2} on sklearn's 8x8 digits, width 1 = "
        f"{settings['base_channels']}-{2 * settings['base_channels']}-"
        f"{4 * settings['base_channels']} channels; endpoints from seeds 1 and 2 "
        f"({settings['training']}). Barriers by Eq. 1 (maximum "
        f"over {settings['grid']} alphas of the gap to the endpoints' line) on the test split. "
        "REPAIR = the fused model hfrepair saves; + blocks = REPAIR also on residual-block outputs."
    )
    styles = {"aligned": "o:", "repaired": "s--", "repaired+blocks": "^-"}

    def draw(plt):
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, metric, label in (
            (axes[0], "loss_barrier", "test loss barrier"),
            (axes[1], "midpoint", "midpoint test accuracy (%)"),
        ):
            for index, (normalization, group) in enumerate(by_norm.items()):
                widths = [r["width"] for r in group]
                scale = 100 if metric == "midpoint" else 1
                for curve, style in styles.items():
                    axis.plot(
                        widths,
                        [scale * r[curve][metric] for r in group],
                        style,
                        color=f"C{index}",
                        label=f"{normalization}, {curve}",
                    )
            axis.set(xscale="log", xlabel="width multiplier", ylabel=label)
            axis.set_xticks(settings["widths"], [str(w) for w in settings["widths"]])
            axis.minorticks_off()
        axes[1].legend(fontsize=7)
        return figure

    return run.finish(TITLE, summary, table, {"settings": settings, "rows": rows}, draw)


if __name__ == "__main__":
    sys.exit(main())
