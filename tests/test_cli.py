"""``hfrepair merge`` on model and dataset folders: outputs, reloading, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from hfrepair.cli import main
from hfrepair.data import builtin_transform
from hfrepair.io import load_model, save_merged
from hfrepair.models import MLP, ResNet
from hfrepair.pipeline import merge
from hfrepair.spec import PermutationSpec

from .conftest import assert_one_line_error, batches, run_cli

FAST = ["--grid", "3", "--num-samples", "1000", "--eval-samples", "500", "--batch-size", "500",
        "--train-eval-samples", "250"]
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def endpoint_folders(resnet_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("endpoints")
    for name, model in zip("ab", resnet_pair):
        model.save_pretrained(str(root / name))
    return root / "a", root / "b"


RELOAD = """
import json, sys, torch
from hfrepair.io import load_model
from hfrepair.data import image_batches, model_transform
from hfrepair.evaluate import evaluate
folder, dataset, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = load_model(folder)
test = image_batches(dataset, "test", model_transform(folder), limit=limit, batch_size=500, seed=0)
metrics = evaluate(model, test)
print(json.dumps(metrics.to_dict()))
"""


def test_merge_command_writes_a_model_that_reloads_with_the_reported_accuracy(endpoint_folders, mnist_folder, tmp_path):
    a, b = endpoint_folders
    out = tmp_path / "merged"
    done = run_cli("merge", a, b, "--dataset", mnist_folder, "--output", out, *FAST)
    assert done.returncode == 0, done.stderr
    assert "repaired" in done.stdout and "acc barrier" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "barrier_curve.png", "config.json",
                                                     "merge_results.json", "model.safetensors", "variance_ratio.png"]
    results = json.loads((out / "merge_results.json").read_text())
    assert results["calibration_examples"] == 1000 and results["method"] == "repair"
    card = (out / "README.md").read_text()  # the data sizes actually scored, a local folder said to be one
    assert (f"| evaluation data | {results['merged']['test']['examples']} examples of split `test` of `"
            f"{mnist_folder.name}` (a local folder); train loss on the first {results['merged']['train']['examples']}"
            " calibration examples |") in card
    assert "`a` (a local folder) and `b` (a local folder)" in card
    assert load_file(out / "model.safetensors").keys() == load_file(a / "model.safetensors").keys()
    assert type(load_model(out)) is ResNet
    # A fresh process evaluating the saved weights sees exactly the reported accuracy.
    fresh = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(mnist_folder), "500"],
                           capture_output=True, text=True, env=ENV, check=True)
    reloaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert reloaded["accuracy"] == results["merged"]["test"]["accuracy"]
    assert reloaded["loss"] == pytest.approx(results["merged"]["test"]["loss"], rel=1e-6)
    assert results["merged"]["test"]["accuracy"] > results["curves"]["aligned"]["test"][1]["accuracy"]


def test_no_curves_measures_the_endpoints_and_the_saved_model_only_as_its_printed_plan_says(
        endpoint_folders, mnist_folder, tmp_path):
    a, b = endpoint_folders
    out = tmp_path / "merged"
    done = run_cli("merge", a, b, "--dataset", mnist_folder, "--output", out, "--no-curves", *FAST)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "merge_results.json").read_text())
    assert results["curves"] == {} and results["barriers"] == {} and results["merged"]["test"]["accuracy"] > 0.5
    plan = results["plan"]
    # statistics (2 models) and REPAIR (1) over 1,000 calibration examples; endpoints (2) and the saved
    # model (1) over the test and train examples; the aligned midpoint's variance over the train examples
    sizes = plan["sizes"]
    assert plan["example_forwards"] == plan["example_forwards_run"] == 3 * sizes["calibration"] + 3 * (
        sizes["test"] + sizes["train"]) + sizes["train"]
    assert set(results["variance_ratio"]) == {"aligned", "repaired"}
    # Announced before the passes; the total only when the splits' sizes are known up front, which for
    # local parquet files depends on whether datasets has cached their info from an earlier load.
    header = next(line for line in done.stderr.splitlines() if line.startswith("plan: "))
    assert header in (f"plan: {plan['passes']} passes over the data:",
                      f"plan: {plan['passes']} passes over the data, {plan['example_forwards']:,} example-forwards:")
    assert "REPAIR (saved model): 1 pass x 1 model over 1,000 calibration examples" in done.stderr
    assert "no interpolation curves (--no-curves)" in done.stdout
    assert "alpha=0.5, method=repair, matcher=activation, " in done.stdout  # what was merged, curves or not
    assert "barrier_curve.png" not in {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "No interpolation curve was measured" in card and "barrier_curve.png" not in card


def test_a_second_merge_of_the_architecture_reuses_its_spec_and_says_so(endpoint_folders, mnist_folder, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("HFREPAIR_CACHE", str(tmp_path / "cache"))
    a, b = endpoint_folders
    quick = ["--dataset", mnist_folder, "--no-curves", "--num-samples", "250", "--eval-samples", "100",
             "--overwrite"]
    sources, merged = [], []
    for flags in ([], [], ["--no-spec-cache"]):
        done = run_cli("merge", a, b, "--output", tmp_path / "merged", *quick, *flags)
        assert done.returncode == 0, done.stderr
        results = json.loads((tmp_path / "merged" / "merge_results.json").read_text())
        sources.append((results["spec_source"], next(l for l in done.stdout.splitlines() if "permutation spec" in l)))
        merged.append(load_file(tmp_path / "merged" / "model.safetensors"))
    assert [source for source, _ in sources] == ["discovered", "cached", "discovered"]
    assert "discovered from the torch.export graph" in sources[0][1] and "spec cache" in sources[1][1]
    assert len(list((tmp_path / "cache" / "specs").iterdir())) == 1
    assert all(torch.equal(merged[0][key], other[key]) for other in merged[1:] for key in merged[0])


def test_curve_points_are_repaired_on_the_first_calibration_examples_as_plan_and_card_say(
        endpoint_folders, mnist_folder, tmp_path):
    a, b = endpoint_folders
    out = tmp_path / "merged"
    done = run_cli("merge", a, b, "--dataset", mnist_folder, "--output", out, *FAST, "--grid", "5",
                   "--curve-repair-samples", "300")
    assert done.returncode == 0, done.stderr
    plan = json.loads((out / "merge_results.json").read_text())["plan"]
    assert plan["sizes"]["first calibration"] == 300
    assert "REPAIR (repaired curve): 2 passes x 1 model over the first 300 calibration examples" in done.stderr
    # statistics (2 models) and the saved model's REPAIR (1) over 1,000 calibration examples, the 2 other
    # repaired points' REPAIR over 300; endpoints (2), saved model (1), naive and aligned (3 alphas each)
    # and the other repaired points (2) over the 500 test and 250 train examples
    assert plan["example_forwards"] == plan["example_forwards_run"] == 3 * 1000 + 2 * 300 + 11 * (500 + 250)
    card = (out / "README.md").read_text()
    assert ("The points of the repaired curve other than the saved model were REPAIRed on the first 300 "
            "calibration examples.") in card


def test_saved_model_gives_the_in_memory_logits_in_a_fresh_process(resnet_pair, mnist, endpoint_folders, tmp_path):
    train_x, train_y, test_x, _ = mnist(14)
    merged, _ = merge(*resnet_pair, batches(train_x[:1000], train_y[:1000]))
    save_merged(merged, tmp_path / "m", endpoint_folders[0])
    torch.save(test_x[:64], tmp_path / "x.pt")
    script = ("import sys, torch; from hfrepair.io import load_model; m = load_model(sys.argv[1]);"
              "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "m"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, env=ENV)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), merged(test_x[:64]), rtol=0, atol=0)


def expect_error(capsys, argv, message):
    capsys.readouterr()  # drop what the test's own setup printed
    code = main([str(a) for a in argv])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, message)


def test_bad_input_gives_one_line_errors_and_no_output(endpoint_folders, mnist_folder, tmp_path, capsys):
    a, b = endpoint_folders
    out = tmp_path / "out"
    base = ["--dataset", mnist_folder, "--output", out, *FAST]

    other = tmp_path / "wider"
    ResNet(width=2, blocks_per_stage=1, image_size=14).save_pretrained(str(other))
    expect_error(capsys, ["merge", a, other, *base], "config field 'width'")

    mlp = tmp_path / "mlp"
    MLP(depth=2, width=16, image_size=14).save_pretrained(str(mlp))
    expect_error(capsys, ["merge", a, mlp, *base], "different architectures")

    broken = tmp_path / "nan"
    broken.mkdir()
    (broken / "config.json").write_text((b / "config.json").read_text())
    weights = load_file(b / "model.safetensors")
    weights["conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors")
    expect_error(capsys, ["merge", a, broken, *base], "non-finite values in conv.weight")

    for alpha in ("1.5", "0", "1"):  # at 0 or 1 the saved model would be an endpoint, called a merge
        with pytest.raises(SystemExit) as exit_info:
            main(["merge", str(a), str(b), "--alpha", alpha, "--dataset", str(mnist_folder), "--output", str(out)])
        assert exit_info.value.code == 2
        assert "alpha must be strictly between 0 and 1" in capsys.readouterr().err

    too_many = ["merge", a, b, "--dataset", mnist_folder, "--output", out, "--num-samples", "4001"]
    expect_error(capsys, too_many, "asks for more examples than split 'train' of dataset")

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for split in ("train", "test"):
        data = datasets.load_dataset(str(mnist_folder), split=split).remove_columns("label").rename_column("image", "picture")
        data.to_parquet(str(unlabelled / f"{split}.parquet"))
    expect_error(capsys, ["merge", a, b, "--dataset", unlabelled, "--output", out, *FAST], "no label column")
    expect_error(capsys, ["merge", a, b, "--dataset", unlabelled, "--output", out, "--image-column", "img", *FAST],
                 "no image column 'img'")
    expect_error(capsys, ["merge", a, b, *base, "--split", "validation"], "no split 'validation'")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((b / "config.json").read_text())
    torch.save(load_file(b / "model.safetensors"), pickled / "pytorch_model.bin")
    expect_error(capsys, ["merge", a, pickled, *base], "only pickle weights")

    bad_spec = tmp_path / "spec.json"
    bad_spec.write_text("{not json")
    expect_error(capsys, ["merge", a, b, *base, "--spec", bad_spec], "cannot read the permutation spec")
    expect_error(capsys, ["merge", a, b, "--dataset", mnist_folder, "--output", a, "--overwrite", *FAST],
                 "overlaps the input")

    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind

    out.mkdir()
    expect_error(capsys, ["merge", a, b, *base], "already exists")


def copy_folder(source: Path, target: Path, **config) -> Path:
    """A copy of a model folder, its config changed by ``config``."""
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    (target / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()), **config}))
    return target


def write_split_files(folder: Path, columns: dict, features: datasets.Features) -> Path:
    folder.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_broken_inputs_are_one_line_errors_before_any_output(endpoint_folders, mnist_folder, tmp_path, capsys,
                                                            monkeypatch):
    """Folders, files and option values a user can get wrong: one line, status 2, nothing written."""
    a, b = endpoint_folders
    out = tmp_path / "out"
    base = ["--dataset", mnist_folder, "--output", out, *FAST]

    listed = copy_folder(b, tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")
    expect_error(capsys, ["merge", a, listed, *base], "a model config must be a JSON object, not a list")
    cut = copy_folder(b, tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:1000])
    expect_error(capsys, ["merge", a, cut, *base], "cut: cannot load hfrepair-resnet")
    unknown = copy_folder(b, tmp_path / "unknown", normalization="foo")
    expect_error(capsys, ["merge", unknown, unknown, *base], "normalization must be one of")
    pushed = copy_folder(b, tmp_path / "pushed")
    (pushed / "merge_results.json").write_text("{corrupt")
    expect_error(capsys, ["push", pushed, "user/x"], "its merge_results.json cannot be read")
    (pushed / "merge_results.json").write_text("{}")
    (pushed / "model.safetensors").unlink()
    expect_error(capsys, ["push", pushed, "user/x"], "not a whole hfrepair output folder (no weights)")
    named = copy_folder(b, tmp_path / "named", architectures=[5])
    expect_error(capsys, ["merge", named, named, *base], "architectures must be a list of class names")
    for name, config, message in (("mean", {"mean": "abc"}, "mean must be a list of 1 numbers"),
                                  ("size_text", {"image_size": "28"}, "image_size must be a whole number"),
                                  ("size_huge", {"image_size": 100_000}, "image_size must be a whole number")):
        preprocessing = copy_folder(b, tmp_path / name, **config)
        expect_error(capsys, ["spec", preprocessing], "its image preprocessing cannot be set up")
        expect_error(capsys, ["merge", preprocessing, preprocessing, *base], message)
    processor = copy_folder(b, tmp_path / "processor")
    (processor / "preprocessor_config.json").write_text("{garbage")
    expect_error(capsys, ["spec", a, "--output", ""], "--output must name a file")
    expect_error(capsys, ["spec", a, "--output", tmp_path], "--output must name a file for the spec, not a folder")
    config_a = Path(a) / "config.json"
    kept = config_a.read_text()
    expect_error(capsys, ["spec", a, "--output", config_a], "is inside the model folder")  # not over its config
    assert config_a.read_text() == kept
    for argv in (["spec", processor], ["merge", processor, processor, *base]):
        expect_error(capsys, argv, "processor: its image preprocessing cannot be set up from its config")

    spec = PermutationSpec.from_dict(json.loads(run_spec_json(a, tmp_path)))
    group = next(iter(spec.groups.values()))
    for change, message in ((lambda g: g.members.__setitem__(0, ("nope.weight", 0)), "the model has no tensor"),
                            (lambda g: setattr(g, "size", g.size * 2), "do not fit axis"),
                            (lambda g: g.members.__setitem__(0, (g.members[0][0], 7)), "has no axis 7"),
                            (lambda g: setattr(g, "blocks", 0), "blocks must be a positive integer"),
                            (lambda g: setattr(g, "size", "abc"), "size must be a positive integer"),
                            (lambda g: setattr(g, "kind", "foo"), "kind must be one of stream, heads")):
        broken = PermutationSpec.from_dict(spec.to_dict())
        change(broken.groups[group.name])
        broken.save(tmp_path / "broken.json")
        expect_error(capsys, ["merge", a, b, *base, "--spec", tmp_path / "broken.json"], message)
    no_module = spec.to_dict()
    no_module["sites"][0]["module"] = "nowhere"
    (tmp_path / "site.json").write_text(json.dumps(no_module))
    expect_error(capsys, ["merge", a, b, *base, "--spec", tmp_path / "site.json"], "'nowhere': the model has no such")
    # Sites that name another layer's BatchNorm, tensors or group: they passed the permutation
    # check, and their corrections went into the wrong layer (or no BatchNorm was re-estimated).
    first, inner = spec.sites[0], next(site for site in spec.sites if site.group != spec.sites[0].group)
    for index, field, value, message in (
            (0, "batchnorm", "relu", "the model has no BatchNorm 'relu'"),
            (spec.sites.index(inner), "weight", first.weight, f"{first.weight!r} is not a tensor of {inner.module!r}"),
            (0, "group", inner.group, f"its group {inner.group!r} does not permute its weight")):
        wrong = spec.to_dict()
        wrong["sites"][index][field] = value
        (tmp_path / "wrong-site.json").write_text(json.dumps(wrong))
        expect_error(capsys, ["merge", a, b, *base, "--spec", tmp_path / "wrong-site.json"], message)

    parquet = Path(mnist_folder) / "train.parquet"
    expect_error(capsys, ["merge", a, b, "--dataset", parquet, "--output", out, *FAST], "takes a dataset folder")
    expect_error(capsys, ["merge", a, b, *base, "--image-column", "label"],
                 "column 'label' cannot be both the images and the labels")
    labels = datasets.ClassLabel(names=[str(d) for d in range(10)])
    garbage = write_split_files(tmp_path / "garbage", {"image": [{"bytes": b"not a png", "path": None}] * 8,
                                                       "label": [1] * 8},
                                datasets.Features({"image": datasets.Image(), "label": labels}))
    expect_error(capsys, ["merge", a, b, "--dataset", garbage, "--output", out, *FAST], "first row cannot be read")
    first = datasets.load_dataset(str(mnist_folder), split="test[:8]")
    twelve = write_split_files(tmp_path / "twelve", {"image": first["image"], "label": [11] * 8},
                               datasets.Features({"image": datasets.Image(),
                                                  "label": datasets.ClassLabel(names=[str(d) for d in range(12)])}))
    # Found before any pass, not when the first label 11 is scored after the calibration passes.
    expect_error(capsys, ["merge", a, b, "--dataset", twelve, "--output", out, *FAST],
                 "label column 'label' has 12 classes, more than the model's 10")
    nulls = write_split_files(tmp_path / "nulls", {"image": first["image"], "label": [1] * 7 + [None]},
                              datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    expect_error(capsys, ["merge", a, b, "--dataset", nulls, "--output", out, "--num-samples", "8", "--grid", "3"],
                 "are not images with class labels")

    (tmp_path / "file").write_text("")
    expect_error(capsys, ["merge", a, b, "--dataset", mnist_folder, "--output", tmp_path / "file" / "sub", *FAST],
                 "does not take new folders")
    monkeypatch.chdir(tmp_path)
    expect_error(capsys, ["merge", a, b, "--dataset", mnist_folder, "--output", ".", "--overwrite", *FAST],
                 "holds the current folder")
    expect_error(capsys, ["merge", a, b, *base, "--push-to-hub", "bad id!!"], "not a valid Hub repo id")
    config = tmp_path / "merge.yaml"
    config.write_text("alpha: null\n")
    expect_error(capsys, ["merge", a, b, *base, "--config", config], "alpha cannot be null")
    config.write_text("weights: [nan, 0.5, 0.5]\n")
    expect_error(capsys, ["merge", a, b, *base, "--config", config], "weights must be finite numbers")
    config.write_bytes(b"\xff\xfe\x00alpha: 0.5\x80")  # not UTF-8
    expect_error(capsys, ["merge", a, b, *base, "--config", config], "cannot read the merge config")
    for flags, message in ((["--seed", "-1"], "must be 0 or more"),
                           (["--weights", "nan,0.5,0.5"], "weights must be finite numbers")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(arg) for arg in ["merge", a, b, *base, *flags]])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith((".out", ".file", ".sub"))]


@pytest.mark.parametrize("ending, status, message", [(signal.SIGINT, 130, "interrupted"),
                                                     (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_during_a_merge_is_one_line_and_leaves_no_folder(endpoint_folders, mnist_folder, tmp_path,
                                                                           ending, status, message):
    """Ctrl-C (SIGINT), or SIGTERM (``kill``, a scheduler's time limit), once the passes have
    begun and prepared batches are spilled to the temporary folder: one line, the shell's
    status for it, no traceback, no output, staging or spill folder (before, SIGTERM ended
    the process where it stood and left the staging and spill folders)."""
    a, b = endpoint_folders
    spill = tmp_path / "tmp"
    spill.mkdir()
    output = tmp_path / "out"
    output.mkdir()
    merge = subprocess.Popen([sys.executable, "-m", "hfrepair.cli", "merge", a, b, "--dataset", mnist_folder,
                              "--output", output / "merged", "--cache-memory", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**ENV, "TMPDIR": str(spill)})
    deadline = time.monotonic() + 300
    while not any(spill.glob("hfrepair-batches-*/*.pt")) and merge.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(spill.glob("hfrepair-batches-*/*.pt")), merge.communicate()[1][-3000:]
    merge.send_signal(ending)
    out, err = merge.communicate(timeout=300)
    assert merge.returncode == status, out + err
    assert_one_line_error(err, message)
    assert list(output.iterdir()) == [] and list(spill.iterdir()) == []


def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path):
    """SIGINT while torch and transformers are still importing (the first seconds of every
    command): the same one line and status as during a merge, not a KeyboardInterrupt
    traceback from inside an import."""
    for delay in (0.3, 1.0):
        command = subprocess.Popen([sys.executable, "-m", "hfrepair", "demo", "--output", tmp_path / "merged"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        time.sleep(delay)
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=120)
        assert command.returncode == 130, out + err
        assert_one_line_error(out + err, "interrupted")
        assert list(tmp_path.iterdir()) == []


def test_a_library_import_keeps_python_s_own_ctrl_c():
    """Importing hfrepair from a user's script leaves SIGINT to Python (a KeyboardInterrupt)."""
    check = "import signal, hfrepair; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    subprocess.run([sys.executable, "-c", check], check=True, env=ENV)


def test_an_output_that_appears_during_a_merge_is_kept_without_overwrite(tmp_path):
    """Another merge into OUT, or a user's folder made there while this one ran, is not
    deleted unless --overwrite; the folder written has the modes mkdir gives (not 0700)."""
    from hfrepair.io import OutputError, write_atomically

    out = tmp_path / "out"

    def appears_meanwhile(folder):
        (folder / "config.json").write_text("{}")
        out.mkdir()
        (out / "precious.txt").write_text("kept")

    with pytest.raises(OutputError, match="appeared while this ran; it is kept"):
        write_atomically(out, appears_meanwhile, replace=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "precious.txt").read_text() == "kept"
    mask = os.umask(0o022)
    try:
        write_atomically(tmp_path / "fresh", lambda folder: (folder / "config.json").write_text("{}"))
    finally:
        os.umask(mask)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o755


def test_an_output_that_cannot_be_written_leaves_nothing(tmp_path):
    """A full disk while OUT is written: one error naming OUT and the reason, no staging folder."""
    from safetensors import SafetensorError

    from hfrepair.cli import OutputError, write_atomically

    def fills_the_disk(error):
        def write(folder):
            (folder / "config.json").write_text("{}")
            raise error
        return write

    for error in (OSError(28, "No space left on device"),
                  SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        with pytest.raises(OutputError, match=r"cannot write .*merged: .*No space left on device"):
            write_atomically(tmp_path / "merged", fills_the_disk(error))
        assert list(tmp_path.iterdir()) == []


def run_spec_json(model: Path, tmp_path: Path) -> str:
    """The spec ``hfrepair spec`` discovers for ``model``, as the JSON it writes."""
    assert main(["spec", str(model), "--output", str(tmp_path / "spec.json")]) == 0
    return (tmp_path / "spec.json").read_text()


def test_builtin_transform_matches_training_preprocessing(mnist_folder, mnist):
    data = datasets.load_dataset(str(mnist_folder), split="test")
    config = {"image_size": 14, "in_channels": 1, "mean": [0.1307], "std": [0.3081]}
    torch.testing.assert_close(builtin_transform(config)(data["image"][:5]), mnist(14)[2][:5])


def test_spec_command_shows_and_saves_the_spec_that_merge_takes(endpoint_folders, mnist_folder, tmp_path):
    """``hfrepair spec``: what discovery found, checked, as the JSON ``--spec`` takes; a merge
    with that file equals the merge that discovers it."""
    a, b = endpoint_folders
    done = run_cli("spec", a, "--output", tmp_path / "spec.json")
    assert done.returncode == 0, done.stderr
    assert "permutation groups" in done.stdout and "leaves the outputs unchanged" in done.stdout
    assert "[stream]" in done.stdout and "REPAIR would correct" in done.stdout
    spec = PermutationSpec.load(tmp_path / "spec.json")
    assert any(g.kind == "stream" for g in spec.groups.values())
    # A spec file may hold hand edits: replaced only when asked.
    again = run_cli("spec", a, "--output", tmp_path / "spec.json")
    assert again.returncode == 2 and PermutationSpec.load(tmp_path / "spec.json") == spec
    assert_one_line_error(again.stderr, "spec.json exists; pass --overwrite to replace it")
    assert run_cli("spec", a, "--output", tmp_path / "spec.json", "--overwrite").returncode == 0
    merged = {}
    for name, extra in (("discovered", []), ("given", ["--spec", tmp_path / "spec.json"])):
        done = run_cli("merge", a, b, "--dataset", mnist_folder, "--output", tmp_path / name, *FAST, *extra)
        assert done.returncode == 0, done.stderr
        merged[name] = load_file(tmp_path / name / "model.safetensors")
    assert merged["given"].keys() == merged["discovered"].keys()
    assert all(torch.equal(merged["given"][k], merged["discovered"][k]) for k in merged["given"])
    missing = run_cli("spec", tmp_path / "nowhere")
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, "is neither a local model folder nor a Hub repo id")


def test_config_file_repeats_a_merge_and_flags_override_it(endpoint_folders, mnist_folder, tmp_path, capsys):
    """``--config``: every option from YAML; the record and the card carry the effective config,
    which repeats the merge exactly; bad keys and types are one-line errors."""
    import yaml

    a, b = endpoint_folders
    flags = run_cli("merge", a, b, "--dataset", mnist_folder, "--output", tmp_path / "flags", *FAST)
    assert flags.returncode == 0, flags.stderr
    config = {"model_a": str(a), "model_b": str(b), "dataset": str(mnist_folder), "output": str(tmp_path / "cfg"),
              "grid": 3, "num_samples": 1000, "eval_samples": 500, "batch_size": 500, "alpha": 0.3}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    done = run_cli("merge", "--config", tmp_path / "merge.yaml", "--alpha", "0.5")  # the flag wins
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "cfg" / "merge_results.json").read_text())
    assert record["alpha"] == 0.5 and record["config"]["alpha"] == 0.5 and record["config"]["grid"] == 3
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("flags", "cfg")}
    assert all(torch.equal(weights["flags"][k], weights["cfg"][k]) for k in weights["flags"])
    card = (tmp_path / "cfg" / "README.md").read_text()
    assert "hfrepair merge --config merge.yaml" in card and "num_samples: 1000" in card
    assert f"| permutation spec | {len(record['groups'])} groups, " in card  # and where the spec came from:
    assert ("discovered from the torch.export graph" in card) == (record["spec_source"] == "discovered")
    # The recorded config repeats the merge (into another folder).
    again = {**record["config"], "output": str(tmp_path / "again")}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(again))
    assert run_cli("merge", "--config", tmp_path / "again.yaml").returncode == 0
    repeated = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(repeated[k], weights["cfg"][k]) for k in repeated)
    # Models named on the command line replace the config's (not one of them, the rest kept).
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(b), "--config", str(tmp_path / "merge.yaml")])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "the following arguments are required: MODEL_B")
    for bad, message in (({"gird": 3}, "unknown option 'gird'"), ({"grid": "many"}, "grid: invalid literal"),
                         ({"method": "magic"}, "method must be one of"), ({"overwrite": "yes"}, "true or false"),
                         ({"split": ["train"]}, "split must be a single value, not a list")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "output": str(tmp_path / "bad"), **bad}))
        expect_error(capsys, ["merge", "--config", tmp_path / "bad.yaml"], message)
        assert not (tmp_path / "bad").exists()
    expect_error(capsys, ["merge", "--config", ""], "--config needs the path of a YAML file")  # not ignored
    with pytest.raises(SystemExit) as missing:
        main(["merge", str(a), str(b), "--output", str(tmp_path / "nodata")])
    assert missing.value.code == 2 and "--dataset" in capsys.readouterr().err


