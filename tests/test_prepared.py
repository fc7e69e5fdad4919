"""Data read once: prepared batches replay what the source yielded, in memory or spilled to
disk, cut prefixes alike on every process, and a whole merge decodes each example once and
runs exactly the forward passes its printed plan announced."""

import tempfile
from types import SimpleNamespace

import pytest
import torch

import hfrepair.pipeline as pipeline
from hfrepair import merge
from hfrepair.data import builtin_transform, image_batches
from hfrepair.models import MLP
from hfrepair.prepared import PreparedBatches, SpillError


class CountingSource:
    """Batches of 5 rows numbered from 0 (the last one shorter); counts its own reads."""

    def __init__(self, total=23, size=5):
        self.total, self.size, self.reads = total, size, 0

    def __iter__(self):
        for start in range(0, self.total, self.size):
            self.reads += 1
            rows = torch.arange(start, min(start + self.size, self.total))
            yield rows.float()[:, None], rows


def rows_of(batches) -> list[int]:
    return [int(v) for _, labels in batches for v in labels]


def process(index, count):
    return SimpleNamespace(process_index=index, num_processes=count)


def test_prepared_batches_read_the_source_once_and_replay_it_in_memory_or_from_disk():
    source = CountingSource()
    held = PreparedBatches(source)
    assert rows_of(held.up_to(7)) == list(range(7))  # a pass that stops early ...
    assert source.reads == 2
    assert rows_of(held) == list(range(23))  # ... and the next one continues the same read
    assert rows_of(held) == list(range(23)) and source.reads == 5 and held.spilled == 0

    spilled_source = CountingSource()
    spilled = PreparedBatches(spilled_source, memory_bytes=60)  # room for one batch (5 x 4 + 5 x 8 bytes)
    assert rows_of(spilled) == rows_of(spilled) == list(range(23))
    assert spilled_source.reads == 5 and spilled.spilled == 4
    folder = spilled._folder
    assert folder.is_dir() and len(list(folder.iterdir())) == 4
    spilled.close()
    assert not folder.exists()


def test_a_temporary_folder_that_takes_no_batches_is_one_error_naming_it(monkeypatch, tmp_path):
    """No temporary folder, or a full disk under it: what to change, in one line."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(SpillError, match=r"cannot keep prepared batches in .*missing .*set TMPDIR"):
        rows_of(PreparedBatches(CountingSource(), memory_bytes=60))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def full_disk(*_args, **_kwargs):  # what torch's writer raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SpillError, match="raise --cache-memory.*unexpected pos"):
        rows_of(PreparedBatches(CountingSource(), memory_bytes=60))


def test_a_prefix_is_cut_at_the_same_examples_on_every_process():
    for limit in (12, 15, 23, 40):
        parts = [PreparedBatches(CountingSource(), process(index, 2)).prefix(limit) for index in range(2)]
        together = sorted(rows_of(parts[0]) + rows_of(parts[1]))
        assert together == list(range(min(limit, 23))), limit
        assert rows_of(parts[0]) and all(v // 5 % 2 == 0 for v in rows_of(parts[0]))  # whole batches, dealt out


def test_a_merge_decodes_each_example_once_and_runs_the_forwards_it_announced(mnist_folder, monkeypatch):
    decoded = []
    transform = builtin_transform({"image_size": 28, "in_channels": 1})

    def counting_transform(images):
        decoded.append(len(images))
        return transform(images)

    def stream(split, limit):
        return image_batches(str(mnist_folder), split, counting_transform, limit=limit, batch_size=128, seed=0,
                             strict_limit=True)  # sizes known up front: the announced plan counts forwards

    # Forwards of the model class on real data, outside the checks that run it on 8 examples.
    forwards, checking = [], [False]
    for name in ("verify_spec", "check_function_preserved", "checked_spec", "check_runs"):
        original = getattr(pipeline, name)

        def flagged(*args, _original=original, **kwargs):
            checking[0] = True
            try:
                return _original(*args, **kwargs)
            finally:
                checking[0] = False
        monkeypatch.setattr(pipeline, name, flagged)

    def count(module, args):  # a pre-hook: passes that need no logits stop before the model's end
        if isinstance(module, MLP) and not checking[0]:
            forwards.append(len(args[0]))

    plans = []
    torch.manual_seed(1)
    model_a = MLP(depth=2, width=32)
    torch.manual_seed(2)
    model_b = MLP(depth=2, width=32)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        _merged, result = merge(model_a, model_b, stream("train", 600), {"test": stream("test", 300)},
                                train_examples=200, curve_repair_examples=400, grid=5, announce=plans.append)
    finally:
        handle.remove()
    assert sum(decoded) == 600 + 300  # every example decoded once, the train-loss examples included
    total = result.plan["example_forwards"]
    assert sum(forwards) == total == result.plan["example_forwards_run"]
    assert len(plans) == 1 and f"{total:,} example-forwards" in plans[0]
    assert "REPAIR (repaired curve): 2 passes x 1 model over the first 400 calibration examples" in plans[0]
    # statistics (2 x 600), REPAIR of the saved model (600) and of 2 more repaired points on the
    # curve's 400 (2 x 400), endpoints (2 x 500), saved model (500), naive and aligned at 3
    # alphas, repaired at 2 (8 x 500)
    assert total == 2 * 600 + 600 + 2 * 400 + 2 * 500 + 500 + 8 * 500
    assert result.curves["repaired"]["test"][2] == result.merged["test"]  # the saved point, reused
    assert result.plan["variance_data"] == "train" and set(result.variance_ratio) == {"aligned", "repaired"}


def test_a_cap_the_split_need_not_fill_gives_no_batch_count_until_read():
    """Progress bars show what is known: 10 rows under a cap of 40, in batches of 4, are 3
    batches, not the cap's 10; only a cap the split must fill counts before reading."""
    import datasets

    from hfrepair.data import ImageStream

    rows = datasets.IterableDataset.from_generator(lambda: ({"image": [[i]], "label": i % 3} for i in range(10)))
    for strict, before in ((False, None), (True, 10)):
        stream = ImageStream(rows, torch.tensor, "image", "label", "the generator", batch_size=4, limit=40,
                             strict_limit=strict)
        held = PreparedBatches(stream)
        assert held.batch_count() == before  # strict: the split must fill the cap (else an error)
    held = PreparedBatches(ImageStream(rows, torch.tensor, "image", "label", "the generator", batch_size=4,
                                       limit=40))
    assert len(list(held)) == 3 and held.batch_count() == 3
