"""Which matching location works best? Midpoint accuracy per ``match_at``, on the demo pair.

    python benchmarks/match_location.py [--cache DIR] [--method repair]

Uses the demo's shipped endpoint pair and its MNIST split (cached on first use, like
``hfrepair demo``); prints aligned-only and REPAIRed midpoint test accuracy for each
location. The figures behind the default are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse

import hfrepair
from hfrepair.demo import demo_pair
from hfrepair.matching import MATCH_LOCATIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None)
    parser.add_argument("--method", default="repair", choices=hfrepair.METHODS)
    args = parser.parse_args()
    model_a, model_b, calibration, test = demo_pair(args.cache)
    print(f"{'match_at':<15}{'aligned':>10}{'repaired':>10}")
    for location in MATCH_LOCATIONS:
        _, result = hfrepair.merge(model_a, model_b, calibration, {"test": test}, grid=3, match_at=location,
                                   method=args.method, curves=("aligned", "repaired"))
        aligned, repaired = (result.curves[c]["test"][1]["accuracy"] for c in ("aligned", "repaired"))
        print(f"{location:<15}{100 * aligned:>9.1f}%{100 * repaired:>9.1f}%", flush=True)


if __name__ == "__main__":
    main()
