"""Calibration and evaluation data: a Hub-style image dataset streamed as tensor batches.

In: a dataset folder or Hub id readable by ``datasets.load_dataset`` (e.g. ``train.parquet``
and ``test.parquet``), a split, a preprocessing function. Out: :class:`ImageStream`, a
re-iterable of ``(pixel_values, labels)`` batches read with ``streaming=True``: nothing is
downloaded or held beyond the rows of the current batch and the shuffle buffer, so memory
does not grow with the number of examples.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
import yaml
from PIL import Image

IMAGE_NAMES = ("image", "img", "pixel_values", "picture")
LABEL_NAMES = ("label", "labels", "class", "target")


class DataError(ValueError):
    """Dataset, split or columns that do not fit; the message names the problem."""


SHUFFLE_BUFFER = 1000


def open_split(dataset: str, split: str, revision: str | None = None) -> datasets.IterableDataset:
    """``split`` of ``dataset`` as a stream; missing datasets and splits are one-line errors."""
    if Path(dataset).is_dir():  # by its full path: a folder named "text" or "json" is not that loader
        dataset = str(Path(dataset).resolve())
    try:
        return datasets.load_dataset(dataset, split=split, streaming=True, revision=revision)
    except yaml.YAMLError as error:  # the card's metadata block of a folder or repo
        raise DataError(f"cannot read dataset {dataset!r}: its README.md metadata is not valid YAML "
                        f"({type(error).__name__})") from error
    except ValueError as error:
        if "split" in str(error).lower():
            raise DataError(f"dataset {dataset!r} has no split {split!r}{_split_hint(split, str(error))}") from error
        raise DataError(f"cannot read dataset {dataset!r}: {str(error).splitlines()[0]}") from error
    except OSError as error:
        if isinstance(error, FileNotFoundError) and not Path(dataset).exists() and error.filename is None:
            raise DataError(f"dataset {dataset!r} not found") from error
        # A file it needs, or the datasets cache (under HF_HOME), that cannot be used.
        raise DataError(f"cannot read dataset {dataset!r}: {_described(error)}") from error


def _split_hint(split: str, message: str) -> str:
    """What to give instead of a split the dataset lacks: its splits, as datasets' error
    lists them, and for a slice the option that caps a split (streams cannot be sliced)."""
    listed = re.search(r"Available splits: \[(.*?)\]", message)
    names = f" (splits: {listed.group(1).replace(chr(39), '')})" if listed else ""
    if "[" in split:
        return f"{names}; a stream cannot be sliced: cap it with --num-samples or --eval-samples"
    return names


def pick_column(features, given: str | None, kind: str, usual: tuple[str, ...], types: tuple) -> str:
    """A ``kind`` column: the given name, else the first of a matching feature type, else a
    usual name."""
    names = list(features)
    if given is not None:
        if given not in names:
            raise DataError(f"dataset has no {kind} column {given!r} (columns: {', '.join(names)})")
        return given
    typed = [n for n in names if isinstance(features[n], types)]
    if len(typed) > 1:  # picking one would score the model on columns it may not predict
        raise DataError(f"dataset has several {kind} columns ({', '.join(typed)}); name one with --{kind}-column")
    if typed:
        return typed[0]
    for name in usual:
        if name in names:
            return name
    raise DataError(f"dataset has no {kind} column (columns: {', '.join(names)}); pass --{kind}-column")


def class_order(feature, label2id: dict | None) -> tuple[int, ...] | None:
    """The model's index of each class of a dataset's ``ClassLabel``, where the model's
    ``label2id`` names the same classes in another order (scored by index, every label would
    be another class); None where the indices are used as they are."""
    if not isinstance(feature, datasets.ClassLabel) or not isinstance(label2id, dict) or \
            set(feature.names) != set(label2id):
        return None
    order = tuple(int(label2id[name]) for name in feature.names)
    return None if order == tuple(range(len(order))) else order


def detect_columns(features, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """The image and label columns: given names, else by feature type, else by usual names."""
    image = pick_column(features, image_column, "image", IMAGE_NAMES, (datasets.Image,))
    label = pick_column(features, label_column, "label", LABEL_NAMES, (datasets.ClassLabel,))
    return image, label


# Pixels a side: a config asking for more is a mistake (a side of 100,000 would be 30 GB of
# pixels for the two images a spec is traced on).
MAX_IMAGE_SIZE = 8192


def checked_image_size(size) -> int:
    """A config's ``image_size`` (a number, or ``[height, width]`` of which the first is
    used), checked to be a whole number of pixels hfrepair can resize to."""
    size = size[0] if isinstance(size, (list, tuple)) and size else size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be a whole number of pixels from 1 to {MAX_IMAGE_SIZE}, got {size!r}")
    return size


def eight_bit(image) -> Image.Image:
    """A decoded image (or array) as an 8-bit PIL image. 16-bit grayscale (PNG, TIFF; PIL
    modes ``I;16*``, and ``I``, as which older Pillows open them) is scaled from 0-65535 to
    0-255, every image of a dataset alike: PIL's own ``convert("L")`` clips every value above
    255 to white."""
    if not isinstance(image, Image.Image):
        return Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.mode.startswith("I;16") or image.mode == "I":
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return image


def builtin_transform(config: dict):
    """Grayscale/RGB, resize, scale to [0, 1], normalise, for the built-in architectures."""
    size = checked_image_size(config.get("image_size", 28))
    channels = config.get("in_channels", 1)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")

    def per_channel(name: str) -> torch.Tensor:
        value = config.get(name, [0.5] * channels)
        if not (isinstance(value, list) and len(value) == channels
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{name} must be a list of {channels} numbers, got {value!r}")
        return torch.tensor(value, dtype=torch.float32).view(-1, 1, 1)

    mean, std = per_channel("mean"), per_channel("std")

    def transform(images: list) -> torch.Tensor:
        arrays = []
        for image in map(eight_bit, images):
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
            arrays.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
        return (torch.from_numpy(np.stack(arrays)) - mean) / std

    return transform


def image_mode(folder: str | Path, processor=None) -> str:
    """``L`` for a one-channel model (its config's ``num_channels``, else a one-value
    ``image_mean`` in its processor), else ``RGB``: images go in the model's own mode."""
    config = json.loads((Path(folder) / "config.json").read_text())
    channels = config.get("num_channels")
    if channels is None and processor is not None:
        mean = getattr(processor, "image_mean", None)
        channels = len(mean) if isinstance(mean, (list, tuple)) else None
    return "L" if channels == 1 else "RGB"


