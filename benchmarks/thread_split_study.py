"""Study: would a pass run faster split over threads, each on one core, than on N cores per op?

    TQDM_DISABLE=1 python benchmarks/thread_split_study.py [--threads 2] [--repeat 3]

On the demo pair and its 4,000 calibration digits (batches of 64, as a CPU merge reads
them), times two passes of the pass engine as a merge runs them, one process on
``--threads`` intra-op threads, against the same pass split over ``--threads`` Python
threads that each run one intra-op thread, each with its own copy of the models and every
``--threads``-th batch (the float64 sums of the parts would then be added, as processes'
are). The passes: the statistics pass (A and B, the 7 matched sites), the saved model's
exact REPAIR pass (the aligned midpoint, its 9 BatchNorms re-measured) and an evaluation
pass (one model, its logits scored). Not how hfrepair runs today: the pass engine has no
thread split (its taps hold per-pass state and would need one copy per thread); this
measures what one could gain.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time

import torch


def split_over_threads(run, parts: list) -> float:
    """Seconds to run ``run(index, part)`` for every part, each in its own thread on one
    intra-op thread (the first in this thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        workers = [threading.Thread(target=run, args=(index, part)) for index, part in enumerate(parts) if index]
        for worker in workers:
            worker.start()
        run(0, parts[0])
        for worker in workers:
            worker.join()
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hfrepair.allocator import keep_freed_memory
    from hfrepair.cli import CPU_IMAGE_BATCH
    from hfrepair.demo import demo_pair
    from hfrepair.evaluate import Scores
    from hfrepair.interpolate import interpolate
    from hfrepair.matching import match_permutations
    from hfrepair.passes import run_pass
    from hfrepair.pipeline import statistics_plan
    from hfrepair.repair import repair
    from hfrepair.spec import permute_state_dict
    from hfrepair.spec_cache import checked_spec
    from hfrepair.statistics import collect_statistics

    keep_freed_memory()  # as the command runs its passes
    model_a, model_b, calibration, _ = demo_pair(batch_size=CPU_IMAGE_BATCH)
    labelled = list(calibration)
    images = [inputs for inputs, _ in labelled]
    spec, _ = checked_spec(model_a, images[0][:2], cache=None)
    sites, cross = statistics_plan(spec, "repair", "activation")
    copies = [(model_a, model_b)] + [(copy.deepcopy(model_a), copy.deepcopy(model_b)) for _ in range(args.threads - 1)]
    n = args.threads

    def statistics_of(index, part):
        collect_statistics(*copies[index], sites, part, cross_sites=cross)

    stats = collect_statistics(model_a, model_b, sites, images, cross_sites=cross)
    perms = match_permutations(spec, stats)
    midpoint = interpolate(model_a.state_dict(), permute_state_dict(model_b.state_dict(), spec, perms), 0.5)

    def repair_of(index, part):
        repair(copies[index][0], midpoint, spec, stats, perms, 0.5, batches=part)

    def evaluation_of(index, part):
        run_pass([copies[index][0]], [Scores(0)], part, desc="evaluating")

    passes = {"statistics pass (A and B)": (statistics_of, images), "REPAIR pass (midpoint)": (repair_of, images),
              "evaluation pass (A)": (evaluation_of, labelled)}
    print(f"torch {torch.__version__}; {len(images)} batches of {CPU_IMAGE_BATCH} digits; seconds, median of "
          f"{args.repeat} (alternated)")
    for name, (run, batches) in passes.items():
        together, split = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run(0, batches)
            together.append(time.perf_counter() - start)
            split.append(split_over_threads(run, [batches[i::n] for i in range(n)]))
        one, many = statistics.median(together), statistics.median(split)
        print(f"  {name}: one thread on {n} intra-op threads {one:.2f}; {n} threads on one each {many:.2f} "
              f"({many / one:.2f}x)")


if __name__ == "__main__":
    main()
