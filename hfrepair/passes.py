"""The pass engine: the one place that runs models over batches.

A pass reads this process's part of the batches once and runs every model it is given on
each batch, under the accelerator's autocast and with padded positions marked
(:func:`~hfrepair.batches.counting_real_tokens`). What a pass measures, or changes, is
said by its *taps*: statistics at activation sites, REPAIR's correctors, metric
accumulators, activation moments. Each tap keeps float64 sums; after the last batch the
sums of every tap are added over all processes in one reduction, then each tap finishes
(turns sums into statistics, or raises an error every process agrees on).

On a CPU with several intra-op threads, a pass whose taps can be copied (statistics,
REPAIR's trackers, moments) is split over two threads, each on half the intra-op threads
with its own copy of the (small) models and every other batch, and the copies' sums are
added to the taps' as processes' are: the statistics' and trackers' memory-bound ops scale
better over whole batches than within each op (``benchmarks/thread_split_study.py``, 2
cores: the demo's statistics pass 0.92x, its REPAIR pass 0.94x; an evaluation pass gains
nothing and is not split). Such a pass holds two batches' activations at once.

Statistics, REPAIR, the variance ratios and evaluation are thin users of :func:`run_pass`.
"""

from __future__ import annotations

import copy
import numbers
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from torch import nn

from .allocator import release_freed_memory
from .batches import counting_real_tokens, inputs_of, model_outputs, rows, run_model, to_device
from .distributed import (autocast, local_batches, part_of, progress, raise_together, require_data_everywhere,
                          sum_across)


_FORWARDS = [0]  # example-forwards run by every pass of this process so far (examples x models)
# Parameters and buffers of a pass's models (bytes) up to which a CPU pass copies them to
# split its batches over two threads (a large model is not duplicated).
SPLIT_MODEL_BYTES = 256 * 2**20
SPLIT_PARTS = 2


def forward_count() -> int:
    """Example-forwards (over all processes) that :func:`run_pass` has run in this process;
    a merge records the difference as the cost of its passes."""
    return _FORWARDS[0]


class Tap:
    """What a pass measures. Subclasses override the parts they need.

    ``attach`` registers forward hooks on the pass's models and returns their handles
    (removed when the pass ends); ``observe`` sees each model's logits with the batch's
    labels; ``sums``/``set_sums`` expose the float64 sums the pass reduces over processes;
    ``finish`` runs on every process after that reduction.
    """

    def attach(self, models: Sequence[nn.Module]) -> list:
        return []

    def observe(self, model_index: int, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        pass

    wants_outputs = False  # whether observe needs the logits (else they are not extracted)

    def hooked(self) -> list[tuple[int, str]] | None:
        """``(model index, module name)`` of every module ``attach`` hooks; None if unknown.
        When every tap of a pass says, and none wants outputs, each forward stops once the
        last of them has run."""
        return None

    def sums(self) -> list[torch.Tensor]:
        return []

    def set_sums(self, sums: list[torch.Tensor]) -> None:
        pass

    def finish(self) -> None:
        pass

    def replica(self) -> Tap | None:
        """A fresh tap that measures the same on a copy of the pass's models (run by another
        thread on its share of the batches; its sums are then added to this tap's), made
        before the pass attaches anything. None: this tap's pass is not split."""
        return None


def _labels_of(batch):
    """The labels of an ``(inputs, labels)`` batch; None for inputs alone."""
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


def _batch_count(batches: Iterable, limit: int | None, accelerator: Accelerator | None) -> int | None:
    """Batches this process will read, for the progress bar (None when unknown)."""
    if getattr(batches, "is_local", False):
        return batches.batch_count(limit)
    index, count = part_of(accelerator)
    try:
        return len(range(index, len(batches), count))
    except TypeError:  # an uncapped stream, a generator
        return None


def all_sums(parts) -> list[torch.Tensor]:
    """The sums of several accumulators (anything with ``sums``/``set_sums``), in one list."""
    return [t for part in parts for t in part.sums()]


def give_sums(parts, sums: list[torch.Tensor]) -> None:
    """Hand a list made like :func:`all_sums`'s back to its accumulators, in order."""
    start = 0
    for part in parts:
        size = len(part.sums())
        part.set_sums(sums[start : start + size])
        start += size


def _reduce(taps: Sequence[Tap], accelerator: Accelerator | None) -> None:
    """Replace each tap's local sums by the sums over all processes (one all-reduce)."""
    give_sums(taps, sum_across(all_sums(taps), accelerator))


class _StopForward(Exception):
    """Raised from a hook to end a forward whose remaining layers no tap needs."""


class _EarlyStop:
    """Ends each model's forward once the last hook of the pass's taps has run: a pass that
    only measures activations needs nothing after them (a language model's vocabulary-wide
    head is about a third of a small GPT-2's forward). The first batch runs whole and counts
    the hook calls; later batches stop at that count, after the taps' own hooks."""

    def __init__(self, models: Sequence[nn.Module], hooked: list[tuple[int, str]]) -> None:
        self.calls = [0] * len(models)
        self.last: list[int | None] = [None] * len(models)
        modules = [dict(model.named_modules()) for model in models]
        self.handles = [modules[index][name].register_forward_hook(self._counter(index))
                        for index, name in hooked]

    def _counter(self, index: int):
        def hook(_module, _inputs, _output):
            self.calls[index] += 1
            if self.calls[index] == self.last[index]:
                raise _StopForward
        return hook

    def run(self, index: int, forward) -> None:
        self.calls[index] = 0
        try:
            forward()
        except _StopForward:
            return
        self.last[index] = self.calls[index]


def _channels_last_images(inputs):
    """Image batches (4-D floating tensors, alone or in a mapping) copied to channels-last
    strides. oneDNN gives a conv the layout of its input; a one-channel batch counts as
    contiguous in both layouts (``contiguous(memory_format=...)`` leaves it as it is), so
    the first conv of a digits model ran the contiguous path (the demo's stem timed alone:
    5.4 against 0.9 ms a batch of 64; the whole forward about 2% faster) and handed its
    output on in that layout."""
    if isinstance(inputs, Mapping):
        return {name: _channels_last_images(value) for name, value in inputs.items()}
    if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.is_floating_point()):
        return inputs
    _, channels, height, width = inputs.shape
    strides = (height * width * channels, 1, width * channels, channels)
    return torch.empty_strided(inputs.shape, strides, dtype=inputs.dtype, device=inputs.device).copy_(inputs)