def test_config_reads_yaml_no_as_the_choice_no(tmp_path):
    """YAML reads an unquoted `no` as false: for an option whose choices include "no" it means "no"."""
    from hfrepair.cli import build_parser, read_merge_config

    (tmp_path / "c.yaml").write_text("mixed_precision: no\ngrid: 5\n")
    assert read_merge_config(str(tmp_path / "c.yaml"), build_parser().merge_parser) == {
        "mixed_precision": "no", "grid": 5}


def test_merge_and_demo_default_to_the_library_s_five_alphas():
    """One default grid (0, 0.25, 0.5, 0.75, 1) for the merge command, the demo and ``merge()``."""
    import inspect

    from hfrepair.cli import build_parser, parse

    parser = build_parser()
    merge_args = parse(parser, ["merge", "a", "b", "--dataset", "d", "--output", "o"])
    demo_args = parse(parser, ["demo"])
    assert merge_args.grid == demo_args.grid == inspect.signature(merge).parameters["grid"].default == 5
    assert parse(parser, ["merge", "a", "b", "--dataset", "d", "--output", "o", "--grid", "11"]).grid == 11


def test_spec_command_on_a_transformers_model_without_a_processor(tmp_path, capsys):
    """RGB ViT saved without preprocessor_config.json: example images follow its config."""
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                         num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                         num_labels=3)).save_pretrained(str(tmp_path / "vit"))
    assert main(["spec", str(tmp_path / "vit")]) == 0
    assert "[heads]" in capsys.readouterr().out
    assert main(["spec", str(tmp_path / "vit"), "--output", str(tmp_path / "nowhere" / "spec.json")]) == 2
    assert "hfrepair: error: cannot write" in capsys.readouterr().err


