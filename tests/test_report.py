"""A merge says what it aligned, what stayed fixed and what REPAIR corrected, and refuses to
pretend: nothing to align or nothing to correct is an error unless asked for."""

import pytest
import torch
from torch import nn

from hfrepair.card import alignment_text, repair_text, saved_point
from hfrepair.cli import format_table
from hfrepair.discovery import discover_spec
from hfrepair.models import MLP
from hfrepair.pipeline import MergeError, merge
from hfrepair.report import LEFT_OUT, describe, fixed_summary, repair_summary
from hfrepair.spec import PermutationSpec


class Sorted(nn.Module):
    """Sorting the hidden units has no discovery rule: every hidden axis stays fixed."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.sort(self.inp(x), dim=-1).values)


def pair(factory):
    torch.manual_seed(0)
    a = factory().eval()
    torch.manual_seed(1)
    return a, factory().eval()


def data(shape, classes):
    torch.manual_seed(2)
    return [(torch.randn(64, *shape), torch.randint(0, classes, (64,))) for _ in range(2)]


def test_nothing_to_align_names_the_op_without_a_rule():
    a, b = pair(Sorted)
    with pytest.raises(MergeError, match=r"nothing to align in Sorted.*aten\.sort"):
        merge(a, b, data((6,), 3))


def test_a_hand_written_spec_without_groups_is_an_explicit_unaligned_merge():
    a, b = pair(Sorted)
    batches = data((6,), 3)
    spec = discover_spec(a, batches[0][0][:2])
    assert not spec.groups
    merged, result = merge(a, b, batches, method="none", spec=spec)
    assert result.aligned == {} and "not aligned" in result.notes[0]
    assert describe(result)[:2] == ["permutation spec: given by hand (no permutation group to check)",
                                    "aligned: nothing (no permutation group)"]
    assert "**not** aligned" in alignment_text(result.to_dict())[0]
    assert result.weight_distance == {}  # nothing was permuted: no distance "after matching"


def mlp_pair():
    return pair(lambda: MLP(depth=2, width=16, image_size=4, in_channels=1))


def test_without_groups_the_curves_are_naive_and_repair_without_alignment():
    """The aligned curve would repeat the naive one; the REPAIRed one is REPAIR unaligned."""
    a, b = mlp_pair()
    batches = data((1, 4, 4), 10)
    empty = PermutationSpec({}, sites=discover_spec(a, batches[0][0][:2]).sites)
    _, result = merge(a, b, batches, {"test": batches}, grid=3, spec=empty)
    assert list(result.curves) == ["naive", "naive-repaired"]
    assert result.curves["naive-repaired"]["test"][1] == result.merged["test"]  # the saved model's own point
    assert result.variance_ratio == {} and not any("aligned curve" in step for step in result.plan["steps"])
    assert result.plan["example_forwards"] == result.plan["example_forwards_run"]
    assert any("naive-repaired" in note for note in result.notes)


def test_plain_interpolation_has_no_repaired_curve():
    a, b = mlp_pair()
    batches = data((1, 4, 4), 10)
    _, result = merge(a, b, batches, {"test": batches}, grid=3, method="none",
                      curves=("naive", "naive-repaired", "aligned", "repaired"))
    assert list(result.curves) == ["naive", "aligned"] and list(result.variance_ratio) == ["aligned"]
    assert result.curves["aligned"]["test"][1] == result.merged["test"]
    assert result.plan["example_forwards"] == result.plan["example_forwards_run"]
    assert "method none corrects nothing: no REPAIRed curve was measured" in result.notes


@pytest.mark.parametrize("grid, alpha, alphas", [(4, 0.5, [0, 1 / 3, 0.5, 2 / 3, 1]), (3, 0.3, [0, 0.3, 0.5, 1])])
def test_the_saved_model_is_a_point_of_its_curve_whatever_the_grid(grid, alpha, alphas):
    a, b = mlp_pair()
    batches = data((1, 4, 4), 10)
    _, result = merge(a, b, batches, {"test": batches}, grid=grid, alpha=alpha)
    assert result.alphas == pytest.approx(alphas)
    saved = result.alphas.index(alpha)
    assert result.curves["repaired"]["test"][saved] == result.merged["test"]
    assert result.plan["example_forwards"] == result.plan["example_forwards_run"]
    accuracy = f"{100 * result.merged['test']['accuracy']:.1f}%"
    header, repaired = [line for line in format_table(result).splitlines() if line.startswith(("interp", "repaired"))]
    assert ("mid acc" if alpha == 0.5 else f"alpha={alpha:g} acc") in header and accuracy in repaired.split()[1]
    assert saved_point(result.alphas, alpha)[0] == saved


def test_a_spec_that_leaves_groups_out_reports_their_axes_fixed():
    a, b = mlp_pair()
    batches = data((1, 4, 4), 10)
    full = discover_spec(a, batches[0][0][:2])
    first = next(iter(full.groups))
    partial = PermutationSpec({n: g for n, g in full.groups.items() if n != first}, full.fixed, full.sites, full.streams)
    _, result = merge(a, b, batches, spec=partial)
    left_out = sum(1 for m in full.groups[first].members)
    assert result.fixed[LEFT_OUT] == left_out
    assert sum(result.fixed.values()) == sum(fixed_summary(full).values()) + left_out


def test_exact_repair_reports_every_batchnorm_it_re_measures():
    """The exact pass re-measures every BatchNorm, whatever sites a hand-written spec lists."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                      nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).eval()
    example = torch.randn(2, 1, 5, 5)
    spec = discover_spec(a, example)
    few = PermutationSpec(spec.groups, spec.fixed, [s for s in spec.sites if s.batchnorm != "4"], spec.streams)
    assert repair_summary(few, "repair", a)["batchnorm"] == ["1", "4"]
    assert repair_summary(few, "closed-form", a)["batchnorm"] == ["1"]