def model_transform(folder: str | Path):
    """The endpoint's own image processor when its folder has one, else the built-in one; a
    preprocessing config that cannot be read or used is a one-line error naming the folder."""
    try:
        return _model_transform(Path(folder))
    except (OSError, ValueError, TypeError, KeyError) as error:  # json's errors are ValueErrors
        raise DataError(f"{folder}: its image preprocessing cannot be set up from its config: "
                        f"{_described(error)}") from error


def check_same_preprocessing(folders: list[Path]) -> None:
    """Refuse image endpoints whose ``preprocessor_config.json`` differ (where both have one):
    each was trained on inputs prepared its own way, and the merge prepares them as A does,
    so B's scores would be measured on inputs it never saw."""
    def settings(folder: Path) -> dict | None:
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
            if not isinstance(config, dict):
                raise ValueError("preprocessor_config.json is not a JSON object")
        except (OSError, ValueError) as error:  # said as model_transform says it
            raise DataError(f"{folder}: its image preprocessing cannot be set up from its config: "
                            f"{_described(error)}") from error
        return {k: v for k, v in config.items() if k not in ("processor_class", "_processor_class")}

    first = settings(folders[0])
    for number, folder in enumerate(folders[1:], 2):
        other = settings(folder)
        if first is None or other is None:
            continue
        fields = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if fields:
            which = "A and B" if len(folders) == 2 else f"models 1 and {number}"
            raise DataError(f"{which} prepare their images differently (preprocessor_config.json field "
                            f"{fields[0]!r} is {first.get(fields[0])!r} and {other.get(fields[0])!r}): each was "
                            "trained on other inputs")


def _model_transform(folder: Path):
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(folder))
        mode = image_mode(folder, processor)

        def transform(images: list) -> torch.Tensor:
            images = [eight_bit(i) for i in images]
            if mode == "L":  # channels first, so that processors need not guess the layout
                arrays = [np.asarray(i.convert("L"))[None] for i in images]
                return processor(images=arrays, input_data_format="channels_first", return_tensors="pt")["pixel_values"]
            return processor(images=[i.convert(mode) for i in images], return_tensors="pt")["pixel_values"]

        return transform
    config = json.loads((folder / "config.json").read_text())
    if "in_channels" not in config and "num_channels" in config:  # a transformers config
        config = {"in_channels": config["num_channels"], "image_size": config.get("image_size", 224)}
    return builtin_transform(config)


