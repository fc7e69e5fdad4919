"""Statistics, REPAIR and evaluation on two real processes (gloo on CPU) equal one process.

``accelerate.debug_launcher`` forks two processes that run the passes through the Python
API; one CLI merge runs under ``accelerate launch --multi_gpu --num_processes 2`` (on CPU,
``accelerate launch --cpu --num_processes 2`` would silently start one process).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hfrepair.data import image_batches, model_transform
from hfrepair.discovery import discover_spec
from hfrepair.distributed import local_batches
from hfrepair.io import load_model
from hfrepair.pipeline import merge
from hfrepair.statistics import collect_statistics

from .conftest import assert_one_line_error, run_cli

NUM_SAMPLES = 1100  # with batches of 250: 4 full batches and one of 100, dealt 3 / 2
EVAL_SAMPLES = 700
BATCH = 250


def fake_process(index, count):
    return SimpleNamespace(process_index=index, num_processes=count)


def test_parts_cover_the_capped_batches_exactly_once():
    batches = [(torch.arange(i * 10, i * 10 + 10), torch.zeros(10)) for i in range(7)]
    for count in (1, 2, 3, 5, 8):
        parts = [list(local_batches(batches, 45, fake_process(i, count))) for i in range(count)]
        seen = sorted(int(x) for part in parts for inputs, _ in part for x in inputs)
        assert seen == list(range(45))


def test_stream_parts_cover_the_capped_stream_exactly_once(mnist_folder):
    stream = image_batches(str(mnist_folder), "train", lambda images: torch.zeros(len(images)),
                           limit=NUM_SAMPLES, batch_size=BATCH, seed=0)
    whole = torch.cat([labels for _, labels in stream])
    parts = [list(local_batches(stream, None, fake_process(i, 2))) for i in range(2)]
    assert [len(p) for p in parts] == [3, 2]
    interleaved = [parts[n % 2][n // 2][1] for n in range(5)]
    assert torch.equal(torch.cat(interleaved), whole) and len(whole) == NUM_SAMPLES


def run_passes(folders, dataset, accelerator, rotate=False):
    """Statistics and a whole merge, as one process of a launch (or alone)."""
    model_a, model_b = load_model(folders[0]), load_model(folders[1])
    transform = model_transform(folders[0])
    calibration = image_batches(dataset, "train", transform, limit=NUM_SAMPLES, batch_size=BATCH, seed=0)
    test = image_batches(dataset, "test", transform, limit=EVAL_SAMPLES, batch_size=BATCH, seed=0)
    spec = discover_spec(model_a, next(iter(calibration))[0][:4])
    stats = collect_statistics(model_a, model_b, spec.sites, calibration, accelerator=accelerator)
    merged, result = merge(model_a, model_b, calibration, {"test": test}, grid=3, rotate=rotate,
                           rotation_steps=3, accelerator=accelerator)  # refined: full-batch steps, any process count
    sums = {name: [t.tolist() for t in pair.sums()] for name, pair in stats.pairs.items()}
    return {"examples": stats.examples, "sums": sums, "result": result.to_dict(),
            "merged": {k: v.tolist() for k, v in merged.state_dict().items()}}


def two_process_worker(folders, dataset, out, rotate=False):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    # debug_launcher's workers each see LOCAL_WORLD_SIZE=1, so accelerate gives each all the
    # physical cores' threads: two of them on a 2-core machine (another pytest worker beside)
    # took 31 s for the ViT's passes, against 5.6 s on one thread each. The moments' bits do
    # not depend on the thread count; at these sizes neither do the cross-products'.
    torch.set_num_threads(1)
    assert accelerator.num_processes == 2
    measured = run_passes(folders, dataset, accelerator, rotate)
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(measured, f)


@pytest.fixture(scope="module")
def endpoint_folders(resnet_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    for name, model in zip("ab", resnet_pair):
        model.save_pretrained(str(root / name))
    return str(root / "a"), str(root / "b")


@pytest.fixture(scope="module")
def vit_endpoint_folders(tmp_path_factory):
    """Two randomly initialised ViTs with a grayscale processor: the transformer path (heads,
    per-head dims, stream, LayerNorm corrections) across processes."""
    from transformers import ViTImageProcessor

    from .conftest import tiny_vit

    root = tmp_path_factory.mktemp("distributed-vit")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        tiny_vit().save_pretrained(str(root / name))
        ViTImageProcessor(do_resize=False, image_mean=[0.1307], image_std=[0.3081]).save_pretrained(str(root / name))
    return str(root / "a"), str(root / "b")


def assert_close_nested(a, b, rel):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close_nested(a[key], b[key], rel)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_nested(x, y, rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=rel)
    else:
        assert a == b


@pytest.mark.parametrize("pair, rotate", [("endpoint_folders", False), ("vit_endpoint_folders", False),
                                          ("vit_endpoint_folders", True)])  # the rotations' sums and fits too
def test_two_processes_equal_one(pair, rotate, mnist_folder, tmp_path, request):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    endpoint_folders = request.getfixturevalue(pair)
    out = tmp_path / "two.json"
    AcceleratorState._reset_state(reset_partial_state=True)  # the forked workers must not inherit it
    debug_launcher(two_process_worker, args=(endpoint_folders, str(mnist_folder), str(out), rotate), num_processes=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    two = json.loads(out.read_text())
    one = run_passes(endpoint_folders, str(mnist_folder), None, rotate)

    assert two["examples"] == one["examples"] == NUM_SAMPLES
    assert two["result"]["calibration_examples"] == NUM_SAMPLES
    assert two["result"]["endpoints"]["A"]["test"]["examples"] == EVAL_SAMPLES
    # float64 sums: only the order of additions differs (at these sizes the cross-products' GEMM
    # runs alike on 1 and 2 threads; on the demo's 64 x 28 x 28 outputs it may not: see
    # statistics.sample_batch)
    assert_close_nested(two["sums"], one["sums"], rel=1e-9)
    assert_close_nested(two["result"]["matched_correlation"], one["result"]["matched_correlation"], rel=1e-9)
    assert two["result"]["groups"] == one["result"]["groups"]
    assert bool(two["result"]["rotated"]) == bool(one["result"]["rotated"]) == rotate
    # REPAIR's float32 trackers and the evaluation's float32 logits: float32 tolerance
    assert_close_nested(two["merged"], one["merged"], rel=1e-5)
    for label in ("naive", "aligned", "repaired"):
        assert_close_nested(two["result"]["curves"][label], one["result"]["curves"][label], rel=1e-5)


def launch(*args, processes=2):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29512", "-m", "hfrepair.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_cli_under_accelerate_launch(endpoint_folders, mnist_folder, tmp_path):
    common = ["--dataset", mnist_folder, "--grid", "3", "--num-samples", NUM_SAMPLES, "--eval-samples",
              EVAL_SAMPLES, "--batch-size", BATCH]
    two_out, one_out = tmp_path / "two", tmp_path / "one"
    done = launch("merge", *endpoint_folders, "--output", two_out, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("merged model written to") == 1  # the main process alone reports and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no staging folder left behind
    single = run_cli("merge", *endpoint_folders, "--output", one_out, *common)
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = (json.loads((o / "merge_results.json").read_text()) for o in (two_out, one_out))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["calibration_examples"] == one["calibration_examples"] == NUM_SAMPLES
    assert_close_nested(two["matched_correlation"], one["matched_correlation"], rel=1e-9)
    assert_close_nested(two["merged"], one["merged"], rel=1e-5)
    weights_two, weights_one = (load_file(o / "model.safetensors") for o in (two_out, one_out))
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, rtol=1e-5, atol=1e-5)

    # The same command under torchrun, with a bad split.
    failed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29513", "-m",
         "hfrepair.cli", "merge", *endpoint_folders, "--output", str(tmp_path / "never"), *map(str, common),
         "--split", "nope"], capture_output=True, text=True, check=False, timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    assert failed.returncode != 0
    # Both processes meet the bad split; only the main one says so (the launcher then
    # reports the failed processes in its own words).
    errors = [line for line in failed.stderr.splitlines() if line.startswith("hfrepair: error:")]
    assert len(errors) == 1 and "has no split 'nope'" in errors[0], failed.stderr[-3000:]
    assert not (tmp_path / "never").exists()


def test_bf16_autocast_keeps_float64_sums(endpoint_folders, mnist_folder):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model_a, model_b = load_model(endpoint_folders[0]), load_model(endpoint_folders[1])
    calibration = image_batches(str(mnist_folder), "train", model_transform(endpoint_folders[0]), limit=500,
                                batch_size=BATCH)
    spec = discover_spec(model_a, next(iter(calibration))[0][:4])
    exact = collect_statistics(model_a, model_b, spec.sites, calibration)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        bf16 = collect_statistics(model_a, model_b, spec.sites, calibration,
                                  accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    for name, pair in bf16.pairs.items():
        assert pair.cross.dtype == torch.float64
        reference = exact.pairs[name]
        assert not torch.equal(pair.a.total, reference.a.total)  # the forward passes did run in bf16
        corr, corr_exact = pair.correlation(), reference.correlation()
        assert (corr.diagonal() - corr_exact.diagonal()).abs().max() < 0.05


def two_ranks(*args, port: int):
    """``hfrepair`` as rank 0 and rank 1 of a gloo group started by hand (no launcher between
    them and us): each process's status and stderr."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-m", "hfrepair", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    return [(rank.wait(timeout=300), rank.communicate()[1]) for rank in ranks]