@contextmanager
def channels_last_convolutions(models: Sequence[nn.Module]):
    """2-D conv kernels on the CPU in channels-last layout for the pass, put back after;
    yields what puts each batch's images in that layout too (nothing when no kernel moved).

    oneDNN's CPU convolutions run faster on it, and the activations that follow keep the
    layout (the demo's BN ResNet: 0.73 against 1.1-1.3 ms per digit, 2 threads); results
    agree to float rounding. Only the kernels' strides change, never their values.
    """
    moved = [module for model in models for module in model.modules()
             if isinstance(module, nn.Conv2d) and module.weight.device.type == "cpu" and module.weight.is_contiguous()]
    kernels = [module.weight.data for module in moved]
    for module in moved:
        module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    try:
        yield _channels_last_images if moved else (lambda inputs: inputs)
    finally:
        # Back into the kernels' own storage: a caller's state_dict taken before the pass
        # still aliases the weights after it.
        for module, kernel in zip(moved, kernels):
            kernel.copy_(module.weight.data)
            module.weight.data = kernel


@contextmanager
def kept_modes(*models: nn.Module):
    """The models in eval mode inside; every module's own train/eval flag back after, error
    or not (a caller's model in training mode stays in it)."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def run_pass(
    models: Sequence[nn.Module],
    taps: Sequence[Tap],
    batches: Iterable,
    *,
    limit: int | None = None,
    accelerator: Accelerator | None = None,
    desc: str = "pass",
    grad: bool = False,
    release: bool = True,
) -> int:
    """Run every model on each of this process's batches (at most ``limit`` examples over
    all processes) with ``taps`` attached; returns the examples read by all processes.

    Models run in eval mode (each module's mode is put back after); the inputs go to the
    first model's device. A process that got no batch is an error on every process (its
    statistics would be undefined), and so is bad data that one process met. Nothing
    records gradients unless ``grad`` (a tap that differentiates what it observes). A
    model's ``forwards_per_example`` (default 1) is what it counts per example.
    ``release``: hand what the pass freed back to the system when it ends; a caller that
    runs several passes of one kind in a row (evaluation) keeps it for the next one (each
    would fault the same pages in again: 0.2 s of a default demo merge) and releases once
    after the last (:func:`~hfrepair.allocator.release_freed_memory`).
    """
    check_batches(batches, limit)
    with torch.set_grad_enabled(grad), kept_modes(*models):
        return _run_pass(models, taps, batches, limit, accelerator, desc, release)


def check_batches(batches: Iterable, limit: int | None = None, name: str = "batches") -> None:
    """Refuse what cannot be a pass's batches, in words: one tensor (an iterable of its rows,
    not of batches) or a limit below one example."""
    if isinstance(batches, (torch.Tensor, str, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(f"{name} must be an iterable of batches (a list of tensors or (inputs, labels) pairs, a "
                        f"DataLoader), not {type(batches).__name__}" +
                        ("; wrap one tensor as [tensor]" if isinstance(batches, torch.Tensor) else ""))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"the number of examples to use must be a positive integer (or None for all), "
                         f"not {limit!r}")


def _run_pass(models, taps, batches, limit, accelerator, desc, release=True) -> int:
    device = next(models[0].parameters()).device
    count = _batch_count(batches, limit, accelerator)
    local = local_batches(batches, limit, accelerator)
    source = progress(local, accelerator, desc=desc, unit="batch", total=count)
    parts = _split_parts(models, taps, device, count)
    failure = None
    try:
        if parts > 1:
            examples = _run_split(models, taps, source, device, accelerator, parts)
        else:
            examples = _run_batches(models, taps, source, device, accelerator)
    except BaseException as error:
        # The error's traceback holds the bar's iterator, so the bar would stay on screen
        # and the error line printed next would run into it.
        getattr(source, "close", lambda: None)()
        local.close()  # and the stream under it: its readers stop before the process ends
        if not isinstance(error, ValueError):
            raise
        failure = error  # bad data this process met: every process raises it (raise_together)
    raise_together(failure, accelerator)
    total = require_data_everywhere(examples, accelerator, desc)
    _FORWARDS[0] += total * sum(getattr(model, "forwards_per_example", 1) for model in models)
    _reduce(taps, accelerator)
    for tap in taps:
        tap.finish()
    if release:
        release_freed_memory()
    return total


def _run_batches(models, taps, batches: Iterable, device, accelerator) -> int:
    """Every model on each batch, with the taps attached; the examples read."""
    observing = [tap for tap in taps if tap.wants_outputs]
    handles = [handle for tap in taps for handle in tap.attach(models)]
    hooked = [tap.hooked() for tap in taps]
    stop = None if observing or None in hooked else _EarlyStop(models, [h for tap in hooked for h in tap])
    handles += stop.handles if stop else []
    examples = 0
    try:
        with channels_last_convolutions(models) as in_layout:
            for batch in batches:
                inputs, labels = in_layout(to_device(inputs_of(batch), device)), _labels_of(batch)
                labels = labels.to(device) if labels is not None else None
                with autocast(accelerator), counting_real_tokens(inputs):
                    for index, model in enumerate(models):
                        if stop:
                            stop.run(index, lambda: run_model(model, inputs))
                            continue
                        logits = model_outputs(model, inputs)
                        for tap in observing:
                            tap.observe(index, logits, labels)
                examples += rows(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return examples


def _split_parts(models, taps, device, batch_count: int | None) -> int:
    """Threads to split a pass over: :data:`SPLIT_PARTS` for a CPU pass with as many
    intra-op threads or more that records no gradients, has at least two batches per
    thread (or a count not known before reading: a calibration stream under a cap it need
    not fill), small models and taps that all copy; else 1."""
    parts = SPLIT_PARTS
    if (torch.get_num_threads() < parts or device.type != "cpu" or torch.is_grad_enabled()
            or (batch_count is not None and batch_count < 2 * parts)):
        return 1
    size = sum(t.numel() * t.element_size() for model in models for t in (*model.parameters(), *model.buffers()))
    if size * (parts - 1) > SPLIT_MODEL_BYTES or any(type(tap).replica is Tap.replica for tap in taps):
        return 1
    return parts


def _run_split(models, taps, batches: Iterable, device, accelerator, parts: int) -> int:
    """:func:`_run_batches` over ``parts`` threads sharing the intra-op threads: thread i runs
    its own copies of the models and taps on batches i, i + parts, ...; the copies' sums are
    then added to the taps', in thread order (the same on every run)."""
    crews = [(models, taps)] + [([copy.deepcopy(model) for model in models], [tap.replica() for tap in taps])
                                for _ in range(parts - 1)]
    dealer = _Dealer(batches, parts)
    examples, errors = [0] * parts, []

    def work(part: int) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread: a new one starts with it on
                examples[part] = _run_batches(*crews[part], dealer.deal(part), device, accelerator)
        except BaseException as error:  # re-raised below, in the caller's thread
            errors.append(error)
            dealer.stop()

    threads = torch.get_num_threads()
    torch.set_num_threads(threads // parts)
    try:
        helpers = [threading.Thread(target=work, args=(part,), name=f"hfrepair-pass-{part}", daemon=True)
                   for part in range(1, parts)]
        for helper in helpers:
            helper.start()
        work(0)
        for helper in helpers:
            helper.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]
    measured = [crew_taps for (_, crew_taps), seen in zip(crews, examples) if seen]
    if not measured:  # no batch at all: the caller says so
        return 0
    for index, tap in enumerate(taps):
        give_sums([tap], [sum(parts_sums) for parts_sums in zip(*(crew[index].sums() for crew in measured))])
    return sum(examples)


class _Dealer:
    """Deals one iterable's batches to ``parts`` threads in turn (thread i takes batches i,
    i + parts, ...), one at a time: a stream is read in its own order, and each thread's share,
    so each sum, is the same on every run."""

    def __init__(self, batches: Iterable, parts: int) -> None:
        self._batches, self._parts = iter(batches), parts
        self._taken, self._over = 0, False
        self._turn = threading.Condition()

    def deal(self, part: int) -> Iterator:
        while True:
            with self._turn:
                self._turn.wait_for(lambda: self._over or self._taken % self._parts == part)
                if self._over:
                    return
                try:
                    batch = next(self._batches)
                except StopIteration:
                    self._over = True
                    return
                except BaseException:  # an error in reading them: every share ends
                    self._over = True
                    raise
                finally:
                    self._taken += 1
                    self._turn.notify_all()
            yield batch

    def stop(self) -> None:
        """Ends every thread's share (one of them failed)."""
        with self._turn:
            self._over = True
            self._turn.notify_all()
