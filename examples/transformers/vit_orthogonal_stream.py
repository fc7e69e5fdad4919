"""Study: the ViT pair's residual stream and value dims aligned by orthogonal maps, not permutations.

    python examples/transformers/vit_orthogonal_stream.py [--threads N] [--output DIR] [--seeds 1 2]

Uses the pair of ``vit_digits.py`` (trained there, or here on first use, and cached). A
pre-LN transformer's stream can be rotated, not only permuted, without changing the function,
once every LayerNorm's affine is folded into the layers that read it (gamma = 1, beta = 0
left behind) and the rotation keeps the all-ones direction (then it commutes with the
LayerNorm's centring and norm): the writers' output rows (patch embedding, cls token,
positions, attention output, MLP output) take Q, the readers' input columns (q, k, v, MLP
in, classifier) take Q^T. Q is fitted by orthogonal Procrustes, on the complement of the
all-ones direction, to the per-token normalised stream at every LayerNorm input of A and B.
Heads, head dims and MLP units keep hfrepair's permutations; a last variant also rotates
each head's value dims (v_proj rows by M, o_proj columns by M^T, M by Procrustes on the
head's values). Each variant is then interpolated at the midpoint and REPAIRed exactly by
hfrepair (statistics re-collected on the aligned pair). Prints and writes
``orthogonal_stream.json`` (``orthogonal_stream_seeds_S_T.json`` for another pair). The
library's ``--rotate`` (:mod:`hfrepair.rotation`) makes the last variant generically and
reproduces its figures; this script keeps the steps apart to measure each.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import time
from pathlib import Path

import torch

import hfrepair
from hfrepair.data import image_batches, model_transform
from hfrepair.evaluate import evaluate
from hfrepair.io import load_model
from hfrepair.spec import identity_permutations, permute_state_dict, with_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit_digits import digits_folder, endpoints, study_parser  # noqa: E402  (the same cached pair)

repair = importlib.import_module("hfrepair.repair").repair


def norm_readers(model) -> list:
    """(LayerNorm, the linear layers that read its output) for every LayerNorm of a ViT classifier."""
    vit = model.vit
    pairs = [(layer.layernorm_before, [layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj])
             for layer in vit.layers]
    pairs += [(layer.layernorm_after, [layer.mlp.fc1]) for layer in vit.layers]
    return pairs + [(vit.layernorm, [model.classifier])]


@torch.no_grad()
def fold_norm_affines(model):
    """A copy whose LayerNorms have gamma = 1, beta = 0, their affine moved into the readers."""
    folded = copy.deepcopy(model)
    for norm, readers in norm_readers(folded):
        for linear in readers:
            linear.bias += linear.weight @ norm.bias
            linear.weight *= norm.weight
        norm.weight.fill_(1)
        norm.bias.zero_()
    return folded


@torch.no_grad()
def rotate_stream(model, rotation: torch.Tensor):
    """A copy of a folded ViT carrying its residual stream as ``rotation @ x``."""
    rotated = copy.deepcopy(model)
    embeddings = rotated.vit.embeddings
    patches = embeddings.patch_embeddings.projection
    patches.weight.copy_(torch.einsum("ij,jchw->ichw", rotation, patches.weight))
    patches.bias.copy_(rotation @ patches.bias)
    embeddings.cls_token.copy_(embeddings.cls_token @ rotation.T)
    embeddings.position_embeddings.copy_(embeddings.position_embeddings @ rotation.T)
    for layer in rotated.vit.layers:
        for writer in (layer.attention.o_proj, layer.mlp.fc2):
            writer.weight.copy_(rotation @ writer.weight)
            writer.bias.copy_(rotation @ writer.bias)
        for reader in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj, layer.mlp.fc1):
            reader.weight.copy_(reader.weight @ rotation.T)
    rotated.classifier.weight.copy_(rotated.classifier.weight @ rotation.T)
    return rotated


@torch.no_grad()
def stream_cross_products(model_a, model_b, batches) -> torch.Tensor:
    """Sum over tokens and LayerNorm inputs of n_A n_B^T, n the per-token normalised stream."""
    seen: dict[int, list] = {0: [], 1: []}

    def grab(index):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            x = x - x.mean(-1, keepdim=True)
            seen[index].append(x / x.std(-1, keepdim=True))
        return hook

    handles = [norm.register_forward_pre_hook(grab(i)) for i, model in enumerate((model_a, model_b))
               for norm, _ in norm_readers(model)]
    width = model_a.config.hidden_size
    total = torch.zeros(width, width, dtype=torch.float64)
    try:
        for images, _ in batches:
            model_a(images)
            model_b(images)
            for xa, xb in zip(seen[0], seen[1]):
                total += xa.T @ xb
            seen[0].clear()
            seen[1].clear()
    finally:
        for handle in handles:
            handle.remove()
    return total


@torch.no_grad()
def value_cross_products(model_a, model_b, batches) -> dict[int, torch.Tensor]:
    """Per layer, per head: the sum over tokens of v_A v_B^T (heads x dims x dims)."""
    heads = model_a.config.num_attention_heads
    seen: dict[tuple, torch.Tensor] = {}

    def grab(key):
        def hook(_module, _args, output):
            seen[key] = output.reshape(-1, heads, output.shape[-1] // heads).double()
        return hook

    handles = [layer.attention.v_proj.register_forward_hook(grab((i, index)))
               for i, model in enumerate((model_a, model_b)) for index, layer in enumerate(model.vit.layers)]
    total: dict[int, torch.Tensor] = {}
    try:
        for images, _ in batches:
            model_a(images)
            model_b(images)
            for index in range(len(model_a.vit.layers)):
                product = torch.einsum("nhd,nhe->hde", seen[(0, index)], seen[(1, index)])
                total[index] = total.get(index, 0) + product
    finally:
        for handle in handles:
            handle.remove()
    return total


@torch.no_grad()
def rotate_values(model, cross: dict[int, torch.Tensor]):
    """A copy whose every head carries its values as ``M v`` (``M`` orthogonal, by Procrustes
    per head), the attention output reading them through ``M^T``: the function is unchanged."""
    rotated = copy.deepcopy(model)
    heads = rotated.config.num_attention_heads
    for index, layer in enumerate(rotated.vit.layers):
        attention, dims = layer.attention, rotated.config.hidden_size // heads
        for head in range(heads):
            u, _, vh = torch.linalg.svd(cross[index][head])
            rotation, rows = (u @ vh).float(), slice(head * dims, (head + 1) * dims)
            attention.v_proj.weight[rows] = rotation @ attention.v_proj.weight[rows]
            attention.v_proj.bias[rows] = rotation @ attention.v_proj.bias[rows]
            attention.o_proj.weight[:, rows] = attention.o_proj.weight[:, rows] @ rotation.T
    return rotated


def procrustes_keeping_ones(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q maximising tr(Q^T cross) among those with Q 1 = 1."""
    width = cross.shape[0]
    ones = torch.full((width, 1), width ** -0.5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    complement = torch.linalg.qr(torch.cat([ones, torch.randn(width, width - 1, dtype=torch.float64,
                                                              generator=generator)], 1))[0][:, 1:]
    u, _, vh = torch.linalg.svd(complement.T @ cross @ complement)
    return (complement @ (u @ vh) @ complement.T + ones @ ones.T).float()


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2), help="the pair's seeds (default 1 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits_folder(args.cache)
    start = time.perf_counter()
    folder_a, folder_b = endpoints(args.cache, data, 30, 4000, tuple(args.seeds))
    model_a, model_b = load_model(folder_a), load_model(folder_b)
    transform = model_transform(folder_a)
    calibration = list(image_batches(str(data), "train", transform, limit=4000, batch_size=500))
    test = list(image_batches(str(data), "test", transform, limit=None, batch_size=500))
    probe = calibration[0][0][:16]

    spec = hfrepair.discover_spec(model_a, calibration[0][0][:8])
    perms = hfrepair.match_permutations(spec, hfrepair.collect_statistics(model_a, model_b, spec.sites, calibration))
    stream = next(name for name, group in spec.groups.items() if group.kind == "stream")

    def midpoint(a, b_aligned) -> dict:
        """Aligned-only and REPAIRed midpoint accuracy of a pair whose units already correspond."""
        mixed = hfrepair.interpolate(a.state_dict(), b_aligned.state_dict(), 0.5)
        stats = hfrepair.collect_statistics(a, b_aligned, spec.sites, calibration)
        fixed = repair(a, mixed, spec, stats, identity_permutations(spec), 0.5, "repair", calibration)
        return {"aligned": evaluate(with_state_dict(a, mixed), test).accuracy,
                "repaired": evaluate(with_state_dict(a, fixed), test).accuracy}

    def permuted(order):
        return copy.deepcopy(with_state_dict(model_b, permute_state_dict(model_b.state_dict(), spec, order)))

    folded_a = fold_norm_affines(model_a)
    heads_only = {**perms, stream: identity_permutations(spec)[stream]}
    folded_b = fold_norm_affines(permuted(heads_only))
    rotation = procrustes_keeping_ones(stream_cross_products(folded_a, folded_b, calibration))
    rotated_b = rotate_stream(folded_b, rotation)
    values_rotated_b = rotate_values(rotated_b, value_cross_products(folded_a, rotated_b, calibration))
    record = {
        "endpoints": {"A": evaluate(model_a, test).accuracy, "B": evaluate(model_b, test).accuracy},
        "function_preserved_max_abs_diff": {
            "A folded": float((folded_a(probe).logits - model_a(probe).logits).abs().max()),
            "B rotated": float((rotated_b(probe).logits - model_b(probe).logits).abs().max()),
            "B rotated, values too": float((values_rotated_b(probe).logits - model_b(probe).logits).abs().max())},
        "midpoint": {
            "stream permuted (hfrepair today)": midpoint(model_a, permuted(perms)),
            "stream permuted, norm affines folded": midpoint(folded_a, fold_norm_affines(permuted(perms))),
            "stream rotated (orthogonal, norm affines folded)": midpoint(folded_a, rotated_b),
            "stream rotated, and each head's value dims": midpoint(folded_a, values_rotated_b)},
    }
    record["seconds"] = time.perf_counter() - start
    args.output.mkdir(parents=True, exist_ok=True)
    record["seeds"] = list(args.seeds)
    name = ("orthogonal_stream.json" if tuple(args.seeds) == (1, 2)
            else "orthogonal_stream_seeds_{}_{}.json".format(*args.seeds))
    (args.output / name).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
