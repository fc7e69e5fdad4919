"""A default ``hfrepair merge`` of the demo pair: wall time, its forward passes, peak memory.

    python benchmarks/bench_default_merge.py [--threads 2] [--repeat N] [--cold] [--before PATH]

Runs ``hfrepair merge A B --dataset DEMO --output OUT`` with every default (5,000
calibration examples asked, the 4,000 of the demo's train split used; 5 alphas, the default grid; naive,
aligned and repaired curves on the 1,000 test digits and the first 1,000 calibration
digits) on the shipped demo endpoints, in a fresh process as a user's command runs (N
times with ``--repeat N``, the first on an empty spec cache, the others reusing the spec
it stored, or each on an empty one with ``--cold``, as a first merge of an architecture;
the run with the median ratio is reported in full), and prints:

* the merge's wall time (the command, from reading the endpoints to the written folder);
* the example-forwards its plan announced and ran, and what they take alone: each pass's
  example-forwards times one endpoint's per-example forward timed alone over 512 prepared
  digits right before and right after that pass, in the merge's process (same allocator
  settings and threads; the timings are left out of the wall time). This shared machine's
  speed drifts by tens of percent within a minute, so a yardstick taken apart from the
  merge says little about it. The ratio of the wall time to that sum is what decoding,
  copying and bookkeeping add; it is also given per kind of pass, with the time spent
  outside passes;
* the peak resident memory during each kind of pass (statistics, REPAIR, evaluation), the
  kernel's high-water mark read and reset whenever a pass starts or ends (Linux);
* the saved model's test accuracy.

``--before PATH`` also times the same command with the hfrepair found in PATH (e.g. a
checkout of an earlier commit) in a fresh process after each merge, so that the two
alternate and share the machine's drift, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """The resident set's high-water mark since it was last reset (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("this benchmark reads /proc/self/status (Linux)")


def reset_peak_rss() -> None:
    """Start a new high-water mark at the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class StagePeaks:
    """Peak RSS per kind of pass, exact: the kernel's high-water mark, read and reset at every
    change of stage (a sampling thread can miss a pass's peak, which lasts a batch)."""

    def __init__(self) -> None:
        self.stage, self.peaks = "other", {}
        reset_peak_rss()

    def settle(self) -> None:
        """Count the peak since the last reset under the current stage, reset it, and go
        back to counting under "other"."""
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), peak_rss_mb())
        reset_peak_rss()
        self.stage = "other"


def stage_of(desc: str) -> str:
    """The kind of a pass, from the description it shows."""
    for prefix, stage in (("statistics", "statistics"), ("REPAIR", "REPAIR"), ("evaluating", "evaluation"),
                          ("variance", "variance")):
        if desc.startswith(prefix):
            return stage
    return desc


def demo_command(output: Path) -> list[str]:
    from hfrepair.demo import SHIPPED_ENDPOINTS, default_cache, write_mnist_dataset

    dataset = write_mnist_dataset(default_cache() / "mnist")
    return ["merge", str(SHIPPED_ENDPOINTS / "resnet-a"), str(SHIPPED_ENDPOINTS / "resnet-b"), "--dataset",
            str(dataset), "--output", str(output), "--overwrite"]


class Yardstick:
    """One endpoint's forward alone over prepared digits in the merge's batches (its CPU
    default), with channels-last kernels as the passes run it, timed right before every pass
    of the merge and once after it. This shared machine's speed drifts by tens of percent
    within a minute, so a yardstick taken apart from the merge says little about it; taken
    between its passes, each pass is compared with the machine's speed at that moment."""

    def __init__(self, examples: int = 512) -> None:
        from hfrepair.cli import CPU_IMAGE_BATCH
        from hfrepair.demo import demo_pair

        self.model, _, calibration, _ = demo_pair(batch_size=CPU_IMAGE_BATCH)
        self.model.eval()
        self.batches = []
        for images, _labels in calibration:
            self.batches.append(images)
            if sum(len(b) for b in self.batches) >= examples:
                break
        self.examples = sum(len(b) for b in self.batches)
        self.samples: list[float] = []  # seconds per example, one per timing
        self.seconds = 0.0  # spent timing, left out of the merge's wall time

    @torch.no_grad()
    def time(self, release: bool = True) -> None:
        """``release``: whether the pass before handed its freed memory back; the yardstick
        then hands back what it used too, so that the next pass starts as it would without it
        (else the next pass reuses what the one before kept, and so does the yardstick)."""
        from hfrepair.allocator import release_freed_memory
        from hfrepair.passes import channels_last_convolutions

        start = time.perf_counter()
        with channels_last_convolutions([self.model]) as in_layout:
            # One batch untimed first: when the pass before handed its memory back, the
            # faults that costs would weigh more in 8 batches than in a pass.
            self.model(in_layout(self.batches[0]))
            begin = time.perf_counter()
            for images in self.batches:
                self.model(in_layout(images))
            self.samples.append((time.perf_counter() - begin) / self.examples)
        if release:
            release_freed_memory()
        self.seconds += time.perf_counter() - start


