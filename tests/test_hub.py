"""``hfrepair merge`` with Hub ids and ``--push-to-hub``, against the Hub emulator over HTTP.

Endpoints (trained in the tests) and the MNIST parquet dataset are uploaded with the real
huggingface_hub client; the merge runs as a subprocess; the pushed repo is pulled back,
loaded with the endpoints' own class, and its accuracy compared with the card's.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import assert_one_line_error
from tests.hub_emulator import HubEmulator
from tests.test_hub_emulator import TOKEN, run_client

FAST = ["--grid", "3", "--num-samples", "1000", "--eval-samples", "500", "--batch-size", "500",
        "--train-eval-samples", "250"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubEmulator(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        yield server
        assert server.unhandled == [], f"clients called endpoints the emulator lacks: {server.unhandled}"


@pytest.fixture(scope="module")
def uploaded(hub, resnet_pair, hf_resnet_folders, mnist_folder, tmp_path_factory):
    """What the tests merge from, uploaded with the real client.

    user/resnet-a (private), user/resnet-b (license cards), user/resnet-b-sharded (B's weights
    in shards with an index), user/hf-a and user/hf-b (transformers ResNets with their image
    processors), user/mnist (parquet dataset), user/pickled (pickle weights only) and
    user/remote-code (a config that asks for code shipped in the repo).
    """
    root = tmp_path_factory.mktemp("upload")
    for name, model in zip("ab", resnet_pair):
        model.save_pretrained(str(root / name))
        (root / name / "README.md").write_text("---\nlicense: mit\n---\n# endpoint\n")
    hf_a, hf_b = hf_resnet_folders
    run_client(hub, root, f"""
        import json, shutil, torch
        from huggingface_hub import HfApi, save_torch_state_dict
        from safetensors.torch import load_file
        api = HfApi()
        for name in "ab":
            api.create_repo(f"user/resnet-{{name}}", private=name == "a")
            api.upload_folder(repo_id=f"user/resnet-{{name}}", folder_path=f"{root}/" + name)
        for name, folder in (("hf-a", "{hf_a}"), ("hf-b", "{hf_b}")):
            api.create_repo(f"user/{{name}}")
            api.upload_folder(repo_id=f"user/{{name}}", folder_path=folder)
        os.makedirs("{root}/sharded")
        shutil.copy("{root}/b/config.json", "{root}/sharded/config.json")
        save_torch_state_dict(load_file("{root}/b/model.safetensors"), "{root}/sharded", max_shard_size="40KB")
        api.create_repo("user/resnet-b-sharded")
        api.upload_folder(repo_id="user/resnet-b-sharded", folder_path="{root}/sharded")
        api.create_repo("user/mnist", repo_type="dataset")
        api.upload_folder(repo_id="user/mnist", repo_type="dataset", folder_path="{mnist_folder}")
        api.create_repo("user/pickled")
        api.upload_file(repo_id="user/pickled", path_or_fileobj=f"{root}/a/config.json", path_in_repo="config.json")
        torch.save(load_file(f"{root}/a/model.safetensors"), f"{root}/w.bin")
        api.upload_file(repo_id="user/pickled", path_or_fileobj=f"{root}/w.bin", path_in_repo="pytorch_model.bin")
        config = json.load(open("{hf_a}/config.json"))
        config["model_type"] = "custom-resnet"  # unknown to transformers: only the repo's code builds it
        config["auto_map"] = {{"AutoConfig": "modeling_custom.CustomConfig",
                               "AutoModelForImageClassification": "modeling_custom.CustomResNet"}}
        os.makedirs("{root}/remote")
        json.dump(config, open("{root}/remote/config.json", "w"))
        shutil.copy("{hf_a}/model.safetensors", "{root}/remote/model.safetensors")
        open("{root}/remote/modeling_custom.py", "w").write("raise SystemExit('remote code ran')\\n")
        api.create_repo("user/remote-code")
        api.upload_folder(repo_id="user/remote-code", folder_path="{root}/remote")
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


