"""Data read once: each example is streamed, decoded and preprocessed once per merge.

A merge runs many passes over the same examples (statistics, REPAIR at every alpha of a
curve, evaluation of every point). :class:`PreparedBatches` wraps this process's part of
a batch source: the first pass reads the source and keeps each prepared batch, in memory
up to a bound and in a temporary file beyond it; later passes replay the kept tensors.
A pass that stops early (a capped pass, the example batch) leaves the source where it
was, and the next pass continues from there. Streaming, seeding, caps and the
multi-process split are the source's: the cache only remembers what it yielded.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate import Accelerator

from .batches import inputs_of, rows
from .distributed import numbered_batches, part_of, within

class SpillError(ValueError):
    """Prepared batches beyond the memory bound could not be written to the temporary folder."""


DEFAULT_MEMORY = 2 * 10**9  # bytes of prepared batches held in memory per source (2GB); the rest spill to disk


def batch_bytes(batch) -> int:
    """Bytes of the tensors in a batch (a tensor, a mapping, or a tuple of them)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(batch_bytes(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(batch_bytes(v) for v in batch)
    return 0


def expected_examples(source: Iterable) -> int | None:
    """Examples a source will yield over all processes, when that is known before reading it:
    a stream's ``size`` (a cap its split must fill), the sum over a list of batches; None
    otherwise."""
    if hasattr(source, "size"):
        return source.size
    if isinstance(source, (list, tuple)):
        return sum(rows(inputs_of(b)) for b in source)
    return None


class PreparedBatches:
    """This process's batches of ``source``, read once and replayed by every later pass.

    ``memory_bytes`` bounds what is held in memory; later batches go to a temporary
    folder, removed by :meth:`close` (or when the object is collected). ``up_to(limit)``
    replays the batches of the first ``limit`` examples of the global order, so a prefix
    (the train-loss examples of the calibration set) costs no second read.
    """

    is_local = True  # local_batches: already this process's part

    def __init__(self, source: Iterable, accelerator: Accelerator | None = None,
                 memory_bytes: int = DEFAULT_MEMORY) -> None:
        self.expected = expected_examples(source)
        self._reader = numbered_batches(source, accelerator)
        self._held: list[tuple[int, int, object]] = []  # (start, rows, batch or spilled file)
        self._complete = False
        self._memory_left = memory_bytes
        self._folder: Path | None = None
        self._cleanup = None
        index, count = part_of(accelerator)
        try:
            if hasattr(source, "shard"):
                # A cap the split need not fill is only an upper bound (the demo's 5,000 over a
                # split of 4,000 showed 79 batches to come of 63): unknown until read.
                self._batches = len(source.shard(index, count)) if getattr(source, "size", None) is not None else None
            else:
                self._batches = len(range(index, len(source), count))
        except TypeError:  # an uncapped stream, a generator
            self._batches = None

    def _keep(self, start: int, batch) -> None:
        size, count = batch_bytes(batch), rows(inputs_of(batch))
        if size <= self._memory_left:
            self._memory_left -= size
            self._held.append((start, count, batch))
            return
        try:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="hfrepair-batches-"))
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
            path = self._folder / f"{len(self._held)}.pt"
            torch.save(batch, path)
        except (OSError, RuntimeError) as error:  # a full disk: torch's writer raises RuntimeError
            where = self._folder or tempfile.gettempdir()
            raise SpillError(f"cannot keep prepared batches in {where} (beyond --cache-memory they go to the "
                             f"temporary folder; free space there, set TMPDIR or raise --cache-memory): "
                             f"{(str(error).splitlines() or [''])[0]}") from error
        self._held.append((start, count, path))

    def _numbered(self) -> Iterator[tuple[int, object]]:
        position = 0
        while True:
            if position < len(self._held):
                start, _rows, batch = self._held[position]
                if isinstance(batch, Path):
                    batch = torch.load(batch, weights_only=True)
                position += 1
                yield start, batch
                continue
            if self._complete:
                return
            try:
                start, batch = next(self._reader)
            except StopIteration:
                self._complete = True
                return
            self._keep(start, batch)

    def up_to(self, limit: int | None) -> Iterator:
        """The batches of the first ``limit`` examples (all with None), the last one cut."""
        return within(self._numbered(), limit)

    def __iter__(self) -> Iterator:
        return self.up_to(None)

    def batch_count(self, limit: int | None = None) -> int | None:
        """Batches :meth:`up_to` yields (None when not known yet)."""
        if self._complete:
            return sum(1 for start, _rows, _batch in self._held if limit is None or start < limit)
        return self._batches if limit is None else None

    def __len__(self) -> int:
        count = self.batch_count()
        if count is None:
            raise TypeError("the number of batches is not known before the source has been read")
        return count

    @property
    def examples(self) -> int | None:
        """Examples this process has read, once the whole source has been read."""
        return sum(r for _start, r, _batch in self._held) if self._complete else None

    @property
    def spilled(self) -> int:
        """Batches kept in the temporary folder rather than in memory."""
        return sum(1 for *_, batch in self._held if isinstance(batch, Path))

    def prefix(self, examples: int) -> PreparedPrefix:
        """The first ``examples`` examples of the global order, replayed from this cache."""
        return PreparedPrefix(self, examples)

    def close(self) -> None:
        """Forget the batches and remove the temporary folder."""
        self._held.clear()
        if self._cleanup is not None:
            self._cleanup()


class PreparedPrefix:
    """A prefix of :class:`PreparedBatches` (the calibration set's first examples, for the
    train-loss curve): no batch of its own is read or kept."""

    is_local = True

    def __init__(self, whole: PreparedBatches, examples: int) -> None:
        self.whole, self.limit = whole, examples
        self.expected = None if whole.expected is None else min(examples, whole.expected)

    def _cap(self, limit: int | None) -> int:
        return self.limit if limit is None else min(limit, self.limit)

    def up_to(self, limit: int | None) -> Iterator:
        return self.whole.up_to(self._cap(limit))

    def __iter__(self) -> Iterator:
        return self.up_to(None)

    def batch_count(self, limit: int | None = None) -> int | None:
        return self.whole.batch_count(self._cap(limit))


def preparer(cleanup: ExitStack, accelerator: Accelerator, memory_bytes: int = DEFAULT_MEMORY):
    """A function turning a batch source into :class:`PreparedBatches`, each closed (its
    spill folder removed) when ``cleanup`` unwinds."""
    def prepare(batches: Iterable) -> PreparedBatches:
        cache = PreparedBatches(batches, accelerator, memory_bytes)
        cleanup.callback(cache.close)
        return cache
    return prepare
