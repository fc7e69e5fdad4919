"""transformers image classifiers merge like the built-ins: HF ResNet through the CLI (with
its own image processor), ConvNeXt (LayerNorm, depthwise convs, layer scale) through the API."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ResNetConfig,
    ResNetForImageClassification,
)

from hfrepair.data import image_batches, model_transform
from hfrepair.io import load_model
from hfrepair.pipeline import merge
from hfrepair.training import train_classifier

ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def save_with_processor(model, folder):
    model.save_pretrained(str(folder))
    processor = ConvNextImageProcessor(size={"shortest_edge": 28}, crop_pct=1.0,
                                       image_mean=[0.1307] * 3, image_std=[0.3081] * 3)
    processor.save_pretrained(str(folder))


def train_hf_pair(factory, mnist_folder, root, epochs, lr=0.05):
    """Two endpoints trained on images preprocessed by their own saved image processor."""
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


def test_hf_resnet_merges_through_the_cli(mnist_folder, tmp_path):
    a, b = train_hf_pair(hf_resnet, mnist_folder, tmp_path, epochs=4)
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "hfrepair.cli", "merge", str(a), str(b), "--dataset", str(mnist_folder),
         "--output", str(out), "--grid", "3", "--num-samples", "2000", "--eval-samples", "1000"],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "preprocessor_config.json").is_file()
    results = json.loads((out / "merge_results.json").read_text())
    merged = ResNetForImageClassification.from_pretrained(str(out))  # the endpoints' own class
    assert merged.state_dict().keys() == hf_resnet().state_dict().keys()
    assert len(results["groups"]) == 2 + 2  # two residual streams, two inner convs
    ends = [results["endpoints"][k]["test"]["accuracy"] for k in "AB"]
    assert min(ends) > 0.85
    assert results["merged"]["test"]["accuracy"] > results["curves"]["aligned"]["test"][1]["accuracy"]
    assert results["merged"]["test"]["accuracy"] > 0.5


def test_convnext_merges_and_repair_helps(mnist_folder, tmp_path):
    def factory():
        config = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                num_labels=10, layer_scale_init_value=1.0)
        return ConvNextForImageClassification(config)

    a, b = train_hf_pair(factory, mnist_folder, tmp_path, epochs=6, lr=0.1)
    model_a, model_b = load_model(a), load_model(b)
    assert isinstance(model_a, ConvNextForImageClassification)
    transform = model_transform(a)
    calibration = image_batches(str(mnist_folder), "train", transform, limit=2000, batch_size=500)
    test = image_batches(str(mnist_folder), "test", transform, batch_size=500)
    merged, result = merge(model_a, model_b, calibration, {"test": test}, grid=3)
    assert isinstance(merged, ConvNextForImageClassification)
    assert result.permuted_max_abs_diff <= 1e-4
    aligned = result.curves["aligned"]["test"][1]["accuracy"]
    repaired = result.curves["repaired"]["test"][1]["accuracy"]
    # Measured here: endpoints 87.8% / 85.9%, aligned 67.2%, REPAIR 79.7%.
    assert min(result.endpoints[k]["test"]["accuracy"] for k in "AB") > 0.8
    assert repaired > aligned + 0.05
    assert repaired == pytest.approx(result.merged["test"]["accuracy"])
