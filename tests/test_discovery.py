"""Discovered specs preserve the function under random permutations, on every architecture."""

import pytest
import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from hfrepair.discovery import ExportError, discover_spec
from hfrepair.models import MLP, VGG, ResNet
from hfrepair.spec import (
    PermutationSpec,
    SpecError,
    check_function_preserved,
    permute_state_dict,
    verify_spec,
)


def randomise(model: nn.Module) -> nn.Module:
    """Random weights with non-trivial norm buffers and scales, so every axis matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0, 1.0 / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
            else:  # norm scales and ConvNeXt's layer scale (1e-6 at init)
                param.uniform_(0.5, 1.0)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def hf_resnet(layer_type, hidden, depths):
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=hidden, depths=depths,
                          layer_type=layer_type, num_labels=5)
    return ResNetForImageClassification(config)


def convnext(hidden, depths):
    config = ConvNextConfig(num_channels=1, num_stages=len(hidden), hidden_sizes=hidden, depths=depths, num_labels=5)
    return ConvNextForImageClassification(config)


# (model factory, expected number of groups or None)
ARCHITECTURES = {
    "mlp-3x32": (lambda: MLP(depth=3, width=32), 3),
    "mlp-6x16-bn": (lambda: MLP(depth=6, width=16, normalization="batchnorm"), 6),
    "vgg-2x2": (lambda: VGG(widths=(8, 16), layers_per_stage=2, image_size=16), 4),
    "vgg-3x1": (lambda: VGG(widths=(8, 16, 32), layers_per_stage=1, image_size=16), 3),
    # ResNet: one group per residual stream (3 stages) + one per block's inner conv.
    "resnet20-bn": (lambda: ResNet(blocks_per_stage=3, base_channels=4, image_size=16), 3 + 9),
    "resnet-bn-w2": (lambda: ResNet(width=2, blocks_per_stage=1, base_channels=4, image_size=16), 3 + 3),
    "resnet-ln": (lambda: ResNet(blocks_per_stage=2, base_channels=4, normalization="layernorm", image_size=16), 3 + 6),
    "resnet-none": (lambda: ResNet(blocks_per_stage=1, base_channels=4, normalization="none", image_size=16), 3 + 3),
    "hf-resnet-basic": (lambda: hf_resnet("basic", [8, 16], [1, 2]), 2 + 3),
    "hf-resnet-bottleneck": (lambda: hf_resnet("bottleneck", [16, 32], [1, 1]), 2 + 2 * 2 + 1),
    "hf-convnext": (lambda: convnext([8, 16], [1, 2]), 2 + 3),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_discovered_spec_preserves_function(name):
    factory, expected_groups = ARCHITECTURES[name]
    model = randomise(factory())
    inputs = torch.randn(3, 1, 16, 16) if "mlp" not in name else torch.randn(3, 1, 28, 28)
    spec = discover_spec(model, inputs)
    assert len(spec.groups) == expected_groups, spec.summary()
    report = verify_spec(model, spec, inputs, atol=1e-5)
    assert report["max_abs_diff"] <= 1e-5
    assert report["inconsistent_diff"] > 1e-3
    # Every group has at least one place where its activations can be measured.
    assert {site.group for site in spec.sites} == set(spec.groups)


def test_batchnorm_buffers_are_in_the_group():
    model = randomise(ResNet(blocks_per_stage=1, base_channels=4, image_size=16))
    spec = discover_spec(model, torch.randn(2, 1, 16, 16))
    stem = next(g for g in spec.groups.values() if ("conv.weight", 0) in g.members)
    for key in ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"):
        assert (key, 0) in stem.members, key
    # The first block's inner conv reads the stream; its second conv writes back into it.
    assert ("blocks.0.conv1.weight", 1) in stem.members
    assert ("blocks.0.conv2.weight", 0) in stem.members
    # The downsampling shortcut reads the previous stream and writes the next one.
    last = next(g for g in spec.groups.values() if ("classifier.weight", 1) in g.members)
    assert ("blocks.2.shortcut.0.weight", 0) in last.members
    assert ("blocks.1.shortcut.0.weight", 1) in next(
        g for g in spec.groups.values() if ("blocks.0.conv2.weight", 0) in g.members
    ).members
    assert ("classifier.weight", 0) in spec.fixed  # logits are the model's output
    assert "model output" in spec.fixed[("classifier.weight", 0)]


def test_wrong_spec_is_rejected():
    model = randomise(MLP(depth=2, width=16))
    inputs = torch.randn(4, 1, 28, 28)
    spec = discover_spec(model, inputs)
    first = next(iter(spec.groups.values()))
    broken = PermutationSpec({first.name: type(first)(first.name, first.size, first.members[:1])})
    perm = {first.name: torch.roll(torch.arange(first.size), 1)}
    with pytest.raises(SpecError, match="changed its outputs"):
        check_function_preserved(model, permute_state_dict(model.state_dict(), broken, perm), inputs)


def test_spec_round_trips_through_json(tmp_path):
    model = randomise(ResNet(blocks_per_stage=1, base_channels=4, image_size=16))
    spec = discover_spec(model, torch.randn(2, 1, 16, 16))
    spec.save(tmp_path / "spec.json")
    loaded = PermutationSpec.load(tmp_path / "spec.json")
    assert loaded.groups == spec.groups and loaded.sites == spec.sites and loaded.fixed == spec.fixed
    verify_spec(model, loaded, torch.randn(2, 1, 16, 16))


def test_hand_edited_spec_can_drop_a_group():
    """Overriding by hand: a spec without a group leaves those axes alone and stays valid."""
    model = randomise(VGG(widths=(8, 16), layers_per_stage=1, image_size=16))
    inputs = torch.randn(2, 1, 16, 16)
    spec = discover_spec(model, inputs)
    name = next(iter(spec.groups))
    data = spec.to_dict()
    data["groups"] = [g for g in data["groups"] if g["name"] != name]
    data["sites"] = [s for s in data["sites"] if s["group"] != name]
    edited = PermutationSpec.from_dict(data)
    assert name not in edited.groups
    verify_spec(model, edited, inputs)


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent control flow: export cannot trace it
            return self.linear(x)
        return x


def test_unexportable_model_says_what_to_do():
    with pytest.raises(ExportError, match="spec by hand"):
        discover_spec(Unexportable(), torch.randn(2, 4))


class Tricky(nn.Module):
    """Patterns that once produced wrong groups: many chunks concatenated again, a tensor
    clamp bound, an unused layer, and a BatchNorm over the sequence axis of a channels-last
    Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 24)
        self.heads = nn.ModuleList(nn.Linear(2, 3) for _ in range(12))
        self.low = nn.Parameter(torch.zeros(36))
        self.unused = nn.Linear(5, 5)
        self.seq = nn.Linear(36, 6)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(6, 2)

    def forward(self, x):  # x: (N, 5, 4)
        parts = self.inp(x).chunk(12, dim=-1)
        h = torch.cat([head(p) for head, p in zip(self.heads, parts)], dim=-1)
        h = torch.clamp(h, min=self.low)
        return self.out(self.bn(self.seq(h)))


def test_tricky_patterns_give_only_valid_groups():
    model = randomise(Tricky())
    inputs = torch.randn(3, 5, 4)
    spec = discover_spec(model, inputs)
    verify_spec(model, spec, inputs)
    keys = {member[0] for group in spec.groups.values() for member in group.members}
    assert not any(key.startswith("unused.") for key in keys)
    # The clamp bound is elementwise with the concatenated head outputs: it moves with them,
    # block by block, exactly as the columns of the layer that reads them.
    def groups_on(key, axis):
        return sorted((name, m[2:]) for name, g in spec.groups.items() for m in g.members if m[:2] == (key, axis))

    assert groups_on("low", 0) and groups_on("low", 0) == groups_on("seq.weight", 1)
    assert ("unused.weight", 0) in spec.fixed and "not used" in spec.fixed[("unused.weight", 0)]
    # The BatchNorm normalises the sequence axis, not seq's output units: no BN-reset site.
    seq = next(site for site in spec.sites if site.module == "seq")
    assert seq.axis == 2 and seq.batchnorm is None
