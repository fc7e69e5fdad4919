"""Activation matching against weight matching on trained pairs, side by side.

    python benchmarks/compare_matchers.py BUILT [--only NAME ...]

``BUILT`` is the ``built`` folder a test run leaves in pytest's temporary directory (the
trained endpoint pairs and data sets the tests share, e.g.
``/tmp/pytest-of-$USER/pytest-N/built``); the demo pair that ships with hfrepair is
merged too, and three more pairs are trained on the demo digits first (seeds 1 and 2): an
MLP 3 x 256 (10 epochs), a VGG 16-32-64 (two convs a stage, 5 epochs) and, with the tests'
own recipe, a transformers ConvNeXt (LayerNorm, depthwise convs, 16-32 channels, 6 epochs).

Each pair is merged twice through the CLI (``--matcher activation`` and ``--matcher
weight``, everything else equal) and the script prints, per pair and matcher: the matching
time, the whole merge's peak resident memory, the relative weight distance
``|A - P(B)| / |A|`` before and after, the mean matched activation correlation, and the
midpoint's metric aligned and aligned + REPAIR (test accuracy for classifiers, test loss
per token for language models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHORT = ["--grid", "3", "--eval-samples", "500", "--train-eval-samples", "250"]
TEXT = ["--grid", "3", "--num-samples", "600", "--eval-samples", "150", "--train-eval-samples", "150"]


def trained(factory, data: Path, folder: Path, **training) -> tuple[Path, Path]:
    from hfrepair.demo import train_endpoint

    return tuple(train_endpoint(factory, data, seed, folder / f"endpoint-{seed}", **training) for seed in (1, 2))


def convnext_pair(data: Path, folder: Path) -> tuple[Path, Path]:
    """The ConvNeXt pair of ``tests/test_transformers_models.py``, trained the same way."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from tests.conftest import train_hf_pair

    def factory():
        return ConvNextForImageClassification(ConvNextConfig(
            num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10,
            layer_scale_init_value=1.0))

    return tuple(train_hf_pair(factory, data, folder, epochs=6, lr=0.1))


def pairs(built: Path, demo_data: Path, scratch: Path, only) -> dict[str, tuple[Path, Path, Path, list[str]]]:
    from hfrepair.demo import SHIPPED_ENDPOINTS
    from hfrepair.models import MLP, VGG

    def endpoints(name):
        return built / name / "endpoint-1", built / name / "endpoint-2"

    def plain(name, factory, **training):  # trained only when asked for
        return trained(factory, demo_data, scratch / name, **training) if not only or name in only else (None, None)

    return {
        "MLP 3x256": (*plain("MLP 3x256", lambda: MLP(depth=3, width=256), epochs=10, lr=0.05), demo_data,
                      [*SHORT, "--num-samples", "2000"]),
        "VGG 16-32-64": (*plain("VGG 16-32-64", lambda: VGG(widths=(16, 32, 64), layers_per_stage=2), epochs=5,
                                lr=0.01, batch_size=64), demo_data, [*SHORT, "--num-samples", "2000"]),
        "ConvNeXt": (*(convnext_pair(demo_data, scratch / "convnext") if not only or "ConvNeXt" in only
                       else (None, None)), demo_data, [*SHORT, "--num-samples", "2000"]),
        "demo ResNet (BN)": (SHIPPED_ENDPOINTS / "resnet-a", SHIPPED_ENDPOINTS / "resnet-b", demo_data,
                             [*SHORT, "--num-samples", "2000"]),
        "HF ResNet": (*endpoints("hf_resnet"), built / "mnist", [*SHORT, "--num-samples", "1000"]),
        "ViT": (*endpoints("vit"), built / "mnist", [*SHORT, "--num-samples", "2000"]),
        "GPT-2": (*endpoints("gpt2"), built / "pydoc", TEXT),
        "Llama": (*endpoints("llama"), built / "pydoc", TEXT),
        "BERT": (*endpoints("bert"), built / "docstrings", ["--grid", "3"]),
    }


# The CLI in a process that reports its own peak resident memory when it exits.
WITH_PEAK = """
import resource, runpy, sys
sys.argv = ["hfrepair", *sys.argv[1:]]
try:
    runpy.run_module("hfrepair.cli", run_name="__main__")
finally:
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def merge(a: Path, b: Path, data: Path, flags: list[str], matcher: str, out: Path) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", WITH_PEAK, "merge", str(a), str(b), "--dataset", str(data),
                           "--output", str(out), "--matcher", matcher, *flags],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{a.parent.name} with {matcher} matching failed:\n{done.stderr[-2000:]}")
    peak = next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("peak_rss_kb"))
    return {**json.loads((out / "merge_results.json").read_text()), "peak_rss_mb": int(peak) / 1024}


def row(name: str, matcher: str, record: dict) -> str:
    mid = record["alphas"].index(0.5)
    key = "loss" if record["task"] == "text-generation" else "accuracy"

    def metric(label):
        value = record["curves"][label]["test"][mid][key]
        return f"{value:.3f}" if key == "loss" else f"{100 * value:.1f}%"

    correlations = list(record["matched_correlation"].values())
    distance = record["weight_distance"]
    return (f"| {name} | {matcher} | {record['seconds']['match']:.2f} | {record['peak_rss_mb']:.0f} | "
            f"{distance['unaligned']:.3f} -> "
            f"{distance['aligned']:.3f} | {sum(correlations) / len(correlations):.3f} | {metric('naive')} | "
            f"{metric('aligned')} | {metric('repaired')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("built", type=Path, help="the built folder of a test run")
    parser.add_argument("--only", nargs="*", help="pair names to run (default: all)")
    args = parser.parse_args()
    from hfrepair.demo import write_mnist_dataset

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        demo_data = write_mnist_dataset(scratch / "digits")
        print("| pair | matcher | match s | merge peak RSS MB | weight distance | matched corr | naive | aligned | "
              "aligned + REPAIR |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (a, b, data, flags) in pairs(args.built, demo_data, scratch, args.only).items():
            if args.only and name not in args.only:
                continue
            for matcher in ("activation", "weight"):
                record = merge(a, b, data, flags, matcher, scratch / f"{name}-{matcher}".replace(" ", "_"))
                print(row(name, matcher, record), flush=True)


if __name__ == "__main__":
    main()
