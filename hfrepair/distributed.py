"""The passes on every process of an ``accelerate`` launch: who reads what, and one sum.

Every pass (statistics, REPAIR, evaluation) reads the batches in the one global order a
single process would read, capped at the same number of examples, and deals them out
round-robin, whole batches at a time: process ``i`` of ``n`` keeps batches ``i, i + n, ...``.
No example is read twice or skipped, and each batch is processed exactly as it would be
by one process, so the float64 sums differ from a single-process run only in the order of
their additions. Sums are reduced once, at the end of a pass, as one flat float64 tensor.

Without an ``Accelerator``, or with one process, all of this is the single-process path.
(accelerate's own ``prepare(DataLoader)`` is not used for the split: with ``even_batches``
it repeats examples to even out the processes, and without it the global cap of
``--num-samples`` could not be applied before splitting.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .batches import first_rows, inputs_of, rows


class ProcessDataError(ValueError):
    """Some process got no calibration batch: its statistics would be undefined."""


def make_accelerator(mixed_precision: str | None = None) -> Accelerator:
    """The Accelerator of this launch (``accelerate launch``, ``torchrun`` or a plain run).

    Without a GPU, ``cpu=True`` makes the processes of a launch one gloo group: otherwise
    accelerate treats each of them as an independent single process.
    """
    has_device = (torch.cuda.is_available() or torch.backends.mps.is_available()
                  or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    # accelerate's CPU autocast knows bf16 only: fp16 would run in float32 and be recorded as fp16.
    refused = PrecisionError("fp16 mixed precision needs a GPU (on a CPU the passes would run in float32); "
                             "use --mixed-precision bf16 or no")
    if mixed_precision == "fp16" and not has_device:  # before accelerate's state is set for the process
        raise refused
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not has_device)
    if accelerator.mixed_precision == "fp16" and not has_device:  # asked by `accelerate launch`
        raise refused
    return accelerator


class PrecisionError(ValueError):
    """A mixed precision this machine cannot run."""


def part_of(accelerator: Accelerator | None) -> tuple[int, int]:
    """(this process's index, number of processes)."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def is_main_process(accelerator: Accelerator | None = None) -> bool:
    """True on the process that prints and writes. Without an accelerator, the launcher's
    RANK decides (torchrun and accelerate launch set it), so errors raised before any
    Accelerator exists are still printed once."""
    if accelerator is not None:
        return accelerator.is_main_process
    return int(os.environ.get("RANK", "0")) == 0


def progress(iterable: Iterable, accelerator: Accelerator | None, **options) -> Iterable:
    """A tqdm bar on the main process only (TQDM_DISABLE still silences it)."""
    if not is_main_process(accelerator):
        return iterable
    return tqdm(iterable, leave=False, **options)


def autocast(accelerator: Accelerator | None):
    """The forward passes' autocast (the accelerator's mixed precision); sums stay float64."""
    return accelerator.autocast() if accelerator is not None else nullcontext()


def numbered_batches(batches: Iterable, accelerator: Accelerator | None) -> Iterator[tuple[int, object]]:
    """This process's batches of ``batches``, each with its first example's position in the
    global order (so that a prefix of the data can be cut the same on every process).

    A stream that can deal itself out (``shard``, ``numbered``) skips preprocessing the
    others' batches; any other iterable is read whole and dealt out here.
    """
    index, count = part_of(accelerator)
    if hasattr(batches, "numbered"):
        yield from batches.shard(index, count).numbered()
        return
    start = 0
    for number, batch in enumerate(batches):
        if number % count == index:
            yield start, batch
        start += rows(inputs_of(batch))


def cut_batch(batch, keep: int):
    """The first ``keep`` examples of a batch (a tensor, a mapping, or an (inputs, labels) pair)."""
    if isinstance(batch, (tuple, list)):
        return tuple(first_rows(t, keep) for t in batch)
    return first_rows(batch, keep)


def within(numbered: Iterable[tuple[int, object]], limit: int | None) -> Iterator:
    """The batches of ``(start, batch)`` pairs up to ``limit`` examples in the global order,
    the one that crosses it cut there."""
    for start, batch in numbered:
        if limit is not None and start >= limit:
            return
        size = rows(inputs_of(batch))
        yield batch if limit is None or start + size <= limit else cut_batch(batch, limit - start)
        if limit is not None and start + size >= limit:
            return  # without reading (and preprocessing) the next batch


def local_batches(batches: Iterable, limit: int | None, accelerator: Accelerator | None) -> Iterator:
    """This process's batches of ``batches`` capped at ``limit`` examples over all processes.

    Batches are tensors or ``(inputs, labels)`` tuples; the last one kept is cut at the cap.
    Prepared batches (:class:`~hfrepair.prepared.PreparedBatches`) are this process's part
    already; a stream that can deal itself out applies the cap before preprocessing.
    """
    if getattr(batches, "is_local", False):
        yield from batches.up_to(limit)
        return
    if hasattr(batches, "shard"):
        index, count = part_of(accelerator)
        yield from batches.shard(index, count, limit)
        return
    yield from within(numbered_batches(batches, accelerator), limit)


def sum_across(tensors: list[torch.Tensor], accelerator: Accelerator | None) -> list[torch.Tensor]:
    """Element-wise float64 sums of ``tensors`` over all processes, in one all-reduce."""
    tensors = [t.to(torch.float64) for t in tensors]
    if accelerator is None or accelerator.num_processes == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(accelerator.device)
    flat = accelerator.reduce(flat, reduction="sum")
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape).to(t.device))
        start += t.numel()
    return out


def raise_together(error: ValueError | None, accelerator: Accelerator | None) -> None:
    """Raise on every process when one met bad input in a step they all take (a pass): the
    others raise a :class:`ProcessDataError` with its message, so that none waits in a
    reduction the failing one left, and the main process says it (once)."""
    if accelerator is None or accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    messages = gather_object([None if error is None else str(error)])
    if error is not None:
        raise error
    failed = [message for message in messages if message is not None]
    if failed:
        raise ProcessDataError(failed[0])


def require_data_everywhere(local_examples: int, accelerator: Accelerator | None, what: str) -> int:
    """Total examples of a pass; every process must have had some (checked by all together,
    so that no process is left waiting in a reduction the others skipped)."""
    counts = torch.tensor([float(local_examples), float(local_examples == 0)])
    total, empty = (int(v) for v in sum_across([counts], accelerator)[0].tolist())
    if empty:
        _, count = part_of(accelerator)
        if count == 1:
            raise ProcessDataError(f"{what}: the data holds no batch")
        raise ProcessDataError(f"{what}: {empty} of {count} processes got no batch; use fewer processes, "
                               "smaller batches or more examples")
    return total