def test_reset_without_batchnorm_has_nothing_to_correct():
    a, b = pair(lambda: MLP(depth=2, width=16, image_size=4, in_channels=1))
    with pytest.raises(MergeError, match="nothing to correct"):
        merge(a, b, data((1, 4, 4), 10), method="reset")


def test_the_report_lists_groups_fixed_axes_and_corrections():
    a, b = pair(lambda: MLP(depth=2, width=16, image_size=4, in_channels=1))
    batches = data((1, 4, 4), 10)
    _, result = merge(a, b, batches, {"test": batches}, grid=3)
    assert result.aligned["mlp"]["groups"] == 2 and result.aligned["mlp"]["sizes"] == [16]
    assert result.fixed and all(count > 0 for count in result.fixed.values())
    assert len(result.corrected["affine"]) == 2 and not result.corrected["scale"]
    assert any(line.startswith("REPAIR corrected 2 sites") for line in describe(result))
    assert "corrected 2 sites" in repair_text(result.to_dict())[1]
    # Plain interpolation says so, everywhere.
    _, plain = merge(a, b, batches, {"test": batches}, grid=3, method="none")
    assert not any(plain.corrected.values())
    assert "plain interpolation" in repair_text(plain.to_dict())[0]
    assert "REPAIR: nothing corrected (method none)" in describe(plain)


def test_block_outputs_need_block_outputs():
    """An MLP has no residual stream: a 'repaired+blocks' curve would only repeat 'repaired'."""
    a, b = pair(lambda: MLP(depth=2, width=16, image_size=4, in_channels=1))
    with pytest.raises(MergeError, match="no residual-block outputs"):
        merge(a, b, data((1, 4, 4), 10), curves=("naive", "aligned", "repaired", "repaired+blocks"))


def test_an_n_model_gap_reads_in_the_direction_it_goes():
    """``gap`` is the endpoints' mean minus the merged model's metric: worse accuracy is a
    positive gap, worse loss a negative one; the words say which way either goes."""
    from hfrepair.report import gap_text

    assert gap_text({"accuracy": 0.009, "loss": -0.1}, language_model=False) == \
        "0.9 points of accuracy below the endpoints' weighted mean"
    assert gap_text({"accuracy": -0.02}, language_model=False) == \
        "2.0 points of accuracy above the endpoints' weighted mean"
    assert gap_text({"accuracy": 0.012, "loss": -0.193}, language_model=True) == \
        "a loss 0.193 above the endpoints' weighted mean"
    assert gap_text({"loss": 0.05}, language_model=True) == "a loss 0.050 below the endpoints' weighted mean"
    assert gap_text({}, language_model=True) == "not measured"


def test_group_sizes_are_listed_by_units():
    """32 before 128 (not as text), per-head sizes by their units too."""
    from hfrepair.report import alignment_summary
    from hfrepair.spec import PermutationGroup

    groups = {name: PermutationGroup(name, size, [], kind, blocks) for name, size, kind, blocks in (
        ("a", 128, "mlp", 1), ("b", 32, "mlp", 1), ("c", 64, "mlp", 1), ("d", 64, "head_dims", 4),
        ("e", 12, "head_dims", 1))}
    summary = alignment_summary(PermutationSpec(groups))
    assert summary["mlp"]["sizes"] == [32, 64, 128]
    assert summary["head_dims"]["sizes"] == [12, "4x16"]


def test_a_local_folder_given_as_a_dot_is_named_in_the_card(tmp_path, monkeypatch):
    from hfrepair.card import dataset_text

    (tmp_path / "digits").mkdir()
    monkeypatch.chdir(tmp_path / "digits")
    assert dataset_text({"repo_id": None, "reference": ".", "revision": None}) == "`digits` (a local folder)"


def test_a_barrier_that_rounds_to_zero_reads_zero_not_minus_zero():
    from hfrepair.report import rounded

    assert f"{rounded(-0.0004, 1):.1f}" == "0.0" and f"{rounded(-0.0004, 3):.3f}" == "0.000"
    assert f"{rounded(-0.06, 1):.1f}" == "-0.1" and f"{rounded(0.25, 1):.1f}" == "0.2"


def test_a_model_merged_with_itself_is_said_to_be_one():
    import copy

    a, b = mlp_pair()
    batches = data((1, 4, 4), 10)
    _, itself = merge(a, copy.deepcopy(a), batches, {"test": batches}, grid=3)
    _, pair = merge(a, b, batches, {"test": batches}, grid=3)
    same = "A and B hold the same weights: this merge is A, with REPAIR's corrections"
    assert same in itself.notes and same not in pair.notes
