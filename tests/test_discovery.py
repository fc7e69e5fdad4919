"""Discovered specs preserve the function under random permutations, on every architecture."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hfrepair.discovery import ExportError, discover_spec
from hfrepair.models import MLP, VGG, ResNet
from hfrepair.repair import correction_mode, correction_sites
from hfrepair.report import IN_HEAD_ORDER, fixed_summary
from hfrepair.spec import (
    PermutationGroup,
    PermutationSpec,
    SpecError,
    check_function_preserved,
    check_spec_fits,
    model_outputs,
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
    check_spec_fits(model, spec)  # what a hand-written spec must meet, a discovered one meets


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


def test_what_is_not_a_permutation_or_a_finite_output_is_named_as_such():
    """A permutation of the wrong length or with a repeated unit would resize or duplicate
    weights; NaN inputs would look like a wrong spec."""
    model = randomise(MLP(depth=2, width=16))
    inputs = torch.randn(4, 1, 28, 28)
    spec = discover_spec(model, inputs)
    name = next(iter(spec.groups))
    state = model.state_dict()
    for perm in (torch.arange(3), torch.zeros(16, dtype=torch.long)):
        with pytest.raises(ValueError, match=f"group {name!r} must hold each of its 16 units once"):
            permute_state_dict(state, spec, {name: perm})
    with pytest.raises(ValueError, match="no permutation group 'nope'"):
        permute_state_dict(state, spec, {"nope": torch.arange(16)})
    with pytest.raises(SpecError, match="not finite"):
        check_function_preserved(model, state, torch.full_like(inputs, float("nan")))


def test_spec_round_trips_through_json(tmp_path):
    model = randomise(ResNet(blocks_per_stage=1, base_channels=4, image_size=16))
    spec = discover_spec(model, torch.randn(2, 1, 16, 16))
    spec.save(tmp_path / "spec.json")
    loaded = PermutationSpec.load(tmp_path / "spec.json")
    assert loaded.groups == spec.groups and loaded.sites == spec.sites and loaded.fixed == spec.fixed
    verify_spec(model, loaded, torch.randn(2, 1, 16, 16))


def test_convnext_stages_are_foldable_stream_stretches_and_round_trip(tmp_path):
    """Each ConvNeXt stage is a stretch: entered by the stem's LayerNorm or the downsampling
    conv, one sum per block, written by the block's pwconv2 through its layer scale, read by
    the next block's depthwise conv (kernel rows); no other architecture has one (ReLU after
    the sums, or LayerNorms reading them, or no hookable sum)."""
    model = randomise(convnext([8, 16], [1, 2]))
    spec = discover_spec(model, torch.randn(2, 1, 16, 16))
    stage = "convnext.encoder.stages.{}.layers.{}".format
    assert [(f.entry, f.sums) for f in spec.streams] == [
        ("convnext.embeddings.layernorm", [stage(0, 0)]),
        ("convnext.encoder.stages.1.downsampling_layer.1", [stage(1, 0), stage(1, 1)])]
    second = spec.streams[1]
    assert second.writers == [stage(1, 0) + ".pwconv2", stage(1, 1) + ".pwconv2"]
    assert second.gains == [stage(1, i) + ".layer_scale_parameter" for i in (0, 1)]
    assert second.readers == [[[stage(1, 0) + ".dwconv.weight", 0]], [[stage(1, 1) + ".dwconv.weight", 0]]]
    sums = [s for s in spec.sites if s.kind == "sum"]
    assert [s.module for s in sums] == [stage(0, 0), stage(1, 0), stage(1, 1)]
    assert [correction_mode(s) for s in correction_sites(spec) if s.kind == "sum"] == ["stream"] * 3
    spec.save(tmp_path / "spec.json")
    assert PermutationSpec.load(tmp_path / "spec.json").streams == spec.streams
    for name in ("resnet20-bn", "resnet-none", "hf-resnet-basic", "vgg-2x2"):
        factory, _ = ARCHITECTURES[name]
        assert not discover_spec(randomise(factory()), torch.randn(2, 1, 16, 16)).streams, name


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


# ---- transformers: tiny configs (hidden 32, 2 layers, 4 heads) ------------------------------

VOCAB, LENGTH, LAYERS = 50, 7, 2
TINY = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)


def vit():
    config = ViTConfig(**TINY, image_size=16, patch_size=4, num_channels=1, num_labels=5)
    return ViTForImageClassification(config)


def bert():
    config = BertConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config)


def gpt2(**overrides):
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=16,
                        **{"use_cache": False, **overrides})
    return GPT2LMHeadModel(config)


def llama(tied: bool, **overrides):
    """Grouped-query attention: 4 query heads share 2 kv heads."""
    config = LlamaConfig(**TINY, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=16,
                         tie_word_embeddings=tied, **{"use_cache": False, **overrides})
    return LlamaForCausalLM(config)


def token_ids():
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(0))


def layer_groups(attention: str, mlp: str, heads=("heads",), dims=("qk_dims", "v_dims")) -> dict[str, str]:
    """Expected group name -> kind for every layer: heads, head dims and the MLP's units."""
    expected = {}
    for i in range(LAYERS):
        expected.update({f"{attention.format(i)}.{role}": "heads" for role in heads})
        expected.update({f"{attention.format(i)}.{role}": "head_dims" for role in dims})
        expected[mlp.format(i)] = "mlp"
    return expected