def test_unreadable_shard_size_is_refused_before_the_merge(endpoint_folders, mnist_folder, tmp_path, capsys):
    from hfrepair.cli import build_parser, parse

    a, b = endpoint_folders
    out = tmp_path / "out"
    argv = ["merge", str(a), str(b), "--dataset", str(mnist_folder), "--output", str(out), *FAST]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--max-shard-size", "abc"])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "argument --max-shard-size: must be a positive size")
    assert not out.exists() and not list(tmp_path.iterdir())  # refused when read: nothing written, no staging
    config = tmp_path / "merge.yaml"
    config.write_text("max_shard_size: abc\n")
    expect_error(capsys, [*argv, "--config", config], "max_shard_size: must be a positive size")
    assert not out.exists()
    parser = build_parser()
    sizes = {text: parse(parser, [*argv, "--max-shard-size", text]).max_shard_size
             for text in ("5GB", "1.5GB", "500MB", "40000")}
    assert sizes == {"5GB": "5GB", "1.5GB": "1.5GB", "500MB": "500MB", "40000": 40000}


@pytest.mark.parametrize("kind, dtype", [("builtin", "float16"), ("builtin", "bfloat16"),
                                         ("transformers", "float16")])
def test_half_precision_endpoints_merge_and_are_saved_in_their_dtype(kind, dtype, endpoint_folders,
                                                                     hf_resnet_folders, mnist_folder, tmp_path):
    """Half-precision endpoints (transformers 5 loads Hub repos in their saved dtype): the spec
    check uses the dtype's tolerance, interpolation and folding round once, and the merge is
    saved, and reloads, in the endpoints' dtype with the accuracy it reported."""
    import copy

    from hfrepair.data import image_batches, model_transform
    from hfrepair.evaluate import evaluate

    half = getattr(torch, dtype)
    sources = endpoint_folders if kind == "builtin" else hf_resnet_folders
    folders = []
    for name, source in zip("ab", sources):
        model = copy.deepcopy(load_model(source)).to(half)
        model.save_pretrained(str(tmp_path / name))
        processor = source / "preprocessor_config.json"
        if processor.is_file():
            (tmp_path / name / processor.name).write_bytes(processor.read_bytes())
        folders.append(tmp_path / name)
    out = tmp_path / "merged"
    # the last flags win: a lighter merge (bfloat16 convolutions are slow on CPU)
    done = run_cli("merge", *folders, "--dataset", mnist_folder, "--output", out, *FAST, "--num-samples", "500",
                   "--eval-samples", "300", "--train-eval-samples", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "merge_results.json").read_text())
    assert results["dtype"] == dtype
    saved = load_file(out / "model.safetensors")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {half}
    reloaded = load_model(out)
    assert {p.dtype for p in reloaded.parameters()} == {half}
    test = image_batches(str(mnist_folder), "test", model_transform(out), limit=300, batch_size=500, seed=0)
    assert evaluate(reloaded, test).accuracy == results["merged"]["test"]["accuracy"]
    assert results["merged"]["test"]["accuracy"] > results["curves"]["aligned"]["test"][1]["accuracy"]


