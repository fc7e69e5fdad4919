"""REPAIR sets the corrected layers' statistics to their goals, and folds exactly."""

import copy
import importlib

import pytest
import torch
from torch import nn

from hfrepair.discovery import discover_spec
from hfrepair.fuse import fold_batchnorm
from hfrepair.interpolate import interpolate
from hfrepair.matching import MatchingError, match_permutations
from hfrepair.pipeline import MergeError, merge
from hfrepair.models import MLP, VGG, ResNet
from hfrepair.repair import (
    ChannelBatchNorm,
    block_output_sites,
    correction_sites,
    repair,
    repair_block_outputs,
    site_goal,
)
from hfrepair.spec import permute_state_dict, with_state_dict
from hfrepair.passes import forward_count, run_pass
from hfrepair.statistics import SiteMoments, collect_moments, collect_statistics


def endpoints(factory):
    torch.manual_seed(0)
    a = factory().eval()
    torch.manual_seed(1)
    b = factory().eval()
    return a, b


def prepare(a, b, inputs):
    spec = discover_spec(a, inputs[:2])
    stats = collect_statistics(a, b, spec.sites, [inputs])
    perms = match_permutations(spec, stats)
    mixed = interpolate(a.state_dict(), permute_state_dict(b.state_dict(), spec, perms), 0.5)
    return spec, stats, perms, mixed


