"""Text data: the endpoints' tokenizer, and a Hub-style text split streamed as token batches.

In: a dataset folder or Hub id, a split, the endpoints' tokenizer. Out: re-iterable
``(inputs, labels)`` batches, seeded and shuffled as images are.

- Causal LMs, :class:`PackedTextStream`: the texts are tokenized, joined with the EOS token
  and cut into blocks of ``block_length`` tokens, so that no position is padding and every
  real token enters exactly one block. The labels are the input ids themselves
  (transformers' convention; the evaluation shifts them). A last block shorter than the
  others comes as a batch of its own.
- Sequence classifiers, :class:`PaddedTextStream`: whole examples, cut at ``max_length``
  and padded to the longest of their batch; the inputs are the tokenizer's tensors
  (``input_ids``, ``attention_mask``, ...), and the passes count real tokens only
  (:mod:`hfrepair.batches`).
- Causal LMs can read whole examples the same way (:func:`padded_lm_batches`, padded on the
  right): the labels are the input ids with padded positions ignored (-100), so no
  prediction of or from padding is scored.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import datasets
import torch

from .data import (LABEL_NAMES, SHUFFLE_BUFFER, DataError, SplitBatches, class_order, open_split, pick_column,
                   split_features)
from .evaluate import IGNORED_LABEL

TEXT_NAMES = ("text", "content", "sentence", "document")
# Blocks longer than this cost more than calibration needs; a model's maximum positions can
# be 100k+ (Llama-family). --max-length lifts it up to the model's limit.
DEFAULT_MAX_LENGTH = 512
TOKENIZE_ROWS = 256  # texts per call of the (Rust, batched) tokenizer
# Files that hold a tokenizer, as transformers saves them (fast, sentencepiece, WordPiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(folder: str | Path):
    """The tokenizer saved with an endpoint (as a Hub repo ships it)."""
    from transformers import AutoTokenizer

    # transformers builds an empty tokenizer from config.json alone: refuse a folder without
    # the files of one (a merge would read every word as unknown and save that tokenizer).
    if Path(folder).is_dir() and not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); a text model's "
                        "folder must hold the tokenizer it was trained with")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # the tokenizers library raises plain Exceptions for a broken tokenizer.json
        raise DataError(f"{folder}: no usable tokenizer ({str(error).splitlines()[0]}); a text model's "
                        "folder must hold the tokenizer it was trained with") from error


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides how text becomes ids: the whole serialized fast tokenizer (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens), else the vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return repr((sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens))


def check_same_tokenizer(tokenizer_a, tokenizer_b) -> None:
    """Endpoints that read text differently cannot be merged: their embedding rows would
    mean different tokens."""
    if tokenizer_fingerprint(tokenizer_a) != tokenizer_fingerprint(tokenizer_b):
        size_a, size_b = len(tokenizer_a), len(tokenizer_b)
        detail = f" ({size_a} vs {size_b} tokens)" if size_a != size_b else ""
        raise DataError(f"the endpoints have different tokenizers{detail}: their token ids do not mean the same "
                        "text, so their embeddings cannot be merged")


def model_positions(config: dict) -> int | None:
    """The longest sequence the model takes, from its config."""
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def block_length(config: dict, requested: int | None) -> int:
    """``--max-length``, checked against the model; by default its positions, capped."""
    positions = model_positions(config)
    if requested is None:
        return min(positions or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if positions is not None and requested > positions:
        raise DataError(f"--max-length {requested} exceeds the model's {positions} positions")
    if requested < 2:
        raise DataError(f"--max-length must be at least 2 tokens (one to read, one to predict), got {requested}")
    return requested


def is_text(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def detect_text_column(features, given: str | None = None) -> str:
    """The text column: the given name, else the only string column, else a usual name."""
    names = list(features)
    if given is not None:
        if given not in names:
            raise DataError(f"dataset has no text column {given!r} (columns: {', '.join(names)})")
        if features[given] is not None and not is_text(features[given]):
            raise DataError(f"column {given!r} holds {features[given].__class__.__name__}"
                            f"{'(' + features[given].dtype + ')' if hasattr(features[given], 'dtype') else ''}, "
                            "not text")
        return given
    texts = [n for n in names if is_text(features[n])]
    if len(texts) == 1:
        return texts[0]
    for name in TEXT_NAMES:
        if name in texts:
            return name
    if texts:
        raise DataError(f"dataset has several text columns ({', '.join(texts)}); pass --text-column")
    raise DataError(f"dataset has no text column for a text model (columns: {', '.join(names)}); "
                    "pass --text-column")


def pack(token_lists: Iterable[list[int]], eos_id: int, length: int) -> Iterator[list[int]]:
    """Blocks of ``length`` ids from the texts joined by EOS, then the rest as one shorter
    block (if it has something to predict: two ids or more)."""
    buffer: list[int] = []
    for tokens in token_lists:
        buffer.extend(tokens)
        buffer.append(eos_id)
        while len(buffer) >= length:
            yield buffer[:length]
            del buffer[:length]
    if len(buffer) > 1:
        yield buffer


@dataclasses.dataclass(frozen=True)
class PackedTextStream(SplitBatches):
    """Re-iterable ``(input_ids, input_ids)`` batches of packed blocks from one split.

    Each iteration restarts the stream (seeded shuffle of the texts as for images, then
    packing); ``limit`` counts blocks; ``part`` keeps this process's batches. With
    ``strict_limit``, a split that packs into fewer blocks than ``limit`` is an error.
    """

    stream: datasets.IterableDataset
    tokenizer: object
    text_column: str
    name: str
    block_length: int
    batch_size: int = 32
    limit: int | None = None
    seed: int | None = None
    buffer_size: int = SHUFFLE_BUFFER
    strict_limit: bool = False
    part: tuple[int, int] = (0, 1)

    def token_lists(self) -> Iterator[list[int]]:
        """Each non-empty text's ids, without special tokens (packing adds the EOS)."""
        for rows in self.row_batches(self.shuffled_rows(), TOKENIZE_ROWS):
            texts = rows[self.text_column]
            if any(not isinstance(t, str) for t in texts if t is not None):
                raise DataError(f"column {self.text_column!r} of {self.name} holds values that are not text")
            texts = [t for t in texts if t]
            if texts:
                # verbose=False: texts longer than the model are expected here; packing cuts them.
                encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
                yield from (ids for ids in encoded if ids)

    def numbered(self):
        """This part's batches, each with the position of its first block in the split."""
        blocks = pack(self.token_lists(), self.tokenizer.eos_token_id, self.block_length)
        if self.limit is not None:
            blocks = islice(blocks, self.limit)
        batch: list[list[int]] = []
        seen = number = 0
        for block in blocks:
            if batch and (len(batch) == self.batch_size or len(block) != len(batch[0])):
                if self.is_mine(number):
                    ids = torch.tensor(batch)
                    yield seen - len(batch), (ids, ids)
                number, batch = number + 1, []
            batch.append(block)
            seen += 1
        if batch and self.is_mine(number):
            ids = torch.tensor(batch)
            yield seen - len(batch), (ids, ids)
        if seen == 0:
            raise DataError(f"the texts in column {self.text_column!r} of {self.name} are all empty after "
                            "tokenization")
        if self.strict_limit and self.limit is not None and seen < self.limit:
            raise DataError(f"--num-samples {self.limit} asks for more blocks of {self.block_length} tokens than "
                            f"{self.name} packs into ({seen})")


