"""Wall time and peak memory of each merge stage, against the bare forward passes.

    python benchmarks/bench_merge.py [--model resnet|gpt2] [--examples N] [--threads 2]

Prints, for the demo architecture (``resnet``: BatchNorm ResNet, 32-64-128 channels, 28x28
digits, 4,000 examples by default) or a GPT-2 (``gpt2``: 6 layers, width 256, 8 heads, a
vocabulary of 8,192, 2,000 sequences of 128 tokens by default): seconds per stage; the
ratio of (statistics pass + REPAIR pass) to the bare forward passes they need (A and B
over the calibration data, then the interpolated network once); and the peak resident
memory of the statistics + REPAIR stages with 1x and 10x the calibration examples, each
measured in a fresh process. Endpoints are randomly initialised: the cost of a pass does
not depend on what the weights learned.
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


GPT2 = dict(vocab_size=8192, n_embd=256, n_layer=6, n_head=8, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)
# model -> (default calibration examples, batch size, a pool of inputs)
INPUTS = {
    "resnet": (4000, 500, lambda: torch.randn(2000, 1, 28, 28)),
    "gpt2": (2000, 32, lambda: torch.randint(0, GPT2["vocab_size"], (1000, GPT2["n_positions"]))),
}


class CyclingBatches:
    """``examples`` inputs in batches, cycling over a fixed pool: data memory stays constant."""

    def __init__(self, pool: torch.Tensor, examples: int, batch_size: int) -> None:
        self.pool, self.examples, self.batch_size = pool, examples, batch_size

    def __iter__(self):
        for start in range(0, self.examples, self.batch_size):
            size = min(self.batch_size, self.examples - start)
            offset = start % len(self.pool)
            yield self.pool[offset : offset + size]


def endpoint(model: str, seed: int):
    torch.manual_seed(seed)
    if model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(**GPT2, use_cache=False)).eval()
    from hfrepair.demo import DEMO_ENDPOINT
    from hfrepair.models import ResNet

    return ResNet(**DEMO_ENDPOINT).eval()


def forward_all(model, batches) -> None:
    """Each batch through ``model``, outputs dropped at once (GPT-2's logits are 134 MB a batch)."""
    for inputs in batches:
        model(inputs)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@torch.no_grad()
def stages(model: str, examples: int) -> dict:
    from hfrepair.discovery import discover_spec
    from hfrepair.interpolate import interpolate
    from hfrepair.matching import match_permutations
    from hfrepair.pipeline import statistics_plan
    from hfrepair.repair import repair
    from hfrepair.spec import permute_state_dict, with_state_dict
    from hfrepair.statistics import collect_statistics

    a, b = endpoint(model, 1), endpoint(model, 2)
    _, batch_size, pool = INPUTS[model]
    batches = CyclingBatches(pool(), examples, batch_size)
    seconds = {}
    spec, seconds["discover"] = timed(lambda: discover_spec(a, next(iter(batches))[:2]))
    sites, cross = statistics_plan(spec, "repair", "activation")
    stats, seconds["statistics"] = timed(lambda: collect_statistics(a, b, sites, batches, cross_sites=cross))
    perms, seconds["match"] = timed(lambda: match_permutations(spec, stats))
    aligned, seconds["permute"] = timed(lambda: permute_state_dict(b.state_dict(), spec, perms))
    mixed, seconds["interpolate"] = timed(lambda: interpolate(a.state_dict(), aligned, 0.5))
    merged, seconds["repair"] = timed(lambda: repair(a, mixed, spec, stats, perms, 0.5, "repair", batches))
    net = with_state_dict(a, merged).eval()
    bare = {}
    for name, network in (("forward A", a), ("forward B", b), ("forward merged", net)):
        _, bare[name] = timed(lambda: forward_all(network, batches))
    return {"seconds": seconds, "bare": bare,
            "ratio": (seconds["statistics"] + seconds["repair"]) / sum(bare.values()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(INPUTS), default="resnet")
    parser.add_argument("--examples", type=int, default=None, help="calibration examples (default: per model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--growth", type=int, default=10,
                        help="also measure peak memory with this many times the examples (0: skip)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.examples = args.examples or INPUTS[args.model][0]
    if args.json:
        print(json.dumps(stages(args.model, args.examples)))
        return

    def child(examples, env=None):
        out = subprocess.run([sys.executable, __file__, "--json", "--model", args.model, "--examples", str(examples),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                             env={**os.environ, **(env or {})})
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Times with the allocator as users run it.
    one = child(args.examples)
    print(f"{args.model}: torch {torch.__version__}, {args.threads} threads, {args.examples} calibration examples")
    print(f"{'stage':<16}{'seconds':>10}")
    for name, value in {**one["seconds"], **one["bare"]}.items():
        print(f"{name:<16}{value:>10.2f}")
    print(f"(statistics + REPAIR) / bare forward passes: {one['ratio']:.2f}x")
    print(f"peak RSS: {one['peak_rss_mb']:.0f} MB with {args.examples} examples")
    if args.growth:
        # Large blocks via mmap go back to the OS when freed, so peak RSS tracks live memory
        # rather than how glibc's heap happened to fragment (which varied +-10% run to run).
        # That costs page faults on every large allocation, so these runs are not timed.
        stable = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
        base, more = child(args.examples, stable), child(args.growth * args.examples, stable)
        growth = 100 * (more["peak_rss_mb"] / base["peak_rss_mb"] - 1)
        print(f"peak RSS (mmap threshold 1 MB): {base['peak_rss_mb']:.0f} MB with {args.examples} examples, "
              f"{more['peak_rss_mb']:.0f} MB with {args.growth * args.examples} ({growth:+.1f}%)")


if __name__ == "__main__":
    main()