def test_bad_input_that_one_process_meets_is_said_once_and_ends_both(endpoint_folders, mnist_folder, tmp_path):
    """A corrupt image in one process's batch, a calibration cap that leaves one process no
    batch, a dataset that does not exist, a usage error: one line from the main process, status
    2 from both, no traceback, nothing left (before: a gloo traceback from the other process,
    or the error line twice)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(mnist_folder / "train.parquet")
    images = table.column("image").to_pylist()
    images[10] = {"bytes": b"not an image", "path": None}
    broken = tmp_path / "broken"
    broken.mkdir()
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, table.schema.field("image"),
                                    pa.array(images, type=table.schema.field("image").type)),
                   str(broken / "train.parquet"))
    (broken / "test.parquet").write_bytes((mnist_folder / "test.parquet").read_bytes())
    out = tmp_path / "out"
    base = ["merge", *endpoint_folders, "--output", out, "--no-curves", "--eval-samples", 100]
    for port, args, message in (
            (29514, ["--dataset", broken, "--num-samples", 2000], "are not images with class labels"),
            (29515, ["--dataset", mnist_folder, "--num-samples", 50], "calibration: 1 of 2 processes got no batch"),
            (29516, ["--dataset", tmp_path / "nowhere"], "nowhere"),
            (29517, ["--dataset", mnist_folder, "--alpha", 1.5], "alpha must be strictly between 0 and 1")):
        (status_0, err_0), (status_1, err_1) = two_ranks(*base, *args, port=port)
        assert status_0 == status_1 == 2, err_0[-2000:] + err_1[-2000:]
        assert "hfrepair: error:" not in err_1 and "Traceback" not in err_1, err_1[-2000:]
        assert_one_line_error(err_0, message)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


class _FirstBatchFailsOnRankOne:
    """Evaluation batches whose first read fails on rank 1 only (a corrupt image there)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __iter__(self):
        from hfrepair.data import DataError

        if self.rank == 1:
            raise DataError("corrupt image in rank 1's first batch")
        yield torch.zeros(2, 3), torch.tensor([0, 1])


def first_batch_worker(out):
    from accelerate import Accelerator

    from hfrepair.pipeline import check_first_batches

    accelerator = Accelerator(cpu=True)
    torch.set_num_threads(1)
    try:
        check_first_batches(torch.nn.Linear(3, 3), torch.zeros(2, 3),
                            {"evaluation['test']": _FirstBatchFailsOnRankOne(accelerator.process_index)}, accelerator)
        message = "no error"
    except ValueError as error:
        message = str(error)
    with open(f"{out}.{accelerator.process_index}", "w") as f:
        f.write(message)


def test_a_first_evaluation_batch_one_process_cannot_read_fails_both(tmp_path):
    """Before any pass, each process reads its first evaluation batch; one that cannot (rank
    1 here) raises on both, with its message (before: rank 0 waited in the collective of
    the label check, then died of a gloo connection reset, a traceback, with the message lost)."""
    from accelerate import debug_launcher

    out = tmp_path / "message"
    debug_launcher(first_batch_worker, args=(str(out),), num_processes=2)
    for rank in (0, 1):
        assert (tmp_path / f"message.{rank}").read_text() == "corrupt image in rank 1's first batch"