# name -> (factory, inputs, expected groups (name -> kind) besides "stream",
#          (key, axis) that must be fixed, (key, axis) that must be on the stream)
TRANSFORMERS = {
    "vit": (vit, lambda: torch.randn(2, 1, 16, 16),
            layer_groups("vit.layers.{}.attention", "vit.layers.{}.mlp.fc1"),
            [("vit.embeddings.position_embeddings", 1), ("vit.embeddings.cls_token", 1)],
            [("vit.embeddings.patch_embeddings.projection.weight", 0), ("vit.embeddings.cls_token", 2),
             ("vit.embeddings.position_embeddings", 2), ("classifier.weight", 1)]),
    "bert": (bert, token_ids,
             {**layer_groups("bert.encoder.layer.{}.attention.self", "bert.encoder.layer.{}.intermediate.dense"),
              "bert.pooler.dense": "mlp"},
             [("bert.embeddings.word_embeddings.weight", 0), ("bert.embeddings.position_embeddings.weight", 0),
              ("bert.embeddings.token_type_embeddings.weight", 0)],
             [("bert.embeddings.word_embeddings.weight", 1), ("bert.embeddings.position_embeddings.weight", 1),
              ("bert.embeddings.token_type_embeddings.weight", 1), ("bert.pooler.dense.weight", 1)]),
    "gpt2-tied": (gpt2, token_ids,
                  layer_groups("transformer.h.{}.attn", "transformer.h.{}.mlp.c_fc"),
                  [("transformer.wte.weight", 0), ("transformer.wpe.weight", 0), ("lm_head.weight", 0)],
                  [("transformer.wte.weight", 1), ("lm_head.weight", 1), ("transformer.wpe.weight", 1),
                   ("transformer.h.0.attn.c_attn.weight", 0)]),
    # RoPE rotates pairs of q/k dims by position: qk dims stay fixed, v dims permute.
    **{f"llama-gqa-{'tied' if tied else 'untied'}": (
        lambda tied=tied: llama(tied), token_ids,
        layer_groups("model.layers.{}.self_attn", "model.layers.{}.mlp.gate_proj",
                     heads=("kv_heads", "query_heads"), dims=("v_dims",)),
        [("model.embed_tokens.weight", 0), ("lm_head.weight", 0)],
        [("model.embed_tokens.weight", 1), ("lm_head.weight", 1), ("model.norm.weight", 0)])
       for tied in (True, False)},
}


@pytest.mark.parametrize("factory", [
    lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                       use_cache=False)),
    lambda: LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 1}, vocab_size=VOCAB, num_key_value_heads=2,
                                         max_position_embeddings=16, use_cache=False))], ids=["gpt2", "llama"])
def test_a_one_block_decoder_has_its_residual_stream(factory):
    """With one block, the attention and MLP outputs that write the stream share their block:
    the stream is still a stream (reported as one, and rotated by --rotate), not MLP units."""
    model = randomise(factory())
    spec = discover_spec(model, token_ids())
    kinds = sorted(g.kind for g in spec.groups.values())
    assert kinds.count("stream") == 1 and kinds.count("mlp") == 1, spec.summary()


