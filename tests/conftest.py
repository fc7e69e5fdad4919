"""Shared fixtures: the MNIST digits as a Hub-style parquet dataset, and trained endpoints.

Endpoints are trained once per test run (session scope), from different seeds, with one
torch thread so that runs are deterministic.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# A fresh Hugging Face cache per run, as on CI's fresh machine: nothing from earlier runs
# (generated dataset splits, downloads) may hide behaviour. Set before datasets is imported.
_HF_HOME = tempfile.mkdtemp(prefix="hfrepair-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

import pytest
import torch
from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

from hfrepair.data import image_batches, model_transform
from hfrepair.demo import load_tensors, write_mnist_dataset
from hfrepair.models import MLP, VGG, ResNet
from hfrepair.training import train_classifier

torch.set_num_threads(1)

SMALL = dict(image_size=14)  # 14x14 digits keep conv endpoints trainable in seconds


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory):
    return write_mnist_dataset(tmp_path_factory.mktemp("mnist"))


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
def resnet_pair(mnist):
    factory = lambda: ResNet(width=1, blocks_per_stage=1, normalization="batchnorm", **SMALL)
    return train_pair(factory, mnist(14), epochs=4, lr=0.1)


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
    return train_hf_pair(hf_resnet, mnist_folder, tmp_path_factory.mktemp("hf_resnet"), epochs=4)


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
    return train_grayscale_pair(tiny_vit, mnist_folder, tmp_path_factory.mktemp("vit"), epochs=30, lr=3e-3,
                                weight_decay=0.05, optimizer="adamw")
