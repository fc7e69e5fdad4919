"""The paper-reproduction scripts (examples/paper/) in ``--quick`` mode, in-process.

Each script trains small endpoints on sklearn's 8x8 digits (cached for the session, so
scripts that share endpoints train them once), checks its qualitative claim and writes
its figure, ``results.md`` and ``results.json``. A failed required claim is exit status 1.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper"


@pytest.fixture(scope="module")
def endpoint_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("paper-cache")


@pytest.fixture
def run_quick(endpoint_cache, tmp_path, monkeypatch):
    """Run ``examples/paper/<name>.py --quick``; return its exit status and results.json."""
    monkeypatch.syspath_prepend(str(PAPER))

    def run(name: str) -> tuple[int, dict]:
        spec = importlib.util.spec_from_file_location(f"paper_{name}", PAPER / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        output = tmp_path / name
        status = script.main(["--quick", "--cache", str(endpoint_cache), "--output", str(output)])
        for written in ("results.md", f"{name}.png"):
            assert (output / written).stat().st_size > 0, written
        results = json.loads((output / "results.json").read_text())
        assert results["mode"] == "quick" and results["claims"]
        return status, results

    return run


def required_claims(results: dict) -> dict[str, bool]:
    return {c["claim"]: c["holds"] for c in results["claims"] if c["required"]}


def test_variance_collapse(run_quick):
    status, results = run_quick("variance_collapse")
    assert status == 0, required_claims(results)
    mlp = results["networks"]["MLP"]
    assert mlp["aligned"][-1] < 0.5 * mlp["aligned"][0]  # collapse compounds with depth
    assert mlp["repaired"][-1] > 0.5


def test_depth(run_quick):
    status, results = run_quick("depth")
    assert status == 0, required_claims(results)
    deepest = results["rows"][-1]
    assert deepest["exact"] > deepest["aligned"] + 0.2  # REPAIR > aligned for a deep MLP
    assert deepest["closed_form"] > deepest["aligned"]


def test_normalization_width(run_quick):
    status, results = run_quick("normalization_width")
    assert status == 0, required_claims(results)
    batchnorm = next(r for r in results["rows"] if r["normalization"] == "batchnorm")
    assert batchnorm["repaired"]["midpoint"] > batchnorm["aligned"]["midpoint"] + 0.2  # BN ResNet


def test_unaligned(run_quick):
    status, results = run_quick("unaligned")
    assert status == 0, required_claims(results)
    for network in results["networks"].values():
        assert max(network["midpoint"], key=network["midpoint"].get) == "repaired"


def test_split_data(run_quick):
    status, results = run_quick("split_data")
    assert status == 0, required_claims(results)
    for network in results["networks"].values():
        assert len(network["alphas"]) == len(network["curves"]["repaired"])
        assert sum(network["train_sizes"]) == 1397  # disjoint halves covering the train split
        assert network["ensemble"]["examples"] == 400


def test_quick_mode_fails_only_on_a_failed_required_claim(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PAPER))
    paper_common = importlib.import_module("paper_common")

    def finish(mode: list[str], required: bool) -> int:
        output = tmp_path / "-".join([*mode, str(required)])
        run = paper_common.Run(
            "example", "an example", [*mode, "--cache", str(tmp_path), "--output", str(output)]
        )
        run.claim("a claim that fails", False, required=required)
        return run.finish("Example", "summary", "| a |", {}, lambda plt: plt.figure())

    assert finish(["--quick"], required=True) == 1
    assert finish(["--quick"], required=False) == 0
    assert finish([], required=True) == 0  # full runs report failures, they do not fail
