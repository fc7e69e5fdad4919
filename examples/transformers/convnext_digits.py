"""Merging two ConvNeXts trained on the MNIST digits: stream corrections that fold, and where to match.

    python examples/transformers/convnext_digits.py [--output DIR] [--cache DIR] [--depths 2,2,2] [--quick]

Two transformers ConvNeXts (3 stages of 32-64-128 channels, 2x2 patches, LayerNorm,
depthwise 7x7 convs, layer scale; 3-channel ConvNextImageProcessor) are trained with AdamW
from seeds 1 and 2 on the 4,000 training digits, cached, and merged with ``hfrepair.merge``
(2,000 calibration digits, the 1,000 test digits) three ways, each adding one change:

1. as hfrepair did before stream stretches were found: REPAIR of conv/linear outputs only,
   the stream matched at its LayerNorm outputs (the spec's ``streams`` and sum sites
   removed by hand);
2. also every residual sum of each stage corrected, folded back through the stage; the
   stream still matched at its LayerNorm outputs (``match_at="normalization"``, which
   leaves the MLP units at their activations);
3. the default: the stream, read by convolutions between its sums, matched at every site
   of its group, sums included.

It reports the fused model's midpoint accuracy and loss, its gap to the endpoints' mean,
and writes ``results.md`` and ``results.json`` into ``docs/results/convnext`` (or
``--output``). ``--quick`` trains 1-1-1 blocks for 6 epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

import hfrepair
from hfrepair.data import image_batches, model_transform
from hfrepair.demo import write_mnist_dataset
from hfrepair.discovery import discover_spec
from hfrepair.io import load_model
from hfrepair.training import train_classifier

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "convnext"


def train_pair(data: Path, cache: Path, depths: list[int], epochs: int) -> list[Path]:
    """Endpoints for seeds 1 and 2, trained once per configuration and cached."""
    folders = []
    for seed in (1, 2):
        folder = cache / f"convnext-{'-'.join(map(str, depths))}-e{epochs}" / f"endpoint-{seed}"
        if not (folder / "model.safetensors").exists() or not (folder / "trained").exists():
            torch.manual_seed(seed)
            model = ConvNextForImageClassification(ConvNextConfig(
                num_channels=3, num_stages=3, hidden_sizes=[32, 64, 128], depths=depths, patch_size=2,
                num_labels=10))
            processor = ConvNextImageProcessor(size={"shortest_edge": 28}, crop_pct=1.0,
                                               image_mean=[0.1307] * 3, image_std=[0.3081] * 3)
            processor.save_pretrained(str(folder))
            model.save_pretrained(str(folder))  # the transform reads the config's channels
            images, labels = next(iter(image_batches(str(data), "train", model_transform(folder), batch_size=4000)))
            train_classifier(model, images, labels, epochs=epochs, lr=2e-3, weight_decay=0.05, seed=seed,
                             optimizer="adamw", desc=f"training endpoint {seed}")
            model.save_pretrained(str(folder))
            (folder / "trained").touch()
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "hfrepair" / "examples")
    parser.add_argument("--depths", default="2,2,2", help="blocks per stage (default 2,2,2)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1-1-1 blocks, 6 epochs")
    args = parser.parse_args(argv)
    depths = [1, 1, 1] if args.quick else [int(d) for d in args.depths.split(",")]
    epochs = 6 if args.quick else args.epochs
    data = args.cache / "digits"
    if not data.exists():
        write_mnist_dataset(data)
    folders = train_pair(data, args.cache, depths, epochs)
    model_a, model_b = (load_model(folder) for folder in folders)
    transform = model_transform(folders[0])
    calibration = image_batches(str(data), "train", transform, limit=2000, batch_size=500)
    test = image_batches(str(data), "test", transform, batch_size=500)
    spec = discover_spec(model_a, next(iter(calibration))[0][:8])
    sums = {name for fold in spec.streams for name in fold.sums}
    without_streams = replace(spec, streams=[], sites=[s for s in spec.sites if s.module not in sums])
    rows, record = [], {"depths": depths, "epochs": epochs, "stream_sums": sorted(sums), "merges": {}}
    for label, corrects, stream_at, given, match_at in (
            ("before", "layer outputs", "LayerNorm outputs", without_streams, "activation"),
            ("stream sums", "+ stream sums, folded", "LayerNorm outputs", spec, "normalization"),
            ("default", "+ stream sums, folded", "every site", spec, "activation")):
        _, result = hfrepair.merge(model_a, model_b, calibration, {"test": test}, grid=3, match_at=match_at,
                                   spec=given)
        ends = [result.endpoints[k]["test"] for k in "AB"]
        mean = sum(e["accuracy"] for e in ends) / 2
        merged, aligned = result.merged["test"], result.curves["aligned"]["test"][1]
        record["merges"][label] = {"endpoints": ends, "merged": merged, "gap": mean - merged["accuracy"],
                                   "aligned": aligned, "corrected": result.corrected}
        rows.append(f"| {corrects} | {stream_at} | {100 * aligned['accuracy']:.1f}% | {100 * merged['accuracy']:.1f}% "
                    f"| {merged['loss']:.3f} | {100 * (mean - merged['accuracy']):.1f} |")
    ends = record["merges"][next(iter(record["merges"]))]["endpoints"]
    lines = [f"ConvNeXt 32-64-128, depths {'-'.join(map(str, depths))}, {epochs} epochs AdamW; endpoints "
             f"{100 * ends[0]['accuracy']:.1f}% / {100 * ends[1]['accuracy']:.1f}% (test); "
             f"{len(sums)} stream sums in {len(spec.streams)} foldable stretches", "",
             "| REPAIR corrects | stream matched at | aligned midpoint | saved model | its loss | "
             "gap to endpoints' mean (points) |",
             "|---|---|---|---|---|---|", *rows]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    (args.output / "results.json").write_text(json.dumps(record, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
