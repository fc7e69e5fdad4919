"""The real huggingface_hub / datasets / transformers clients against the local Hub emulator.

`HF_ENDPOINT` is read when those libraries are imported, so every client scenario runs in a
subprocess whose environment points at the emulator started by the test (in this process, so
tests can inspect its state and arm failure hooks). Each scenario prints one `RESULT:` JSON line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

from tests.hub_emulator import HubEmulator, git_blob_sha1

TOKEN = "hf_test_token"


@pytest.fixture
def hub(tmp_path):
    with HubEmulator(tmp_path / "hub", token=TOKEN) as server:
        yield server
        assert server.unhandled == [], f"clients called endpoints the emulator lacks: {server.unhandled}"
        crashes = [r for r in server.requests if r[2] >= 500]
        assert crashes == [], f"emulator errors: {crashes}"


def run_client(hub, tmp_path, code: str, token: str | None = TOKEN, timeout: int = 180) -> dict:
    """Run `code` with the clients pointed at `hub`; return what it printed as `RESULT: {json}`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_")) and k != "HUGGINGFACE_HUB_CACHE"}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if token is not None:
        env["HF_TOKEN"] = token
    script = tmp_path / "client.py"
    prelude = "import json, os, sys\ndef result(**kw):\n    print('RESULT: ' + json.dumps(kw), flush=True)\n"
    script.write_text(prelude + textwrap.dedent(code))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT: ")]
    assert lines, f"no RESULT line:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT: "):])


def raw_request(hub, method, path, body=None, headers=None, token=TOKEN):
    """A bare HTTP call (no client library), for protocol details the clients hide."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(hub.endpoint + path, data=data, method=method, headers=headers or {})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


README = """\
---
license: apache-2.0
library_name: hfrepair
tags:
- model-merging
model-index:
- name: merged-resnet
  results:
  - task:
      type: image-classification
    dataset:
      name: MNIST
      type: mnist
      split: test
    metrics:
    - type: accuracy
      value: 0.9712
      name: Accuracy
---
# Merged ResNet

