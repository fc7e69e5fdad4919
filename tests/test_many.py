"""N models merged into one: three and four trained MLPs beat their plain average by far,
and two models give exactly the pairwise merge."""

import copy

import pytest
import torch

import hfrepair
from hfrepair.many import merge_many
from hfrepair.models import MLP
from hfrepair.pipeline import MergeError
from hfrepair.training import train_classifier

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def four(mnist):
    """Four MLPs (seeds 1-4), calibration inputs and labelled test batches."""
    train_x, train_y, test_x, test_y = mnist(28)
    models = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        models.append(train_classifier(MLP(depth=2, width=128), train_x, train_y, seed=seed, epochs=5, lr=0.05).eval())
    calibration = [train_x[i:i + 500] for i in range(0, 2000, 500)]
    test = [(test_x[i:i + 500], test_y[i:i + 500]) for i in range(0, len(test_x), 500)]
    return models, calibration, test


@pytest.mark.parametrize("count, matcher", [(3, "activation"), (3, "weight"), (4, "activation")])
def test_models_merge_far_above_their_plain_average(four, count, matcher):
    models, calibration, test = four
    merged, result = merge_many(models[:count], calibration, test, matcher=matcher)
    # Measured (one run): endpoints 91.7 / 92.1 / 92.6 / 92.4%. Three: plain average 45.3%,
    # activation matching 89.5% aligned and 88.3% REPAIRed after 5 rounds of re-aligning each
    # model to the others (87.2% / 88.2% with each aligned to the first only), weight matching
    # 80.8% / 86.0%. Four: plain average 29.0%, activation matching 87.8% / 88.0% after 6 rounds
    # (87.0% / 88.4% each to the first).
    assert min(e["accuracy"] for e in result.endpoints) > 0.9
    assert result.rounds >= 1 and (result.settled or matcher == "weight")  # weight matching may cycle
    assert result.aligned["accuracy"] > result.naive["accuracy"] + 0.25
    assert result.merged["accuracy"] > result.naive["accuracy"] + 0.35
    assert result.corrected["affine"] and result.models == count
    assert result.weights == pytest.approx([1 / count] * count)
    assert result.gap["accuracy"] == pytest.approx(
        sum(e["accuracy"] for e in result.endpoints) / count - result.merged["accuracy"])
    assert hfrepair.evaluate(merged, test).accuracy == result.merged["accuracy"]  # measured on what is returned


def test_two_models_are_the_pairwise_merge(four):
    models, calibration, test = four
    many, result = merge_many(models[:2], calibration, test)
    pairwise, pair_result = hfrepair.merge(models[0], models[1], calibration, {"test": test}, grid=3)
    for key, value in pairwise.state_dict().items():
        torch.testing.assert_close(many.state_dict()[key], value, rtol=1e-5, atol=1e-5)
    assert result.merged["accuracy"] == pair_result.merged["test"]["accuracy"]
    # What it aligned, with the pair's correlations, as the pairwise merge says it.
    assert result.aligned_groups.keys() == pair_result.aligned.keys()
    for kind, info in pair_result.aligned.items():
        assert result.aligned_groups[kind] == pytest.approx(info, rel=1e-6)


@pytest.mark.parametrize("build", ["mlp", "vit"])
def test_a_pair_in_a_common_order_correlates_as_the_permuted_models_do(four, build):
    """Both models of a pair permuted into a common order: the correlation read off the
    unpermuted pair's statistics with ``reference`` equals that of the permuted models
    measured anew (per-head groups included)."""
    from hfrepair.discovery import discover_spec
    from hfrepair.matching import mean_matched_correlation
    from hfrepair.spec import identity_permutations, load_into, permute_state_dict, random_permutations
    from hfrepair.statistics import collect_statistics
    from tests.conftest import tiny_vit

    models, calibration, _ = four
    if build == "vit":
        torch.manual_seed(0)
        models = [tiny_vit().eval() for _ in range(2)]
        calibration = [x.view(-1, 1, 28, 28)[:200] for x in calibration[:2]]
    first, second = models[0], models[1]
    spec = discover_spec(first, calibration[0][:2])
    generator = torch.Generator().manual_seed(0)
    perm_first, perm_second = (random_permutations(spec, generator) for _ in range(2))
    measured = collect_statistics(first, second, spec.sites, calibration)
    reread = mean_matched_correlation(spec, measured, perm_second, reference=perm_first)
    permuted = [load_into(copy.deepcopy(model), permute_state_dict(model.state_dict(), spec, perms))
                for model, perms in ((first, perm_first), (second, perm_second))]
    anew = mean_matched_correlation(spec, collect_statistics(*permuted, spec.sites, calibration),
                                    identity_permutations(spec))
    assert reread == pytest.approx(anew, abs=1e-5)
    assert reread != pytest.approx(mean_matched_correlation(spec, measured, identity_permutations(spec)))


def test_unmergeable_requests_are_refused(four):
    models, calibration, _test = four
    models = models[:3]
    with pytest.raises(MergeError, match="at least 2 models"):
        merge_many(models[:1], calibration)
    with pytest.raises(MergeError, match="add up to 1"):
        merge_many(models, calibration, weights=[0.5, 0.5, 0.5])
    with pytest.raises(MergeError, match="repair, reset or none"):
        merge_many(models, calibration, method="closed-form")
    with pytest.raises(MergeError, match="add up to 1"):  # NaN compares false with every bound
        merge_many(models[:2], calibration, weights=[float("nan"), 0.5])
    with pytest.raises(MergeError, match="match_at must be one of"):
        merge_many(models, calibration, match_at="middle")
    with pytest.raises(MergeError, match="model 3 has weight 0: leave it out of the merge"):
        merge_many(models, calibration, weights=[0.5, 0.5, 0.0])
    with pytest.raises(MergeError, match="models must be a list of models"):
        merge_many(models[0], calibration)
    with pytest.raises(MergeError, match="one iterable of labelled batches"):
        merge_many(models, calibration, {"test": calibration})
    broken = copy.deepcopy(models[2])
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(MergeError, match="^model 3 has non-finite values"):  # the third model named, not "B"
        merge_many([*models[:2], broken], calibration)


def test_plain_averaging_is_never_called_repaired(four):
    from hfrepair.cli import format_many_table

    models, calibration, test = four
    _, result = merge_many(models[:3], calibration, test, method="none")
    assert result.pairwise and all(set(pair) == {"models", "aligned"} for pair in result.pairwise)
    assert result.merged == result.aligned  # the saved model is the aligned average itself
    table = format_many_table(result, ["a", "b", "c"], "image-classification")
    assert "aligned average (saved)" in table and "REPAIR" not in table.replace("REPAIR: nothing corrected", "")


def test_a_match_location_the_groups_lack_is_said(four):
    """As for two models: ``match_at="normalization"`` on MLPs without norms matches at the
    activations, and a note says so."""
    models, calibration, _test = four
    _, result = merge_many(models[:3], calibration, match_at="normalization", pairwise=False)
    groups = len(result.groups)
    assert f"{groups} of {groups} groups have no normalization site" in " ".join(result.notes)


def test_a_model_given_twice_is_said(four):
    models, calibration, _test = four
    _, result = merge_many([models[0], copy.deepcopy(models[0]), models[1]], calibration, pairwise=False)
    assert result.notes == ["models 1 and 2 hold the same weights: one model counted twice"]
