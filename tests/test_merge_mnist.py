"""Merging endpoints trained on the real MNIST digits: REPAIR recovers the midpoint.

Figures from one run here (2 cores, torch 2.13 CPU, one thread), midpoint test accuracy:
- BN ResNet (16-32-64 channels, 14x14 digits, 4 epochs): endpoints 95.4% / 95.3%,
  naive 11.7%, aligned 11.4%, aligned + REPAIR 58.6% (+ block outputs 59.6%),
  REPAIR without alignment 21.1%.
- Plain MLP (20 hidden layers of 128, trained with BN, folded): endpoints 92.2% / 93.1%,
  naive 8.4%, aligned 23.5%, REPAIR 86.7%, closed form 85.8%.
- VGG without normalisation (6 convs, 16-32-64): endpoints 93.8% / 94.5%, naive 22.0%,
  aligned 52.5%, REPAIR 75.1%.
- LayerNorm ResNet (16-32-64, 14x14, 4 epochs): endpoints 91.2% / 91.0%, naive 14.6%,
  aligned 64.3%, REPAIR 75.9% (corrected at the norm outputs, folded into their affine).
"""

import pytest

from hfrepair.models import ResNet
from hfrepair.pipeline import merge

from .conftest import SMALL, batches, train_pair


def midpoint(result, curve, split="test", metric="accuracy"):
    index = result.alphas.index(0.5)
    return result.curves[curve][split][index][metric]


def recovered(result, curve="repaired"):
    """Share of the aligned-only midpoint loss (in accuracy) that ``curve`` wins back."""
    ends = (result.endpoints["A"]["test"]["accuracy"] + result.endpoints["B"]["test"]["accuracy"]) / 2
    aligned = midpoint(result, "aligned")
    return (midpoint(result, curve) - aligned) / (ends - aligned)


def run(pair, data, **kwargs):
    train_x, train_y, test_x, test_y = data
    calibration = batches(train_x, train_y)
    evaluation = {"test": batches(test_x, test_y), "train": calibration}
    return merge(pair[0], pair[1], calibration, evaluation, grid=3, **kwargs)


@pytest.fixture(scope="module")
def resnet_result(resnet_pair, mnist):
    return run(resnet_pair, mnist(14),
               curves=("naive", "naive-repaired", "aligned", "repaired", "repaired+blocks"))


def test_bn_resnet_repair_recovers_most_of_the_midpoint(resnet_result):
    _, result = resnet_result
    assert min(result.endpoints["A"]["test"]["accuracy"], result.endpoints["B"]["test"]["accuracy"]) > 0.9
    assert midpoint(result, "aligned") < 0.5  # BN statistics collapse without REPAIR
    assert recovered(result) > 0.5
    # Without alignment REPAIR cannot do it: naive averaging is clearly worse.
    assert midpoint(result, "naive-repaired") < midpoint(result, "repaired") - 0.2
    assert midpoint(result, "naive", metric="loss") > midpoint(result, "repaired", metric="loss")
    # Barriers by Eq. 1 shrink with REPAIR, on accuracy and on train loss.
    barriers = result.barriers
    assert barriers["repaired"]["test"]["accuracy"]["max"] < barriers["aligned"]["test"]["accuracy"]["max"] - 0.3
    assert barriers["repaired"]["train"]["loss"]["max"] < barriers["aligned"]["train"]["loss"]["max"]
    # The returned model is the one measured at alpha = 0.5.
    assert result.merged["test"]["accuracy"] == midpoint(result, "repaired")
    assert result.calibration_examples == 4000


def test_block_output_corrections_are_reported_beside_never_instead(resnet_result):
    merged, result = resnet_result
    assert "repaired+blocks" in result.curves
    assert any("never saved" in note for note in result.notes)
    # The saved model is the fused one: same keys as the endpoints, and its accuracy is
    # the "repaired" curve's, whatever the block-output curve says.
    assert set(merged.state_dict()) == set(result_keys(merged))
    assert result.merged["test"]["accuracy"] == midpoint(result, "repaired")
    assert midpoint(result, "repaired+blocks") > midpoint(result, "aligned") + 0.2


def result_keys(model):
    return type(model)(**{k: v for k, v in model._hub_mixin_config.items() if k != "model_type"}).state_dict()


def test_bn_resnet_variance_collapse_is_undone(resnet_result):
    _, result = resnet_result
    aligned = list(result.variance_ratio["aligned"].values())
    repaired = list(result.variance_ratio["repaired"].values())
    assert aligned[-1] < 0.5  # collapse compounds with depth
    assert all(0.6 < r < 1.5 for r in repaired)


def test_deep_mlp_repair_exact_and_closed_form(deep_mlp_pair, mnist):
    data = mnist(28)
    _, exact = run(deep_mlp_pair, data, method="repair")
    _, closed = run(deep_mlp_pair, data, method="closed-form")
    assert midpoint(exact, "aligned") < 0.5  # aligned-only collapses at depth 20
    assert midpoint(exact, "aligned") > midpoint(exact, "naive")
    assert recovered(exact) > 0.5
    assert recovered(closed) > 0.3
    assert midpoint(exact, "repaired") >= midpoint(closed, "repaired") - 0.02


def test_vgg_without_normalisation(vgg_pair, mnist):
    _, result = run(vgg_pair, mnist(14), method="repair")
    assert min(result.endpoints["A"]["test"]["accuracy"], result.endpoints["B"]["test"]["accuracy"]) > 0.9
    assert midpoint(result, "repaired") > midpoint(result, "aligned") + 0.1
    assert midpoint(result, "aligned") > midpoint(result, "naive")


def test_layernorm_resnet_repair_improves_the_saved_model(mnist):
    """LayerNorm ResNets: corrections at the norm outputs, folded into the norms' affine."""
    factory = lambda: ResNet(width=1, blocks_per_stage=1, normalization="layernorm", **SMALL)
    pair = train_pair(factory, mnist(14), epochs=4, lr=0.05)
    _, result = run(pair, mnist(14), method="repair")
    assert min(result.endpoints[k]["test"]["accuracy"] for k in "AB") > 0.85
    assert midpoint(result, "repaired") > midpoint(result, "aligned") + 0.05
    assert result.merged["test"]["accuracy"] == pytest.approx(midpoint(result, "repaired"))
