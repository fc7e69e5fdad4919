"""``hfrepair merge`` with Hub ids and ``--push-to-hub``, against the Hub emulator over HTTP.

Endpoints (trained in the tests) and the MNIST parquet dataset are uploaded with the real
huggingface_hub client; the merge runs as a subprocess; the pushed repo is pulled back,
loaded with the endpoints' own class, and its accuracy compared with the card's.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import assert_one_line_error
from tests.hub_emulator import HubEmulator
from tests.test_hub_emulator import TOKEN, run_client

FAST = ["--grid", "3", "--num-samples", "1000", "--eval-samples", "500", "--batch-size", "500"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubEmulator(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        yield server
        assert server.unhandled == [], f"clients called endpoints the emulator lacks: {server.unhandled}"


@pytest.fixture(scope="module")
def uploaded(hub, resnet_pair, mnist_folder, tmp_path_factory):
    """user/resnet-a, user/resnet-b (safetensors + license card), user/mnist, user/pickled."""
    root = tmp_path_factory.mktemp("upload")
    for name, model in zip("ab", resnet_pair):
        model.save_pretrained(str(root / name))
        (root / name / "README.md").write_text("---\nlicense: mit\n---\n# endpoint\n")
    run_client(hub, root, f"""
        import torch
        from huggingface_hub import HfApi
        from safetensors.torch import load_file
        api = HfApi()
        for name in "ab":
            api.create_repo(f"user/resnet-{{name}}")
            api.upload_folder(repo_id=f"user/resnet-{{name}}", folder_path=f"{root}/" + name)
        api.create_repo("user/mnist", repo_type="dataset")
        api.upload_folder(repo_id="user/mnist", repo_type="dataset", folder_path="{mnist_folder}")
        api.create_repo("user/pickled")
        api.upload_file(repo_id="user/pickled", path_or_fileobj=f"{root}/a/config.json", path_in_repo="config.json")
        torch.save(load_file(f"{root}/a/model.safetensors"), f"{root}/w.bin")
        api.upload_file(repo_id="user/pickled", path_or_fileobj=f"{root}/w.bin", path_in_repo="pytorch_model.bin")
        result(ok=True)
    """)
    return root


def hub_cli(hub, tmp_path, *args, token=TOKEN):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "hfrepair.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_merge_from_hub_ids_and_push(hub, uploaded, tmp_path):
    out = tmp_path / "merged"
    done = hub_cli(hub, tmp_path, "merge", "user/resnet-a", "user/resnet-b@main", "--dataset", "user/mnist",
                   "--output", out, "--push-to-hub", "user/merged", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pushed to" in done.stdout
    local = sorted(p.name for p in out.iterdir())
    assert local == ["README.md", "barrier_curve.png", "config.json", "merge_results.json", "model.safetensors",
                     "variance_ratio.png"]
    record = json.loads((out / "merge_results.json").read_text())
    assert record["sources"]["model_a"]["repo_id"] == "user/resnet-a"
    assert len(record["sources"]["model_b"]["revision"]) == 40  # the commit actually used
    pulled = run_client(hub, tmp_path, """
        from huggingface_hub import ModelCard, snapshot_download, list_repo_commits
        from hfrepair.io import load_model
        from hfrepair.data import image_batches, model_transform
        from hfrepair.evaluate import evaluate
        folder = snapshot_download("user/merged")
        model = load_model(folder)
        test = image_batches("user/mnist", "test", model_transform(folder), limit=500, batch_size=500, seed=0)
        card = ModelCard.load("user/merged")
        metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
        result(cls=type(model).__name__, accuracy=evaluate(model, test).accuracy, card=metrics,
               base=card.data.base_model, license=card.data.license, tags=card.data.tags,
               files=sorted(os.listdir(folder)), commits=len(list_repo_commits("user/merged")),
               text=card.text)
    """)
    assert pulled["cls"] == "ResNet"
    assert pulled["accuracy"] == pytest.approx(record["merged"]["test"]["accuracy"])
    assert pulled["card"]["accuracy"] == pytest.approx(record["merged"]["test"]["accuracy"], abs=1e-6)
    assert pulled["card"]["accuracy_barrier"] == pytest.approx(
        record["barriers"]["repaired"]["test"]["accuracy"]["max"], abs=1e-6)
    assert pulled["base"] == ["user/resnet-a", "user/resnet-b"]
    assert pulled["license"] == "mit" and {"merge", "hfrepair", "repair"} <= set(pulled["tags"])
    assert "barrier_curve.png" in pulled["files"] and "merge_results.json" in pulled["files"]
    assert pulled["commits"] == 2  # the repo's creation, then ONE commit with everything
    assert "hfrepair merge user/resnet-a" in pulled["text"]


def test_push_command_publishes_an_existing_output(hub, uploaded, tmp_path):
    out = tmp_path / "merged"
    assert hub_cli(hub, tmp_path, "merge", "user/resnet-a", "user/resnet-b", "--dataset", "user/mnist",
                   "--output", out, *FAST).returncode == 0
    done = hub_cli(hub, tmp_path, "push", out, "user/pushed", "--private", "--revision", "v1")
    assert done.returncode == 0, done.stderr[-2000:]
    seen = run_client(hub, tmp_path, """
        from huggingface_hub import HfApi
        info = HfApi().model_info("user/pushed", revision="v1")
        result(private=info.private, files=sorted(s.rfilename for s in info.siblings))
    """)
    assert seen["private"] and "model.safetensors" in seen["files"]


@pytest.mark.parametrize("args, message", [
    (["user/missing", "user/resnet-b"], "model repo 'user/missing' not found"),
    (["user/resnet-a@nope", "user/resnet-b"], "revision not found"),
    (["user/pickled", "user/resnet-b"], "only pickle weights"),
])
def test_hub_errors_are_one_line(hub, uploaded, tmp_path, args, message):
    out = tmp_path / "never"
    done = hub_cli(hub, tmp_path, "merge", *args, "--dataset", "user/mnist", "--output", out, *FAST)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, message)
    assert not out.exists()


def test_unreachable_hub_names_the_endpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"),
               TQDM_DISABLE="1", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    done = subprocess.run([sys.executable, "-m", "hfrepair.cli", "merge", "user/a", "user/b", "--dataset", "x",
                           "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "cannot reach the Hub at http://127.0.0.1:9" in done.stderr
