"""Matching recovers a known permutation; the aligned copy computes the same function."""

import pytest
import torch

from hfrepair.discovery import discover_spec
from hfrepair.matching import match_permutations, matching_sites, mean_matched_correlation
from hfrepair.models import ResNet
from hfrepair.spec import permute_state_dict, random_permutations, with_state_dict
from hfrepair.statistics import collect_statistics


@pytest.mark.parametrize("match_at", ["activation", "normalization", "linear", "all"])
def test_matching_undoes_a_known_permutation(match_at):
    torch.manual_seed(0)
    model = ResNet(blocks_per_stage=1, base_channels=6, image_size=12).eval()
    inputs = torch.randn(32, 1, 12, 12)
    spec = discover_spec(model, inputs[:2])
    scrambled = random_permutations(spec, torch.Generator().manual_seed(1))
    other = with_state_dict(model, permute_state_dict(model.state_dict(), spec, scrambled)).eval()
    stats = collect_statistics(model, other, spec.sites, [inputs])
    perms = match_permutations(spec, stats, match_at)
    for name, perm in perms.items():
        # other's unit j is model's unit scrambled[j]; matching must put it back.
        assert torch.equal(scrambled[name][perm], torch.arange(len(perm))), name
    realigned = permute_state_dict(other.state_dict(), spec, perms)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(realigned[key], value)
    assert min(mean_matched_correlation(spec, stats, perms, match_at).values()) > 0.999


def test_matching_location_falls_back_when_a_group_lacks_that_kind():
    model = ResNet(blocks_per_stage=1, base_channels=4, normalization="none", image_size=12)
    spec = discover_spec(model, torch.randn(2, 1, 12, 12))
    # No normalisation layers: falls back to the post-activation sites.
    for name in spec.groups:
        sites = matching_sites(spec, name, "normalization")
        assert sites and all(s in {x.module for x in spec.sites_of(name, ("activation",))} for s in sites)
