"""Offline text for the tests and examples: real prose that ships with CPython, written as
Hub-style parquet datasets, and tokenizers trained on it.

No text can be downloaded where hfrepair is tested, but every Python carries its own
documentation:

- ``pydoc_data.topics`` holds the language reference's topics (~465,000 characters of
  English prose and code); its paragraphs make a ``text`` dataset for language models.
- The standard library's docstrings, read from its sources with ``ast`` (nothing is
  imported), labelled with the package they document (asyncio, email, importlib, logging,
  xml): a real 5-class text classification task.

Splits are shuffled with a fixed seed. A byte-level BPE tokenizer trained with
``tokenizers`` on a train split is saved in the endpoints' folders, as a Hub repo ships
its tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EOS_TOKEN = "<|endoftext|>"
CLASSIFIER_TOKENS = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
DOCSTRING_PACKAGES = ("asyncio", "email", "importlib", "logging", "xml")


def documentation_paragraphs() -> list[str]:
    """The paragraphs of CPython's pydoc topics, in a fixed order."""
    from pydoc_data.topics import topics

    return [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]


def package_docstrings(packages: tuple[str, ...] = DOCSTRING_PACKAGES) -> tuple[list[str], list[int]]:
    """Docstrings (over 20 characters) of the modules, classes and functions of each
    standard-library package, and the index of their package; tests of the packages left out."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, labels = [], []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for label, package in enumerate(packages):
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root).parts[1:] or "tests" in path.relative_to(root).parts[1:]:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                text = ast.get_docstring(node) if isinstance(node, kinds) else None
                if text and len(text) > 20:
                    texts.append(text)
                    labels.append(label)
    return texts, labels


def _write_splits(folder: Path, columns: dict[str, list], test_fraction: float, seed: int, features=None) -> Path:
    """``train.parquet`` / ``test.parquet`` (the Hub layout) of a seeded shuffle of the rows."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    count = len(next(iter(columns.values())))
    order = np.random.default_rng(seed).permutation(count)
    cut = int(count * (1 - test_fraction))
    for split, index in (("train", order[:cut]), ("test", order[cut:])):
        rows = {name: [values[i] for i in index] for name, values in columns.items()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def _written(folder: Path) -> bool:
    return (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file()


def write_text_dataset(folder: str | Path, test_fraction: float = 0.1, seed: int = 0) -> Path:
    """The documentation paragraphs as a ``text`` dataset; kept if already written."""
    folder = Path(folder)
    if _written(folder):
        return folder
    return _write_splits(folder, {"text": documentation_paragraphs()}, test_fraction, seed)


def write_docstring_dataset(folder: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """The labelled docstrings as a ``text`` + ``label`` (ClassLabel of the package names)
    dataset; kept if already written."""
    import datasets

    folder = Path(folder)
    if _written(folder):
        return folder
    texts, labels = package_docstrings()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(DOCSTRING_PACKAGES))})
    return _write_splits(folder, {"text": texts, "label": labels}, test_fraction, seed, features)


def train_tokenizer(texts: list[str], vocab_size: int = 512, classifier: bool = False):
    """A byte-level BPE tokenizer (GPT-2's kind) trained on ``texts``, as transformers'
    ``PreTrainedTokenizerFast``: with ``<|endoftext|>`` as its EOS (and padding) token, or
    for a ``classifier`` BERT's ``[CLS] text [SEP]`` framing and a ``[PAD]`` token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = dict(CLASSIFIER_TOKENS) if classifier else {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN,
                                                           "pad_token": EOS_TOKEN}
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(special.values())),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    if classifier:
        cls, sep = CLASSIFIER_TOKENS["cls_token"], CLASSIFIER_TOKENS["sep_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", special_tokens=[(t, tokenizer.token_to_id(t)) for t in (cls, sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
