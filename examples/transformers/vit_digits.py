"""Merging two ViTs trained on the MNIST digits: what alignment and REPAIR do in a transformer.

    python examples/transformers/vit_digits.py [--output DIR] [--cache DIR] [--threads N] [--quick]

Two transformers ViTs (4 layers, width 64, 4 heads, 7x7 patches of 28x28 grayscale digits,
a one-channel ViTImageProcessor) are trained with AdamW from seeds 1 and 2 on the 4,000
training digits, cached, and merged with ``hfrepair.merge``. The script then measures,
with the public API only:

* the barrier curves (naive, aligned, aligned + REPAIR) and what was aligned and corrected;
* variance collapse per site (paper Figure 2) in the residual stream (LayerNorm inputs
  read back at their outputs), in attention (q, k, v projections) and in the MLP, after
  alignment and after REPAIR;
* REPAIR per site family: without each family, with each family alone, and scale-only
  (no shift) everywhere;
* where unit correlations are measured (``match_at``).

Writes ``results.md``, ``results.json`` and ``vit_digits.png`` into ``docs/results/transformers``
(or ``--output``). ``--quick`` trains for 12 epochs on 2,000 digits, evaluates on 500 and
exits 1 unless naive < aligned < aligned + REPAIR at the midpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import hfrepair
from hfrepair.data import image_batches, model_transform
from hfrepair.demo import write_mnist_dataset
from hfrepair.evaluate import evaluate
from hfrepair.io import load_model
from hfrepair.repair import correction_mode, correction_sites
from hfrepair.spec import with_state_dict
from hfrepair.statistics import collect_moments
from hfrepair.training import train_classifier

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "transformers"
FAMILIES = {  # site family -> module name endings
    "patch embedding": ("projection",),
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "attention output": ("o_proj",),
    "MLP in": ("fc1",), "MLP activation": ("activation_fn",), "MLP out": ("fc2",), "LayerNorms": ("layernorm_before", "layernorm_after", "layernorm"),
}


def family(module: str) -> str:
    for name, endings in FAMILIES.items():
        if module.endswith(endings):
            return name
    return "other"


def endpoints(cache: Path, data: Path, epochs: int, examples: int, seeds: tuple[int, int] = (1, 2)) -> list[Path]:
    """Two trained ViT folders (from ``seeds``), trained once and cached."""
    folders = []
    for seed in seeds:
        folder = cache / f"vit-L4W64P7-E{epochs}-N{examples}-{seed}"
        folders.append(folder)
        if (folder / "model.safetensors").is_file() and (folder / "trained").is_file():
            continue
        torch.manual_seed(seed)
        model = ViTForImageClassification(ViTConfig(
            image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=128, num_labels=10))
        model.save_pretrained(folder)
        ViTImageProcessor(do_resize=False, image_mean=[0.1307], image_std=[0.3081]).save_pretrained(folder)
        images, labels = next(iter(image_batches(str(data), "train", model_transform(folder), limit=examples,
                                                 batch_size=examples)))
        train_classifier(model, images, labels, epochs=epochs, lr=3e-3, weight_decay=0.05, seed=seed,
                         optimizer="adamw")
        model.save_pretrained(folder)
        (folder / "trained").write_text("")
    return folders


def study_parser(description: str) -> argparse.ArgumentParser:
    """The options the ViT studies share: where results go, where the pair is cached, threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "HFREPAIR_CACHE", Path.home() / ".cache" / "hfrepair")) / "transformers")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def digits_folder(cache: Path) -> Path:
    """The MNIST digits as a dataset folder in the cache, written on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    data = cache / "mnist"
    if not (data / "train.parquet").is_file():
        write_mnist_dataset(data)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs, examples, tested = (12, 2000, 500) if args.quick else (30, 4000, None)
    data = digits_folder(args.cache)
    start = time.perf_counter()
    folder_a, folder_b = endpoints(args.cache, data, epochs, examples)
    model_a, model_b = load_model(folder_a), load_model(folder_b)
    transform = model_transform(folder_a)
    calibration = list(image_batches(str(data), "train", transform, limit=examples, batch_size=500))
    test = list(image_batches(str(data), "test", transform, limit=tested, batch_size=500))

    merged, result = hfrepair.merge(model_a, model_b, calibration, {"test": test, "train": calibration},
                                    grid=3 if args.quick else 5)
    mid = len(result.alphas) // 2
    midpoint = {label: result.curves[label]["test"][mid]["accuracy"] for label in result.curves}

    # The stages by hand, for the measurements below (the same choices as merge's).
    spec = hfrepair.discover_spec(model_a, calibration[0][0][:8])
    stats = hfrepair.collect_statistics(model_a, model_b, spec.sites, calibration)
    perms = hfrepair.match_permutations(spec, stats)
    state_a = model_a.state_dict()
    aligned_b = hfrepair.permute_state_dict(model_b.state_dict(), spec, perms)
    mixed = hfrepair.interpolate(state_a, aligned_b, 0.5)

    def accuracy(state) -> float:
        return evaluate(with_state_dict(model_a, state), test).accuracy

    def repaired(sites) -> dict:
        return hfrepair.repair(model_a, mixed, spec, stats, perms, 0.5, "repair", calibration, sites=sites)

    # Variance collapse at every site, relative to the endpoints' mean variance.
    variance = {}
    for label, state in (("aligned", mixed), ("repaired", merged.state_dict())):
        moments = collect_moments(with_state_dict(model_a, state), spec.sites, calibration)
        variance[label] = {
            site.module: float(moments[site.module].var.sum()
                               / ((stats.pairs[site.module].a.var.sum() + stats.pairs[site.module].b.var.sum()) / 2))
            for site in spec.sites
        }

    sites = correction_sites(spec)
    families = sorted({family(s.module) for s in sites}, key=list(FAMILIES).index)
    ablation = {"all (default)": accuracy(repaired(sites)), "none (aligned only)": accuracy(mixed)}
    for name in families:
        ablation[f"without {name}"] = accuracy(repaired([s for s in sites if family(s.module) != name]))
    for name in families:
        ablation[f"only {name}"] = accuracy(repaired([s for s in sites if family(s.module) == name]))
    ablation["scale only, everywhere"] = accuracy(repaired([replace(s, bias=None) for s in sites]))

    locations = {}
    for match_at in ("activation", "normalization", "linear", "all"):
        order = hfrepair.match_permutations(spec, stats, match_at)
        mixed_at = hfrepair.interpolate(state_a, hfrepair.permute_state_dict(model_b.state_dict(), spec, order), 0.5)
        locations[match_at] = {
            "aligned": accuracy(mixed_at),
            "repaired": accuracy(hfrepair.repair(model_a, mixed_at, spec, stats, order, 0.5, "repair", calibration)),
        }

    claims = {"naive < aligned < aligned + REPAIR at the midpoint":
              midpoint["naive"] < midpoint["aligned"] < midpoint["repaired"]}
    record = {
        "mode": "quick" if args.quick else "full", "epochs": epochs, "examples": examples,
        "endpoints": {k: result.endpoints[k]["test"]["accuracy"] for k in "AB"},
        "midpoint": midpoint, "barriers": result.barriers, "aligned": result.aligned,
        "corrected": {k: len(v) for k, v in result.corrected.items()},
        "correction_modes": sorted({correction_mode(s) for s in sites}),
        "variance_ratio": variance, "ablation": ablation, "match_at": locations, "claims": claims,
        "seconds": time.perf_counter() - start,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(record, indent=2))
    (args.output / "results.md").write_text(markdown(record, spec))
    plot(record, spec, args.output / "vit_digits.png")
    print((args.output / "results.md").read_text())
    return 0 if all(claims.values()) else 1


def markdown(record: dict, spec) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"Endpoints: {pct(record['endpoints']['A'])} / {pct(record['endpoints']['B'])} test accuracy "
             f"({record['epochs']} epochs on {record['examples']} digits).", "",
             "| interpolation (alpha = 0.5) | test accuracy | accuracy barrier | train-loss barrier |", "|---|---|---|---|"]
    for label, value in record["midpoint"].items():
        barriers = record["barriers"][label]
        lines.append(f"| {label} | {pct(value)} | {100 * barriers['test']['accuracy']['max']:.1f} points | "
                     f"{barriers['train']['loss']['max']:.3f} |")
    lines += ["", "Aligned: " + ", ".join(f"{k} {v['groups']} x {'/'.join(map(str, v['sizes']))} "
                                          f"(correlation {v['matched_correlation']:.2f} vs {v['unaligned_correlation']:.2f})"
                                          for k, v in record["aligned"].items()), ""]
    lines += ["Variance ratio (merged / endpoints' mean), mean per site family:", "",
              "| sites | aligned | aligned + REPAIR |", "|---|---|---|"]
    for name in [*FAMILIES, "other"]:
        members = [m for m in record["variance_ratio"]["aligned"] if family(m) == name]
        if members:
            mean = lambda label: sum(record["variance_ratio"][label][m] for m in members) / len(members)  # noqa: E731
            lines.append(f"| {name} ({len(members)}) | {mean('aligned'):.3f} | {mean('repaired'):.3f} |")
    lines += ["", "REPAIR per site family (midpoint test accuracy):", "", "| corrected | accuracy |", "|---|---|"]
    lines += [f"| {name} | {pct(value)} |" for name, value in record["ablation"].items()]
    lines += ["", "Where correlations are measured (`match_at`):", "", "| match_at | aligned | aligned + REPAIR |",
              "|---|---|---|"]
    lines += [f"| {k} | {pct(v['aligned'])} | {pct(v['repaired'])} |" for k, v in record["match_at"].items()]
    lines += ["", "Claims: " + "; ".join(f"{k}: {'holds' if v else 'FAILS'}" for k, v in record["claims"].items()), ""]
    return "\n".join(lines)


def plot(record: dict, spec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(record["variance_ratio"]["aligned"])
    for label, style in (("aligned", "o--"), ("repaired", "o-")):
        axes[0].plot(range(len(names)), [record["variance_ratio"][label][n] for n in names], style, markersize=3,
                     label=label)
    axes[0].axhline(1.0, color="gray", linewidth=0.8)
    axes[0].set_xlabel("site (input to output)")
    axes[0].set_ylabel("variance / endpoints' variance")
    axes[0].legend()
    ablation = record["ablation"]
    axes[1].barh(list(ablation), [100 * v for v in ablation.values()])
    axes[1].set_xlabel("midpoint test accuracy (%)")
    axes[1].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
