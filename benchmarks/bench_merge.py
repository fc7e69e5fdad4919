"""Wall time and peak memory of each merge stage, against the bare forward passes.

    python benchmarks/bench_merge.py [--examples 4000] [--threads 2]

Prints, for the demo architecture (BatchNorm ResNet, 32-64-128 channels, 28x28 digits):
seconds per stage; the ratio of (statistics pass + REPAIR pass) to the bare forward
passes they need (A and B over the calibration data, then the interpolated network once);
and the peak resident memory of the statistics + REPAIR stages with 1x and 10x the
calibration examples, each measured in a fresh process. Endpoints are randomly
initialised: the cost of a pass does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


class CyclingBatches:
    """``examples`` inputs in batches, cycling over a fixed pool: data memory stays constant."""

    def __init__(self, pool: torch.Tensor, examples: int, batch_size: int = 500) -> None:
        self.pool, self.examples, self.batch_size = pool, examples, batch_size

    def __iter__(self):
        for start in range(0, self.examples, self.batch_size):
            size = min(self.batch_size, self.examples - start)
            offset = start % len(self.pool)
            yield self.pool[offset : offset + size]


def endpoints():
    from hfrepair.demo import DEMO_ENDPOINT
    from hfrepair.models import ResNet

    torch.manual_seed(1)
    a = ResNet(**DEMO_ENDPOINT).eval()
    torch.manual_seed(2)
    b = ResNet(**DEMO_ENDPOINT).eval()
    return a, b


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@torch.no_grad()
def stages(examples: int) -> dict:
    from hfrepair.discovery import discover_spec
    from hfrepair.interpolate import interpolate
    from hfrepair.matching import match_permutations
    from hfrepair.pipeline import statistics_plan
    from hfrepair.repair import repair
    from hfrepair.spec import permute_state_dict, with_state_dict
    from hfrepair.statistics import collect_statistics

    a, b = endpoints()
    batches = CyclingBatches(torch.randn(2000, 1, 28, 28), examples)
    seconds = {}
    spec, seconds["discover"] = timed(lambda: discover_spec(a, torch.randn(2, 1, 28, 28)))
    sites, cross = statistics_plan(spec, "repair", "activation")
    stats, seconds["statistics"] = timed(lambda: collect_statistics(a, b, sites, batches, cross_sites=cross))
    perms, seconds["match"] = timed(lambda: match_permutations(spec, stats))
    aligned, seconds["permute"] = timed(lambda: permute_state_dict(b.state_dict(), spec, perms))
    mixed, seconds["interpolate"] = timed(lambda: interpolate(a.state_dict(), aligned, 0.5))
    merged, seconds["repair"] = timed(lambda: repair(a, mixed, spec, stats, perms, 0.5, "repair", batches))
    net = with_state_dict(a, merged).eval()
    bare = {}
    _, bare["forward A"] = timed(lambda: [a(x) for x in batches])
    _, bare["forward B"] = timed(lambda: [b(x) for x in batches])
    _, bare["forward merged"] = timed(lambda: [net(x) for x in batches])
    return {"seconds": seconds, "bare": bare,
            "ratio": (seconds["statistics"] + seconds["repair"]) / sum(bare.values()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(stages(args.examples)))
        return

    def child(examples):
        # Large blocks via mmap go back to the OS when freed, so peak RSS tracks live memory
        # rather than how glibc's heap happened to fragment (which varied +-10% run to run).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
        out = subprocess.run([sys.executable, __file__, "--json", "--examples", str(examples),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    one, ten = child(args.examples), child(10 * args.examples)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.examples} calibration examples")
    print(f"{'stage':<16}{'seconds':>10}")
    for name, value in {**one["seconds"], **one["bare"]}.items():
        print(f"{name:<16}{value:>10.2f}")
    print(f"(statistics + REPAIR) / bare forward passes: {one['ratio']:.2f}x")
    growth = 100 * (ten["peak_rss_mb"] / one["peak_rss_mb"] - 1)
    print(f"peak RSS: {one['peak_rss_mb']:.0f} MB with {args.examples} examples, "
          f"{ten['peak_rss_mb']:.0f} MB with {10 * args.examples} ({growth:+.1f}%)")


if __name__ == "__main__":
    main()