def packed_batches(dataset: str, split: str, tokenizer, block_length: int, *, limit: int | None = None,
                   batch_size: int = 32, text_column: str | None = None, strict_limit: bool = False,
                   seed: int | None = None, buffer_size: int = SHUFFLE_BUFFER,
                   revision: str | None = None) -> PackedTextStream:
    """Streamed batches of packed blocks of ``split``'s texts (see the module docstring)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the endpoints' tokenizer has no EOS token to join packed texts with")
    stream = open_split(dataset, split, revision)
    name = f"split {split!r} of dataset {dataset!r}"
    column = detect_text_column(split_features(stream, name), text_column)
    return PackedTextStream(stream, tokenizer, column, name, block_length, batch_size, limit, seed, buffer_size,
                            strict_limit)


def label_index(feature, label2id: dict[str, int], classes: int, column: str):
    """Labels -> class indices for a classifier with ``classes`` outputs: class indices as
    they are, label names through the model's ``label2id``; what cannot fit is an error."""
    def present(values):
        if any(value is None for value in values):
            raise DataError(f"label column {column!r} has empty (null) cells")
        return values

    if isinstance(feature, datasets.ClassLabel):
        if feature.num_classes != classes:
            raise DataError(f"label column {column!r} has {feature.num_classes} classes, the classifier {classes}")
        order = class_order(feature, label2id)
        if order is None:
            return lambda values: torch.as_tensor(present(values))
        return lambda values: torch.as_tensor(order)[torch.as_tensor(present(values))]
    if is_text(feature):
        def by_name(values):
            unknown = sorted({v for v in values if v not in label2id})
            if unknown:
                raise DataError(f"label column {column!r} holds {unknown[0]!r}, not one of the classifier's labels "
                                f"({', '.join(label2id)})")
            return torch.as_tensor([label2id[v] for v in values])
        return by_name
    if feature is not None and not str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
        raise DataError(f"label column {column!r} holds {getattr(feature, 'dtype', feature)}, not class indices")

    def checked(values):
        labels = torch.as_tensor(present(values))
        outside = labels[(labels < 0) | (labels >= classes)]
        if len(outside):
            raise DataError(f"label column {column!r} holds {int(outside[0])}, outside the classifier's {classes} "
                            f"labels (0-{classes - 1})")
        return labels
    return checked