@pytest.fixture(scope="module")
def merged_from_hub(hub, uploaded, tmp_path_factory):
    """``hfrepair merge`` of a private and a public Hub repo, streamed data, pushed to user/merged."""
    root = tmp_path_factory.mktemp("merge")
    out = root / "merged"
    done = hub_cli(hub, root, "merge", "user/resnet-a", "user/resnet-b@main", "--dataset", "user/mnist",
                   "--output", out, "--push-to-hub", "user/merged", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, out, done


def pull_and_evaluate(hub, tmp_path, repo: str) -> dict:
    """Pull ``repo`` with the real clients, rebuild it with the endpoints' class, score it."""
    return run_client(hub, tmp_path, f"""
        from huggingface_hub import ModelCard, snapshot_download, list_repo_commits
        from hfrepair.io import load_model
        from hfrepair.data import image_batches, model_transform
        from hfrepair.evaluate import evaluate
        folder = snapshot_download("{repo}")
        model = load_model(folder)
        test = image_batches("user/mnist", "test", model_transform(folder), limit=500, batch_size=500, seed=0)
        card = ModelCard.load("{repo}")
        metrics = {{r.metric_type: r.metric_value for r in card.data.eval_results}}
        datasets = sorted({{(r.dataset_type, r.dataset_revision) for r in card.data.eval_results}})
        result(datasets=datasets, cls=type(model).__name__, accuracy=evaluate(model, test).accuracy, card=metrics,
               base=card.data.base_model, license=card.data.license, tags=card.data.tags,
               relation=card.data.to_dict().get("base_model_relation"),
               files=sorted(os.listdir(folder)), commits=len(list_repo_commits("{repo}")),
               text=card.text, readme=open(os.path.join(folder, "README.md"), "rb").read().hex())
    """)


def test_merge_from_hub_ids_and_push(hub, merged_from_hub, tmp_path):
    root, out, done = merged_from_hub
    assert "pushed to" in done.stdout
    local = sorted(p.name for p in out.iterdir())
    assert local == ["README.md", "barrier_curve.png", "config.json", "merge_results.json", "model.safetensors",
                     "variance_ratio.png"]
    record = json.loads((out / "merge_results.json").read_text())
    assert record["sources"]["model_a"]["repo_id"] == "user/resnet-a"
    assert len(record["sources"]["model_b"]["revision"]) == 40  # the commit actually used
    assert record["sources"]["dataset"]["repo_id"] == "user/mnist"
    assert len(record["sources"]["dataset"]["revision"]) == 40
    assert record["calibration_examples"] == 1000
    # Streamed: the dataset's files never landed in the client's cache.
    cached = [p.name for p in (root / "hf_home").rglob("*") if p.suffix in (".parquet", ".arrow")]
    assert cached == []
    pulled = pull_and_evaluate(hub, tmp_path, "user/merged")
    assert pulled["cls"] == "ResNet"
    assert pulled["accuracy"] == pytest.approx(record["merged"]["test"]["accuracy"])
    assert pulled["card"]["accuracy"] == pytest.approx(record["merged"]["test"]["accuracy"], abs=1e-6)
    assert pulled["card"]["accuracy_barrier"] == pytest.approx(
        record["barriers"]["repaired"]["test"]["accuracy"]["max"], abs=1e-6)
    assert pulled["base"] == ["user/resnet-a", "user/resnet-b"] and pulled["relation"] == "merge"
    assert pulled["license"] == "mit" and {"merge", "hfrepair", "repair"} <= set(pulled["tags"])
    assert "barrier_curve.png" in pulled["files"] and "merge_results.json" in pulled["files"]
    assert pulled["commits"] == 2  # the repo's creation, then ONE commit with everything
    assert "hfrepair merge user/resnet-a" in pulled["text"]
    # The scores are tied to the dataset's commit, in the model-index and the card's tables.
    dataset_commit = record["sources"]["dataset"]["revision"]
    assert pulled["datasets"] == [["user/mnist", dataset_commit]]
    assert f"of split `test` of `user/mnist` @ `{dataset_commit}`" in pulled["text"]
    assert bytes.fromhex(pulled["readme"]) == (out / "README.md").read_bytes()  # the card exactly as pushed


def test_transformers_model_round_trip(hub, uploaded, tmp_path):
    """HF ResNet (its own image processor) from the Hub, merged, pushed, reloaded by transformers."""
    out = tmp_path / "merged"
    done = hub_cli(hub, tmp_path, "merge", "user/hf-a", "user/hf-b", "--dataset", "user/mnist", "--output", out,
                   "--push-to-hub", "user/hf-merged", "--max-shard-size", "40KB", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "merge_results.json").read_text())
    assert len(record["groups"]) == 2 + 2  # two residual streams, two inner convs
    assert (out / "preprocessor_config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert min(record["endpoints"][k]["test"]["accuracy"] for k in "AB") > 0.85
    assert record["merged"]["test"]["accuracy"] > record["curves"]["aligned"]["test"][1]["accuracy"]
    pulled = pull_and_evaluate(hub, tmp_path, "user/hf-merged")
    assert pulled["cls"] == "ResNetForImageClassification"
    assert pulled["accuracy"] == pytest.approx(record["merged"]["test"]["accuracy"])
    assert pulled["card"]["accuracy"] == pytest.approx(record["merged"]["test"]["accuracy"], abs=1e-6)
    assert "preprocessor_config.json" in pulled["files"]
    assert any(name.startswith("model-0000") for name in pulled["files"])


def test_sharded_endpoint_loads_like_the_single_file(hub, uploaded, tmp_path, resnet_pair):
    seen = run_client(hub, tmp_path, """
        from hfrepair.hub import resolve_model
        from hfrepair.io import load_model
        source = resolve_model("user/resnet-b-sharded")
        shards = sorted(p.name for p in source.folder.iterdir())
        state = load_model(source.folder).state_dict()
        result(shards=shards, sums={k: float(v.double().sum()) for k, v in state.items()})
    """)
    assert "model.safetensors.index.json" in seen["shards"] and len(seen["shards"]) > 3
    expected = {k: float(v.double().sum()) for k, v in resnet_pair[1].state_dict().items()}
    assert seen["sums"] == pytest.approx(expected, rel=0, abs=0)


def test_push_command_publishes_an_existing_output(hub, merged_from_hub, tmp_path):
    _, out, _ = merged_from_hub
    done = hub_cli(hub, tmp_path, "push", out, "user/pushed", "--private", "--revision", "v1")
    assert done.returncode == 0, done.stderr[-2000:]
    seen = run_client(hub, tmp_path, """
        from huggingface_hub import HfApi
        info = HfApi().model_info("user/pushed", revision="v1")
        result(private=info.private, files=sorted(s.rfilename for s in info.siblings))
    """)
    assert seen["private"] and "model.safetensors" in seen["files"]
    denied = hub_cli(hub, tmp_path, "push", out, "user/pushed-again", token="hf_wrong")
    assert denied.returncode == 2
    assert_one_line_error(denied.stderr, "access denied")


def test_push_failing_midway_leaves_the_repo_unchanged(hub, merged_from_hub, tmp_path):
    out = tmp_path / "fresh"
    shutil.copytree(merged_from_hub[1], out)
    # New bytes, so the client cannot skip the upload as already stored on the server.
    save_file(load_file(out / "model.safetensors"), out / "model.safetensors", metadata={"format": "pt", "copy": "1"})
    run_client(hub, tmp_path, """
        from huggingface_hub import HfApi
        HfApi().create_repo("user/atomic")
        HfApi().upload_file(repo_id="user/atomic", path_or_fileobj=b"# placeholder card\\n", path_in_repo="README.md")
        result(ok=True)
    """)
    before = hub.load("model", "user/atomic")
    hub.fail_next_lfs_upload = True
    done = hub_cli(hub, tmp_path, "push", out, "user/atomic")
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "push to 'user/atomic'")
    assert hub.load("model", "user/atomic") == before  # no commit, no file changed


