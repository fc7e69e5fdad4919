"""Measure a merge: loss and accuracy over an alpha grid, barriers, variance collapse.

In: a model and labelled batches (:class:`Scores` is the pass engine's tap for them). Out:
plain dicts/lists of numbers. Barriers follow the paper's Eq. 1: the maximum over alpha of the
gap between the interpolated network and the straight line between the endpoints (loss
above it, accuracy below it); the midpoint gap is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from .passes import Tap, run_pass


class EvaluationError(ValueError):
    """Labels that do not fit the model's outputs, or no data."""


IGNORED_LABEL = -100  # transformers' label for positions that are not scored (padding)


@dataclass
class Metrics:
    """Mean loss and accuracy per prediction: per example for classifiers, per predicted
    token for language models (``predictions`` counts them; it equals ``examples`` for a
    classifier)."""

    loss: float
    accuracy: float
    examples: int
    predictions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def predictions_and_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, classes) and their targets. Labels with a sequence axis are next-token
    targets, given as the input ids themselves (transformers' convention): position t is
    scored on label t + 1. Ignored labels (-100) are dropped."""
    if labels.dim() == 2 and logits.dim() == 3:
        logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = labels != IGNORED_LABEL
    return logits[keep], labels[keep]


class Scores(Tap):
    """Tap of the summed loss and accuracy of one model's predictions in a pass;
    :attr:`metrics` after the pass. Labels outside the model's classes are counted, not
    raised during the pass: a process must not leave the others waiting in the reduction."""

    wants_outputs = True

    def __init__(self, model_index: int = 0) -> None:
        self.model_index = model_index
        self.totals = torch.zeros(5, dtype=torch.float64)  # loss, correct, scored, examples, outside
        self.classes = 0
        self.metrics: Metrics | None = None

    def observe(self, model_index, logits, labels):
        if model_index != self.model_index:
            return
        if labels is None:
            raise EvaluationError("evaluation batches need labels: (inputs, labels) pairs")
        examples = len(labels)
        logits, labels = predictions_and_targets(logits.float(), labels)
        self.classes = logits.shape[-1]
        outside = int(((labels < 0) | (labels >= self.classes)).sum())
        if outside or self.totals[4]:
            self.totals += torch.tensor([0.0, 0.0, 0.0, examples, outside], dtype=torch.float64)
            return
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        correct = (logits.argmax(-1) == labels).sum().item()
        self.totals += torch.tensor([loss, correct, len(labels), examples, 0.0], dtype=torch.float64)

    def sums(self):
        return [self.totals]

    def set_sums(self, sums):
        self.totals = sums[0].cpu()

    def finish(self):
        loss, correct, scored, examples, outside = self.totals.tolist()
        if outside:
            raise EvaluationError(f"{int(outside)} labels lie outside the model's {self.classes} classes "
                                  f"(0-{self.classes - 1})")
        if scored == 0:
            raise EvaluationError("evaluation data is empty")
        self.metrics = Metrics(loss / scored, correct / scored, int(examples), int(scored))


def evaluate(model: nn.Module, batches: Iterable, max_examples: int | None = None,
             accelerator: Accelerator | None = None) -> Metrics:
    """Mean cross-entropy and accuracy of ``model`` over ``(inputs, labels)`` batches, per
    prediction (with an ``accelerator``: over the batches of all processes)."""
    scores = Scores()
    run_pass([model], [scores], batches, limit=max_examples, accelerator=accelerator, desc="evaluating")
    return scores.metrics


def barrier(alphas: list[float], values: list[float], higher_is_better: bool = False) -> dict[str, float]:
    """Eq. 1 barrier (max over alpha) and the midpoint gap, against the endpoints' line.

    For accuracy (``higher_is_better``) the gap is line minus value: a positive barrier is
    always a loss of quality.
    """
    if len(alphas) != len(values) or len(values) < 2:
        raise ValueError(f"a barrier needs one value per alpha, at least 2: got {len(alphas)} alphas and "
                         f"{len(values)} values")
    first, last = values[0], values[-1]
    sign = -1.0 if higher_is_better else 1.0
    gaps = [sign * (v - ((1 - a) * first + a * last)) for a, v in zip(alphas, values)]
    mid = min(range(len(alphas)), key=lambda i: abs(alphas[i] - 0.5))
    return {"max": max(gaps), "midpoint": gaps[mid], "midpoint_alpha": alphas[mid]}


def barriers_of(alphas: list[float], points: list[dict]) -> dict[str, dict]:
    return {
        "loss": barrier(alphas, [p["loss"] for p in points]),
        "accuracy": barrier(alphas, [p["accuracy"] for p in points], higher_is_better=True),
    }


def variance_ratios(moments_merged: dict, moments_a: dict, moments_b: dict) -> dict[str, float]:
    """Per-site ratio v_alpha / ((v_A + v_B) / 2) of summed unit variances (paper Fig. 2)."""
    return {
        name: (moments_merged[name].var.sum() / ((moments_a[name].var.sum() + moments_b[name].var.sum()) / 2)).item()
        for name in moments_merged
    }
