"""Merge two models from Python, stage by stage, and print what each stage produced.

    python examples/merge_api.py [--cache DIR]

Uses the demo's MNIST dataset (cached on first use) and the endpoint pair that ships with
``hfrepair demo``, then runs the pipeline one public function at a time.
"""

from __future__ import annotations

import argparse

import hfrepair
from hfrepair.demo import DEMO_ENDPOINT, demo_pair
from hfrepair.models import ResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    model_a, model_b, calibration, test = demo_pair(args.cache)

    example = next(iter(calibration))[0][:4]
    spec = hfrepair.discover_spec(model_a, example)
    print(spec.summary())
    print("verification:", hfrepair.verify_spec(model_a, spec, example))

    stats = hfrepair.collect_statistics(model_a, model_b, spec.sites, calibration)
    perms = hfrepair.match_permutations(spec, stats)
    aligned_b = hfrepair.permute_state_dict(model_b.state_dict(), spec, perms)
    mixed = hfrepair.interpolate(model_a.state_dict(), aligned_b, 0.5)
    for method in ("none", "closed-form", "repair"):
        state = hfrepair.repair(model_a, mixed, spec, stats, perms, 0.5, method, calibration)
        merged = ResNet(**DEMO_ENDPOINT)
        merged.load_state_dict(state)
        print(f"{method:>12}: {hfrepair.evaluate(merged, test)}")
    print("endpoint A:", hfrepair.evaluate(model_a, test), "endpoint B:", hfrepair.evaluate(model_b, test))


if __name__ == "__main__":
    main()
