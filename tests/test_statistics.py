"""One streamed pass gives float64 moments and cross-products at every site, exact to the
float32 rounding of each batch's centred moments."""

import torch
from torch import nn

from hfrepair.discovery import discover_spec
from hfrepair.models import VGG
from hfrepair.spec import ActivationSite
from hfrepair.passes import run_pass
from hfrepair.statistics import SiteMoments, collect_moments, collect_statistics, sample_batch


def small_vgg(seed):
    torch.manual_seed(seed)
    return VGG(widths=(4, 6), layers_per_stage=1, image_size=8).eval()


def test_sums_match_a_direct_float64_computation():
    a, b = small_vgg(0), small_vgg(1)
    x = torch.randn(10, 1, 8, 8)
    spec = discover_spec(a, x[:2])
    site = next(s for s in spec.sites if s.module == "features.1")  # first ReLU
    stats = collect_statistics(a, b, [site], [x[:4], x[4:7], x[7:]])
    pair = stats.pairs["features.1"]
    fa = a.features[:2](x).double().permute(0, 2, 3, 1).reshape(-1, 4)
    fb = b.features[:2](x).double().permute(0, 2, 3, 1).reshape(-1, 4)
    assert stats.examples == 10
    assert pair.a.n == 10 * 8 * 8  # every spatial position is a sample
    assert pair.cross.dtype == torch.float64
    # Each batch is reduced in float32 around its own mean: float32 rounding, not worse.
    torch.testing.assert_close(pair.a.total, fa.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pair.b.squares, (fb * fb).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pair.cross, fa.T @ fb, rtol=1e-6, atol=1e-6)
    expected = torch.corrcoef(torch.cat([fa, fb], 1).T)[:4, 4:]
    torch.testing.assert_close(pair.correlation(), expected, atol=1e-6, rtol=1e-6)


def test_max_examples_counts_exactly_and_memory_does_not_grow():
    a, b = small_vgg(0), small_vgg(1)
    spec = discover_spec(a, torch.randn(2, 1, 8, 8))
    batches = [torch.randn(7, 1, 8, 8) for _ in range(6)]
    few = collect_statistics(a, b, spec.sites, batches, max_examples=7)
    capped = collect_statistics(a, b, spec.sites, batches, max_examples=30)
    assert capped.examples == 30
    # The state kept is per-site sums: the same tensors whatever the number of examples.
    for name, pair in capped.pairs.items():
        assert pair.cross.shape == few.pairs[name].cross.shape
        assert pair.a.total.shape == few.pairs[name].a.total.shape


def test_dead_units_correlate_zero_not_nan():
    a, b = small_vgg(0), small_vgg(1)
    with torch.no_grad():
        a.features[0].weight[0].zero_()
        a.features[0].bias[0] = -1.0  # unit 0 is always 0 after ReLU
    spec = discover_spec(a, torch.randn(2, 1, 8, 8))
    site = next(s for s in spec.sites if s.module == "features.1")
    stats = collect_statistics(a, b, [site], [torch.randn(16, 1, 8, 8)])
    corr = stats.pairs["features.1"].correlation()
    assert torch.isfinite(corr).all()
    assert (corr[0] == 0).all()


def test_moments_of_one_model_match_the_pair_pass():
    a, b = small_vgg(0), small_vgg(1)
    spec = discover_spec(a, torch.randn(2, 1, 8, 8))
    batches = [torch.randn(5, 1, 8, 8) for _ in range(3)]
    pairs = collect_statistics(a, b, spec.sites, batches).pairs
    single = collect_moments(b, spec.sites, batches)
    for name, moments in single.items():
        torch.testing.assert_close(moments.var, pairs[name].b.var, rtol=1e-6, atol=1e-6)