@dataclasses.dataclass(frozen=True)
class PaddedTextStream(SplitBatches):
    """Re-iterable ``(tokenizer tensors, labels)`` batches of whole examples from one split.

    Texts longer than ``max_length`` tokens are cut there; each batch is padded to its
    longest text. ``limit`` counts examples, as for images. Without a ``label_column`` (a
    causal LM) the labels are the input ids, padded positions set to -100.
    """

    stream: datasets.IterableDataset
    tokenizer: object
    text_column: str
    name: str
    max_length: int
    labels: object  # values of the label column -> class indices (label_index); None for a causal LM
    label_column: str | None
    batch_size: int = 32
    limit: int | None = None
    seed: int | None = None
    buffer_size: int = SHUFFLE_BUFFER
    strict_limit: bool = False
    part: tuple[int, int] = (0, 1)

    def numbered(self):
        """This part's batches, each with the position of its first example in the split."""
        rows = self.first_rows()
        seen = texts_seen = 0
        for number, batch in enumerate(self.row_batches(rows, self.batch_size)):
            texts = [text or "" for text in batch[self.text_column]]
            if any(not isinstance(t, str) for t in texts):
                raise DataError(f"column {self.text_column!r} of {self.name} holds values that are not text")
            texts_seen += sum(1 for t in texts if t.strip())
            if self.is_mine(number):
                inputs = dict(self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                             return_tensors="pt"))
                if inputs["input_ids"].shape[-1]:  # a batch of empty texts has no token to run or score
                    yield seen, (inputs, self._labels(batch, inputs))
            seen += len(texts)
        if seen and not texts_seen:
            raise DataError(f"the texts in column {self.text_column!r} of {self.name} are all empty")
        if self.strict_limit and self.limit is not None and seen < self.limit:
            raise DataError(f"--num-samples {self.limit} asks for more examples than {self.name} has ({seen})")


    def _labels(self, rows: dict, inputs: dict) -> torch.Tensor:
        if self.label_column is None:  # next-token targets: the ids, padding not scored
            return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORED_LABEL)
        return self.labels(rows[self.label_column])


def padded_lm_batches(dataset: str, split: str, tokenizer, max_length: int, *, limit: int | None = None,
                      batch_size: int = 32, text_column: str | None = None, strict_limit: bool = False,
                      seed: int | None = None, buffer_size: int = SHUFFLE_BUFFER,
                      revision: str | None = None) -> PaddedTextStream:
    """Streamed batches of whole texts for a causal LM, padded on the right (positions then
    start at 0 in every row) with the EOS token when the tokenizer has no padding token."""
    tokenizer = copy.deepcopy(tokenizer)  # the endpoints' own is saved with the merge: leave it as it is
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError("the endpoints' tokenizer has neither a padding nor an EOS token to pad texts with")
        tokenizer.pad_token = tokenizer.eos_token
    stream = open_split(dataset, split, revision)
    name = f"split {split!r} of dataset {dataset!r}"
    column = detect_text_column(split_features(stream, name), text_column)
    return PaddedTextStream(stream, tokenizer, column, name, max_length, None, None, batch_size, limit, seed,
                            buffer_size, strict_limit)


def padded_batches(dataset: str, split: str, tokenizer, max_length: int, classes: int,
                   label2id: dict[str, int] | None = None, *, limit: int | None = None, batch_size: int = 32,
                   text_column: str | None = None, label_column: str | None = None, strict_limit: bool = False,
                   seed: int | None = None, buffer_size: int = SHUFFLE_BUFFER,
                   revision: str | None = None) -> PaddedTextStream:
    """Streamed, padded batches of ``split``'s labelled texts for a classifier with
    ``classes`` outputs (see the module docstring)."""
    if tokenizer.pad_token_id is None:
        raise DataError("the endpoints' tokenizer has no padding token to batch texts of different lengths")
    stream = open_split(dataset, split, revision)
    name = f"split {split!r} of dataset {dataset!r}"
    features = split_features(stream, name)
    column = detect_text_column(features, text_column)
    if label_column is not None and label_column == column:
        raise DataError(f"column {column!r} is the texts; name the labels' column with --label-column (or the texts' "
                        "with --text-column)")
    others = {k: v for k, v in features.items() if k != column}
    if not others:  # a language-modelling corpus given to a classifier
        raise DataError(f"{name} has no label column: its one column {column!r} holds the texts, and a classifier "
                        "is scored on labels")
    label = pick_column(others, label_column, "label", LABEL_NAMES, (datasets.ClassLabel,))
    labels = label_index(features[label], label2id or {}, classes, label)
    return PaddedTextStream(stream, tokenizer, column, name, max_length, labels, label, batch_size, limit, seed,
                            buffer_size, strict_limit)