def assert_preserved(model, spec, inputs):
    report = verify_spec(model, spec, inputs, atol=1e-5)
    with torch.no_grad():
        scale = max(1.0, model_outputs(model, inputs).abs().max().item())
    assert report["max_abs_diff"] <= 1e-5 * scale
    assert report["inconsistent_diff"] > 1e-3
    return report


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_spec_preserves_function(name):
    """One stream, heads and head dims per layer, MLP units; vocabulary rows stay put."""
    factory, make_inputs, expected, fixed, on_stream = TRANSFORMERS[name]
    model, inputs = randomise(factory()), make_inputs()
    spec = discover_spec(model, inputs)
    assert_preserved(model, spec, inputs)
    assert {n: g.kind for n, g in spec.groups.items()} == {"stream": "stream", **expected}, spec.summary()
    for key, axis in fixed:
        assert (key, axis) in spec.fixed, (key, axis)
    stream = spec.groups["stream"]
    assert stream.size == 32
    for key, axis in on_stream:
        assert (key, axis) in stream.members, (key, axis)
        assert (key, axis) not in spec.fixed, (key, axis)
    # A member never appears twice (a tied weight permuted twice would be permuted by p o p).
    for group in spec.groups.values():
        assert len(set(group.members)) == len(group.members), group.name
    assert correction_sites(spec)
    # Pre-LN streams are read by LayerNorms (no per-unit rescaling passes them); BERT's sums
    # are inside the module that normalises them: nothing to fold.
    assert not spec.streams
    # Every group has somewhere to measure its activations (matching needs them).
    assert {g for site in spec.sites for g in site.groups()} == set(spec.groups)
    check_spec_fits(model, spec)


@pytest.mark.parametrize("factory", [gpt2, lambda: llama(True)], ids=["gpt2", "llama"])
def test_tied_embedding_moves_with_the_stream_and_is_not_fixed(factory):
    """A tied input embedding and LM head are one tensor: its columns are the stream, even
    though export lifts it once per key and one of the two inputs goes unused."""
    model = randomise(factory())
    head, embedding = model.lm_head.weight, model.get_input_embeddings().weight
    assert head is embedding
    keys = [k for k, v in model.state_dict(keep_vars=True).items() if v is head]
    assert len(keys) == 2
    spec = discover_spec(model, token_ids())
    for key in keys:
        assert (key, 1) in spec.groups["stream"].members
        assert (key, 1) not in spec.fixed, spec.fixed[(key, 1)]
        assert "vocabulary" in spec.fixed[(key, 0)]


def test_untied_llama_head_rows_are_the_logits():
    model = randomise(llama(False))
    spec = discover_spec(model, token_ids())
    assert spec.fixed[("lm_head.weight", 0)] == "model output"
    assert "vocabulary" in spec.fixed[("model.embed_tokens.weight", 0)]
    assert not any(k.startswith("model.rotary_emb") for g in spec.groups.values() for k, *_ in g.members)


def test_gpt2_fused_qkv_is_three_blocks_of_heads():
    """Conv1D's c_attn stores (in, out) with out = [q | k | v], each heads x head dims: the
    heads permute all three blocks alike, q and k share their dims, v's go to c_proj."""
    model = randomise(gpt2())
    inputs = token_ids()
    spec = discover_spec(model, inputs)
    attn = "transformer.h.0.attn"
    key = f"{attn}.c_attn.weight"

    def blocks(group):
        return sorted(m[2:] for m in spec.groups[f"{attn}.{group}"].members if m[:2] == (key, 1))

    assert blocks("heads") == [(0, (), 8), (32, (), 8), (64, (), 8)]
    # Head dims take one permutation per head: units are (head, dim), each head's 8 dims apart.
    assert blocks("qk_dims") == [(0, (), 1, ((4, 8), (8, 1))), (32, (), 1, ((4, 8), (8, 1)))]
    assert blocks("v_dims") == [(64, (), 1, ((4, 8), (8, 1)))]
    assert spec.groups[f"{attn}.qk_dims"].blocks == 4 and spec.groups[f"{attn}.qk_dims"].size == 32
    assert (key, 0) in spec.groups["stream"].members  # Conv1D: rows read the stream
    assert (f"{attn}.c_proj.weight", 1) in spec.groups["stream"].members
    # The site on c_attn's output carries the same blocks, Conv1D's weight is transposed.
    site = next(s for s in spec.sites if s.module == f"{attn}.c_attn")
    assert site.group is None and site.weight_axis == 1
    layout = sorted((g.rsplit(".", 1)[1], *rest) for g, *rest in site.layout)
    members = sorted((g.rsplit(".", 1)[1], *m[2:]) for g, group in spec.groups.items() if g.startswith(attn)
                     for m in group.members if m[:2] == (key, 1))
    assert layout == members
    assert all(correction_mode(s) == "affine" for s in correction_sites(spec))


