"""The pass engine stops a forward once its taps have seen all they need, and splits a CPU
pass over two threads where that is faster, summing what one thread would."""

import threading

import pytest
import torch
from torch import nn

from hfrepair import passes
from hfrepair.evaluate import Scores, evaluate
from hfrepair.passes import Tap, run_pass
from hfrepair.spec import ActivationSite
from hfrepair.statistics import SiteMoments, SiteStatistics


class Undeclared(Tap):
    """A tap that hooks nothing and does not say so: the pass cannot know where to stop."""


def test_a_measuring_pass_skips_the_layers_after_its_last_site_and_measures_the_same():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 50)) for _ in range(2))
    head_calls = []
    for model in (a, b):
        model[2].register_forward_pre_hook(lambda _m, args: head_calls.append(len(args[0])))
    sites = [ActivationSite(module="1", axis=-1, group="hidden", kind="activation")]
    batches = [torch.randn(n, 6) for n in (5, 7, 3)]

    stopping = SiteStatistics(sites)
    run_pass([a, b], [stopping], batches)
    assert head_calls == [5, 5]  # the first batch runs whole (to count the hooks), the rest stop at the site

    head_calls.clear()
    whole = SiteStatistics(sites)
    run_pass([a, b], [whole, Undeclared()], batches)
    assert head_calls == [5, 5, 7, 7, 3, 3]
    assert [t.tolist() for t in stopping.sums()] == [t.tolist() for t in whole.sums()]

    head_calls.clear()
    evaluate(a, [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches])  # logits needed: never stopped
    assert head_calls == [5, 7, 3]


class threads:
    """Torch's intra-op threads set for a block (the split needs at least two)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def statistics_with_parts(parts: int, a, b, sites, batches) -> list[torch.Tensor]:
    passes.SPLIT_PARTS = parts
    try:
        tap = SiteStatistics(sites)
        examples = run_pass([a, b], [tap], batches)
    finally:
        passes.SPLIT_PARTS = 2
    assert examples == sum(len(x) for x in batches)
    return tap.sums()


def test_a_pass_split_over_two_threads_sums_what_one_thread_does_and_the_same_on_every_run():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)) for _ in range(2))
    sites = [ActivationSite(module="1", axis=-1, group="hidden", kind="activation")]
    batches = [torch.randn(n, 6) + 3 for n in (64, 64, 64, 64, 64, 17)]  # 3 batches each, the last short
    with threads(2), torch.no_grad():  # as within a pass
        assert passes._split_parts([a, b], [SiteStatistics(sites)], torch.device("cpu"), len(batches)) == 2
    with threads(2):
        whole = statistics_with_parts(1, a, b, sites, batches)
        split, again = (statistics_with_parts(2, a, b, sites, batches) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(split, again))  # each thread's share is fixed
    for x, y in zip(split, whole):  # counts, sums, squares and cross-products: float rounding
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert split[0].item() == whole[0].item() == 64 * 5 + 17


def test_a_split_pass_that_fails_in_one_thread_raises_its_error_once_and_ends():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 8), nn.ReLU()) for _ in range(2))
    sites = [ActivationSite(module="1", axis=-1, group="hidden", kind="activation")]

    class Unreadable:
        """Six batches promised, the fourth unreadable."""

        def __len__(self):
            return 6

        def __iter__(self):
            for number in range(6):
                if number == 3:
                    raise ValueError("batch 3 is unreadable")
                yield torch.randn(8, 6)

    with threads(2), pytest.raises(ValueError, match="batch 3 is unreadable"):
        run_pass([a, b], [SiteStatistics(sites)], Unreadable())
    assert not [t for t in threading.enumerate() if t.name.startswith("hfrepair-pass")]  # none left waiting


@pytest.mark.parametrize("parts", [1, 2])
def test_a_pass_that_fails_midway_closes_its_progress_bar(parts, monkeypatch):
    """The error line a user sees next must not run into a bar left on screen."""
    from tqdm.auto import tqdm

    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    class FailsOnBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def forward(self, x):
            self.seen += 1
            if self.seen == 3:
                raise ValueError("a forward failed")
            return x

    model = nn.Sequential(nn.Linear(6, 8), FailsOnBatch(), nn.ReLU())
    sites = [ActivationSite(module="2", axis=-1, group="hidden", kind="activation")]
    with threads(parts), pytest.raises(ValueError, match="a forward failed") as failure:
        run_pass([model], [SiteMoments(sites)], [torch.randn(8, 6) for _ in range(6)], desc="failing pass")
    assert failure.value.__traceback__ is not None  # still held, as when the CLI prints it
    assert not [bar for bar in list(tqdm._instances) if bar.desc == "failing pass"]


def test_passes_are_not_split_when_they_record_gradients_have_few_batches_or_taps_without_copies():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    sites = [ActivationSite(module="1", axis=-1, group="hidden", kind="activation")]
    cpu = torch.device("cpu")
    with threads(2), torch.no_grad():  # as within a pass
        assert passes._split_parts([model], [SiteMoments(sites)], cpu, 4) == 2
        assert passes._split_parts([model], [SiteMoments(sites)], cpu, 3) == 1  # fewer than two a thread
        # Not known before reading (a cap the split need not fill): split, as a merge's
        # statistics pass over the default calibration cap must be.
        assert passes._split_parts([model], [SiteMoments(sites)], cpu, None) == 2
        assert passes._split_parts([model], [Scores(0)], cpu, 10) == 1  # evaluation: nothing to gain
        with torch.enable_grad():
            assert passes._split_parts([model], [SiteMoments(sites)], cpu, 10) == 1
    with threads(1), torch.no_grad():
        assert passes._split_parts([model], [SiteMoments(sites)], cpu, 10) == 1


def test_a_split_pass_over_a_source_that_yields_nothing_says_so():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    sites = [ActivationSite(module="1", axis=-1, group="hidden", kind="activation")]

    class Empty:
        """Says it has four batches, yields none."""

        def __len__(self):
            return 4

        def __iter__(self):
            return iter(())

    with threads(2), pytest.raises(ValueError, match="no data|empty|no batch"):
        run_pass([model], [SiteMoments(sites)], Empty(), desc="moments")


def test_a_pass_puts_back_the_callers_modes_and_refuses_what_are_not_batches():
    """A model in training mode stays in it after an evaluation, and its conv kernels keep
    their storage (the pass runs them channels-last); one tensor instead of batches, or a
    limit below one example, is a clear error."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).train()
    model[1].eval()
    kernel = model[0].weight.data_ptr()
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))]
    evaluate(model, data)
    assert model.training and model[0].training and not model[1].training
    assert model[0].weight.data_ptr() == kernel and model[0].weight.is_contiguous()
    with pytest.raises(TypeError, match="wrap one tensor as"):
        run_pass([model], [Scores(0)], data[0][0])
    with pytest.raises(ValueError, match="must be a positive integer"):
        evaluate(model, data, max_examples=0)