Produced by hfrepair.
"""


def test_upload_folder_snapshot_and_model_card(hub, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text(README)
    result = run_client(hub, tmp_path, f"""
        import numpy as np
        from safetensors.numpy import save_file
        from huggingface_hub import HfApi, ModelCard, snapshot_download, hf_hub_download
        src = {str(src)!r}
        save_file({{"weight": np.random.default_rng(0).standard_normal(750_000).astype(np.float32)}},
                  os.path.join(src, "model.safetensors"))
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump({{"model_type": "resnet", "architectures": ["ResNetForImageClassification"]}}, f)
        api = HfApi()
        url = api.create_repo("test-user/merged")
        info = api.upload_folder(folder_path=src, repo_id="test-user/merged", commit_message="Add model")
        folder = snapshot_download("test-user/merged")
        same = {{name: open(os.path.join(src, name), "rb").read() == open(os.path.join(folder, name), "rb").read()
                 for name in os.listdir(src)}}
        model = api.model_info("test-user/merged", files_metadata=True)
        siblings = {{s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None] for s in model.siblings}}
        card = ModelCard.load("test-user/merged")
        metrics = [[r.metric_type, r.metric_value, r.dataset_type] for r in card.data.eval_results]
        exists_twice = False
        try:
            api.create_repo("test-user/merged")
        except Exception as err:
            exists_twice = err.response.status_code
        api.create_repo("test-user/merged", exist_ok=True)
        # downloading again from the cache is a no-op; a second upload of the same files is skipped
        again = hf_hub_download("test-user/merged", "config.json")
        commits = [c.title for c in api.list_repo_commits("test-user/merged")]
        result(url=str(url), oid=info.oid, sha=model.sha, same=same, siblings=siblings, metrics=metrics,
               card_license=model.card_data.license, library=model.library_name, config=model.config,
               conflict=exists_twice, commits=commits, again=again)
    """)
    assert result["url"] == f"{hub.endpoint}/test-user/merged"
    assert result["same"] == {"README.md": True, "config.json": True, "model.safetensors": True}
    assert result["oid"] == result["sha"]
    weights = (src / "model.safetensors").read_bytes()
    assert len(weights) > 3_000_000
    assert result["siblings"]["model.safetensors"] == [len(weights), hashlib.sha256(weights).hexdigest()]
    assert result["siblings"]["config.json"][1] is None  # a regular (non-LFS) file
    assert set(result["siblings"]) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    assert result["metrics"] == [["accuracy", 0.9712, "mnist"]]
    assert result["card_license"] == "apache-2.0" and result["library"] == "hfrepair"
    assert result["config"]["model_type"] == "resnet"
    assert result["conflict"] == 409
    assert result["commits"] == ["Add model", "initial commit"]
    # The LFS object is stored once, content-addressed by its sha256.
    assert hub.lfs_size(hashlib.sha256(weights).hexdigest()) == len(weights)


def test_resolve_headers_and_ranges(hub):
    hub.create_repo("model", "test-user/raw")
    lines = [{"key": "header", "value": {"summary": "add"}},
             {"key": "file", "value": {"path": "a/b.txt", "content": base64.b64encode(b"0123456789").decode(),
                                       "encoding": "base64"}}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, answer = raw_request(hub, "POST", "/api/models/test-user/raw/commit/main", body,
                                    {"Content-Type": "application/x-ndjson"})
    assert status == 200
    commit = json.loads(answer)["commitOid"]
    status, headers, data = raw_request(hub, "GET", "/test-user/raw/resolve/main/a/b.txt",
                                        headers={"Range": "bytes=2-5"})
    assert (status, data, headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    assert headers["X-Repo-Commit"] == commit
    assert headers["ETag"] == f'"{git_blob_sha1(b"0123456789")}"'
    assert not any(h.lower().startswith("x-xet") for h in headers)
    status, _, data = raw_request(hub, "GET", "/test-user/raw/resolve/main/a/b.txt", headers={"Range": "bytes=-3"})
    assert (status, data) == (206, b"789")
    status, headers, _ = raw_request(hub, "GET", "/test-user/raw/resolve/main/a/b.txt", headers={"Range": "bytes=20-"})
    assert status == 416 and headers["Content-Range"] == "bytes */10"
    status, headers, _ = raw_request(hub, "HEAD", "/test-user/raw/resolve/main/missing.txt")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    status, headers, _ = raw_request(hub, "GET", "/test-user/raw/resolve/nope/a/b.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = raw_request(hub, "GET", "/test-user/absent/resolve/main/a/b.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    # Tree listing: folders, recursion, and EntryNotFound for a missing folder.
    status, _, data = raw_request(hub, "GET", "/api/models/test-user/raw/tree/main")
    assert [(e["type"], e["path"]) for e in json.loads(data)] == [("directory", "a"), ("file", ".gitattributes")]
    status, _, data = raw_request(hub, "GET", "/api/models/test-user/raw/tree/main/a?recursive=true&expand=true")
    entries = json.loads(data)
    assert [e["path"] for e in entries] == ["a/b.txt"] and entries[0]["lastCommit"]["id"] == commit
    status, headers, _ = raw_request(hub, "GET", "/api/models/test-user/raw/tree/main/zzz")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    # A write with a bad token is refused.
    status, _, _ = raw_request(hub, "POST", "/api/models/test-user/raw/commit/main", body,
                               {"Content-Type": "application/x-ndjson"}, token="hf_wrong")
    assert status == 401


def test_commit_is_atomic_on_the_server(hub):
    """A commit naming one missing LFS object changes nothing, not even its valid regular file."""
    hub.create_repo("model", "test-user/atomic")
    before = hub.load("model", "test-user/atomic")
    lines = [{"key": "header", "value": {"summary": "half"}},
             {"key": "file", "value": {"path": "config.json", "content": base64.b64encode(b"{}").decode(),
                                       "encoding": "base64"}},
             {"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": "ab" * 32,
                                          "size": 12}}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, _ = raw_request(hub, "POST", "/api/models/test-user/atomic/commit/main", body,
                               {"Content-Type": "application/x-ndjson"})
    assert status == 422
    assert hub.load("model", "test-user/atomic") == before
    # parentCommit must match the branch head
    lines[0]["value"]["parentCommit"] = "0" * 40
    status, _, _ = raw_request(hub, "POST", "/api/models/test-user/atomic/commit/main",
                               b"".join(json.dumps(line).encode() + b"\n" for line in lines[:2]),
                               {"Content-Type": "application/x-ndjson"})
    assert status == 412
    assert hub.load("model", "test-user/atomic") == before


def test_failed_lfs_upload_leaves_repo_unchanged(hub, tmp_path):
    hub.create_repo("model", "test-user/atomic")
    before = hub.load("model", "test-user/atomic")
    hub.fail_next_lfs_upload = True
    result = run_client(hub, tmp_path, """
        from huggingface_hub import HfApi, CommitOperationAdd
        api = HfApi()
        ops = [CommitOperationAdd("config.json", b'{"a": 1}'),
               CommitOperationAdd("model.safetensors", os.urandom(200_000))]
        try:
            api.create_commit("test-user/atomic", operations=ops, commit_message="should not land")
            error = None
        except Exception as err:
            error = type(err).__name__
        result(error=error, files=api.list_repo_files("test-user/atomic"))
    """)
    assert result["error"] is not None
    assert result["files"] == [".gitattributes"]
    assert hub.load("model", "test-user/atomic") == before
    assert hub.fail_next_lfs_upload is False  # the hook fired


def test_revisions_and_errors(hub, tmp_path):
    hub.create_repo("model", "test-user/secret", private=True)
    result = run_client(hub, tmp_path, """
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
        api = HfApi()
        repo = "test-user/revs"
        api.create_repo(repo)
        api.upload_file(path_or_fileobj=b"main v1", path_in_repo="notes.txt", repo_id=repo)
        api.create_branch(repo, branch="experiment")
        api.upload_file(path_or_fileobj=b"branch v2", path_in_repo="notes.txt", repo_id=repo, revision="experiment")
        api.create_tag(repo, tag="v1", revision="main")
        on_main = open(hf_hub_download(repo, "notes.txt"), "rb").read().decode()
        on_branch = open(hf_hub_download(repo, "notes.txt", revision="experiment"), "rb").read().decode()
        on_tag = open(hf_hub_download(repo, "notes.txt", revision="v1"), "rb").read().decode()
        refs = api.list_repo_refs(repo)
        branch_sha = api.model_info(repo, revision="experiment").sha
        by_sha = open(hf_hub_download(repo, "notes.txt", revision=branch_sha), "rb").read().decode()
        api.delete_file("notes.txt", repo, revision="experiment")
        after_delete = api.list_repo_files(repo, revision="experiment")
        # a commit to a branch that does not exist yet creates it from main
        api.upload_file(path_or_fileobj=b"new", path_in_repo="fresh.txt", repo_id=repo, revision="fresh")
        fresh = api.list_repo_files(repo, revision="fresh")
        paths = [[type(p).__name__, p.path] for p in api.get_paths_info(repo, ["notes.txt", "nope.txt"])]
        try:
            api.upload_file(path_or_fileobj=b"---\\nkey: [unclosed\\n---\\n", path_in_repo="README.md", repo_id=repo)
            bad_yaml = None
        except ValueError as err:
            bad_yaml = str(err).splitlines()[0]
        api.create_repo("test-user/short-lived")
        api.delete_repo("test-user/short-lived")
        deleted = not api.repo_exists("test-user/short-lived")
        secret_private = api.model_info("test-user/secret").private

        kinds = (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HfHubHTTPError)

        def error(call):
            # [status, names of the typed client errors raised], or None when the call succeeds
            try:
                call()
            except HfHubHTTPError as err:
                return [err.response.status_code, [k.__name__ for k in kinds if isinstance(err, k)]]
            return None

        errors = {
            "missing_repo": error(lambda: hf_hub_download("test-user/nothing-here", "config.json")),
            "missing_repo_info": error(lambda: api.model_info("test-user/nothing-here")),
            "missing_file": error(lambda: hf_hub_download(repo, "missing.bin")),
            "missing_revision": error(lambda: hf_hub_download(repo, "notes.txt", revision="no-such-branch")),
            "missing_revision_info": error(lambda: api.model_info(repo, revision="no-such-branch")),
            "private_wrong_token": error(lambda: api.model_info("test-user/secret", token="hf_wrong")),
            "private_download_wrong_token": error(
                lambda: hf_hub_download("test-user/secret", ".gitattributes", token="hf_wrong")),
            "private_ok": error(lambda: api.model_info("test-user/secret")),
            "write_wrong_token": error(lambda: api.upload_file(
                path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, token="hf_wrong")),
            "create_wrong_token": error(lambda: api.create_repo("test-user/other", token="hf_wrong")),
            "whoami_wrong_token": error(lambda: api.whoami(token="hf_wrong")),
            "private_read_token": error(lambda: api.model_info("test-user/secret", token="hf_read_token")),
            "create_read_token": error(lambda: api.create_repo("test-user/other", token="hf_read_token")),
        }
        roles = [api.whoami(token=token)["auth"]["accessToken"]["role"] for token in (None, "hf_read_token")]
        result(on_main=on_main, on_branch=on_branch, on_tag=on_tag, by_sha=by_sha, after_delete=after_delete,
               branches=sorted(b.name for b in refs.branches), tags=[t.name for t in refs.tags], errors=errors,
               fresh=fresh, paths=paths, bad_yaml=bad_yaml, deleted=deleted, secret_private=secret_private,
               roles=roles)
    """)
    assert (result["on_main"], result["on_branch"], result["on_tag"]) == ("main v1", "branch v2", "main v1")
    assert result["by_sha"] == "branch v2"
    assert result["after_delete"] == [".gitattributes"]
    assert result["branches"] == ["experiment", "main"] and result["tags"] == ["v1"]
    assert result["fresh"] == [".gitattributes", "fresh.txt", "notes.txt"]
    assert result["paths"] == [["RepoFile", "notes.txt"]]
    assert result["bad_yaml"] == "Invalid metadata in README.md."
    assert result["deleted"] and result["secret_private"] is True
    errors = result["errors"]
    assert errors["missing_repo"] == [404, ["RepositoryNotFoundError", "HfHubHTTPError"]]
    assert errors["missing_repo_info"] == [404, ["RepositoryNotFoundError", "HfHubHTTPError"]]
    assert errors["missing_revision"] == [404, ["RevisionNotFoundError", "HfHubHTTPError"]]
    assert errors["missing_revision_info"] == [404, ["RevisionNotFoundError", "HfHubHTTPError"]]
    assert errors["missing_file"] == [404, ["EntryNotFoundError", "HfHubHTTPError"]]
    assert errors["private_wrong_token"] == [401, ["RepositoryNotFoundError", "HfHubHTTPError"]]
    assert errors["private_download_wrong_token"][0] == 401
    assert errors["private_ok"] is None
    assert errors["write_wrong_token"][0] == 401
    assert errors["create_wrong_token"][0] == 401
    assert errors["whoami_wrong_token"][0] == 401
    assert errors["private_read_token"] is None and errors["create_read_token"][0] == 403
    assert result["roles"] == ["write", "read"]


def test_parquet_dataset_load_and_push_to_hub(hub, tmp_path):
    result = run_client(hub, tmp_path, f"""
        import datasets
        from datasets import Dataset, load_dataset
        from huggingface_hub import HfApi
        api = HfApi()
        src = {str(tmp_path / "ds")!r}
        os.makedirs(os.path.join(src, "data"))
        Dataset.from_dict({{"x": list(range(20)), "label": [i % 3 for i in range(20)]}}).to_parquet(
            os.path.join(src, "data", "train.parquet"))
        Dataset.from_dict({{"x": list(range(100, 105)), "label": [0, 1, 2, 0, 1]}}).to_parquet(
            os.path.join(src, "data", "test.parquet"))
        api.create_repo("test-user/digits", repo_type="dataset")
        api.upload_folder(folder_path=src, repo_id="test-user/digits", repo_type="dataset")
        streamed = list(load_dataset("test-user/digits", split="train", streaming=True))
        train = load_dataset("test-user/digits", split="train")
        test = load_dataset("test-user/digits", split="test")

        pushed = Dataset.from_dict({{"text": ["a", "b", "c"], "n": [1, 2, 3]}})
        pushed.push_to_hub("test-user/pushed")
        back = load_dataset("test-user/pushed", split="train")
        files = api.list_repo_files("test-user/pushed", repo_type="dataset")
        result(streamed=[r["x"] for r in streamed], train=list(train["x"]), test=list(test["x"]),
               labels=list(train["label"]),
               back=back.to_dict(), files=files)
    """)
    assert result["streamed"] == list(range(20))
    assert result["train"] == list(range(20)) and result["labels"] == [i % 3 for i in range(20)]
    assert result["test"] == list(range(100, 105))
    assert result["back"] == {"text": ["a", "b", "c"], "n": [1, 2, 3]}
    assert any(f.endswith(".parquet") for f in result["files"]) and "README.md" in result["files"]


def test_transformers_push_to_hub_and_from_pretrained(hub, tmp_path):
    result = run_client(hub, tmp_path, """
        import torch
        from transformers import ResNetConfig, ResNetForImageClassification
        torch.manual_seed(0)
        config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              num_labels=3)
        model = ResNetForImageClassification(config).eval()
        model.push_to_hub("test-user/tiny-resnet")
        loaded = ResNetForImageClassification.from_pretrained("test-user/tiny-resnet").eval()
        a, b = model.state_dict(), loaded.state_dict()
        same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        x = torch.randn(2, 1, 16, 16)
        with torch.no_grad():
            close = torch.allclose(model(x).logits, loaded(x).logits)
        from huggingface_hub import HfApi
        result(same=same, close=close, files=HfApi().list_repo_files("test-user/tiny-resnet"))
    """, timeout=300)
    assert result["same"] and result["close"]
    assert {"config.json", "model.safetensors"} <= set(result["files"])