def _decoder(feature):
    """Image cells -> PIL images; cells are read undecoded so unused rows cost no decoding."""
    if isinstance(feature, datasets.Image):
        image = datasets.Image()
        return lambda cells: [image.decode_example(cell) for cell in cells]
    return lambda cells: cells


class SplitBatches:
    """What the image and text streams share: one process's part of the batches, a length
    when capped, and the seeded shuffle of the rows.

    Subclasses are frozen dataclasses with ``stream``, ``batch_size``, ``limit``, ``seed``,
    ``buffer_size`` and ``part`` fields; ``limit`` counts what a batch holds (examples, or
    packed blocks of text).
    """

    def shard(self, index: int, count: int, limit: int | None = None):
        """This stream's part for process ``index`` of ``count``, optionally capped lower."""
        if limit is not None and self.limit is not None:
            limit = min(limit, self.limit)
        return dataclasses.replace(self, part=(index, count), limit=self.limit if limit is None else limit)

    def __len__(self) -> int:
        """Batches this part yields; known only when the stream is capped."""
        if self.limit is None:
            raise TypeError("an uncapped stream has no known length")
        index, count = self.part
        batches = (self.limit + self.batch_size - 1) // self.batch_size
        return len(range(index, batches, count))

    def shuffled_rows(self) -> datasets.IterableDataset:
        if self.seed is None:
            return self.stream
        # One input shard in the buffer at a time (shard order is still shuffled): with
        # several, datasets interleaves them in threads and sleeps 5 s after every pass.
        return self.stream.shuffle(seed=self.seed, buffer_size=self.buffer_size, max_buffer_input_shards=1)

    def first_rows(self) -> datasets.IterableDataset:
        """The shuffled rows, the first ``limit`` of them (when ``limit`` counts rows)."""
        rows = self.shuffled_rows()
        return rows if self.limit is None else rows.take(self.limit)

    def is_mine(self, number: int) -> bool:
        """Whether batch ``number`` belongs to this process's part."""
        index, count = self.part
        return number % count == index

    def __iter__(self):
        for _start, batch in self.numbered():
            yield batch

    def row_batches(self, rows: datasets.IterableDataset, batch_size: int) -> Iterator[dict]:
        """``rows`` in batches of ``batch_size``; a part of the files that cannot be read (a
        corrupt row group, a shard that is not parquet) is the dataset's fault, found only
        when the stream reaches it: a one-line error."""
        batches, read = rows.iter(batch_size=batch_size), 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, ValueError) as error:  # pyarrow: ArrowInvalid (ValueError), ArrowIOError
                raise DataError(f"{self.name}: its files cannot be read past row {read} of the stream: "
                                f"{_described(error)}") from error
            read += len(next(iter(batch.values()), []))
            yield batch

    @property
    def size(self) -> int | None:
        """What the whole stream yields (over all parts), when known before reading it: a
        cap the split must fill (``strict_limit``, also set when the split states its size)."""
        return self.limit if self.strict_limit else None