def test_llama_gqa_sites_are_block_layouts_and_scale_only():
    """q rows are kv heads x queries per kv head x head dims; k/v rows kv heads x dims. No
    bias anywhere: every correction is a scale."""
    model = randomise(llama(False))
    spec = discover_spec(model, token_ids())
    attn = "model.layers.0.self_attn"
    kv, query, v_dims = (spec.groups[f"{attn}.{r}"] for r in ("kv_heads", "query_heads", "v_dims"))
    # v dims: one permutation per kv head (shared by the query heads that read it).
    assert (kv.size, query.size, v_dims.size, v_dims.blocks) == (2, 2, 16, 2)
    assert (f"{attn}.q_proj.weight", 0, 0, (), 16) in kv.members
    assert (f"{attn}.k_proj.weight", 0, 0, (), 8) in kv.members
    assert (f"{attn}.q_proj.weight", 0, 0, ((2, 16),), 8) in query.members
    assert not any(m[0] == f"{attn}.k_proj.weight" for m in query.members)  # k is shared by queries
    sites = {s.module: s for s in spec.sites}
    for proj, groups in (("q_proj", {kv.name, query.name}), ("k_proj", {kv.name}), ("v_proj", {kv.name, v_dims.name})):
        site = sites[f"{attn}.{proj}"]
        assert site.group is None and site.layout and set(site.groups()) == groups, proj
    # gate and up feed one elementwise product: one group of MLP units.
    mlp = spec.groups["model.layers.0.mlp.gate_proj"]
    assert ("model.layers.0.mlp.up_proj.weight", 0) in mlp.members
    assert ("model.layers.0.mlp.down_proj.weight", 1) in mlp.members
    corrected = correction_sites(spec)
    assert corrected and {correction_mode(s) for s in corrected} == {"scale"}
    assert f"{attn}.q_proj" in {s.module for s in corrected}
    # q and k rows move with their heads, never within them (RoPE): the report says so, per projection.
    layers = len(model.model.layers)
    assert fixed_summary(spec)[IN_HEAD_ORDER] == 2 * layers


@pytest.mark.parametrize("factory", [lambda: gpt2(use_cache=True), lambda: llama(False, use_cache=True)],
                         ids=["gpt2", "llama"])
def test_default_config_with_cache_exports(factory):
    """Decoders default to use_cache=True, whose DynamicCache output torch.export cannot
    flatten: discovery turns the cache off for the export, and leaves the config as it was."""
    model = randomise(factory())
    assert model.config.use_cache is True
    inputs = token_ids()
    spec = discover_spec(model, inputs)
    assert model.config.use_cache is True
    assert_preserved(model, spec, inputs)
    model.config.use_cache = False
    assert discover_spec(model, inputs).to_dict() == spec.to_dict()


# ---- custom modules: GroupNorm, concatenation, padding, flatten ---------------------------

class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.b = nn.Conv2d(8, 3, 3)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x))))


