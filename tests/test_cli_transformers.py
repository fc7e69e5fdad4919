"""``hfrepair merge`` on transformers image models stored as Hub-style folders with a
grayscale image processor: a ViT (heads, head dims, residual stream, MLP aligned) and a
one-channel transformers ResNet (images must reach the model as one channel, not RGB)."""

import json

import pytest
from huggingface_hub import ModelCard
from safetensors import safe_open

from hfrepair.data import image_batches, model_transform
from hfrepair.evaluate import evaluate

from .conftest import run_cli, train_grayscale_pair

EVAL_SAMPLES = 500
FAST = ["--grid", "3", "--num-samples", "1000", "--eval-samples", str(EVAL_SAMPLES), "--batch-size", "500",
        "--train-eval-samples", "250"]
OUTPUT_FILES = ["README.md", "barrier_curve.png", "config.json", "merge_results.json", "model.safetensors",
                "preprocessor_config.json", "variance_ratio.png"]


def merge_folders(a, b, dataset, out, *extra):
    done = run_cli("merge", a, b, "--dataset", dataset, "--output", out, *FAST, *extra)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done, json.loads((out / "merge_results.json").read_text())


def tensor_names(path):
    with safe_open(str(path), framework="pt") as weights:
        return set(weights.keys())


def reloaded_test_metrics(model, folder, dataset):
    """The saved model on the CLI's evaluation examples: same split, cap and shuffle seed."""
    test = image_batches(str(dataset), "test", model_transform(folder), limit=EVAL_SAMPLES, batch_size=500, seed=0)
    return evaluate(model, test)


def stdout_lines(done):
    return [line.strip() for line in done.stdout.splitlines()]


def test_vit_merges_end_to_end_and_reloads_with_the_reported_accuracy(vit_folders, mnist_folder, tmp_path):
    from transformers import ViTForImageClassification

    a, b = vit_folders
    out = tmp_path / "merged-vit"
    done, results = merge_folders(a, b, mnist_folder, out)
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    assert tensor_names(out / "model.safetensors") == tensor_names(a / "model.safetensors")

    model = ViTForImageClassification.from_pretrained(str(out))
    assert type(model) is ViTForImageClassification and model.config.num_channels == 1
    reloaded = reloaded_test_metrics(model, out, mnist_folder)
    assert reloaded.examples == EVAL_SAMPLES
    assert reloaded.accuracy == pytest.approx(results["merged"]["test"]["accuracy"], abs=1e-6)

    assert {"stream", "heads", "head_dims", "mlp"} <= set(results["aligned"])
    assert results["corrected"]["affine"]
    lines = stdout_lines(done)
    assert any(line.startswith("aligned:") for line in lines), done.stdout
    assert any(line.startswith("REPAIR corrected") for line in lines), done.stdout

    card_text = (out / "README.md").read_text()
    assert "attention heads" in card_text and "residual stream" in card_text
    # Local endpoints are named by their folder, never by this machine's absolute path (the
    # reproduce block keeps the command as typed); accuracy barriers are in points.
    body = card_text.split("## Reproduce")[0]
    assert str(vit_folders[0]) not in body and vit_folders[0].name in body
    assert " points |" in body
    assert "repair" in ModelCard.load(out / "README.md").data.tags

    endpoints = {k: v["test"]["accuracy"] for k, v in results["endpoints"].items()}
    mid = min(range(len(results["alphas"])), key=lambda i: abs(results["alphas"][i] - 0.5))
    print(f"ViT: endpoints {endpoints}, aligned {results['curves']['aligned']['test'][mid]['accuracy']}, "
          f"repaired {results['curves']['repaired']['test'][mid]['accuracy']}, "
          f"merged {results['merged']['test']['accuracy']}")


def test_vit_merge_without_correction_is_reported_as_plain_interpolation(vit_folders, mnist_folder, tmp_path):
    a, b = vit_folders
    out = tmp_path / "merged-none"
    done, results = merge_folders(a, b, mnist_folder, out, "--method", "none")
    assert results["method"] == "none"
    assert results["corrected"] and all(v == [] for v in results["corrected"].values()), results["corrected"]
    assert "plain interpolation" in (out / "README.md").read_text()
    assert "repair" not in ModelCard.load(out / "README.md").data.tags
    assert any(line.startswith("REPAIR: nothing corrected") for line in stdout_lines(done)), done.stdout


