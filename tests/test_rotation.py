"""Orthogonal maps for a pre-norm transformer's stream and value dims: which models admit
them (decided by trying), that a rotated copy is matched back exactly, that refining the maps
lowers the midpoint's distillation loss without changing B's function, and refusals."""

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, ViTConfig,
                          ViTForImageClassification)

from hfrepair.batches import model_outputs
from hfrepair.discovery import discover_spec
from hfrepair.models import ResNet
from hfrepair.passes import forward_count
from hfrepair.repair import correction_sites, exact_correctors
from hfrepair.rotation import (RotationError, fit_rotations, fold_norms, random_rotation, refine_rotations,
                               rotate_state_dict, rotation_plan)
from hfrepair.spec import identity_permutations, load_into, with_state_dict
from hfrepair.statistics import collect_statistics


def trained_looking_norms(model):
    """Norm affines away from their initial 1 and 0 (at 1 and 0 every norm commutes with a
    rotation, so a refusal could not be tested)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return trained_looking_norms(ViTForImageClassification(ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10)))


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    return trained_looking_norms(LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied)))


def random_maps(spec, plan, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: random_rotation(spec.groups[name].size, spec.groups[name].blocks,
                                  plan.centred and name == plan.stream, generator)
            for name in [plan.stream, *plan.values]}


@pytest.mark.parametrize("make, example", [
    (tiny_vit, torch.randn(4, 1, 28, 28)),
    (lambda: tiny_llama(tied=False), torch.randint(0, 128, (2, 16))),  # RMSNorm, grouped-query attention
])
def test_folded_and_rotated_models_compute_the_same_function(make, example):
    model = make()
    spec = discover_spec(model, example)
    plan = rotation_plan(model, spec, example)
    assert plan.values and all(plan.norms.values())
    assert plan.centred == isinstance(model, ViTForImageClassification)  # LayerNorm centres, RMSNorm does not
    folded = fold_norms(model.state_dict(), plan, spec)
    rotated = rotate_state_dict(folded, spec, plan, random_maps(spec, plan, seed=1))
    want = model_outputs(model, example)
    with torch.no_grad():
        for state in (folded, rotated):
            got = model_outputs(with_state_dict(model, state), example)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    norm = next(iter(plan.norms))
    assert torch.equal(folded[f"{norm}.weight"], torch.ones_like(folded[f"{norm}.weight"]))
    # A rotation that ignores the norms' affines changes the function: the check has teeth.
    careless = rotate_state_dict(model.state_dict(), spec, plan, random_maps(spec, plan, seed=1))
    with torch.no_grad():
        assert (model_outputs(with_state_dict(model, careless), example) - want).abs().max() > 1e-2 * want.abs().max()


def test_a_rotated_copy_is_matched_back_exactly():
    """B = A with its stream and value dims rotated at random: Procrustes finds the inverse
    maps, and B rotated by them has A's folded weights."""
    model_a = tiny_vit()
    images = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    batches = [images[i:i + 64] for i in range(0, 256, 64)]
    spec = discover_spec(model_a, images[:8])
    plan = rotation_plan(model_a, spec, images[:8])
    folded_a = fold_norms(model_a.state_dict(), plan, spec)
    model_b = with_state_dict(model_a, rotate_state_dict(folded_a, spec, plan, random_maps(spec, plan, seed=2)))
    maps = fit_rotations(model_a, model_b, spec, plan, batches)
    back = rotate_state_dict(fold_norms(model_b.state_dict(), plan, spec), spec, plan, maps)
    for key, value in folded_a.items():
        assert torch.allclose(back[key], value, atol=1e-4), key


def test_refined_maps_stay_orthogonal_keep_b_s_function_and_lower_the_distillation_loss():
    """Two different ViTs: the fitted maps refined by a few full-batch steps are still
    orthogonal (the stream's keeping the ones direction), B carried by them computes what it
    did, the midpoint's KL divergence from the endpoints' mixed predictions falls, and the
    pass engine counts three forwards per example (A, B, the midpoint) per step, or the
    midpoint's alone once the endpoints' predictions are kept."""
    model_a, model_b = tiny_vit(0), tiny_vit(1)
    with torch.no_grad():  # confident predictions, as a trained pair makes (at random init they are uniform)
        for model in (model_a, model_b):
            model.classifier.weight.mul_(30)
    images = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    batches = [images[i:i + 64] for i in range(0, 256, 64)]
    spec = discover_spec(model_a, images[:8])
    plan = rotation_plan(model_a, spec, images[:8])
    fitted = fit_rotations(model_a, model_b, spec, plan, batches)
    folded_a, folded_b = (fold_norms(m.state_dict(), plan, spec) for m in (model_a, model_b))
    before = forward_count()
    maps, record = refine_rotations(model_a, model_b, folded_a, folded_b, spec, plan, fitted, batches, steps=6,
                                    alpha=0.5, limit=192)
    assert forward_count() - before == 7 * 192 * 3
    before = forward_count()  # the endpoints' predictions kept after the first pass: the same steps, fewer forwards
    kept, _ = refine_rotations(model_a, model_b, folded_a, folded_b, spec, plan, fitted, batches, steps=6, alpha=0.5,
                               limit=192, keep_targets=True)
    assert forward_count() - before == 192 * 3 + 6 * 192
    assert all(torch.allclose(kept[name], maps[name], atol=1e-12) for name in maps)
    assert record["steps"] == 6 and record["examples"] == 192 and record["alpha"] == 0.5
    loss = record["distillation_loss"]
    assert loss["refined"] < 0.7 * loss["fitted"]
    for name, matrix in maps.items():
        assert torch.allclose(matrix @ matrix.T, torch.eye(len(matrix), dtype=matrix.dtype), atol=1e-10)
        assert not torch.allclose(matrix, fitted[name], atol=1e-3)  # every map moved
    ones = torch.ones(len(maps[plan.stream]), dtype=torch.float64)
    assert torch.allclose(maps[plan.stream] @ ones, ones, atol=1e-10)
    want = model_outputs(model_b, images[:16])
    with torch.no_grad():
        got = model_outputs(with_state_dict(model_b, rotate_state_dict(folded_b, spec, plan, maps)), images[:16])
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert not any(p.requires_grad and p.grad is not None for p in model_a.parameters())
    # Refined for the REPAIRed midpoint: REPAIR's correctors stay measuring and keep no graph.
    stats = collect_statistics(with_state_dict(model_a, folded_a),
                               with_state_dict(model_a, rotate_state_dict(folded_b, spec, plan, fitted)), spec.sites,
                               batches)
    correctors = exact_correctors(spec, stats, identity_permutations(spec), 0.5)
    _, repaired = refine_rotations(model_a, model_b, folded_a, folded_b, spec, plan, fitted, batches, steps=3,
                                   alpha=0.5, limit=192, correctors=correctors)
    assert repaired["repair_correctors"] == len(correctors) == len(correction_sites(spec)) > 0
    assert repaired["distillation_loss"]["refined"] < repaired["distillation_loss"]["fitted"]
    assert all(c.training and not c.sums.requires_grad for c in correctors.values())


