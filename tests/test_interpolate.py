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


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate({"w": torch.zeros(1)}, {"w": torch.ones(1)}, alpha)
