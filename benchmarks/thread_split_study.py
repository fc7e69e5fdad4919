"""A pass with and without the engine's split over two threads (``hfrepair.passes``).

    TQDM_DISABLE=1 python benchmarks/thread_split_study.py [--threads 2] [--repeat 5]

On the demo pair and its 4,000 calibration digits (batches of 64, as a CPU merge reads
them), times three passes as a merge runs them: one Python thread on ``--threads``
intra-op threads (``SPLIT_PARTS = 1``), against the engine's split (two threads, each on
half the intra-op threads with its own copy of the models and every other batch, their
float64 sums added). The passes: the statistics pass (A and B, the 7 matched sites), the
saved model's exact REPAIR pass (the aligned midpoint, its 9 BatchNorms re-measured) and an
evaluation pass (one model, its logits scored; never split by the engine, its taps have no
copies, so it is split here by hand for the comparison).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time

import torch


def evaluation_split(run, model, batches: list) -> None:
    """``run(model, part)`` on every other batch in each of two threads (what the engine
    would do if evaluation's taps could be copied)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        helper = threading.Thread(target=run, args=(copy.deepcopy(model), batches[1::2]))
        helper.start()
        run(model, batches[0::2])
        helper.join()
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hfrepair import passes
    from hfrepair.allocator import keep_freed_memory
    from hfrepair.cli import CPU_IMAGE_BATCH
    from hfrepair.demo import demo_pair
    from hfrepair.evaluate import Scores
    from hfrepair.interpolate import interpolate
    from hfrepair.matching import match_permutations
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
    stats = collect_statistics(model_a, model_b, sites, images, cross_sites=cross)
    perms = match_permutations(spec, stats)
    midpoint = interpolate(model_a.state_dict(), permute_state_dict(model_b.state_dict(), spec, perms), 0.5)
    evaluate = lambda model, part: passes.run_pass([model], [Scores(0)], part, desc="evaluating")

    runs = {
        "statistics pass (A and B)": lambda split: collect_statistics(model_a, model_b, sites, images,
                                                                      cross_sites=cross),
        "REPAIR pass (midpoint)": lambda split: repair(model_a, midpoint, spec, stats, perms, 0.5, batches=images),
        "evaluation pass (A)": lambda split: (evaluation_split(evaluate, model_a, labelled) if split
                                              else evaluate(model_a, labelled)),
    }
    print(f"torch {torch.__version__}, {args.threads} threads; {len(images)} batches of {CPU_IMAGE_BATCH} digits; "
          f"seconds, median of {args.repeat} (alternated)")
    for name, run in runs.items():
        times = {False: [], True: []}
        for _ in range(args.repeat):
            for split in (False, True):
                passes.SPLIT_PARTS = 2 if split else 1
                start = time.perf_counter()
                run(split)
                times[split].append(time.perf_counter() - start)
        whole, split = statistics.median(times[False]), statistics.median(times[True])
        print(f"  {name}: whole {whole:.2f}; split over two threads {split:.2f} ({split / whole:.2f}x)")


if __name__ == "__main__":
    main()
