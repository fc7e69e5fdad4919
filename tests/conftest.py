"""Shared fixtures: the MNIST digits and CPython's documentation as Hub-style parquet
datasets, and trained endpoints.

Endpoints are trained once per test run, from different seeds, with one torch thread so
that runs are deterministic. The suite runs under pytest-xdist (see pyproject's addopts):
what several test files need is built once for all workers by ``built_once``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import pickle
import shutil
import subprocess
import tempfile

# A fresh Hugging Face cache per run, as on CI's fresh machine: nothing from earlier runs
# (generated dataset splits, downloads) may hide behaviour. Set before datasets is imported.
_HF_HOME = tempfile.mkdtemp(prefix="hfrepair-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
# hfrepair's own cache (the specs merges discover) too: per worker, never the user's.
_HFREPAIR_CACHE = tempfile.mkdtemp(prefix="hfrepair-tests-cache-")
os.environ["HFREPAIR_CACHE"] = _HFREPAIR_CACHE
atexit.register(shutil.rmtree, _HFREPAIR_CACHE, ignore_errors=True)

import pytest
import torch
from filelock import FileLock
from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

from hfrepair.cli import main
from hfrepair.data import image_batches, model_transform
from hfrepair.demo import load_tensors, write_mnist_dataset
from hfrepair.models import MLP, VGG, ResNet
from hfrepair.training import train_classifier

torch.set_num_threads(1)

SMALL = dict(image_size=14)  # 14x14 digits keep conv endpoints trainable in seconds


# Test files that share an expensive session fixture run on one worker, one after the other
# (pyproject's ``--dist loadgroup``), rather than one waiting for the other to train it;
# every other file is a group of its own.
WORKER_GROUPS = {"test_cli_transformers.py": "vit", "test_transformers_models.py": "vit"}


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(WORKER_GROUPS.get(item.path.name, item.path.name)))


def built_once(tmp_path_factory, name: str, build):
    """``build(folder)``'s result, built once per test run however many xdist workers ask.

    Session fixtures are per worker under pytest-xdist; training an endpoint pair in each
    worker would double the suite's heaviest work. The first worker that needs ``name``
    builds it in the run's shared temporary folder under a file lock; the others wait for
    it and read the pickled result (paths, or trained models).
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "built" / name
    result = folder.parent / f"{name}.pickle"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(folder.parent / f"{name}.lock")):
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            value = build(folder)
            result.write_bytes(pickle.dumps(value))
    return pickle.loads(result.read_bytes())


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory):
    return built_once(tmp_path_factory, "mnist", write_mnist_dataset)


@pytest.fixture(scope="session")
def mnist(mnist_folder):
    """Preprocessed tensors per image size: {size: (train_x, train_y, test_x, test_y)}."""
    cache = {}

    def get(size: int):
        if size not in cache:
            config = {"image_size": size, "in_channels": 1, "mean": [0.1307], "std": [0.3081]}
            cache[size] = (*load_tensors(mnist_folder, "train", config), *load_tensors(mnist_folder, "test", config))
        return cache[size]

    return get


