"""``hfrepair demo``: the shipped endpoint pair merged on a fresh cache, and ``--retrain``."""

import hashlib
import json

import pytest
from safetensors.torch import load_file

from hfrepair import demo
from hfrepair.cli import main
from hfrepair.data import image_batches, model_transform
from hfrepair.evaluate import evaluate
from hfrepair.io import load_model

from .conftest import assert_one_line_error

QUICK = ["--num-samples", "500", "--eval-samples", "300", "--grid", "3", "--batch-size", "250"]


def midpoint_accuracy(record: dict, label: str) -> float:
    curve = record["curves"][label]["test"]
    return curve[len(curve) // 2]["accuracy"]


def test_demo_merges_the_shipped_pair_on_a_fresh_cache(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out" / "demo"
    assert main(["demo", "--cache", str(cache), "--output", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert f"the pair shipped in {demo.SHIPPED_ENDPOINTS}" in printed and "repaired" in printed
    assert {"config.json", "model.safetensors", "merge_results.json", "README.md"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "merge_results.json").read_text())
    assert record["sources"]["model_a"]["reference"] == str(demo.SHIPPED_ENDPOINTS / "resnet-a")
    assert record["sources"]["model_b"]["reference"] == str(demo.SHIPPED_ENDPOINTS / "resnet-b")
    assert record["calibration_examples"] == 500 and record["alphas"] == [0.0, 0.5, 1.0]
    assert record["config"]["num_samples"] == 500 and record["config"]["model_a"] == record["sources"]["model_a"][
        "reference"]  # what --config takes to repeat the demo's merge
    # Nothing was trained: the cache holds the dataset only.
    assert sorted(p.name for p in cache.iterdir()) == ["mnist"]
    assert midpoint_accuracy(record, "repaired") > midpoint_accuracy(record, "aligned") + 0.2
    assert record["merged"]["test"]["accuracy"] > midpoint_accuracy(record, "aligned") + 0.2  # the saved model
    assert load_file(out / "model.safetensors").keys() == load_file(
        demo.SHIPPED_ENDPOINTS / "resnet-a" / "model.safetensors").keys()


def test_shipped_endpoints_are_the_recorded_trained_models(mnist_folder):
    made = demo.shipped_provenance()
    assert made["training"] == demo.DEMO_TRAINING and made["architecture"] == demo.DEMO_ENDPOINT
    assert made["seeds"] == {"resnet-a": 1, "resnet-b": 2}
    for name, _ in demo.ENDPOINT_SEEDS:
        folder = demo.SHIPPED_ENDPOINTS / name
        assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == made["sha256"][name]
        config = json.loads((folder / "config.json").read_text())
        assert {key: config[key] for key in demo.DEMO_ENDPOINT} == demo.DEMO_ENDPOINT
        model = load_model(folder)
        test = image_batches(str(mnist_folder), "test", model_transform(folder), batch_size=500)
        accuracy = evaluate(model, test).accuracy
        assert accuracy > 0.97
        assert accuracy == pytest.approx(made["test_accuracy"][name], abs=0.002)
    readme = (demo.SHIPPED_ENDPOINTS / "README.md").read_text()
    assert made["command"] in readme and made["torch"] in readme and made["date"] in readme


def test_retrain_trains_a_fresh_pair_into_the_cache_and_merges_it(tmp_path, monkeypatch, capsys):
    # The real settings train for minutes; a one-channel-wide ResNet on 14x14 digits, one
    # epoch, goes through the same code in seconds.
    monkeypatch.setattr(demo, "DEMO_ENDPOINT", dict(width=1, blocks_per_stage=1, normalization="batchnorm",
                                                    image_size=14))
    monkeypatch.setattr(demo, "DEMO_TRAINING", dict(epochs=1, lr=0.1, batch_size=128))
    shipped = {p: p.read_bytes() for p in demo.SHIPPED_ENDPOINTS.rglob("*") if p.is_file()}
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert main(["demo", "--retrain", "--cache", str(cache), "--output", str(out), *QUICK]) == 0
    assert "training resnet-a and resnet-b" in capsys.readouterr().out
    record = json.loads((out / "merge_results.json").read_text())
    for name, key in (("resnet-a", "model_a"), ("resnet-b", "model_b")):
        assert record["sources"][key]["reference"] == str(cache / name)
        assert json.loads((cache / name / "config.json").read_text())["image_size"] == 14
    weights_a, weights_b = (load_file(cache / name / "model.safetensors") for name in ("resnet-a", "resnet-b"))
    assert not (weights_a["conv.weight"] == weights_b["conv.weight"]).all()  # seeds 1 and 2
    assert {p: p.read_bytes() for p in demo.SHIPPED_ENDPOINTS.rglob("*") if p.is_file()} == shipped
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_demo_refuses_bad_input_before_training_or_writing_data(tmp_path, monkeypatch, capsys):
    """An existing OUT is refused before a pair is trained; a write of the data that fails
    midway (a full disk) leaves no file a later run would take for the dataset; a corrupt
    cached dataset is one line under --retrain too."""
    import datasets

    def never(*_args, **_kwargs):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr(demo, "train_demo_endpoints", never)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["demo", "--retrain", "--cache", str(tmp_path / "cache"), "--output", str(out), *QUICK]) == 2
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "cache").exists()

    written = datasets.Dataset.to_parquet

    def fills_the_disk(self, path, *args, **kwargs):
        if path.endswith("test.parquet"):
            raise OSError(28, "No space left on device")
        return written(self, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "to_parquet", fills_the_disk)
        assert main(["demo", "--cache", str(tmp_path / "full"), "--output", str(tmp_path / "o1"), *QUICK]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list((tmp_path / "full").iterdir()) == []  # neither split, nor a staging folder

    corrupt = tmp_path / "corrupt" / "mnist"
    demo.write_mnist_dataset(corrupt)
    (corrupt / "train.parquet").write_bytes(b"garbage")
    monkeypatch.undo()
    assert main(["demo", "--retrain", "--cache", str(corrupt.parent), "--output", str(tmp_path / "o2"), *QUICK]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot read the demo's data in")
    assert not (tmp_path / "o2").exists()
