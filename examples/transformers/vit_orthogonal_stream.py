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
head's values). Two more variants refine those maps by 40 full-batch Adam steps on the first
1,000 calibration digits (each map its fit times the exponential of a skew matrix), so that
the midpoint predicts the endpoints' mixed predictions: the plain midpoint, and the midpoint
REPAIRed batch by batch (what ``--rotate`` does). Each variant is then interpolated at the
midpoint and REPAIRed exactly by hfrepair (statistics re-collected on the aligned pair).
Prints and writes
``orthogonal_stream.json`` (``orthogonal_stream_seeds_S_T.json`` for another pair). The
steps are :mod:`hfrepair.rotation`'s (what ``--rotate`` runs, the last variant), taken one
at a time here to measure each.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import hfrepair
from hfrepair.data import image_batches, model_transform
from hfrepair.evaluate import evaluate
from hfrepair.io import load_model
from hfrepair.pipeline import ROTATION_STEPS
from hfrepair.repair import exact_correctors, repair
from hfrepair.rotation import fit_rotations, fold_norms, refine_rotations, rotate_state_dict, rotation_plan
from hfrepair.spec import identity_permutations, permute_state_dict, with_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit_digits import digits_folder, endpoints, study_parser  # noqa: E402  (the same cached pair)


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
    plan = rotation_plan(model_a, spec, probe)
    permuted_b = permute_state_dict(model_b.state_dict(), spec, perms)
    maps = fit_rotations(model_a, with_state_dict(model_b, permuted_b), spec, plan, calibration)
    folded_a, folded_b = (fold_norms(state, plan, spec) for state in (model_a.state_dict(), permuted_b))

    def midpoint(state_a, state_b) -> dict:
        """Aligned-only and REPAIRed midpoint accuracy of a pair whose units already correspond."""
        a, b = with_state_dict(model_a, state_a), with_state_dict(model_a, state_b)
        mixed = hfrepair.interpolate(state_a, state_b, 0.5)
        stats = hfrepair.collect_statistics(a, b, spec.sites, calibration)
        fixed = repair(a, mixed, spec, stats, identity_permutations(spec), 0.5, "repair", calibration)
        return {"aligned": evaluate(with_state_dict(a, mixed), test).accuracy,
                "repaired": evaluate(with_state_dict(a, fixed), test).accuracy}

    def max_diff(state, reference) -> float:
        with torch.no_grad():
            return float((with_state_dict(model_a, state)(probe).logits - reference(probe).logits).abs().max())

    stream_only = rotate_state_dict(folded_b, spec, plan, {plan.stream: maps[plan.stream]})
    both = rotate_state_dict(folded_b, spec, plan, maps)

    def refined(correctors=None) -> dict:
        """B rotated by the maps refined for the midpoint (REPAIRed by batch with ``correctors``)."""
        better, _ = refine_rotations(model_a, model_b, folded_a, folded_b, spec, plan, maps, calibration,
                                     ROTATION_STEPS, 0.5, limit=1000, correctors=correctors)
        return rotate_state_dict(folded_b, spec, plan, better)

    fitted_stats = hfrepair.collect_statistics(with_state_dict(model_a, folded_a), with_state_dict(model_a, both),
                                               spec.sites, calibration)
    refined_plain = refined()
    refined_repaired = refined(exact_correctors(spec, fitted_stats, identity_permutations(spec), 0.5))
    record = {
        "endpoints": {"A": evaluate(model_a, test).accuracy, "B": evaluate(model_b, test).accuracy},
        "function_preserved_max_abs_diff": {"A folded": max_diff(folded_a, model_a),
                                            "B rotated": max_diff(stream_only, model_b),
                                            "B rotated, values too": max_diff(both, model_b),
                                            "B rotated, refined maps": max_diff(refined_repaired, model_b)},
        "midpoint": {
            "stream permuted (hfrepair today)": midpoint(model_a.state_dict(), permuted_b),
            "stream permuted, norm affines folded": midpoint(folded_a, folded_b),
            "stream rotated (orthogonal, norm affines folded)": midpoint(folded_a, stream_only),
            "stream rotated, and each head's value dims": midpoint(folded_a, both),
            "both, refined for the plain midpoint": midpoint(folded_a, refined_plain),
            "both, refined for the REPAIRed midpoint (--rotate)": midpoint(folded_a, refined_repaired)},
    }
    record["seconds"] = time.perf_counter() - start
    record["seeds"] = list(args.seeds)
    name = ("orthogonal_stream.json" if tuple(args.seeds) == (1, 2)
            else "orthogonal_stream_seeds_{}_{}.json".format(*args.seeds))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / name).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
