"""Throughput of the statistics pass with 1 and N processes, and peak memory per process.

    python benchmarks/bench_distributed.py [--examples 4000] [--processes 2]

Each configuration runs in fresh processes started with ``torchrun`` (gloo on CPU, NCCL
where CUDA is available): the demo architecture (BatchNorm ResNet, 32-64-128 channels,
28x28 inputs, random weights), calibration batches of 250, one warm-up batch, then one
timed statistics pass over ``--examples`` examples. Reported: examples per second over all
processes, and each process's peak resident memory (and peak CUDA memory on a GPU).
Configurations: 1 process x 1 thread, 1 process x N threads, N processes x 1 thread.
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
    with open(out, "a") as f:
        f.write(json.dumps(figures) + "\n")
    accelerator.end_training()


def launch(processes: int, threads: int, examples: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                        "--master_port", "29533", __file__, "--worker", "--examples", str(examples),
                        "--out", out.name], check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out.name) as f:
            return sorted((json.loads(line) for line in f), key=lambda r: r["rank"])


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
    for processes, threads in ((1, 1), (1, n), (n, 1)):
        rows = launch(processes, threads, args.examples)
        assert sum(1 for _ in rows) == processes and rows[0]["examples"] == args.examples
        seconds = max(r["seconds"] for r in rows)
        memory = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in rows)
        if "peak_cuda_mb" in rows[0]:
            memory += "; CUDA " + " / ".join(f"{r['peak_cuda_mb']:.0f}" for r in rows)
        label = f"{processes} process x {threads} thread"
        print(f"{label:<26}{args.examples / seconds:>12.1f}{seconds:>9.2f}  {memory}  ({rows[0]['device']})")


if __name__ == "__main__":
    main()