def run_after(output: Path) -> dict:
    from hfrepair.allocator import keep_freed_memory
    from hfrepair.cli import main as cli_main

    keep_freed_memory()  # what the command sets first, so that the yardstick runs as the merge does
    yardstick = Yardstick()
    peaks = StagePeaks()
    passes_module = importlib.import_module("hfrepair.passes")
    passes, bare_pass = [], passes_module._run_pass
    released = [True]  # whether the last pass handed its freed memory back

    def timed_pass(models, taps, batches, limit, accelerator, desc, release=True):
        peaks.settle()
        yardstick.time(released[0])
        reset_peak_rss()  # the yardstick's own peak counts nowhere
        peaks.stage = stage_of(desc)
        forwards, start = passes_module.forward_count(), time.perf_counter()
        try:
            return bare_pass(models, taps, batches, limit, accelerator, desc, release)
        finally:
            released[0] = release
            passes.append({"desc": desc, "seconds": time.perf_counter() - start,
                           "forwards": passes_module.forward_count() - forwards})
            peaks.settle()
    passes_module._run_pass = timed_pass

    start = time.perf_counter()
    code = cli_main(demo_command(output))
    seconds = time.perf_counter() - start - yardstick.seconds
    peaks.settle()
    if code:
        raise SystemExit(f"the merge failed with status {code}")
    yardstick.time()
    # Each pass against the forward alone timed right before and right after it.
    for index, one in enumerate(passes):
        one["forward"] = (yardstick.samples[index] + yardstick.samples[index + 1]) / 2
    record = json.loads((output / "merge_results.json").read_text())
    return {"seconds": seconds, "peaks": peaks.peaks, "record": record, "passes": passes,
            "forwards_alone": sum(one["forwards"] * one["forward"] for one in passes)}


def run_before(path: str, output: Path, threads: int) -> dict:
    """The same merge with the hfrepair at ``path``, in a fresh process."""
    script = (f"import sys, time, torch; sys.path.insert(0, {path!r}); torch.set_num_threads({threads}); "
              "import hfrepair, benchmarks.bench_default_merge as b; from hfrepair.cli import main; "
              f"start = time.perf_counter(); code = main(b.demo_command(__import__('pathlib').Path({str(output)!r}))); "
              "print('SECONDS', time.perf_counter() - start, hfrepair.__file__); sys.exit(code)")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{path}:{root}", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    line = next((l for l in out.stdout.splitlines() if l.startswith("SECONDS")), None)
    if out.returncode or line is None:
        raise SystemExit(f"the earlier hfrepair failed: {out.stderr[-2000:]}")
    record = json.loads((output / "merge_results.json").read_text())
    return {"seconds": float(line.split()[1]), "module": line.split()[2], "record": record}


