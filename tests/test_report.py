"""A merge says what it aligned, what stayed fixed and what REPAIR corrected, and refuses to
pretend: nothing to align or nothing to correct is an error unless asked for."""

import pytest
import torch
from torch import nn

from hfrepair.card import alignment_text, repair_text
from hfrepair.discovery import discover_spec
from hfrepair.models import MLP
from hfrepair.pipeline import MergeError, merge
from hfrepair.report import describe


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
    assert describe(result)[:2] == ["permutation spec: given by hand (checked: a random permutation per group leaves "
                                    "the outputs unchanged)", "aligned: nothing (no permutation group)"]
    assert "**not** aligned" in alignment_text(result.to_dict())[0]


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