PUSH = ["--push-to-hub", "user/never"]
PUBLIC_PAIR = ["user/resnet-b", "user/resnet-b-sharded"]
HUB_ERRORS = [
    (["user/missing", "user/resnet-b", *PUSH], TOKEN, "model repo 'user/missing' not found"),
    (["user/resnet-a@nope", "user/resnet-b", *PUSH], TOKEN, "revision not found"),
    (["user/resnet-a", "user/resnet-b"], None, "model repo 'user/resnet-a' not found on"),
    (["user/resnet-a", "user/resnet-b"], "hf_wrong", "or private and your token cannot read it"),
    (["user/pickled", "user/resnet-b", *PUSH], TOKEN, "only pickle weights"),
    (["user/remote-code", "user/remote-code", *PUSH], TOKEN, "pass --trust-remote-code if you trust it"),
    (["user/resnet-a", "user/hf-b", *PUSH], TOKEN, "different architectures"),
    (["user/resnet-a", "user/resnet-b", "--dataset", "user/no-data", *PUSH], TOKEN,
     "dataset repo 'user/no-data' not found"),
    (["user/resnet-a", "user/resnet-b", "--split", "validation", *PUSH], TOKEN,
     "has no split 'validation' (splits: train, test)"),
    (["user/resnet-a", "user/resnet-b", "--split", "train[:100]", *PUSH], TOKEN,
     "has no split 'train[:100]' (splits: train, test); a stream cannot be sliced: cap it with --num-samples"),
    (["user/resnet-a", "user/resnet-b", "--label-column", "digit", *PUSH], TOKEN, "no label column 'digit'"),
    (["user/resnet-a", "user/resnet-b", "--num-samples", "4001", *PUSH], TOKEN,
     "asks for more examples than split 'train' of dataset 'user/mnist' has (4000)"),
    # A push the token cannot make is refused before anything is downloaded or merged.
    ([*PUBLIC_PAIR, *PUSH], None, "cannot push to 'user/never': no Hub token (run `hf auth login`"),
    ([*PUBLIC_PAIR, *PUSH], "hf_wrong", "cannot push to 'user/never': access denied"),
    ([*PUBLIC_PAIR, *PUSH], "hf_read_token", "cannot push to 'user/never': the token of 'test-user' is read-only"),
]


