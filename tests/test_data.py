"""Streamed batches: seeded shuffling, caps, and splits shorter than asked for."""

import datasets
import pytest
import torch

from hfrepair.data import DataError, ImageStream, image_batches


def labels_of(stream) -> list[int]:
    return torch.cat([labels for _, labels in stream]).tolist()


def test_seeded_shuffle_is_repeatable_and_capped(mnist_folder):
    def stream(seed, limit=600):
        return image_batches(str(mnist_folder), "train", lambda images: torch.zeros(len(images)), limit=limit,
                             batch_size=128, seed=seed)

    in_order = labels_of(stream(None))
    assert len(in_order) == 600
    assert labels_of(stream(0)) == labels_of(stream(0))  # every pass reads the same examples
    assert labels_of(stream(0)) != in_order and labels_of(stream(1)) != labels_of(stream(0))
    assert len(stream(0)) == 5  # batches, known from the cap


def test_a_stream_shorter_than_the_cap_says_how_long_it_was():
    rows = datasets.IterableDataset.from_generator(lambda: ({"image": [[i]], "label": i % 3} for i in range(10)))
    assert rows.info.splits is None  # no stated size: the error comes when the stream runs out
    stream = ImageStream(rows, torch.tensor, "image", "label", "the generator", batch_size=4, limit=12,
                         strict_limit=True)
    with pytest.raises(DataError, match=r"--num-samples 12 asks for more examples than the generator has \(10\)"):
        list(stream)
    relaxed = ImageStream(rows, torch.tensor, "image", "label", "the generator", batch_size=4, limit=12)
    assert labels_of(relaxed) == [i % 3 for i in range(10)]