@pytest.mark.parametrize("make, example, reason", [
    (lambda: trained_looking_norms(BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))),
     torch.randint(0, 128, (2, 16)), "changes its outputs"),  # post-LN: the residual carries the affine
    (lambda: tiny_llama(tied=True), torch.randint(0, 128, (2, 16)), "changes its outputs"),  # the head is the embedding
    (lambda: ResNet(blocks_per_stage=1, base_channels=8).eval(), torch.randn(2, 1, 28, 28), "residual stream"),
])
def test_models_whose_stream_cannot_rotate_are_refused_with_the_reason(make, example, reason):
    model = make()
    with pytest.raises(RotationError, match=reason):
        rotation_plan(model, discover_spec(model, example), example)


def test_the_check_leaves_the_workspace_reusable():
    model = tiny_vit()
    example = torch.randn(2, 1, 28, 28)
    spec = discover_spec(model, example)
    workspace = with_state_dict(model, model.state_dict())
    rotation_plan(model, spec, example, workspace=workspace)
    load_into(workspace, model.state_dict())  # the caller reloads it; the plan left the architecture intact
    with torch.no_grad():
        assert torch.equal(model_outputs(workspace, example), model_outputs(model, example))


def fitted_llama_pair(model_a, model_b, examples: int):
    """Token batches of 16 (and the tokens), the spec, rotation plan, Procrustes maps and
    norm-folded state dicts of a Llama pair."""
    tokens = torch.randint(0, 128, (examples, 16), generator=torch.Generator().manual_seed(1))
    batches = [tokens[i:i + 16] for i in range(0, examples, 16)]
    spec = discover_spec(model_a, tokens[:2])
    plan = rotation_plan(model_a, spec, tokens[:2])
    fitted = fit_rotations(model_a, model_b, spec, plan, batches)
    folded_a, folded_b = (fold_norms(m.state_dict(), plan, spec) for m in (model_a, model_b))
    return tokens, batches, spec, plan, fitted, folded_a, folded_b


def test_a_language_model_s_maps_refine_for_its_scale_only_repair():
    """An untied Llama (RMSNorm, grouped-query attention, no biases): refined with REPAIR's
    scale-only correctors in the loop, its token predictions move towards the endpoints'
    mixed predictions and B keeps its function."""
    model_a, model_b = tiny_llama(tied=False), tiny_llama(tied=False)
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        for model in (model_a, model_b):
            model.lm_head.weight.mul_(30)
    tokens, batches, spec, plan, fitted, folded_a, folded_b = fitted_llama_pair(model_a, model_b, 64)
    stats = collect_statistics(with_state_dict(model_a, folded_a),
                               with_state_dict(model_a, rotate_state_dict(folded_b, spec, plan, fitted)), spec.sites,
                               batches)
    correctors = exact_correctors(spec, stats, identity_permutations(spec), 0.5)
    assert all(c.scale_only for c in correctors.values())
    maps, record = refine_rotations(model_a, model_b, folded_a, folded_b, spec, plan, fitted, batches, steps=4,
                                    alpha=0.5, correctors=correctors)
    assert record["examples"] == 64 and record["distillation_loss"]["refined"] < record["distillation_loss"]["fitted"]
    want = model_outputs(model_b, tokens[:4])
    with torch.no_grad():
        got = model_outputs(with_state_dict(model_b, rotate_state_dict(folded_b, spec, plan, maps)), tokens[:4])
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_a_tied_model_whose_norms_fold_to_nothing_is_refined():
    """Tied input and output embeddings with every norm weight 1 (a fresh Llama): folding
    leaves both names of the embedding equal, so rotation is admitted, and refinement runs
    (before, functional_call refused the interpolated state's two values for the tied tensor)."""
    def fresh(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)).eval()

    model_a, model_b = fresh(0), fresh(1)
    _, batches, spec, plan, fitted, folded_a, folded_b = fitted_llama_pair(model_a, model_b, 32)
    assert torch.equal(folded_a["lm_head.weight"], folded_a["model.embed_tokens.weight"])
    maps, record = refine_rotations(model_a, model_b, folded_a, folded_b, spec, plan, fitted, batches, steps=2,
                                    alpha=0.5)
    assert record["steps"] == 2 and record["examples"] == 32