def test_weight_matching_aligns_without_matching_data_and_says_so(endpoint_folders, mnist_folder, tmp_path):
    a, b = endpoint_folders
    out = tmp_path / "weight-matched"
    done = run_cli("merge", a, b, "--dataset", mnist_folder, "--output", out, "--matcher", "weight", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "matcher=weight" in done.stdout and "after weight matching" in done.stdout
    record = json.loads((out / "merge_results.json").read_text())
    assert record["matcher"] == "weight"
    distance = record["weight_distance"]
    accuracy = {label: curve["test"][1]["accuracy"] for label, curve in record["curves"].items()}
    # Measured (one run, this BatchNorm pair): weight distance 1.157 -> 1.057; midpoint naive
    # 10.6%, weight-matched 9.0%, + REPAIR 27.4% (activation matching reaches far more on BN
    # networks: docs/results.md#matchers).
    assert distance["aligned"] < distance["unaligned"] - 0.05
    assert accuracy["repaired"] > accuracy["naive"] + 0.1
    assert "weight matching" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def three_mlp_folders(mnist, tmp_path_factory):
    from hfrepair.training import train_classifier

    train_x, train_y = mnist(28)[:2]
    root = tmp_path_factory.mktemp("three")
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = train_classifier(MLP(depth=2, width=128), train_x, train_y, seed=seed, epochs=5, lr=0.05)
        model.save_pretrained(str(root / f"mlp-{seed}"))
    return [root / f"mlp-{seed}" for seed in (1, 2, 3)]


def test_three_models_merge_into_one_through_the_cli(three_mlp_folders, mnist_folder, tmp_path):
    out = tmp_path / "merged-three"
    done = run_cli("merge", *three_mlp_folders, "--dataset", mnist_folder, "--output", out,
                   "--num-samples", "2000", "--weights", "0.4,0.3,0.3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merged 3 models (weights 0.400/0.300/0.300)" in done.stdout
    record = json.loads((out / "merge_results.json").read_text())
    assert record["models"] == 3 and record["weights"] == [0.4, 0.3, 0.3]
    assert [Path(s["reference"]).name for s in record["sources"]["models"]] == ["mlp-1", "mlp-2", "mlp-3"]
    # Measured (one run, weights 0.4 / 0.3 / 0.3): endpoints 91.7 / 92.1 / 92.6%, plain average 45.6%,
    # aligned 88.0%, REPAIR 87.8% after 4 rounds of re-aligning each to the others (uniform weights
    # in tests/test_many.py: 45.3% / 89.5% / 88.3%).
    assert record["merged"]["accuracy"] > record["naive"]["accuracy"] + 0.35
    assert record["settled"] and f"({record['rounds']} rounds)" in (out / "README.md").read_text()
    card = (out / "README.md").read_text()
    eval_results = ModelCard.load(out / "README.md").data.eval_results
    assert {r.metric_type: r.metric_value for r in eval_results}["accuracy"] == pytest.approx(
        record["merged"]["accuracy"])
    assert all(name in card for name in ("mlp-1", "mlp-2", "mlp-3")) and "Merge of 3 models" in card
    # A local dataset is never named as a Hub dataset, and the examples scored are counted.
    assert {(r.dataset_type, r.dataset_name) for r in eval_results} == {("local-folder", "mnist (local folder)")}
    assert f"on {record['merged']['examples']} examples of split `test`" in card
    assert f"corr: mean over the 3 pairs of models" in card and "corr " in done.stdout
    assert [p["models"] for p in record["pairwise"]] == [[0, 1], [0, 2], [1, 2]]
    assert all(p["repaired"]["accuracy"] > record["naive"]["accuracy"] for p in record["pairwise"])
    assert "midpoint of mlp-1 and mlp-2" in card and "midpoint mlp-1 + mlp-2" in done.stdout
    # What was aligned (by kind and size) and what stayed fixed, as a two-model merge says it.
    assert record["aligned_groups"]["mlp"]["groups"] == 2 and "aligned: mlp 2 x" in done.stdout
    assert "permutation spec: " in done.stdout and "permutation groups, the spec " in (out / "README.md").read_text()
    assert sum(record["fixed"].values()) > 0 and "fixed: " in done.stdout and "stayed fixed" in card
    # A REPAIR that left the saved model worse than the aligned average is said, as for two models.
    hurt = [note for note in record["notes"] if note.startswith("REPAIR made the merge worse: loss ")]
    assert bool(hurt) == (record["merged"]["loss"] > record["aligned"]["loss"])
    assert all(note in card and note in done.stdout for note in hurt)
    fresh = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(mnist_folder), "1000"],
                           capture_output=True, text=True, env=ENV, check=True)
    assert json.loads(fresh.stdout.strip().splitlines()[-1])["accuracy"] == record["merged"]["accuracy"]


