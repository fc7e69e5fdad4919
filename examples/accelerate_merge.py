"""Call hfrepair from your own accelerate script: every process runs this file, the passes
split the data between them, and only the main process saves.

    python examples/accelerate_merge.py                       # one process
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no examples/accelerate_merge.py   # two processes
    torchrun --nproc_per_node 2 examples/accelerate_merge.py  # the same with torchrun

Uses the demo's MNIST dataset (cached on first use by the main process) and the endpoint
pair that ships with ``hfrepair demo``. Runs on the GPUs where there are any. Each process
reports the statistics pass's throughput and its own peak memory (resident, and CUDA on a
GPU): the figures ``benchmarks/bench_distributed.py`` gives, for a whole merge.
"""

from __future__ import annotations

import argparse
import resource

import torch
from accelerate import Accelerator

import hfrepair
from hfrepair.data import image_batches, model_transform
from hfrepair.demo import demo_endpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="demo cache (default ~/.cache/hfrepair/demo)")
    parser.add_argument("--output", default="accelerate-merged")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast forward passes (sums stay float64)")
    args = parser.parse_args()

    # Your script's own Accelerator. Without a GPU, cpu=True joins the launched processes
    # into one gloo group (hfrepair.make_accelerator() makes the same choice for you).
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not torch.cuda.is_available())
    with accelerator.main_process_first():  # the main process writes the dataset, the others reuse it
        dataset, folders = demo_endpoints(args.cache)
    model_a, model_b = hfrepair.load_model(folders[0]), hfrepair.load_model(folders[1])
    transform = model_transform(folders[0])
    calibration = image_batches(str(dataset), "train", transform, limit=4000, batch_size=250, seed=0)
    test = image_batches(str(dataset), "test", transform, batch_size=250)

    merged, result = hfrepair.merge(model_a, model_b, calibration, {"test": test}, grid=5, accelerator=accelerator)

    if accelerator.is_main_process:
        hfrepair.save_merged(merged, args.output, folders[0])
        mid = len(result.alphas) // 2
        repaired, aligned = (result.curves[c]["test"][mid]["accuracy"] for c in ("repaired", "aligned"))
        print(f"{accelerator.num_processes} process(es), {result.calibration_examples} calibration examples: "
              f"midpoint test accuracy {100 * repaired:.1f}% with REPAIR, {100 * aligned:.1f}% aligned only; "
              f"saved to {args.output}")
    rate = result.calibration_examples / result.seconds["statistics"]
    memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    if torch.cuda.is_available():
        memory += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
    accelerator.wait_for_everyone()
    print(f"process {accelerator.process_index} on {accelerator.device}: statistics pass {rate:.1f} examples/s "
          f"(all processes), {memory}", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
