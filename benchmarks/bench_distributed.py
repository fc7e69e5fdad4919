"""Throughput of the statistics pass with 1 and N processes, and peak memory per process.

    python benchmarks/bench_distributed.py [--examples 4000] [--processes 2]

Each configuration runs in fresh processes started with ``torchrun`` (gloo on CPU, NCCL
where CUDA is available): the demo architecture (BatchNorm ResNet, 32-64-128 channels,
28x28 inputs, random weights), calibration batches of 250, one warm-up batch, then one
timed statistics pass over ``--examples`` examples. Reported: examples per second over all
processes, and each process's peak resident memory (and peak CUDA memory on a GPU).
Configurations: 1 process x 1 thread, 1 process x N threads, N processes x 1 thread. Each
configuration's reduced sums are also compared with those of 1 process x N threads: the
moments' and the cross-products' largest difference relative to a site's largest value,
and the correlations' largest absolute one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

BATCH = 250


class CyclingBatches:
    """``examples`` inputs in batches, cycling over a fixed pool: data memory stays constant."""

    def __init__(self, pool: torch.Tensor, examples: int) -> None:
        self.pool, self.examples = pool, examples

    def __len__(self) -> int:
        return (self.examples + BATCH - 1) // BATCH

    def __iter__(self):
        for start in range(0, self.examples, BATCH):
            offset = start % len(self.pool)
            yield self.pool[offset : offset + min(BATCH, self.examples - start)]


def worker(examples: int, out: str) -> None:
    """One process of a launch: time one statistics pass, append this process's figures."""
    from hfrepair.demo import DEMO_ENDPOINT
    from hfrepair.discovery import discover_spec
    from hfrepair.distributed import make_accelerator
    from hfrepair.models import ResNet
    from hfrepair.statistics import collect_statistics

    accelerator = make_accelerator()
    torch.manual_seed(1)
    model_a = ResNet(**DEMO_ENDPOINT).eval().to(accelerator.device)
    torch.manual_seed(2)
    model_b = ResNet(**DEMO_ENDPOINT).eval().to(accelerator.device)
    pool = torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(accelerator.device)
    spec = discover_spec(model_a, pool[:4])
    collect_statistics(model_a, model_b, spec.sites, [pool[:BATCH]] * accelerator.num_processes,
                       accelerator=accelerator)  # warm-up
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    stats = collect_statistics(model_a, model_b, spec.sites, CyclingBatches(pool, examples), accelerator=accelerator)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    figures = {"rank": accelerator.process_index, "processes": accelerator.num_processes,
               "threads": torch.get_num_threads(), "examples": stats.examples, "seconds": seconds,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "device": str(accelerator.device)}
    if torch.cuda.is_available():
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if accelerator.is_main_process:  # the sums are reduced: every process holds the same
        torch.save({name: {"moments": torch.cat([t.double().flatten().cpu() for t in pair.a.sums() + pair.b.sums()]),
                           "cross": pair.cross.cpu(), "correlation": pair.correlation().cpu()}
                    for name, pair in stats.pairs.items()}, out + ".pt")
    with open(out, "a") as f:
        f.write(json.dumps(figures) + "\n")
    accelerator.end_training()


def launch(processes: int, threads: int, examples: int) -> tuple[list[dict], dict]:
    """Each process's figures, and the reduced sums per site."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                        "--master_port", "29533", __file__, "--worker", "--examples", str(examples),
                        "--out", out.name], check=True, env=env, stdout=subprocess.DEVNULL)
        sums = torch.load(out.name + ".pt")
        os.remove(out.name + ".pt")
        with open(out.name) as f:
            return sorted((json.loads(line) for line in f), key=lambda r: r["rank"]), sums


def largest_difference(sums: dict, reference: dict, key: str, relative: bool) -> float:
    """The largest difference of ``key`` over every site, relative to the largest of the
    site's reference values when ``relative`` (a cross-product near zero has no scale of its
    own); entries never collected (NaN: outside a site's blocks) are left out."""
    worst = 0.0
    for name, ref in reference.items():
        diff = (sums[name][key] - ref[key]).abs().nan_to_num(0.0)
        if relative:
            diff = diff / ref[key].abs().nan_to_num(0.0).max().clamp_min(1e-300)
        worst = max(worst, float(diff.max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.examples, args.out)
        return
    n = args.processes
    print(f"{'configuration':<26}{'examples/s':>12}{'seconds':>9}  peak RSS per process (MB)")
    sums = {}
    for processes, threads in ((1, 1), (1, n), (n, 1)):
        rows, sums[processes, threads] = launch(processes, threads, args.examples)
        assert sum(1 for _ in rows) == processes and rows[0]["examples"] == args.examples
        seconds = max(r["seconds"] for r in rows)
        memory = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in rows)
        if "peak_cuda_mb" in rows[0]:
            memory += "; CUDA " + " / ".join(f"{r['peak_cuda_mb']:.0f}" for r in rows)
        label = f"{processes} process x {threads} thread"
        print(f"{label:<26}{args.examples / seconds:>12.1f}{seconds:>9.2f}  {memory}  ({rows[0]['device']})")
    reference = sums[1, n]
    print(f"against 1 process x {n} threads: largest difference of the moments / the cross-products, relative "
          "to a site's largest; largest absolute difference of the correlations")
    for (processes, threads), measured in sums.items():
        if (processes, threads) != (1, n):
            print(f"  {processes} process x {threads} thread: "
                  f"{largest_difference(measured, reference, 'moments', True):.1e} / "
                  f"{largest_difference(measured, reference, 'cross', True):.1e}, "
                  f"{largest_difference(measured, reference, 'correlation', False):.1e}")


if __name__ == "__main__":
    main()