def test_max_rounds_zero_aligns_each_model_to_the_first(three_mlp_folders, mnist_folder, tmp_path):
    out = tmp_path / "first-only"
    done = run_cli("merge", *three_mlp_folders, "--dataset", mnist_folder, "--output", out, "--num-samples", "1000",
                   "--max-rounds", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "merge_results.json").read_text())
    assert record["rounds"] == 0 and record["settled"]
    card = (out / "README.md").read_text()
    assert "each model matched to the first;" in card and "re-aligned" not in card


def test_flags_that_do_not_fit_the_models_are_one_line_errors(three_mlp_folders, endpoint_folders, mnist_folder, tmp_path):
    out = tmp_path / "never"
    (tmp_path / "two.yaml").write_text("alpha: 0.2\nno_curves: true\n")  # from a config too, not only flags
    for models, flags, message in (
            (three_mlp_folders, ["--weights", "0.5,0.5"], "weights must be 3 positive numbers"),
            (three_mlp_folders, ["--weights", "-0.2,0.6,0.6"], "weights must be 3 positive numbers"),
            (three_mlp_folders, ["--weights", "1,0,0"], "model 2 has weight 0: leave it out of the merge"),
            (three_mlp_folders, ["--alph", "0.3"], "unrecognized arguments: --alph"),  # no prefixes: not checked
            (three_mlp_folders, ["--config", tmp_path / "two.yaml"], "--alpha is for two models"),
            (endpoint_folders, ["--weights", "0.5,0.5"], "--weights is for 3 or more models"),
            (three_mlp_folders, ["--alpha", "0.3"], "--alpha is for two models"),
            (three_mlp_folders, ["--curve-repair-samples", "300"], "--curve-repair-samples is for two models"),
            (three_mlp_folders, ["--rotate"], "--rotate is for two models"),
            (endpoint_folders, ["--rotate"], "cannot rotate: no norm reads the residual stream of ResNet"),
            (endpoint_folders, ["--rotation-steps", "5"], "--rotation-steps refines the maps of --rotate"),
            (endpoint_folders, ["--rotate", "--rotation-steps", "-1"], "--rotation-steps: must be 0 or more"),
            (three_mlp_folders, ["--rotation-steps", "5"], "--rotation-steps is for two models"),
            (three_mlp_folders, ["--alpha", "0.5"], "--alpha is for two models"),  # its default, said explicitly
            (three_mlp_folders, ["--grid", "11"], "--grid is for two models"),  # N-model merges measure no curves
            (three_mlp_folders, ["--train-eval-samples", "50"], "--train-eval-samples is for two models"),
            (three_mlp_folders, ["--weights", "0.5,0.5", "--dataset", tmp_path / "nowhere"],  # before any loading
             "weights must be 3 positive numbers"),
            (three_mlp_folders, ["--max-rounds", "-1"], "--max-rounds must be 0 or more"),
            (endpoint_folders, ["--max-rounds", "3"], "--max-rounds is for 3 or more models"),
            (three_mlp_folders, ["--method", "reset"], "REPAIR (reset) has nothing to correct in MLP"),
            (endpoint_folders, ["--mixed-precision", "fp16"], "fp16 mixed precision needs a GPU")):
        done = run_cli("merge", *models, "--dataset", mnist_folder, "--output", out, *flags)
        assert done.returncode == 2, flags
        assert_one_line_error(done.stderr, message)
        assert not out.exists()
