"""Train small endpoints (demo, tests, examples): classifiers and causal language models,
SGD or AdamW with a one-cycle schedule.

hfrepair merges networks; it does not train them. This exists so that the built-in demo
and the tests can make two independently trained endpoints offline in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .evaluate import predictions_and_targets
from .batches import model_outputs, rows, select_rows


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    translate: int = 0,
    seed: int = 0,
    optimizer: str = "sgd",
    desc: str | None = None,
) -> nn.Module:
    """Train ``model`` in place on preprocessed ``images`` and return it in eval mode.

    Labels with a sequence axis make it a causal LM's training: ``images`` are then blocks
    of token ids, ``labels`` the same ids, and every position predicts the next token.
    ``images`` may also be a mapping of tensors (a padded text classifier's tokenizer output).

    ``translate`` shifts each training image by up to that many pixels (the paper's MNIST
    augmentation). The seed fixes batch order and shifts; seed the model's construction
    separately for different endpoints. ``optimizer="adamw"`` suits transformers, which
    SGD trains poorly. With ``desc``, a progress bar shows each epoch's training loss and
    accuracy.
    """
    generator = torch.Generator().manual_seed(seed)
    if optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay,
                                    nesterov=True)
    examples = rows(images)
    steps = epochs * ((examples + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.25)
    model.train()
    epochs_bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=desc is None)
    for _ in epochs_bar:
        order = torch.randperm(examples, generator=generator)
        loss_sum, correct, scored = 0.0, 0, 0
        for start in range(0, examples, batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                continue
            batch = select_rows(images, index)
            if translate:
                batch = _translate(batch, translate, generator)
            logits, targets = predictions_and_targets(model_outputs(model, batch), labels[index])
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(targets)
            correct += int((logits.argmax(-1) == targets).sum())
            scored += len(targets)
        epochs_bar.set_postfix(loss=f"{loss_sum / scored:.3f}", accuracy=f"{correct / scored:.3f}")
    return model.eval()


def _translate(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-pixels, pixels], per axis."""
    n, _, height, width = images.shape
    shifts = torch.randint(-pixels, pixels + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2 * shifts[:, 0] / width
    theta[:, 1, 2] = 2 * shifts[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)