def test_exact_repair_meets_the_goal_statistics_and_keeps_the_architecture():
    a, b = endpoints(lambda: VGG(widths=(6, 8), layers_per_stage=2, image_size=8))
    inputs = torch.randn(64, 1, 8, 8)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    repaired = repair(a, mixed, spec, stats, perms, 0.5, "repair", [inputs])
    assert repaired.keys() == a.state_dict().keys()
    assert all(repaired[k].shape == v.shape for k, v in a.state_dict().items())
    sites = correction_sites(spec)
    assert len(sites) == 4
    measured = collect_moments(with_state_dict(a, repaired), sites, [inputs])
    before = collect_moments(with_state_dict(a, mixed), sites, [inputs])
    for site in sites:
        goal = site_goal(stats, site, perms[site.group], 0.5)
        torch.testing.assert_close(measured[site.module].mean, goal.mean, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(measured[site.module].std, goal.std, atol=1e-3, rtol=1e-3)
    # The last layer had collapsed before REPAIR.
    last = sites[-1].module
    assert before[last].std.mean() < 0.9 * measured[last].std.mean()


def test_layernorm_resnet_is_corrected_at_its_norms_and_folds_into_their_affine():
    """Bias-free convs before a LayerNorm cannot take a correction; the norm's affine can."""
    a, b = endpoints(lambda: ResNet(blocks_per_stage=1, base_channels=4, image_size=8, normalization="layernorm"))
    inputs = torch.randn(64, 1, 8, 8)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    sites = correction_sites(spec)
    assert sites and all(s.kind == "norm" for s in sites)
    repaired = repair(a, mixed, spec, stats, perms, 0.5, "repair", [inputs])
    changed = {k for k in repaired if not torch.equal(repaired[k], mixed[k])}
    assert changed == {key for s in sites for key in (s.weight, s.bias)}  # only the norms' affine moved
    measured = collect_moments(with_state_dict(a, repaired), sites, [inputs])
    for site in sites[:1]:  # the first corrected layer sees uncorrected inputs: exact goal
        goal = site_goal(stats, site, perms[site.group], 0.5)
        torch.testing.assert_close(measured[site.module].mean, goal.mean, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(measured[site.module].std, goal.std, atol=1e-3, rtol=1e-3)


def test_closed_form_is_exact_for_the_first_layer_only():
    a, b = endpoints(lambda: VGG(widths=(6, 8), layers_per_stage=2, image_size=8))
    inputs = torch.randn(64, 1, 8, 8)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    repaired = repair(a, mixed, spec, stats, perms, 0.5, "closed-form")
    sites = correction_sites(spec)
    measured = collect_moments(with_state_dict(a, repaired), sites, [inputs])
    first = sites[0]
    goal = site_goal(stats, first, perms[first.group], 0.5)
    torch.testing.assert_close(measured[first.module].std, goal.std, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(measured[first.module].mean, goal.mean, atol=1e-4, rtol=1e-4)
    deep = sites[-1]
    deep_goal = site_goal(stats, deep, perms[deep.group], 0.5)
    assert not torch.allclose(measured[deep.module].std, deep_goal.std, rtol=1e-3)


def test_repair_of_batchnorm_networks_resets_their_statistics():
    a, b = endpoints(lambda: ResNet(blocks_per_stage=1, base_channels=4, image_size=8))
    inputs = torch.randn(64, 1, 8, 8)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    for method in ("repair", "reset"):
        repaired = repair(a, mixed, spec, stats, perms, 0.5, method, [inputs])
        net = with_state_dict(a, repaired)
        with torch.no_grad():
            flat = net.conv(inputs).transpose(0, 1).reshape(4, -1)
        torch.testing.assert_close(net.norm.running_mean, flat.mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net.norm.running_var, flat.var(1), atol=1e-4, rtol=1e-4)
        assert repaired.keys() == a.state_dict().keys()


def test_unknown_method_and_missing_batches_are_refused():
    a, b = endpoints(lambda: VGG(widths=(4,), layers_per_stage=1, image_size=8))
    inputs = torch.randn(8, 1, 8, 8)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    group = next(iter(spec.groups))
    # Permutations and statistics that would give wrong goals or an internal error: refused.
    for wrong_perms, message in (({}, f"no permutation for group {group!r}"),
                                 ({**perms, group: torch.zeros_like(perms[group])}, "must hold each of its"),
                                 ({**perms, group: perms[group].float()}, "must be an integer tensor"),
                                 ({**perms, group: perms[group].tolist()}, "must be an integer tensor")):
        with pytest.raises(ValueError, match=message):
            repair(a, mixed, spec, stats, wrong_perms, 0.5, "repair", [inputs])
    partial = collect_statistics(a, b, [], [inputs])
    with pytest.raises(ValueError, match="stats has no statistics at"):
        repair(a, mixed, spec, partial, perms, 0.5, "repair", [inputs])
    with pytest.raises(ValueError, match="stats has no statistics at"):
        match_permutations(spec, partial)
    with pytest.raises(ValueError, match="must be the Statistics that collect_statistics returns"):
        match_permutations(spec, None)
    with pytest.raises(ValueError, match="state_dict must be a state dict"):
        permute_state_dict(a, spec, perms)
    with pytest.raises(ValueError, match="state_dict has no tensor"):
        repair(a, {}, spec, stats, perms, 0.5, "repair", [inputs])
    with pytest.raises(ValueError, match="the models differ at"):
        collect_statistics(a, VGG(widths=(8,), layers_per_stage=1, image_size=8), spec.sites, [inputs])
    with pytest.raises(ValueError, match="method must be one of"):
        repair(a, mixed, spec, stats, perms, 0.5, "magic", [inputs])
    with pytest.raises(ValueError, match="needs calibration batches"):
        repair(a, mixed, spec, stats, perms, 0.5, "repair")
    for alpha in (0.0, 1.0):  # a merge at an endpoint is the endpoint
        with pytest.raises(MergeError, match="strictly between 0 and 1"):
            merge(a, b, [inputs], alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):  # REPAIR does not extrapolate
        repair(a, mixed, spec, stats, perms, 1.5, "repair", [inputs])


def test_merge_arguments_are_checked_before_any_work():
    """Misuse of the Python API is one clear error naming the argument, raised before the
    spec is discovered or a batch read."""
    a, b = endpoints(lambda: MLP(depth=2, width=8, num_classes=3, image_size=4))
    batches = [torch.randn(16, 1, 4, 4)]
    for arguments, message in (
            ({"match_at": "middle"}, "match_at must be one of"),
            ({"num_samples": 0}, "num_samples must be an integer of at least 1"),
            ({"eval_samples": -1}, "eval_samples must be an integer of at least 1"),
            ({"num_samples": 2.5}, "num_samples must be an integer"),
            ({"grid": 4.5}, "grid must be an integer of at least 3"),
            ({"alpha": "0.5"}, "alpha must be a number"),
            ({"curves": "naive"}, "curves must be a tuple of curve names"),
            ({"evaluation": batches}, "evaluation must map names to labelled batches"),
            ({"spec": {"groups": {}}}, "spec must be a PermutationSpec or the path of one"),
            ({"accelerator": "cpu"}, "accelerator must be an accelerate.Accelerator"),
            ({"cache_memory": "1GB"}, "cache_memory must be an integer of at least 1"),
            ({"cache_memory": -1}, "cache_memory must be an integer of at least 1"),
            ({"announce": 5}, "announce must be a function of one string")):
        with pytest.raises(MergeError, match=message):
            merge(a, b, batches, **arguments)
    labelled = [(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,)))]
    # Evaluation data the model cannot be scored on: found on its first batch, before any pass.
    for evaluation, train_examples, message in (
            ({"test": batches}, None, r"evaluation\['test'\] needs labelled batches"),
            ({"test": [(labelled[0][0], labelled[0][1] + 3)]}, None,
             r"evaluation\['test'\] holds label \d, outside the model's 3 classes \(0-2\)"),
            ({}, 8, "the train evaluation \\(train_examples\\) needs labelled calibration batches"),
            ({"test": []}, None, r"evaluation\['test'\] holds no batch to score")):
        before = forward_count()
        with pytest.raises(MergeError, match=message):
            merge(a, b, batches, evaluation, train_examples=train_examples)
        assert forward_count() == before  # no pass ran
    with pytest.raises(TypeError, match="wrap one tensor as"):
        merge(a, b, batches[0])
    with pytest.raises(MergeError, match=r"MLP cannot run on the calibration data \(RuntimeError"):
        merge(a, b, [torch.randn(16, 5)])  # not the model's input: said so, not blamed on the spec
    with pytest.raises(MergeError, match="differ in dtype"):
        merge(a, copy.deepcopy(b).to(torch.bfloat16), batches)


def test_one_example_through_an_mlp_is_too_few_to_align_or_repair():
    """One sample per unit has no variance: its correlations are all 0, so any permutation
    would do. Refused, never reported as aligned or REPAIRed."""
    a, b = endpoints(lambda: MLP(depth=2, width=8, num_classes=3, image_size=4))
    one = [torch.randn(1, 1, 4, 4)]
    with pytest.raises(MergeError, match="1 sample per unit at .*too few to measure a variance"):
        merge(a, b, one)
    spec = discover_spec(a, one[0])
    stats = collect_statistics(a, b, spec.sites, one)
    with pytest.raises(MatchingError, match="none of its units varies over the calibration data"):
        match_permutations(spec, stats)


def test_merge_leaves_the_callers_models_as_they_were():
    """Training mode (BatchNorm and dropout as the caller left them) and weight storage (a
    state_dict taken before still aliases the weights), after a merge and after one that fails."""
    a, b = endpoints(lambda: VGG(widths=(4,), layers_per_stage=1, image_size=8))
    inputs = torch.randn(8, 1, 8, 8)
    a.train()
    b.train()
    a.features[0].eval()  # a module the caller froze on its own
    weights = a.state_dict()
    merge(a, b, [inputs], curves=())
    with pytest.raises(MergeError):
        merge(a, b, [inputs], match_at="middle")
    with pytest.raises(MergeError):
        merge(a, b, [inputs[:0]])
    assert b.training and a.training and not a.features[0].training
    assert all(m.training for name, m in a.named_modules() if not name.startswith("features.0"))
    assert all(weights[k].data_ptr() == v.data_ptr() for k, v in a.state_dict().items())


@pytest.mark.parametrize("layer, shape, axis", [
    (nn.Conv2d(3, 5, 3), (4, 3, 9, 9), 1),
    (nn.Linear(6, 5), (4, 6), -1),
    (nn.Linear(6, 5), (4, 7, 6), -1),  # channels-last sequence: the fusion trap of BatchNorm1d
    (nn.GroupNorm(1, 5), (4, 5, 6, 6), 1),  # a norm's per-channel affine
    (nn.LayerNorm(5), (4, 7, 5), -1),
])
def test_fold_matches_layer_followed_by_corrector(layer, shape, axis):
    torch.manual_seed(0)
    corrector = ChannelBatchNorm(5, axis)
    with torch.no_grad():
        corrector.running_mean.normal_()
        corrector.running_var.uniform_(0.5, 2)
        corrector.weight.normal_()
        corrector.bias.normal_()
    corrector.eval()
    x = torch.randn(*shape)
    expected = corrector(layer(x))
    state = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}
    fold_batchnorm(state, "weight", "bias", corrector)
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_stream_sum_corrections_fold_exactly_through_each_stage():
    """ConvNeXt's residual sums are corrected and folded back through their stage: the saved
    network gives the in-memory corrected network's logits (1e-5) and meets every sum's goal."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    def convnext():
        model = ConvNextForImageClassification(ConvNextConfig(
            num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 2], num_labels=5))
        with torch.no_grad():  # trained-like layer scales (1e-6 at init) and biases (0 at init)
            for name, value in model.named_parameters():
                if "layer_scale" in name:
                    value.uniform_(0.3, 1.5)
                elif name.endswith("bias"):
                    value.normal_(0, 0.2)
        return model.eval()

    a, b = endpoints(convnext)
    inputs = torch.randn(64, 1, 16, 16)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    sites = correction_sites(spec)
    sums = [s for s in sites if s.kind == "sum"]
    assert len(sums) == 3
    engine = importlib.import_module("hfrepair.repair")
    with torch.no_grad():
        net, added = engine._corrected_network(a, mixed, sites, stats, perms, 0.5, "repair", [inputs], None, None)
        layers_only = engine._fold(dict(net.state_dict()), spec, [s for s in sites if s.kind != "sum"], added)
        in_memory = with_state_dict(a, layers_only)
        for site in sums:
            in_memory.get_submodule(site.module).register_forward_hook(
                lambda _m, _i, out, c=added[site.module].eval(): c(out))
        expected = in_memory(inputs).logits
    folded = with_state_dict(a, repair(a, mixed, spec, stats, perms, 0.5, "repair", [inputs]))
    with torch.no_grad():
        torch.testing.assert_close(folded(inputs).logits, expected, atol=1e-5, rtol=1e-5)
    measured = collect_moments(folded, sums, [inputs])
    for site in sums:
        goal = site_goal(stats, site, perms[site.group], 0.5)
        torch.testing.assert_close(measured[site.module].mean, goal.mean, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(measured[site.module].std, goal.std, atol=1e-3, rtol=1e-3)


def test_block_output_correction_meets_goals_and_stays_in_memory():
    a, b = endpoints(lambda: ResNet(blocks_per_stage=2, base_channels=4, image_size=8))
    inputs = torch.randn(64, 1, 8, 8)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    blocks = block_output_sites(spec)
    assert [s.module for s in blocks] == ["relu"] + [f"blocks.{i}.relu2" for i in range(6)]
    state, in_memory = repair_block_outputs(a, mixed, spec, stats, perms, 0.5, [inputs])
    assert state.keys() == a.state_dict().keys()  # block-output correctors are a tap, not weights
    net = with_state_dict(a, state)
    measured = SiteMoments(blocks)
    run_pass([net], [in_memory, measured], [inputs])
    for site in blocks:
        goal = site_goal(stats, site, perms[site.group], 0.5)
        torch.testing.assert_close(measured.moments[site.module].std, goal.std, atol=5e-2, rtol=3e-2)
    handles = in_memory.attach([net])
    corrected = net(inputs)
    for handle in handles:
        handle.remove()
    assert not torch.allclose(net(inputs), corrected)  # the in-memory corrections matter


@pytest.mark.parametrize("normalization, factory, shape", [
    ("none", lambda: MLP(depth=3, width=16, image_size=4, in_channels=1), (1, 4, 4)),
    ("batchnorm", lambda: MLP(depth=3, width=16, image_size=4, in_channels=1, normalization="batchnorm"), (1, 4, 4)),
    ("batchnorm", lambda: ResNet(blocks_per_stage=1, base_channels=4, image_size=8, normalization="batchnorm"),
     (1, 8, 8)),
], ids=["mlp", "mlp-batchnorm", "resnet-batchnorm"])
def test_exact_repair_weights_every_example_alike_whatever_the_batches(normalization, factory, shape):
    """Batches of 256, 256 and 2 (and a last batch of one example) give the statistics of one
    batch of all examples: REPAIR's sums, and the re-measured statistics of the network's own
    BatchNorms, count examples, not batches. The first corrected layer matches to float32
    rounding; later layers differ only through the few examples that the small last batch
    normalised with its own statistics during the pass (measured: at most 2.1% of a tensor's
    largest value for the MLP, 1.3% with BatchNorm, 0.3% for the ResNet; a cumulative
    BatchNorm gave up to 17.7x, and crashed on a batch of one (N, C) example)."""
    a, b = endpoints(factory)
    torch.manual_seed(3)
    inputs = torch.randn(514, *shape)
    spec, stats, perms, mixed = prepare(a, b, inputs)
    whole = repair(a, mixed, spec, stats, perms, 0.5, "repair", [inputs])
    for sizes in ((256, 256, 2), (256, 257, 1)):
        parts = repair(a, mixed, spec, stats, perms, 0.5, "repair", list(torch.split(inputs, list(sizes))))
        first = correction_sites(spec)[0]
        if normalization == "none":
            assert torch.allclose(parts[first.weight], whole[first.weight], rtol=1e-4, atol=1e-6)
            assert torch.allclose(parts[first.bias], whole[first.bias], rtol=1e-4, atol=1e-6)
        else:
            norm = first.batchnorm
            for buffer in ("running_mean", "running_var"):
                key = f"{norm}.{buffer}"
                assert torch.allclose(parts[key], whole[key], rtol=1e-4, atol=1e-6), key
        worst = max(((parts[k] - whole[k]).abs().max() / whole[k].abs().max().clamp_min(1e-12)).item()
                    for k in whole if whole[k].is_floating_point())
        assert worst < 0.03, (sizes, worst)


def test_corrector_normalises_either_layout_alike_and_keeps_channels_last():
    """A conv output with its channels innermost in memory is normalised as a (samples,
    units) view and stays channels-last (the next conv's fast layout); a contiguous one
    goes through torch's BatchNorm kernel. Both give the same output and the same sums."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 3 + 7
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        corrector = ChannelBatchNorm(6, axis=1).train()
        with torch.no_grad():
            corrector.weight.uniform_(0.5, 2, generator=torch.Generator().manual_seed(1))
            corrector.bias.normal_(generator=torch.Generator().manual_seed(2))
            out = corrector(x.contiguous(memory_format=layout))
        assert out.is_contiguous(memory_format=layout)
        results.append((out, corrector.sums.clone()))
    (plain, plain_sums), (last, last_sums) = results
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_sums, plain_sums, rtol=1e-6, atol=1e-6)
    wide = x.double().permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(last_sums[1] / last_sums[0], wide.mean(0), rtol=1e-6, atol=1e-6)


def test_a_match_location_the_groups_lack_is_said_not_recorded_as_used():
    """``match_at="normalization"`` on an MLP without norms matches at the activations (the
    documented fallback), and the result says so rather than only naming the location asked."""
    a, b = endpoints(lambda: MLP(depth=2, width=8, num_classes=3, image_size=4))
    batches = [torch.randn(64, 1, 4, 4)]
    _, asked = merge(a, b, batches, match_at="normalization")
    _, default = merge(a, b, batches)
    groups = len(asked.groups)
    assert f"match_at 'normalization': {groups} of {groups} groups have no normalization site and were matched " \
           f"elsewhere ({groups} at activation sites)" in asked.notes
    assert asked.matched_correlation == default.matched_correlation
    assert not any(note.startswith("match_at") for note in default.notes)