def run_fresh(output: Path, threads: int, cache: Path) -> dict:
    """:func:`run_after` in a fresh process, as a user's ``hfrepair merge`` runs: nothing imported
    or warmed by an earlier merge (torch.export's first call imports torch._dynamo, ~2 s). The
    runs share the spec cache ``cache``, empty before the first: the first merge discovers
    the spec, the later ones reuse it, as a user's later merges of the architecture do."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--one-merge", str(output)],
                         capture_output=True, text=True, cwd=root,
                         env={**os.environ, "TQDM_DISABLE": "1", "HFREPAIR_CACHE": str(cache),
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"the merge failed: {out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def print_passes(run: dict) -> None:
    """Each kind of pass: its time against its forwards alone; and the time outside passes."""
    kinds: dict[str, list[float]] = {}
    for one in run["passes"]:
        kind = kinds.setdefault(one["desc"], [0, 0, 0.0, 0.0])
        kind[0] += 1
        kind[1] += one["forwards"]
        kind[2] += one["seconds"]
        kind[3] += one["forwards"] * one["forward"]
    print("passes: kind, count, example-forwards, seconds, forwards alone (s), ratio")
    for desc, (count, forwards, seconds, alone) in kinds.items():
        print(f"  {desc}: {count}, {forwards:,}, {seconds:.2f}, {alone:.2f}, {seconds / alone:.2f}x")
    inside = sum(one["seconds"] for one in run["passes"])
    print(f"  outside passes (loading, discovery, matching, interpolation, card, saving): {run['seconds'] - inside:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", default=None, help="a folder whose hfrepair package to time as well")
    parser.add_argument("--repeat", type=int, default=1,
                        help="merges to run, each in a fresh process; the median ratio is the figure")
    parser.add_argument("--cold", action="store_true",
                        help="every merge on an empty spec cache (each discovers its spec, as a first merge does)")
    parser.add_argument("--one-merge", default=None, help=argparse.SUPPRESS)  # a child process's one merge
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.one_merge:
        print("RESULT " + json.dumps(run_after(Path(args.one_merge))))
        return
    runs, befores = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeat):
            if args.cold:
                shutil.rmtree(Path(folder) / "cache" / "specs", ignore_errors=True)
            runs.append(run_fresh(Path(folder) / "after", args.threads, Path(folder) / "cache"))
            if args.before:
                befores.append(run_before(args.before, Path(folder) / "before", args.threads))
    ratios = [run["seconds"] / run["forwards_alone"] for run in runs]
    median = sorted(range(len(runs)), key=ratios.__getitem__)[len(runs) // 2]
    after, record = runs[median], runs[median]["record"]
    forwards = record["plan"]["example_forwards_run"]
    print(f"torch {torch.__version__}, {args.threads} threads; default merge of the demo pair "
          f"({record['calibration_examples']} calibration examples, grid {len(record['alphas'])})"
          + (f"; the run with the median ratio of {len(runs)}" if len(runs) > 1 else ""))
    print(f"wall time: {after['seconds']:.1f} s; saved model {100 * record['merged']['test']['accuracy']:.2f}% "
          f"test accuracy")
    print(f"stages as the merge timed them, the yardstick's timings between passes included (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items()) + f" (spec {record['spec_source']})")
    print(f"example-forwards: {forwards:,} (plan {record['plan']['example_forwards']:,}); each pass's times one "
          f"endpoint's forward alone timed right before and after it: {after['forwards_alone']:.1f} s "
          f"({1e3 * after['forwards_alone'] / forwards:.3f} ms per example-forward)")
    print(f"wall time / (example-forwards x per-example forward): {ratios[median]:.2f}x")
    print_passes(after)
    if len(runs) > 1:
        print("every run: wall " + ", ".join(f"{run['seconds']:.1f}" for run in runs) + " s; forwards alone "
              + ", ".join(f"{run['forwards_alone']:.1f}" for run in runs) + " s; ratio "
              + ", ".join(f"{r:.2f}" for r in ratios) + "x; spec "
              + ", ".join(run["record"]["spec_source"] for run in runs))
    print("peak RSS by pass (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in after["peaks"].items()))
    if len(runs) > 1:
        print("peak RSS of the statistics pass / the curves' evaluation, every run (MB): " + ", ".join(
            f"{run['peaks'].get('statistics', 0):.0f} / {run['peaks'].get('evaluation', 0):.0f}" for run in runs)
            + f"; the curves at or below the statistics pass in "
            f"{sum(run['peaks'].get('evaluation', 0) <= run['peaks'].get('statistics', 0) for run in runs)} of {len(runs)}")
    if befores:
        walls = sorted(before["seconds"] for before in befores)
        mine = sorted(run["seconds"] for run in runs)
        print(f"before ({befores[0]['module']}): wall " + ", ".join(f"{b['seconds']:.1f}" for b in befores)
              + " s, saved model " + ", ".join(f"{100 * b['record']['merged']['test']['accuracy']:.2f}%" for b in befores)
              + f"; median after / median before: {mine[len(mine) // 2]:.1f} / {walls[len(walls) // 2]:.1f} s = "
              f"{mine[len(mine) // 2] / walls[len(walls) // 2]:.2f}")


if __name__ == "__main__":
    main()
