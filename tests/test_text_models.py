"""transformers text models merge through the Python API: GPT-2 (tied LM head, use_cache on),
Llama with grouped-query attention (tied and untied head) and BERT for classification.

Structural checks only, with random token ids and randomly initialised endpoints (seeds 0
and 1) and no evaluation data: the merged model has A's class, keys, shapes and tied
weights; the permuted B computes B's function; matching raises the matched correlation;
REPAIR undoes the variance collapse of averaging and actually changes the weights.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import hfrepair
from hfrepair.pipeline import MergeError
from hfrepair.batches import model_outputs
from hfrepair.spec import with_state_dict

torch.set_num_threads(1)

VOCAB, LENGTH, BATCH, BATCHES = 64, 12, 16, 4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def gpt2():
    # Default config otherwise: use_cache stays True, the LM head is tied to wte.
    # (bos/eos moved inside the tiny vocabulary only to silence transformers' warning.)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                      n_positions=16, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))


def llama(tied: bool):
    """Grouped-query attention: 4 query heads share 2 kv heads; RoPE fixes the q/k dims."""
    return LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=16,
                                        tie_word_embeddings=tied))


def bert():
    return BertForSequenceClassification(BertConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=16,
                                                    num_labels=3))


# name -> (factory, (tied key, tied key) or None, group kinds aligned)
MODELS = {
    "gpt2": (gpt2, ("transformer.wte.weight", "lm_head.weight"), {"stream", "heads", "head_dims", "mlp"}),
    "llama-tied": (lambda: llama(True), ("model.embed_tokens.weight", "lm_head.weight"),
                   {"stream", "heads", "head_dims", "mlp"}),
    "llama-untied": (lambda: llama(False), None, {"stream", "heads", "head_dims", "mlp"}),
    "bert": (bert, None, {"stream", "heads", "head_dims", "mlp"}),
}
NAMES = list(MODELS)


def calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator) for _ in range(BATCHES)]


def endpoints(name: str):
    factory = MODELS[name][0]
    torch.manual_seed(0)
    a = factory().eval()
    torch.manual_seed(1)
    b = factory().eval()
    return a, b


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@lru_cache(maxsize=None)
def merged_pair(name: str):
    """Both endpoints, the calibration batches and the merges with REPAIR and without."""
    a, b = endpoints(name)
    batches = calibration()
    before_a, before_b = snapshot(a), snapshot(b)
    merged, result = hfrepair.merge(a, b, batches, evaluation=None)
    plain, plain_result = hfrepair.merge(a, b, batches, evaluation=None, method="none")
    # merge leaves its endpoints as they were.
    for before, model in ((before_a, a), (before_b, b)):
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    return a, b, batches, merged, result, plain, plain_result


@lru_cache(maxsize=None)
def by_hand(name: str):
    """The stages of a merge run one by one with the public functions."""
    a, b, batches = *merged_pair(name)[:2], merged_pair(name)[2]
    spec = hfrepair.discover_spec(a, batches[0][:8])
    stats = hfrepair.collect_statistics(a, b, spec.sites, batches)
    perms = hfrepair.match_permutations(spec, stats)
    aligned_b = hfrepair.permute_state_dict(b.state_dict(), spec, perms)
    mixed = hfrepair.interpolate(a.state_dict(), aligned_b, 0.5)
    return spec, stats, perms, aligned_b, mixed


@pytest.mark.parametrize("name", NAMES)
def test_merged_model_has_the_endpoints_architecture(name):
    a, b, _, merged, _, plain, _ = merged_pair(name)
    assert type(merged) is type(a) and type(plain) is type(a)
    assert merged is not a and merged is not b
    state_a = a.state_dict()
    for model in (merged, plain):
        state = model.state_dict()
        assert list(state) == list(state_a)
        for key, value in state_a.items():
            assert state[key].shape == value.shape, key
            assert state[key].dtype == value.dtype, key
            if value.is_floating_point():
                assert torch.isfinite(state[key]).all(), key
    if name == "gpt2":
        assert a.config.use_cache is True  # discovery copes with the cache outputs


@pytest.mark.parametrize("name", NAMES)
def test_tied_weights_stay_tied(name):
    a, _, _, merged, _, plain, _ = merged_pair(name)
    tied = MODELS[name][1]
    head, embedding = merged.get_output_embeddings(), merged.get_input_embeddings()
    if tied is None:
        if name.startswith("llama"):
            assert head.weight is not embedding.weight
            assert not torch.equal(head.weight, embedding.weight)
        return
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight
    for model in (merged, plain):
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        assert head.weight is embedding.weight
        state = model.state_dict()
        assert state[tied[0]].data_ptr() == state[tied[1]].data_ptr()
        assert torch.equal(state[tied[0]], state[tied[1]])
    # The one tensor carries the interpolation of A's and aligned B's embedding (its rows are
    # the vocabulary, its columns the stream), not one key's value overwritten by the other's.
    mixed = by_hand(name)[4]
    assert torch.allclose(plain.state_dict()[tied[0]], mixed[tied[0]], atol=1e-6)
    assert torch.allclose(mixed[tied[0]], mixed[tied[1]], atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_permuted_b_computes_b(name):
    _, b, batches, _, result, _, _ = merged_pair(name)
    with torch.no_grad():
        scale = max(1.0, model_outputs(b, batches[0][:8]).abs().max().item())
    assert 0.0 <= result.permuted_max_abs_diff <= 1e-4 * scale
    # The same holds for the hand-run permutation on every calibration batch.
    aligned_b = by_hand(name)[3]
    permuted = with_state_dict(b, aligned_b).eval()
    with torch.no_grad():
        for batch in batches:
            reference = model_outputs(b, batch)
            diff = (model_outputs(permuted, batch) - reference).abs().max().item()
            assert diff <= 1e-4 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_alignment_covers_stream_heads_and_mlp(name):
    _, _, batches, _, result, _, _ = merged_pair(name)
    spec = by_hand(name)[0]
    assert set(result.aligned) == MODELS[name][2], result.aligned
    assert result.groups["stream"] == 32
    assert result.calibration_examples == BATCH * BATCHES
    dims = {n for n, g in spec.groups.items() if g.kind == "head_dims"}
    if name.startswith("llama"):
        # RoPE rotates pairs of q/k dims by position: only the value dims permute (per kv head).
        assert dims and all(n.endswith("v_dims") for n in dims), dims
        assert all(spec.groups[n].size == 16 and spec.groups[n].blocks == 2 for n in dims)
    else:
        assert {n.rsplit(".", 1)[1] for n in dims} == {"qk_dims", "v_dims"}, dims
    # Matching maximises the summed correlation: never below B's units in their own order.
    for kind in ("stream", "mlp"):
        summary = result.aligned[kind]
        assert summary["matched_correlation"] >= summary["unaligned_correlation"]
        names = [n for n, g in spec.groups.items() if g.kind == kind]
        assert len(names) == summary["groups"]
        for group in names:
            matched, unaligned = result.matched_correlation[group], result.unaligned_correlation[group]
            assert matched >= unaligned - 1e-9, (group, matched, unaligned)
    # Random-init endpoints are uncorrelated in their own order, but units do pair up.
    assert result.aligned["stream"]["matched_correlation"] > result.aligned["stream"]["unaligned_correlation"] + 0.1
    assert result.aligned["mlp"]["matched_correlation"] > result.aligned["mlp"]["unaligned_correlation"] + 0.1


@pytest.mark.parametrize("name", NAMES)
def test_corrections_follow_the_architecture(name):
    corrected = merged_pair(name)[4].corrected
    if name.startswith("llama"):
        # No bias anywhere (projections, RMSNorm): every correction is a scale.
        assert corrected["scale"]
        assert not corrected["affine"] and not corrected["batchnorm"]
    else:
        assert corrected["affine"]
        assert not corrected["batchnorm"]
    plain_result = merged_pair(name)[6]
    assert plain_result.method == "none"
    assert all(not sites for sites in plain_result.corrected.values()), plain_result.corrected


def mean_abs_log(ratios: dict[str, float]) -> float:
    return sum(abs(math.log(r)) for r in ratios.values()) / len(ratios)


@pytest.mark.parametrize("name", NAMES)
def test_repair_undoes_variance_collapse(name):
    """Averaging uncorrelated units collapses their variance (to ~0.5-0.7 of the endpoints'
    at the attention and MLP sites); REPAIR brings every site back near 1.

    Measured here (mean |log ratio| aligned -> repaired): gpt2 0.221 -> 0.017, llama (tied
    and untied) 0.375 -> 0.011, bert 0.333 -> 0.023; lowest aligned ratio 0.48-0.57,
    repaired ratios 0.966-1.005 (norm outputs on the stream stay near 1 throughout).
    """
    result, plain_result = merged_pair(name)[4], merged_pair(name)[6]
    ratios = result.variance_ratio
    assert set(ratios) == {"aligned", "repaired"}
    aligned, repaired = ratios["aligned"], ratios["repaired"]
    assert aligned and aligned.keys() == repaired.keys()
    assert all(r > 0 and math.isfinite(r) for r in [*aligned.values(), *repaired.values()])
    assert min(aligned.values()) < 0.8  # the collapse is there to repair
    assert mean_abs_log(aligned) > 0.1
    assert mean_abs_log(repaired) < 0.25 * mean_abs_log(aligned)
    assert max(abs(math.log(r)) for r in repaired.values()) < 0.15
    # Without a correction the saved network is the aligned interpolation itself: one series.
    plain = plain_result.variance_ratio
    assert set(plain) == {"aligned"}
    for site, value in plain["aligned"].items():
        assert value == pytest.approx(aligned[site], rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_repair_changes_the_interpolated_weights(name):
    _, _, _, merged, result, plain, _ = merged_pair(name)
    mixed = by_hand(name)[4]
    plain_state, merged_state = plain.state_dict(), merged.state_dict()
    # method="none" is exactly the hand-run interpolation of A and aligned B ...
    for key, value in mixed.items():
        assert torch.allclose(plain_state[key], value, atol=1e-6), key
    # ... and REPAIR moved some weights well away from it.
    changed = {key for key, value in mixed.items() if value.is_floating_point()
               and (merged_state[key] - value).abs().max().item() > 1e-3}
    assert changed
    assert max((merged_state[k] - mixed[k]).abs().max().item() for k in changed) > 1e-2
    # Only parameters of the corrected sites change (corrections fold into their weight and
    # bias, or norm affine); the embedding tables are never touched.
    corrected = {module for sites in result.corrected.values() for module in sites}
    assert {key.rsplit(".", 1)[0] for key in changed} <= corrected, changed
    embeddings = {f"{n}.weight" for n, m in merged.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert embeddings and not embeddings & changed, changed


@pytest.mark.parametrize("name", NAMES)
def test_hand_run_repair_matches_merge(name):
    a, _, batches, merged, _, _, _ = merged_pair(name)
    spec, stats, perms, _, mixed = by_hand(name)
    state = hfrepair.repair(a, mixed, spec, stats, perms, 0.5, "repair", batches)
    merged_state = merged.state_dict()
    assert state.keys() == merged_state.keys()
    for key, value in state.items():
        assert torch.allclose(merged_state[key], value, atol=1e-5), key


@pytest.mark.parametrize("calibration_data", [[], ()], ids=["list", "tuple"])
def test_empty_calibration_is_refused_in_one_line(calibration_data):
    a, b = endpoints("gpt2")
    with pytest.raises(MergeError) as error:
        hfrepair.merge(a, b, calibration_data, evaluation=None)
    message = str(error.value)
    assert "calibration data is empty" in message
    assert "\n" not in message


def test_fused_qkv_keeps_only_its_q_k_and_v_cross_products():
    """GPT-2's c_attn output is matched within its q, k and v thirds: the statistics pass
    keeps those three blocks of the C x C product (a third of it) and matching picks the
    same permutations as from the whole product."""
    from hfrepair.pipeline import statistics_plan

    a, b, batches = *merged_pair("gpt2")[:2], merged_pair("gpt2")[2]
    spec, whole, perms = by_hand("gpt2")[:3]
    sites, cross = statistics_plan(spec, "repair", "activation")
    qkv = [name for name in cross if name.endswith("attn.c_attn")]
    assert qkv and all(cross[name] == [(0, 32), (32, 64), (64, 96)] for name in qkv)
    assert all(cross[name] is None for name in cross if name not in qkv)
    stats = hfrepair.collect_statistics(a, b, sites, batches, cross_sites=cross)
    for name in qkv:
        assert stats.pairs[name].correlation()[:32, 32:].isnan().all()
    kept = hfrepair.match_permutations(spec, stats)
    assert all(torch.equal(kept[group], perms[group]) for group in perms)
