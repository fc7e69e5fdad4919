"""Specs kept per architecture: another pair of the same architecture reuses the stored
spec without exporting, anything that changes the graph misses, and a stored spec that no
longer fits is discovered anew."""

import json

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from hfrepair import spec_cache
from hfrepair.discovery import discover_spec
from hfrepair.models import MLP
from hfrepair.spec import PermutationSpec
from hfrepair.spec_cache import architecture_key, checked_spec

IMAGES = torch.randn(8, 1, 6, 6)


def mlp(seed: int, width: int = 16) -> MLP:
    torch.manual_seed(seed)
    return MLP(depth=2, width=width, image_size=6, in_channels=1).eval()


def hf_resnet(seed: int, name: str) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = ResNetForImageClassification(config).eval()
    model.config._name_or_path = name
    return model


def as_json(spec) -> dict:
    return json.loads(json.dumps(spec.to_dict()))


def test_the_key_is_the_architecture_not_the_weights_or_the_checkpoint_name():
    assert architecture_key(mlp(0), IMAGES) == architecture_key(mlp(1), IMAGES)
    assert architecture_key(mlp(0), IMAGES) != architecture_key(mlp(0, width=24), IMAGES)
    assert architecture_key(mlp(0), IMAGES) != architecture_key(mlp(0), IMAGES.double())
    a, b = hf_resnet(0, "someone/resnet-a"), hf_resnet(1, "someone-else/resnet-b")
    images = torch.randn(2, 1, 16, 16)
    assert architecture_key(a, images) == architecture_key(b, images)
    assert architecture_key(a, images) != architecture_key(a, torch.randn(2, 1, 24, 24))
    b.config.hidden_act = "gelu"  # a setting that changes no weight's name or shape
    assert architecture_key(a, images) != architecture_key(b, images)


def test_a_second_pair_of_the_same_architecture_reuses_the_spec_without_exporting(tmp_path, monkeypatch):
    spec, source = checked_spec(mlp(0), IMAGES, tmp_path)
    assert source == "discovered" and len(list(tmp_path.iterdir())) == 1

    def no_export(*_args):
        raise AssertionError("discovery ran although the spec was stored")
    monkeypatch.setattr(spec_cache, "discover_spec", no_export)
    reused, source = checked_spec(mlp(1), IMAGES, tmp_path)
    assert source == "cached" and as_json(reused) == as_json(spec) == as_json(discover_spec(mlp(1), IMAGES))


def test_without_a_folder_nothing_is_stored(tmp_path):
    _spec, source = checked_spec(mlp(0), IMAGES, None)
    assert source == "discovered" and not list(tmp_path.iterdir())


@pytest.mark.parametrize("stored", ["not json", "wrong spec", "a subset that passes the check", "a bare spec"])
def test_an_unreadable_altered_or_wrong_stored_spec_is_discovered_anew_and_replaced(stored, tmp_path):
    """Only what the cache stored is used: a file cut short, edited (even into a spec that
    passes the check, such as one group of several, which would merge unaligned layers and
    be reported as cached) or replaced is discovered anew."""
    model = mlp(0)
    path = tmp_path / f"{architecture_key(model, IMAGES)}.json"
    discovered = as_json(discover_spec(model, IMAGES))
    if stored == "not json":
        path.write_text("{")
    elif stored == "wrong spec":  # fails the random-permutation check: a layer's rows permuted, its reader's not
        checked_spec(model, IMAGES, tmp_path)
        entry = json.loads(path.read_text())
        entry["spec"]["groups"][0]["members"] = entry["spec"]["groups"][0]["members"][:1]
        entry["sha256"] = spec_cache._digest(entry["spec"])
        path.write_text(json.dumps(entry))
    elif stored == "a subset that passes the check":
        checked_spec(model, IMAGES, tmp_path)
        entry = json.loads(path.read_text())
        entry["spec"]["groups"] = entry["spec"]["groups"][:1]
        entry["spec"]["sites"] = [site for site in entry["spec"]["sites"]
                                  if site["group"] == entry["spec"]["groups"][0]["name"]]
        path.write_text(json.dumps(entry))
    else:  # a spec file as `hfrepair spec --output` writes it, put in the cache by hand
        path.write_text(json.dumps(discovered))
    spec, source = checked_spec(model, IMAGES, tmp_path)
    assert source == "discovered"
    assert json.loads(path.read_text())["spec"] == as_json(spec) == discovered


def test_a_spec_write_that_fails_midway_leaves_no_file(tmp_path, monkeypatch):
    """``hfrepair spec --output`` and the cache write through ``save``: a full disk leaves
    neither a truncated spec nor its temporary file."""
    from pathlib import Path

    spec = discover_spec(MLP(depth=2, width=8, image_size=4).eval(), torch.randn(2, 1, 4, 4))
    written = Path.write_text

    def fills_the_disk(self, text, *args, **kwargs):
        written(self, text[:10], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        spec.save(tmp_path / "spec.json")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    spec.save(tmp_path / "spec.json")
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]
    assert PermutationSpec.load(tmp_path / "spec.json").to_dict() == spec.to_dict()