def run_cli(*args) -> subprocess.CompletedProcess:
    """``hfrepair ARGS`` run in this process, as ``python -m hfrepair`` would run it.

    In-process because an interpreter start with torch, transformers and datasets imported
    costs seconds per call; the tests that need a fresh process (entry point, launchers,
    Hub client environment, reloading saved files) start one themselves.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_info:  # argparse's own errors
            code = exit_info.code
    return subprocess.CompletedProcess(["hfrepair", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_line_error(stderr: str, message: str) -> None:
    """The user sees exactly one ``hfrepair: error:`` line, last, naming ``message``, and no traceback.

    Progress bars that libraries print before the failure (datasets preparing a split) are
    allowed; they are not part of the error.
    """
    errors = [line for line in stderr.splitlines() if line.startswith("hfrepair: error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr, stderr
    assert message in errors[0], stderr


def batches(x, y, size=500):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def train_pair(factory, data, fold=False, **training):
    train_x, train_y = data[0], data[1]
    pair = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = train_classifier(factory(), train_x, train_y, seed=seed, **training)
        pair.append(model.fold_batchnorm() if fold else model)
    return pair


@pytest.fixture(scope="session")
def resnet_pair(mnist, tmp_path_factory):
    factory = lambda: ResNet(width=1, blocks_per_stage=1, normalization="batchnorm", **SMALL)
    return built_once(tmp_path_factory, "resnet_pair", lambda _: train_pair(factory, mnist(14), epochs=4, lr=0.1))


@pytest.fixture(scope="session")
def deep_mlp_pair(mnist):
    """Width 128, 20 hidden layers: trained with BatchNorm, folded to a plain MLP."""
    factory = lambda: MLP(depth=20, width=128, normalization="batchnorm")
    return train_pair(factory, mnist(28), fold=True, epochs=15, lr=0.1)


@pytest.fixture(scope="session")
def vgg_pair(mnist):
    factory = lambda: VGG(widths=(16, 32, 64), layers_per_stage=2, **SMALL)
    return train_pair(factory, mnist(14), epochs=5, lr=0.01, batch_size=64)


def save_with_processor(model, folder):
    model.save_pretrained(str(folder))
    processor = ConvNextImageProcessor(size={"shortest_edge": 28}, crop_pct=1.0,
                                       image_mean=[0.1307] * 3, image_std=[0.3081] * 3)
    processor.save_pretrained(str(folder))


def train_hf_pair(factory, mnist_folder, root, epochs, lr=0.05):
    """Two transformers endpoints trained on images preprocessed by their own saved processor."""
    folders = []
    for seed in (1, 2):
        folder = root / f"endpoint-{seed}"
        torch.manual_seed(seed)
        model = factory()
        save_with_processor(model, folder)
        data = image_batches(str(mnist_folder), "train", model_transform(folder), batch_size=4000)
        images, labels = next(iter(data))
        train_classifier(model, images, labels, epochs=epochs, lr=lr, seed=seed)
        model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def hf_resnet():
    return ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10))


@pytest.fixture(scope="session")
def hf_resnet_folders(mnist_folder, tmp_path_factory):
    """transformers ResNetForImageClassification endpoints (basic blocks), with image processors."""
    return built_once(tmp_path_factory, "hf_resnet", lambda root: train_hf_pair(hf_resnet, mnist_folder, root, epochs=4))


def tiny_vit():
    """A 4-layer ViT of width 64 with 4 heads on 28x28 grayscale digits (16 patches of 7x7)."""
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=10))


def train_grayscale_pair(factory, mnist_folder, root, **training):
    """Two one-channel transformers endpoints (seeds 1 and 2) saved with a one-value-mean
    ``ViTImageProcessor``, as a grayscale model ships on the Hub; trained on the processor's
    own output."""
    from transformers import ViTImageProcessor

    folders = []
    for seed in (1, 2):
        folder = root / f"endpoint-{seed}"
        torch.manual_seed(seed)
        model = factory()
        model.save_pretrained(str(folder))
        ViTImageProcessor(do_resize=False, image_mean=[0.1307], image_std=[0.3081]).save_pretrained(str(folder))
        data = image_batches(str(mnist_folder), "train", model_transform(folder), batch_size=4000)
        images, labels = next(iter(data))
        assert images.shape[1] == 1
        train_classifier(model, images, labels, seed=seed, **training)
        model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


@pytest.fixture(scope="session")
def vit_folders(mnist_folder, tmp_path_factory):
    """Two trained ViT endpoints with a grayscale processor (AdamW: SGD trains ViTs poorly)."""
    return built_once(tmp_path_factory, "vit", lambda root: train_grayscale_pair(
        tiny_vit, mnist_folder, root, epochs=15, lr=3e-3, weight_decay=0.05, optimizer="adamw"))


LM_LENGTH = 64  # tokens per packed block, and the tiny language models' positions


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory):
    from hfrepair.corpora import write_text_dataset

    return built_once(tmp_path_factory, "pydoc", write_text_dataset)


def tiny_gpt2(tokenizer):
    """A 2-layer GPT-2 of width 64 with 4 heads (tied LM head), without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=LM_LENGTH, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))