def grayscale_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10))


@pytest.fixture(scope="module")
def grayscale_resnet_folders(mnist_folder, tmp_path_factory):
    """Two one-channel transformers ResNets with a one-value-mean ``ViTImageProcessor``."""
    return train_grayscale_pair(grayscale_resnet, mnist_folder, tmp_path_factory.mktemp("gray_resnet"), epochs=4,
                                lr=0.05)


def test_grayscale_transformers_resnet_merges_through_the_cli(grayscale_resnet_folders, mnist_folder, tmp_path):
    from transformers import ResNetForImageClassification

    a, b = grayscale_resnet_folders
    out = tmp_path / "merged-resnet"
    done, results = merge_folders(a, b, mnist_folder, out)
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    model = ResNetForImageClassification.from_pretrained(str(out))
    assert type(model) is ResNetForImageClassification and model.config.num_channels == 1
    assert results["merged"]["test"]["accuracy"] > 0.5, done.stdout
    reloaded = reloaded_test_metrics(model, out, mnist_folder)
    assert reloaded.accuracy == pytest.approx(results["merged"]["test"]["accuracy"], abs=1e-6)

    endpoints = {k: v["test"]["accuracy"] for k, v in results["endpoints"].items()}
    mid = min(range(len(results["alphas"])), key=lambda i: abs(results["alphas"][i] - 0.5))
    print(f"ResNet: endpoints {endpoints}, aligned {results['curves']['aligned']['test'][mid]['accuracy']}, "
          f"repaired {results['curves']['repaired']['test'][mid]['accuracy']}, "
          f"merged {results['merged']['test']['accuracy']}")


def test_vit_rotated_merge_says_what_was_rotated_and_refined(vit_folders, mnist_folder, tmp_path):
    """``--rotate --rotation-steps``: the plan printed before the passes, the record, the notes
    and the card say the maps were fitted, then refined on the first calibration examples;
    the saved model reloads with the reported accuracy."""
    from transformers import ViTForImageClassification

    a, b = vit_folders
    out = tmp_path / "rotated-vit"
    done, results = merge_folders(a, b, mnist_folder, out, "--rotate", "--rotation-steps", "3",
                                  "--curve-repair-samples", "300")
    # The endpoints' predictions are computed in the first step and kept for the other three.
    assert "rotations refined (A, B and the REPAIRed midpoint, with its gradient): 1 pass x 3 models over the " \
           "first 300 calibration examples" in done.stderr
    assert "rotations refined (the REPAIRed midpoint, with its gradient; the endpoints' predictions kept): 3 passes " \
           "x 1 model over the first 300 calibration examples" in done.stderr
    assert "statistics (rotated pair, fitted maps: REPAIR's goals while refining): 1 pass x 2 models" in done.stderr
    assert results["plan"]["example_forwards"] == results["plan"]["example_forwards_run"]
    refined = results["rotated"]["refined"]
    assert refined["steps"] == 3 and refined["examples"] == 300 and refined["alpha"] == 0.5
    assert refined["repair_correctors"] == sum(len(sites) for kind, sites in results["corrected"].items()
                                               if kind not in ("batchnorm", "uncorrected")) > 0
    assert refined["distillation_loss"]["refined"] < refined["distillation_loss"]["fitted"]
    assert results["rotated"]["rotated_max_abs_diff"] <= 1e-4
    # The aligned figures are the permutations'; those of the rotated pair that was
    # interpolated are measured on it and said apart (rotations bring B's weights closer).
    rotated = results["rotated"]
    assert rotated["matched_correlation"].keys() == results["aligned"].keys()
    assert rotated["weight_distance"] < results["weight_distance"]["aligned"]
    assert rotated["matched_correlation"]["stream"] > results["aligned"]["stream"]["matched_correlation"]
    card = (out / "README.md").read_text()
    assert "orthogonal maps" in card and "refined by 3 steps of Adam" in card
    assert f"weight distance {rotated['weight_distance']:.3f} (the aligned figures are after the permutations" in card
    model = ViTForImageClassification.from_pretrained(str(out))
    assert reloaded_test_metrics(model, out, mnist_folder).accuracy == pytest.approx(
        results["merged"]["test"]["accuracy"], abs=1e-6)