def test_hub_errors_are_one_line(hub, uploaded, tmp_path):
    """Each bad Hub input is one ``hfrepair: error:`` line and exit status 2, with nothing
    written or pushed. The cases run one after another in one client process (``main`` per
    case, its token set in the environment as ``HF_TOKEN``) so the imports are paid once;
    ``hub_cli`` tests above cover the real process's exit status."""
    out = tmp_path / "never"
    cases = [(["merge", *FAST, *args, *([] if "--dataset" in args else ["--dataset", "user/mnist"]),
               "--output", str(out)], token) for args, token, _ in HUB_ERRORS]
    requests_before = len(hub.requests)
    seen = run_client(hub, tmp_path, f"""
        import contextlib, io
        from hfrepair.cli import main
        seen = []
        for argv, token in {cases!r}:
            os.environ.pop("HF_TOKEN", None)
            if token:
                os.environ["HF_TOKEN"] = token
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as exit_info:
                    code = exit_info.code
            seen.append((code, err.getvalue(), os.path.exists("{out}")))
        result(seen=seen)
    """)
    for (args, token, message), (code, stderr, wrote) in zip(HUB_ERRORS, seen["seen"], strict=True):
        assert code == 2, (args, stderr)
        assert_one_line_error(stderr, message)
        assert not wrote, args
    assert hub.load("model", "user/never") is None
    # Only the refused pushes name the sharded repo: none of its files was asked for.
    assert not [path for _, path, _ in hub.requests[requests_before:] if "resnet-b-sharded" in path]


def test_unreachable_hub_names_the_endpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"),
               TQDM_DISABLE="1", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    done = subprocess.run([sys.executable, "-m", "hfrepair.cli", "merge", "user/a", "user/b", "--dataset", "x",
                           "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "cannot reach the Hub at http://127.0.0.1:9" in done.stderr


def test_a_mistyped_local_folder_is_named_beside_the_hub_error(tmp_path, monkeypatch):
    """``--dataset data/mnsit`` next to a ``data/`` folder reads as a Hub id; offline, the
    error used to be only "cannot reach the Hub", hiding the typo."""
    from huggingface_hub import constants

    from hfrepair.hub import hub_error

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    offline = hub_error(ConnectionError("no route"), "dataset repo 'data/mnsit'", "data/mnsit")
    assert str(offline) == (f"dataset repo 'data/mnsit': cannot reach the Hub at {constants.ENDPOINT} "
                            "(ConnectionError) (and there is no folder 'data/mnsit' here)")
    assert "no folder" not in str(hub_error(ConnectionError(), "dataset repo 'user/mnist'", "user/mnist"))
