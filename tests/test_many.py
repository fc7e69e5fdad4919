"""N models merged into one: three trained MLPs beat their plain average by far, and two
models give exactly the pairwise merge."""

import pytest
import torch

import hfrepair
from hfrepair.many import merge_many
from hfrepair.models import MLP
from hfrepair.pipeline import MergeError
from hfrepair.training import train_classifier

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def three(mnist):
    train_x, train_y, test_x, test_y = mnist(28)
    models = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        models.append(train_classifier(MLP(depth=2, width=128), train_x, train_y, seed=seed, epochs=5, lr=0.05).eval())
    calibration = [train_x[i:i + 500] for i in range(0, 2000, 500)]
    test = [(test_x[i:i + 500], test_y[i:i + 500]) for i in range(0, len(test_x), 500)]
    return models, calibration, test


@pytest.mark.parametrize("matcher", ["activation", "weight"])
def test_three_models_merge_far_above_their_plain_average(three, matcher):
    models, calibration, test = three
    merged, result = merge_many(models, calibration, test, matcher=matcher)
    # Measured (one run): endpoints 93.0 / 91.6 / 92.5%; plain average 46.3%; activation
    # matching 88.4% aligned, 88.9% REPAIRed; weight matching 78.4% / 87.4%.
    assert min(e["accuracy"] for e in result.endpoints) > 0.9
    assert result.aligned["accuracy"] > result.naive["accuracy"] + 0.25
    assert result.merged["accuracy"] > result.naive["accuracy"] + 0.35
    assert result.corrected["affine"] and result.models == 3 and result.weights == pytest.approx([1 / 3] * 3)
    assert result.gap["accuracy"] == pytest.approx(
        sum(e["accuracy"] for e in result.endpoints) / 3 - result.merged["accuracy"])
    assert hfrepair.evaluate(merged, test).accuracy == result.merged["accuracy"]  # measured on what is returned


def test_two_models_are_the_pairwise_merge(three):
    models, calibration, test = three
    many, result = merge_many(models[:2], calibration, test)
    pairwise, pair_result = hfrepair.merge(models[0], models[1], calibration, {"test": test}, grid=3)
    for key, value in pairwise.state_dict().items():
        torch.testing.assert_close(many.state_dict()[key], value, rtol=1e-5, atol=1e-5)
    assert result.merged["accuracy"] == pair_result.merged["test"]["accuracy"]


def test_unmergeable_requests_are_refused(three):
    models, calibration, _test = three
    with pytest.raises(MergeError, match="at least 2 models"):
        merge_many(models[:1], calibration)
    with pytest.raises(MergeError, match="add up to 1"):
        merge_many(models, calibration, weights=[0.5, 0.5, 0.5])
    with pytest.raises(MergeError, match="repair, reset or none"):
        merge_many(models, calibration, method="closed-form")