@dataclasses.dataclass(frozen=True)
class ImageStream(SplitBatches):
    """Re-iterable ``(pixel_values, labels)`` batches streamed from one split.

    Each iteration restarts the stream: with a ``seed`` the rows pass through a seeded
    shuffle buffer of ``buffer_size`` rows (so a capped calibration set is not just the first,
    possibly label-sorted rows), then the first ``limit`` rows are taken. ``part=(index,
    count)`` keeps every count-th batch starting at ``index``: processes of a distributed run
    read disjoint parts of exactly the batches a single process would read. With
    ``strict_limit``, a split shorter than ``limit`` is an error once the stream runs out.
    """

    stream: datasets.IterableDataset
    transform: object
    image_column: str
    label_column: str
    name: str
    batch_size: int = 256
    limit: int | None = None
    seed: int | None = None
    buffer_size: int = SHUFFLE_BUFFER
    strict_limit: bool = False
    part: tuple[int, int] = (0, 1)
    label_order: tuple[int, ...] | None = None  # the model's index of each dataset class (class_order)

    def numbered(self):
        """This part's batches, each with the position of its first example in the split."""
        rows = self.first_rows()
        decode = _decoder((self.stream.features or {}).get(self.image_column))
        seen = 0
        for number, batch in enumerate(self.row_batches(rows, self.batch_size)):
            labels = batch[self.label_column]
            if self.is_mine(number):
                yield seen, self._tensors(batch[self.image_column], labels, decode, seen)
            seen += len(labels)
        if self.strict_limit and self.limit is not None and seen < self.limit:
            raise DataError(f"--num-samples {self.limit} asks for more examples than {self.name} has ({seen})")

    def _tensors(self, cells: list, labels: list, decode, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's pixels and labels; cells that are not images or labels that are not class
        indices (a null, a corrupt file) are the dataset's fault: a one-line error naming them."""
        try:
            labels = torch.as_tensor(labels)
            return self.transform(decode(cells)), labels if self.label_order is None else \
                torch.as_tensor(self.label_order)[labels]
        except (OSError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as error:  # PIL: OSError
            order = " (in its seeded shuffle)" if self.seed is not None else ""
            raise DataError(f"{self.name}: examples {first}-{first + len(labels) - 1} of the stream{order} are not "
                            f"images with class labels "
                            f"(columns {self.image_column!r}, {self.label_column!r}): {_described(error)}") from error


def _described(error: Exception) -> str:
    """An exception from reading a cell, in one line: its type and its message's first line."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def split_features(stream: datasets.IterableDataset, name: str):
    """The stream's features; an empty split is an error (checked by reading one row)."""
    rows = iter(stream.take(1))
    try:
        first = next(rows, None)
    except (OSError, ValueError, TypeError) as error:  # a first image that does not decode (PIL: OSError)
        raise DataError(f"{name}: its first row cannot be read: {_described(error)}") from error
    finally:
        # An unfinished parquet reader left for the interpreter's exit can abort it ("terminate
        # called without an active exception", status 134) after a one-line error: free it now.
        del rows
        gc.collect()
    if first is None:
        raise DataError(f"{name} is empty")
    return stream.features or {key: None for key in first}


def image_batches(dataset: str, split: str, transform, *, limit: int | None = None, batch_size: int = 256,
                  image_column: str | None = None, label_column: str | None = None,
                  strict_limit: bool = False, seed: int | None = None, buffer_size: int = SHUFFLE_BUFFER,
                  revision: str | None = None, label2id: dict | None = None,
                  classes: int | None = None) -> ImageStream:
    """Streamed batches of ``split``; with ``strict_limit`` a ``limit`` above the split's size is
    an error (raised when the stream runs out). ``label2id``: the model's class names, to map a ``ClassLabel`` that orders the
    same names otherwise (:func:`class_order`). ``classes``: the model's class count, which a
    ``ClassLabel`` may not exceed (found now, not when the first out-of-range label is scored
    after the calibration passes)."""
    stream = open_split(dataset, split, revision)
    name = f"split {split!r} of dataset {dataset!r}"
    features = split_features(stream, name)
    image, label = detect_columns(features, image_column, label_column)
    pixels = features[image]
    if image == label:
        raise DataError(f"column {image!r} cannot be both the images and the labels")
    if isinstance(pixels, datasets.ClassLabel) or (
            isinstance(pixels, datasets.Value) and pixels.dtype not in ("binary", "large_binary", "string")):
        raise DataError(f"image column {image!r} holds {getattr(pixels, 'dtype', 'class labels')}, not images")
    feature = features[label]
    if feature is not None and not isinstance(feature, datasets.ClassLabel) and not str(
            getattr(feature, "dtype", "")).startswith(("int", "uint")):
        raise DataError(f"label column {label!r} holds {getattr(feature, 'dtype', feature)}, not class indices")
    if isinstance(feature, datasets.ClassLabel) and classes and feature.num_classes > classes:
        raise DataError(f"label column {label!r} has {feature.num_classes} classes, more than the model's {classes}")
    # Split sizes a dataset's README states are not used: stale ones are common on the Hub, and
    # trusted they cut the split short or refused a cap it fills. A cap the split does not
    # fill is found when the stream runs out.
    # Encoded images (bytes) and image file paths (strings) are read as datasets' Image cells.
    if isinstance(pixels, (datasets.Image, datasets.Value)):
        stream = stream.cast_column(image, datasets.Image(decode=False))
    return ImageStream(stream, transform, image, label, name, batch_size, limit, seed, buffer_size, strict_limit,
                       label_order=class_order(feature, label2id))
