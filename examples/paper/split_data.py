"""Split-data merging: REPAIRed interpolation of networks trained on disjoint, biased halves.

    python examples/paper/split_data.py [--quick] [--output DIR] [--cache DIR] [--threads N]

Paper Section 5.4 (Figure 7, Figure 13): endpoint A sees 80% of the training images of
classes 0-4 and 20% of classes 5-9, endpoint B the rest. On the full test set, some
REPAIRed interpolations between them beat both endpoints; the logit ensemble of the two
is the baseline to compare with. REPAIR calibrates on the whole training set (both halves).
"""

from __future__ import annotations

import sys

import torch
from paper_common import (
    Digits,
    Run,
    batches,
    dataset,
    endpoint_pair,
    load_data,
    markdown_table,
    merge_pair,
    percent,
    run_experiment,
)
from torch import nn

import hfrepair

TITLE = "Split-data merging (paper Section 5.4)"
MAJORITY_SHARE = 0.8
SPLIT_SEED = 0


def settings_for(quick: bool) -> dict:
    """Quick runs: one ResNet8 on 8x8 digits, trained longer."""
    blocks_per_stage = 1 if quick else 3
    widths = (1,) if quick else (1, 2)
    return {
        **dataset(quick, image_size=14),
        "grid": 11,
        "networks": {
            f"ResNet{6 * blocks_per_stage + 2} x{width}": {
                "width": width,
                "blocks_per_stage": blocks_per_stage,
                "normalization": "batchnorm",
            }
            for width in widths
        },
        "training": {"epochs": 15 if quick else 8, "lr": 0.1},
    }


class LogitEnsemble(nn.Module):
    """Mean of the two endpoints' logits: the baseline a weight-space merge competes with."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList([model_a, model_b])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(pixel_values) for member in self.members]).mean(0)


def biased_halves(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint index sets: A gets 80% of each class 0-4 and 20% of each class 5-9; B the rest."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    half_a, half_b = [], []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        share = MAJORITY_SHARE if digit < 5 else 1 - MAJORITY_SHARE
        cut = round(share * len(members))
        half_a.append(members[:cut])
        half_b.append(members[cut:])
    return torch.cat(half_a).sort().values, torch.cat(half_b).sort().values


def main(argv: list[str] | None = None) -> int:
    return run_experiment("split_data", __doc__, settings_for, report, argv)


def measure(run: Run, data: Digits, model: dict, settings: dict) -> dict:
    """Aligned and REPAIRed curves over alpha, and the logit ensemble, on the full test set."""
    halves = biased_halves(data.train_y)
    pair = endpoint_pair(
        run.cache,
        data,
        "ResNet",
        model,
        settings["training"],
        subsets=halves,
        subset_tag=f"biased-halves-{MAJORITY_SHARE}-seed{SPLIT_SEED}",
    )
    result = merge_pair(
        pair, data, method="repair", grid=settings["grid"], curves=("aligned", "repaired")
    )
    ensemble = hfrepair.evaluate(LogitEnsemble(*pair), batches(data.test_x, data.test_y))
    return {
        "alphas": result.alphas,
        "train_sizes": [len(h) for h in halves],
        "curves": {curve: result.curves[curve]["test"] for curve in ("aligned", "repaired")},
        "ensemble": ensemble.to_dict(),
    }


def check_claims(run: Run, name: str, m: dict) -> None:
    """Section 5.4's claims for one network: does some alpha beat both endpoints?"""
    alphas, repaired = m["alphas"], m["curves"]["repaired"]
    first, last = repaired[0], repaired[-1]
    inner = list(zip(alphas, repaired))[1:-1]
    best_loss = min(inner, key=lambda point: point[1]["loss"])
    best_accuracy = max(inner, key=lambda point: point[1]["accuracy"])
    beats_both = [
        a
        for a, p in inner
        if p["loss"] < min(first["loss"], last["loss"])
        and p["accuracy"] > max(first["accuracy"], last["accuracy"])
    ]
    middle = alphas.index(0.5)
    run.claim(
        f"{name}: REPAIR lowers the midpoint's test loss below the aligned-only midpoint's",
        repaired[middle]["loss"] < m["curves"]["aligned"][middle]["loss"],
    )
    run.claim(
        f"{name}: some REPAIRed alpha has lower test loss than both endpoints "
        f"(best alpha {best_loss[0]:g}: "
        f"{best_loss[1]['loss']:.3f} vs {first['loss']:.3f} / {last['loss']:.3f})",
        best_loss[1]["loss"] < min(first["loss"], last["loss"]),
        required=False,
    )
    run.claim(
        f"{name}: some REPAIRed alpha has higher test accuracy than both endpoints (best alpha "
        f"{best_accuracy[0]:g}: {percent(best_accuracy[1]['accuracy'])})",
        best_accuracy[1]["accuracy"] > max(first["accuracy"], last["accuracy"]),
        required=False,
    )
    run.claim(
        f"{name}: some REPAIRed alpha beats both endpoints in loss and accuracy at once"
        + (f" (alphas {', '.join(f'{a:g}' for a in beats_both)})" if beats_both else ""),
        bool(beats_both),
        required=False,
    )
    run.claim(
        f"{name}: the logit ensemble beats both endpoints in test loss",
        m["ensemble"]["loss"] < min(first["loss"], last["loss"]),
        required=False,
    )
    run.claim(
        f"{name}: the best REPAIRed interpolation reaches the ensemble's test loss",
        best_loss[1]["loss"] <= m["ensemble"]["loss"],
        required=False,
    )


