import pytest
import torch

from hfrepair.interpolate import interpolate


def test_floats_interpolate_and_integer_buffers_do_not():
    a = {"w": torch.zeros(3), "n": torch.tensor(10)}
    b = {"w": torch.ones(3), "n": torch.tensor(30)}
    mixed = interpolate(a, b, 0.25)
    torch.testing.assert_close(mixed["w"], torch.full((3,), 0.25))
    assert mixed["n"].item() == 10 and mixed["n"].dtype == torch.int64
    torch.testing.assert_close(interpolate(a, b, 1.0)["w"], b["w"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5", None])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        interpolate({"w": torch.zeros(1)}, {"w": torch.ones(1)}, alpha)


def test_state_dicts_that_do_not_match_are_refused_in_words():
    with pytest.raises(ValueError, match="hold different tensors \\(e.g. 'v' is in one only\\)"):
        interpolate({"w": torch.zeros(2)}, {"w": torch.ones(2), "v": torch.ones(1)}, 0.5)
    with pytest.raises(ValueError, match=r"differ in shape at w: \(2,\) vs \(3,\)"):
        interpolate({"w": torch.zeros(2)}, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="state_b must be a state dict"):
        interpolate({"w": torch.zeros(2)}, torch.nn.Linear(2, 2), 0.5)