def train_language_model_pair(factory, text_folder, root, seeds=(1, 2), **training):
    """Causal LMs (seeds 1 and 2 unless told) trained on the packed train split, each saved
    with the byte-level BPE tokenizer trained on that split, as a Hub repo ships its tokenizer."""
    import datasets

    from hfrepair.corpora import train_tokenizer
    from hfrepair.text import packed_batches

    tokenizer = train_tokenizer(datasets.load_dataset(str(text_folder), split="train")["text"])
    blocks = torch.cat([ids for ids, _ in packed_batches(str(text_folder), "train", tokenizer, LM_LENGTH,
                                                         batch_size=512) if ids.shape[1] == LM_LENGTH])
    folders = []
    for seed in seeds:
        folder = root / f"endpoint-{seed}"
        torch.manual_seed(seed)
        model = factory(tokenizer)
        train_classifier(model, blocks, blocks, seed=seed, optimizer="adamw", **training)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        folders.append(folder)
    return folders


@pytest.fixture(scope="session")
def gpt2_folders(text_folder, tmp_path_factory):
    return built_once(tmp_path_factory, "gpt2", lambda root: train_language_model_pair(
        tiny_gpt2, text_folder, root, epochs=4, lr=5e-3, weight_decay=0.01, batch_size=32))


@pytest.fixture(scope="session")
def third_gpt2_folder(text_folder, tmp_path_factory):
    """A third GPT-2 like those of ``gpt2_folders`` (seed 3), for merges of N models."""
    return built_once(tmp_path_factory, "gpt2-3", lambda root: train_language_model_pair(
        tiny_gpt2, text_folder, root, seeds=(3,), epochs=4, lr=5e-3, weight_decay=0.01, batch_size=32))[0]


def tiny_llama(tokenizer):
    """A 2-layer Llama of width 64: RMSNorm, RoPE, SwiGLU, no biases, 4 query heads sharing
    2 key/value heads, untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=LM_LENGTH, tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))


@pytest.fixture(scope="session")
def llama_folders(text_folder, tmp_path_factory):
    """Briefly trained: a smoke test of the bias-free path, not a study."""
    return built_once(tmp_path_factory, "llama", lambda root: train_language_model_pair(
        tiny_llama, text_folder, root, epochs=2, lr=5e-3, weight_decay=0.01, batch_size=32))


@pytest.fixture(scope="session")
def docstring_folder(tmp_path_factory):
    from hfrepair.corpora import write_docstring_dataset

    return built_once(tmp_path_factory, "docstrings", write_docstring_dataset)


def tiny_bert_classifier(tokenizer):
    """A 2-layer BERT of width 32 with 4 heads, classifying a docstring's package."""
    from transformers import BertConfig, BertForSequenceClassification

    from hfrepair.corpora import DOCSTRING_PACKAGES

    return BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=LM_LENGTH, num_labels=len(DOCSTRING_PACKAGES), pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(DOCSTRING_PACKAGES)), label2id={n: i for i, n in enumerate(DOCSTRING_PACKAGES)},
        attention_probs_dropout_prob=0.0))


def train_bert_pair(docstring_folder, root):
    """Two BERT classifiers (seeds 1 and 2) trained on the padded docstrings (cut at 64
    tokens), each saved with the [CLS]/[SEP]/[PAD] BPE tokenizer trained on the train split."""
    import datasets

    from hfrepair.corpora import train_tokenizer
    from hfrepair.text import padded_batches

    tokenizer = train_tokenizer(datasets.load_dataset(str(docstring_folder), split="train")["text"], 1000,
                                classifier=True)
    inputs, labels = next(iter(padded_batches(str(docstring_folder), "train", tokenizer, LM_LENGTH, 5,
                                              batch_size=100_000)))
    folders = []
    for seed in (1, 2):
        folder = root / f"endpoint-{seed}"
        torch.manual_seed(seed)
        model = tiny_bert_classifier(tokenizer)
        train_classifier(model, inputs, labels, epochs=15, lr=2e-3, weight_decay=0.01, batch_size=32, seed=seed,
                         optimizer="adamw")
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        folders.append(folder)
    return folders


@pytest.fixture(scope="session")
def bert_folders(docstring_folder, tmp_path_factory):
    return built_once(tmp_path_factory, "bert", lambda root: train_bert_pair(docstring_folder, root))