def report(run: Run, settings: dict) -> int:
    """Check Section 5.4's claims on the measured curves; write the table and figure."""
    data = load_data(settings["data"], run.cache, settings["image_size"])
    measured = {
        name: measure(run, data, model, settings) for name, model in settings["networks"].items()
    }
    for name, m in measured.items():
        check_claims(run, name, m)
    alphas = next(iter(measured.values()))["alphas"]
    headers = ["alpha"]
    for name in measured:
        headers += [f"{name} aligned: loss / acc.", f"{name} + REPAIR: loss / acc."]

    def cell(point: dict) -> str:
        return f"{point['loss']:.3f} / {percent(point['accuracy'])}"

    rows = []
    for i, alpha in enumerate(alphas):
        row = [f"{alpha:g}"]
        for m in measured.values():
            row += [cell(m["curves"]["aligned"][i]), cell(m["curves"]["repaired"][i])]
        rows.append(row)
    ensemble_row = ["logit ensemble"]
    for m in measured.values():
        ensemble_row += ["", cell(m["ensemble"])]
    table = markdown_table(headers, [*rows, ensemble_row])
    sizes = next(iter(measured.values()))["train_sizes"]
    summary = (
        f"BatchNorm ResNets on {settings['data']} ({settings['image_size']}x"
        f"{settings['image_size']}): {settings['networks']}. Endpoint A (alpha 0) trained on "
        f"{sizes[0]} images (80% of classes 0-4, 20% of 5-9), B (alpha 1) on the other "
        f"{sizes[1]} ({settings['training']}). Test loss / accuracy on the full test split."
    )

    def draw(plt):
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, metric, scale in ((axes[0], "loss", 1), (axes[1], "accuracy", 100)):
            for index, (name, m) in enumerate(measured.items()):
                color = f"C{index}"
                for curve, style in (("aligned", "o:"), ("repaired", "o-")):
                    values = [scale * p[metric] for p in m["curves"][curve]]
                    label = f"{name}, {'aligned' if curve == 'aligned' else 'aligned + REPAIR'}"
                    axis.plot(alphas, values, style, color=color, label=label)
                axis.axhline(
                    scale * m["ensemble"][metric],
                    color=color,
                    linestyle="--",
                    label=f"{name}, logit ensemble",
                )
            axis.set(
                xlabel="alpha (0 = A: mostly 0-4, 1 = B: mostly 5-9)",
                ylabel=f"test {metric}{' (%)' if scale == 100 else ''}",
            )
        repaired_losses = [p["loss"] for m in measured.values() for p in m["curves"]["repaired"]]
        axes[0].set_ylim(0, 1.2 * max(repaired_losses))
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        return figure

    return run.finish(TITLE, summary, table, {"settings": settings, "networks": measured}, draw)


if __name__ == "__main__":
    sys.exit(main())
