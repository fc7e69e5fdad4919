"""Calibration and evaluation data: a Hub-style image dataset turned into tensor batches.

In: a dataset folder or id readable by ``datasets.load_dataset`` (e.g. ``train.parquet`` and
``test.parquet``), a split, a preprocessing function. Out: :class:`ImageBatches`, a
re-iterable of ``(pixel_values, labels)`` batches, preprocessed on the fly so memory does
not grow with the number of examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

IMAGE_NAMES = ("image", "img", "pixel_values", "picture")
LABEL_NAMES = ("label", "labels", "class", "target")


class DataError(ValueError):
    """Dataset, split or columns that do not fit; the message names the problem."""


def load_split(dataset: str, split: str):
    try:
        return datasets.load_dataset(dataset, split=split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise DataError(f"dataset {dataset!r} has no split {split!r}") from error
        raise DataError(f"cannot read dataset {dataset!r}: {str(error).splitlines()[0]}") from error
    except FileNotFoundError as error:
        raise DataError(f"dataset {dataset!r} not found") from error


def detect_columns(features, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """The image and label columns: given names, else by feature type, else by usual names."""
    names = list(features)

    def pick(given, kind, usual, types):
        if given is not None:
            if given not in names:
                raise DataError(f"dataset has no {kind} column {given!r} (columns: {', '.join(names)})")
            return given
        typed = [n for n in names if isinstance(features[n], types)]
        if typed:
            return typed[0]
        for name in usual:
            if name in names:
                return name
        raise DataError(f"dataset has no {kind} column (columns: {', '.join(names)}); pass --{kind}-column")

    image = pick(image_column, "image", IMAGE_NAMES, (datasets.Image,))
    label = pick(label_column, "label", LABEL_NAMES, (datasets.ClassLabel,))
    return image, label


def builtin_transform(config: dict):
    """Grayscale/RGB, resize, scale to [0, 1], normalise, for the built-in architectures."""
    size = config.get("image_size", 28)
    channels = config.get("in_channels", 1)
    mean = torch.tensor(config.get("mean", [0.5] * channels)).view(-1, 1, 1)
    std = torch.tensor(config.get("std", [0.5] * channels)).view(-1, 1, 1)

    def transform(images: list) -> torch.Tensor:
        arrays = []
        for image in images:
            image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
            arrays.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
        return (torch.from_numpy(np.stack(arrays)) - mean) / std

    return transform


def model_transform(folder: str | Path):
    """The endpoint's own image processor when its folder has one, else the built-in one."""
    folder = Path(folder)
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(folder))
        def transform(images: list) -> torch.Tensor:
            images = [i if isinstance(i, Image.Image) else Image.fromarray(np.asarray(i, dtype=np.uint8)) for i in images]
            return processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]

        return transform
    config = json.loads((folder / "config.json").read_text())
    if "image_size" not in config and "num_channels" in config:
        config = {"in_channels": config["num_channels"], "image_size": config.get("image_size", 224)}
    return builtin_transform(config)


class ImageBatches:
    """Re-iterable ``(pixel_values, labels)`` batches over ``limit`` examples.

    With a ``seed`` the examples are a seeded shuffle of the split, so a capped calibration
    set is not just the first (possibly label-sorted) rows.
    """

    def __init__(self, dataset, transform, image_column: str, label_column: str,
                 batch_size: int = 256, limit: int | None = None, seed: int | None = None) -> None:
        if seed is not None:
            dataset = dataset.shuffle(seed=seed)
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.batch_size = batch_size
        self.limit = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return (self.limit + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, self.limit, self.batch_size):
            rows = self.dataset[start : min(start + self.batch_size, self.limit)]
            yield self.transform(rows[self.image_column]), torch.as_tensor(rows[self.label_column])


def image_batches(dataset: str, split: str, transform, *, limit: int | None = None, batch_size: int = 256,
                  image_column: str | None = None, label_column: str | None = None,
                  strict_limit: bool = False, seed: int | None = None) -> ImageBatches:
    """Batches of ``split``; with ``strict_limit`` a ``limit`` above the split's size is an error."""
    data = load_split(dataset, split)
    if len(data) == 0:
        raise DataError(f"split {split!r} of dataset {dataset!r} is empty")
    if strict_limit and limit is not None and limit > len(data):
        raise DataError(f"--num-samples {limit} exceeds the {len(data)} examples of split {split!r}")
    image, label = detect_columns(data.features, image_column, label_column)
    feature = data.features[label]
    if not isinstance(feature, datasets.ClassLabel) and not str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
        raise DataError(f"label column {label!r} holds {getattr(feature, 'dtype', feature)}, not class indices")
    return ImageBatches(data, transform, image, label, batch_size, limit, seed)
