"""Weight matching over the discovered spec: B made from A by a known permutation is matched
back exactly, on every architecture discovery supports (heads, head dims, GQA, the
transformer stream, tied embeddings, BatchNorm buffers)."""

import pytest
import torch

from hfrepair.discovery import discover_spec
from hfrepair.spec import identity_permutations, permute_state_dict, random_permutations
from hfrepair.weight_matching import match_weights, objective, weight_distance

from .test_discovery import ARCHITECTURES, TRANSFORMERS, randomise

torch.set_num_threads(1)


def model_and_inputs(name: str):
    if name in TRANSFORMERS:
        factory, make_inputs = TRANSFORMERS[name][:2]
        return randomise(factory()), make_inputs()
    inputs = torch.randn(3, 1, 28, 28) if "mlp" in name else torch.randn(3, 1, 16, 16)
    return randomise(ARCHITECTURES[name][0]()), inputs


@pytest.mark.parametrize("name", [*ARCHITECTURES, *TRANSFORMERS])
def test_a_known_permutation_is_recovered_exactly(name):
    model, inputs = model_and_inputs(name)
    spec = discover_spec(model, inputs)
    state_a = model.state_dict()
    scrambled = random_permutations(spec, torch.Generator().manual_seed(1))
    state_b = permute_state_dict(state_a, spec, scrambled)
    identity = identity_permutations(spec)
    assert weight_distance(spec, state_a, state_b, identity) > 0.5

    found = match_weights(spec, state_a, state_b)

    back = permute_state_dict(state_b, spec, found)
    assert all(torch.equal(back[key], state_a[key]) for key in state_a)
    assert weight_distance(spec, state_a, state_b, found) == 0
    assert objective(spec, state_a, state_b, found) == pytest.approx(objective(spec, state_a, state_a, identity))


def test_independent_models_move_closer():
    """Two differently initialised GPT-2s: no permutation makes them equal, but the matched
    one is closer than the identity, and coordinate descent never ends below where it began."""
    torch.manual_seed(0)
    factory, make_inputs = TRANSFORMERS["gpt2-tied"][:2]
    a = randomise(factory())
    torch.manual_seed(1)
    b = factory().eval()
    spec = discover_spec(a, make_inputs())
    identity = identity_permutations(spec)
    found = match_weights(spec, a.state_dict(), b.state_dict())
    assert objective(spec, a.state_dict(), b.state_dict(), found) > objective(spec, a.state_dict(), b.state_dict(),
                                                                             identity)
    assert weight_distance(spec, a.state_dict(), b.state_dict(), found) < weight_distance(
        spec, a.state_dict(), b.state_dict(), identity)
