"""``save_merged``: a merge's files hold the endpoints' tensor names and reload exactly.

transformers 5 renames some tensors between file and memory (a ViT's file has
``attention.attention.key``, its ``state_dict()`` ``k_proj``), so a merge saved from
``state_dict()`` would not load where the endpoints' files do.
"""

import copy
import json

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, ViTConfig, ViTForImageClassification)

from hfrepair.io import _save_state_dict, config_differences, load_model, read_config, save_merged
from hfrepair.models import MLP

LABELS = {"id2label": {0: "zero", 1: "one", 2: "two"}, "label2id": {"zero": 0, "one": 1, "two": 2}}

TINY = {
    "vit": lambda: ViTForImageClassification(ViTConfig(
        num_channels=1, image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, **LABELS)),
    "bert": lambda: BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, use_cache=False, **LABELS)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, use_cache=False)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False)),
}


def file_tensor_names(folder):
    names = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            names += list(weights.keys())
    return names


def perturbed(model):
    """A copy with every weight changed, as a merge's are (tied weights stay tied)."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in clone.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    return clone


@pytest.fixture(params=sorted(TINY))
def endpoint(request, tmp_path):
    """A tiny random endpoint saved as on the Hub, and loaded back the way endpoints are."""
    torch.manual_seed(0)
    model = TINY[request.param]().eval()
    folder = tmp_path / "a"
    model.save_pretrained(str(folder))
    return folder, type(model).from_pretrained(str(folder)).eval()


@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
def test_transformers_merge_has_the_endpoint_file_names_and_reloads_exactly(endpoint, max_shard_size, tmp_path):
    folder_a, model_a = endpoint
    merged = perturbed(model_a)
    out = tmp_path / "merged"
    save_merged(merged, out, folder_a, max_shard_size)

    names = file_tensor_names(out)
    assert len(names) == len(set(names)) and set(names) == set(file_tensor_names(folder_a))
    assert (out / "model.safetensors.index.json").is_file() == (max_shard_size == "40KB")
    if max_shard_size == "40KB":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(names) and len(set(index["weight_map"].values())) > 1
    config, config_a = read_config(out), read_config(folder_a)
    assert config_differences(config, config_a) == []
    for field in ("architectures", "model_type", "id2label", "label2id"):
        assert config.get(field) == config_a.get(field), field

    reloaded = type(model_a).from_pretrained(str(out)).eval()
    expected = merged.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert not torch.equal(next(reloaded.parameters()), next(model_a.parameters()))


def test_vit_merge_loads_through_load_model(tmp_path):
    torch.manual_seed(0)
    folder_a = tmp_path / "a"
    TINY["vit"]().save_pretrained(str(folder_a))
    merged = perturbed(load_model(folder_a))
    save_merged(merged, tmp_path / "merged", folder_a)
    reloaded = load_model(tmp_path / "merged")
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images).logits, merged(images).logits, rtol=0, atol=0)


@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
def test_builtin_merge_saves_with_endpoint_config_and_loads(max_shard_size, tmp_path):
    torch.manual_seed(0)
    folder_a = tmp_path / "a"
    MLP(depth=3, width=64, image_size=14).save_pretrained(str(folder_a))
    (folder_a / "preprocessor_config.json").write_text('{"image_mean": [0.5]}')
    merged = perturbed(load_model(folder_a))
    out = tmp_path / "merged"
    save_merged(merged, out, folder_a, max_shard_size)

    for name in ("config.json", "preprocessor_config.json"):
        assert (out / name).read_text() == (folder_a / name).read_text()
    assert (out / "model.safetensors.index.json").is_file() == (max_shard_size == "40KB")
    assert set(file_tensor_names(out)) == set(file_tensor_names(folder_a))
    reloaded = load_model(out)
    assert type(reloaded) is MLP
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, merged.state_dict()[name]), name


def test_one_shard_is_written_byte_for_byte_as_huggingface_hub_writes_it(tmp_path):
    """Weights that fit one shard skip the Hub saver (its first call imports torch.distributed.tensor)."""
    torch.manual_seed(0)
    state = {k: v.detach().contiguous() for k, v in MLP(depth=3, width=64, image_size=14).state_dict().items()}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    _save_state_dict(state, ours, "5GB")
    save_torch_state_dict(state, theirs, max_shard_size="5GB")
    assert [p.name for p in ours.iterdir()] == [p.name for p in theirs.iterdir()] == ["model.safetensors"]
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()


def test_weights_that_do_not_fill_the_architecture_exactly_are_refused(tmp_path):
    """transformers would start a missing tensor from random values (and the merge would
    average them in) and drop one it has no place for; both are one clear error."""
    from safetensors.torch import load_file, save_file

    from hfrepair.io import ModelLoadError

    torch.manual_seed(0)
    TINY["gpt2"]().save_pretrained(str(tmp_path / "whole"))
    weights = load_file(str(tmp_path / "whole" / "model.safetensors"))
    for name, change, message in (
            ("missing", lambda w: w.pop("transformer.h.0.ln_1.weight"), r"lack 1 tensor \(e.g. 'transformer.h.0.ln_1"
                                                                        r".weight'\) GPT2LMHeadModel needs; it would "
                                                                        "start from random values"),
            ("extra", lambda w: w.update({"transformer.h.0.extra": torch.zeros(2)}),
             r"hold 1 tensor \(e.g. 'transformer.h.0.extra'\) GPT2LMHeadModel has no place for; it would be dropped")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "whole" / "config.json").read_text())
        changed = dict(weights)
        change(changed)
        save_file(changed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ModelLoadError, match=message):
            load_model(folder)


def test_configs_differ_in_what_they_compute_and_in_the_classes_their_rows_name():
    """How a model runs (use_cache, problem_type, dropout) is no difference; the class names both give
    are; the architecture is named first."""
    config = {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "hidden_size": 32,
              "use_cache": True, "problem_type": None, **LABELS}
    assert config_differences(config, {**config, "use_cache": False, "problem_type": "single_label_classification",
                                       "id2label": {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}}) == []
    # Dropout acts in training only: endpoints trained with other rates are the same function.
    assert config_differences({**config, "attn_pdrop": 0.0, "hidden_dropout_prob": 0.1, "encoder_layerdrop": 0.0},
                              {**config, "attn_pdrop": 0.1, "hidden_dropout_prob": 0.0, "hidden_size": 64,
                               "encoder_layerdrop": 0.1, "drop_path_rate": 0.1}) == ["hidden_size"]
    reordered = {**config, "id2label": {0: "two", 1: "one", 2: "zero"}}
    assert config_differences(config, reordered) == ["id2label"]
    other = {**config, "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new"}
    assert config_differences(config, other)[0] == "architectures"