def test_group_norm_permutes_whole_groups_and_within_groups():
    """GroupNorm(4, 8) normalises channel pairs: the pairs may move as units and the two
    channels of every pair may swap (the same way in every pair), but not cross pairs."""
    model = randomise(GroupNormNet())
    inputs = torch.randn(3, 1, 8, 8)
    spec = discover_spec(model, inputs)
    assert_preserved(model, spec, inputs)
    assert ("norm.weight", 0) not in spec.fixed
    on_norm = {m[2:]: g for g in spec.groups.values() for m in g.members if m[:2] == ("norm.weight", 0)}
    assert on_norm.keys() == {(0, (), 2), (0, ((4, 2),), 1)}
    assert on_norm[(0, (), 2)].size == 4 and on_norm[(0, ((4, 2),), 1)].size == 2
    for group in on_norm.values():
        assert {("a.weight", 0), ("b.weight", 1)} <= {m[:2] for m in group.members}
    # Control: moving one channel into another group changes the function.
    flat = PermutationGroup("c", 8, [("a.weight", 0), ("a.bias", 0), ("norm.weight", 0), ("norm.bias", 0),
                                     ("b.weight", 1)])
    swap = torch.tensor([0, 2, 1, 3, 4, 5, 6, 7])
    with pytest.raises(SpecError):
        check_function_preserved(model, permute_state_dict(model.state_dict(), PermutationSpec({"c": flat}),
                                                           {"c": swap}), inputs)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 3, 3)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_concatenated_branches_keep_their_own_groups():
    model = randomise(Concat())
    inputs = torch.randn(3, 1, 8, 8)
    spec = discover_spec(model, inputs)
    assert_preserved(model, spec, inputs)
    on_input = {g.name: m[2:] for g in spec.groups.values() for m in g.members if m[:2] == ("c.weight", 1)}
    assert len(on_input) == 2
    group_a = next(g for g in spec.groups.values() if ("a.weight", 0) in g.members)
    group_b = next(g for g in spec.groups.values() if ("b.weight", 0) in g.members)
    assert group_a is not group_b and (group_a.size, group_b.size) == (4, 6)
    assert on_input[group_a.name] == (0, (), 1) and on_input[group_b.name] == (4, (), 1)
    assert ("c.weight", 1) not in spec.fixed


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3)
        self.b = nn.Conv2d(6, 3, 3)

    def forward(self, x):
        return self.b(F.pad(F.relu(self.a(x)), (1, 2, 1, 0)))


def test_spatial_padding_keeps_the_channel_group():
    model = randomise(Padded())
    inputs = torch.randn(3, 1, 8, 8)
    spec = discover_spec(model, inputs)
    assert_preserved(model, spec, inputs)
    assert len(spec.groups) == 1
    (group,) = spec.groups.values()
    assert {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)} <= set(group.members)


class Flattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.a(x)), 1))


def test_flatten_into_linear_keeps_the_channel_group():
    """fc reads channels x height x width: each channel owns 16 consecutive columns."""
    model = randomise(Flattened())
    inputs = torch.randn(3, 1, 8, 8)
    spec = discover_spec(model, inputs)
    assert_preserved(model, spec, inputs)
    group = next(g for g in spec.groups.values() if ("a.weight", 0) in g.members)
    assert group.size == 6 and group.kind == "channels"
    assert ("fc.weight", 1, 0, (), 16) in group.members
    assert ("fc.weight", 1) not in spec.fixed


class BiasedAttention(nn.Module):
    """Self-attention with a learned per-head bias passed as the mask (Swin/BEiT's relative
    position bias), and optionally a feature that mixes every head's dims (a mean over heads)."""

    def __init__(self, mix_heads=False):
        super().__init__()
        self.inp, self.q, self.k, self.v, self.o = (nn.Linear(8, 16) for _ in range(5))
        self.o = nn.Linear(16, 8)
        self.bias = nn.Parameter(torch.randn(4, 5, 5))
        self.head = nn.Linear(8, 3)
        self.mix_heads = mix_heads

    def forward(self, x):  # x: (N, 5, 8)
        h = self.inp(x)[..., :8]
        n = x.shape[0]
        q, k, v = (p(h).view(n, 5, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        if self.mix_heads:
            out = out * torch.sigmoid(out.mean(1, keepdim=True))
        return self.head(self.o(out.transpose(1, 2).reshape(n, 5, 16)).mean(1))


@pytest.mark.parametrize("mix_heads", [False, True])
def test_per_head_mask_moves_with_the_heads_and_mixed_dims_stay_shared(mix_heads):
    model = randomise(BiasedAttention(mix_heads))
    inputs = torch.randn(3, 5, 8)
    spec = discover_spec(model, inputs)
    verify_spec(model, spec, inputs)
    heads = next(g for g in spec.groups.values() if g.kind == "heads")
    assert any(m[:2] == ("bias", 0) for m in heads.members)
    v_dims = next(g for g in spec.groups.values() if g.name.endswith("v_dims"))
    assert v_dims.blocks == (1 if mix_heads else 4)
