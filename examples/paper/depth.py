"""Midpoint accuracy vs depth for MLPs: aligned only, exact REPAIR, closed-form REPAIR.

    python examples/paper/depth.py [--quick] [--output DIR] [--cache DIR] [--threads N]

Paper Figure 3 (right) / Figure 6 (right): interpolating aligned MLPs collapses as depth
grows, REPAIR keeps the midpoint near the endpoints, and the closed-form variant (exact
only in the first layer) falls behind the forward-pass variant in deep networks. MLPs of
width 128 train with BatchNorm and are folded to plain MLPs before merging. Depths whose
endpoints the fixed recipe does not train stay in the table but not in the claims.
"""

from __future__ import annotations

import sys

from paper_common import (
    TRAINED_ACCURACY,
    Run,
    at_alpha,
    dataset,
    endpoint_mean,
    endpoint_pair,
    load_data,
    markdown_table,
    merge_pair,
    percent,
    run_experiment,
    trained_label,
)

TITLE = "Midpoint accuracy vs depth (paper Fig. 3 right / Fig. 6 right)"


def settings_for(quick: bool) -> dict:
    """Quick runs: three depths on 8x8 digits, enough to show the collapse."""
    return {
        **dataset(quick, image_size=28),
        "depths": (2, 8, 20) if quick else (2, 4, 6, 8, 10, 15, 20, 25, 30, 40),
        "width": 128,
        "training": {"epochs": 15, "lr": 0.1},
    }


def main(argv: list[str] | None = None) -> int:
    return run_experiment("depth", __doc__, settings_for, report, argv)


def measure(run: Run, settings: dict) -> list[dict]:
    """One row per depth: endpoint mean and the three midpoints, test accuracy."""
    data = load_data(settings["data"], run.cache, settings["image_size"])
    rows = []
    for depth in settings["depths"]:
        pair = endpoint_pair(
            run.cache,
            data,
            "MLP",
            {"depth": depth, "width": settings["width"], "normalization": "batchnorm"},
            settings["training"],
            fold_batchnorm=True,
        )
        exact = merge_pair(
            pair, data, method="repair", grid=3, curves=("naive", "aligned", "repaired")
        )
        closed = merge_pair(pair, data, method="closed-form", grid=3, curves=("repaired",))
        rows.append(
            {
                "depth": depth,
                "endpoints": endpoint_mean(exact),
                "naive": at_alpha(exact, "naive"),
                "aligned": at_alpha(exact, "aligned"),
                "exact": at_alpha(exact, "repaired"),
                "closed_form": at_alpha(closed, "repaired"),
            }
        )
        print(
            f"depth {depth}: "
            + ", ".join(f"{k} {percent(v)}" for k, v in rows[-1].items() if k != "depth"),
            flush=True,
        )
    return rows


def report(run: Run, settings: dict) -> int:
    """Check the paper's claims on the measured midpoints; write the table and figure."""
    rows = measure(run, settings)
    trained = [r for r in rows if r["endpoints"] >= TRAINED_ACCURACY]
    shallow, deep = trained[0], trained[-1]
    run.claim(
        f"aligned-only midpoint collapses with depth ({percent(shallow['aligned'])} at depth "
        f"{shallow['depth']} -> {percent(deep['aligned'])} at depth {deep['depth']})",
        deep["aligned"] < shallow["aligned"] - 0.2,
    )
    run.claim(
        f"exact REPAIR midpoint beats aligned-only at the deepest trained MLP "
        f"(depth {deep['depth']}) "
        "by 20+ points",
        deep["exact"] > deep["aligned"] + 0.2,
    )
    run.claim(
        "exact REPAIR stays within 10 points of the endpoints at every depth",
        all(r["exact"] > r["endpoints"] - 0.1 for r in trained),
        required=False,
    )
    run.claim(
        "closed form falls behind exact as depth grows "
        "(gap at the deepest > gap at the shallowest)",
        deep["exact"] - deep["closed_form"] > shallow["exact"] - shallow["closed_form"],
        required=False,
    )
    table = markdown_table(
        [
            "hidden layers",
            "endpoints (mean)",
            "naive",
            "aligned",
            "REPAIR exact",
            "REPAIR closed form",
        ],
        [
            [
                trained_label(r["depth"], r["endpoints"]),
                *(percent(r[k]) for k in ("endpoints", "naive", "aligned", "exact", "closed_form")),
            ]
            for r in rows
        ],
    )
    summary = (
        f"Midpoint (alpha = 0.5) test accuracy of MLPs of width {settings['width']} on "
        f"{settings['data']} ({settings['image_size']}x{settings['image_size']}); endpoints from "
        f"seeds 1 and 2, trained with BatchNorm ({settings['training']}) and folded."
    )

    def draw(plt):
        figure, axis = plt.subplots(figsize=(6, 4))
        depths = [r["depth"] for r in rows]
        for key, label, style in (
            ("endpoints", "endpoints (mean)", "k--"),
            ("aligned", "aligned only", "o-"),
            ("exact", "REPAIR (exact)", "s-"),
            ("closed_form", "REPAIR (closed form)", "^-"),
        ):
            axis.plot(depths, [100 * r[key] for r in rows], style, label=label)
        axis.set(
            xlabel="hidden layers",
            ylabel="midpoint test accuracy (%)",
            ylim=(0, 100),
            title=f"MLP width {settings['width']}, {settings['data']}",
        )
        axis.legend()
        return figure

    return run.finish(TITLE, summary, table, {"settings": settings, "rows": rows}, draw)


if __name__ == "__main__":
    sys.exit(main())
