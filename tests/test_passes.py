"""The pass engine stops a forward once its taps have seen all they need."""

import torch
from torch import nn

from hfrepair.evaluate import evaluate
from hfrepair.passes import Tap, run_pass
from hfrepair.spec import ActivationSite
from hfrepair.statistics import SiteStatistics


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