def test_large_offsets_lose_no_correlation():
    """Units whose mean is 10,000 standard deviations from zero: float32 sums of raw
    products would lose the covariance entirely; batch-centred ones keep it."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 6), nn.Linear(8, 6)
    with torch.no_grad():
        a.bias.fill_(1e4)
        b.bias.fill_(-3e4)
    site = ActivationSite(module="", axis=-1, group="units", kind="linear")
    batches = [torch.randn(n, 8) for n in (300, 250, 1)]
    stats = collect_statistics(a, b, [site], batches)
    with torch.no_grad():  # the reference: the same float32 activations, summed in float64
        fa, fb = (model(torch.cat(batches)).double() for model in (a, b))
    expected = torch.corrcoef(torch.cat([fa, fb], 1).T)[:6, 6:]
    pair = stats.pairs[""]
    torch.testing.assert_close(pair.correlation(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.a.std, fa.std(0, unbiased=False), rtol=1e-5, atol=0)
    naive = (fa.float().T @ fb.float()).double() / len(fa) - torch.outer(fa.mean(0), fb.mean(0))
    assert (naive / torch.outer(fa.std(0), fb.std(0)) - expected).abs().max() > 0.1


def test_blocks_keep_only_their_cross_products():
    a, b = nn.Linear(4, 9), nn.Linear(4, 9)
    site = ActivationSite(module="", axis=-1, group=None, kind="linear")
    batches = [torch.randn(50, 4), torch.randn(30, 4)]
    full = collect_statistics(a, b, [site], batches).pairs[""]
    blocks = collect_statistics(a, b, [site], batches, cross_sites={"": [(0, 3), (5, 8)]}).pairs[""]
    kept = torch.zeros(9, 9, dtype=torch.bool)
    for start, stop in [(0, 3), (3, 5), (5, 8), (8, 9)]:  # the stretches between blocks are blocks too
        kept[start:stop, start:stop] = True
    torch.testing.assert_close(blocks.correlation()[kept], full.correlation()[kept])
    assert blocks.correlation()[~kept].isnan().all()


def test_channels_last_and_contiguous_outputs_give_the_same_moments():
    """A channels-last conv output is read as a (samples, units) view, a contiguous one
    through a units-first copy: the moments agree to float32 rounding."""
    torch.manual_seed(0)
    output = torch.relu(torch.randn(6, 5, 7, 7) + 3)
    wide = output.double().permute(0, 2, 3, 1).reshape(-1, 5)
    for layout in (torch.contiguous_format, torch.channels_last):
        sample = sample_batch(output.contiguous(memory_format=layout), axis=1)
        assert sample.count == 6 * 7 * 7
        torch.testing.assert_close(sample.mean, wide.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sample.var, wide.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_a_moments_tap_kept_after_its_pass_holds_no_activation_buffers():
    a = small_vgg(0)
    spec = discover_spec(a, torch.randn(2, 1, 8, 8))
    tap = SiteMoments(spec.sites)
    run_pass([a], [tap], [torch.randn(5, 1, 8, 8) for _ in range(2)])
    assert all(m.n > 0 and m.n % 10 == 0 for m in tap.moments.values())  # every position of 10 examples
    held = [t for t in vars(tap._buffers).values() if t]
    assert not held, "the pass's scratch buffers outlive it"


def test_a_sample_for_moments_alone_squares_in_place_and_gives_the_same_moments():
    torch.manual_seed(0)
    output = torch.relu(torch.randn(4, 32, 7, 7) + 1).contiguous(memory_format=torch.channels_last)
    before = output.clone()
    kept, squared = sample_batch(output, axis=1), sample_batch(output, axis=1, keep=False)
    assert kept.centred is not None and squared.centred is None
    assert torch.equal(kept.mean, squared.mean) and torch.equal(kept.var, squared.var)
    assert torch.equal(output, before)  # squared in its own buffer: the module's output is never written


def test_a_samples_moments_have_the_same_bits_whatever_the_thread_count():
    """What lets several processes agree with one to 1e-9 (README): at a demo-sized
    channels-last output, one and two threads give the same per-batch moments."""
    torch.manual_seed(0)
    output = torch.relu(torch.randn(64, 32, 28, 28)).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        samples = []
        for count in (1, 2):
            torch.set_num_threads(count)
            samples.append(sample_batch(output, axis=1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(samples[0].mean, samples[1].mean) and torch.equal(samples[0].var, samples[1].var)
