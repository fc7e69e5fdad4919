"""Text data: packing counts every real token exactly once, the streams deal batches out to
processes like the image streams, columns and lengths are checked with one-line errors,
and a causal LM's evaluation is transformers' own next-token loss."""

from __future__ import annotations

import copy
from functools import lru_cache

import datasets
import pytest
import torch

from hfrepair.corpora import train_tokenizer
from hfrepair.data import DataError
from hfrepair.evaluate import evaluate
from hfrepair.text import (
    DEFAULT_MAX_LENGTH,
    block_length,
    check_same_tokenizer,
    detect_text_column,
    pack,
    packed_batches,
    padded_lm_batches,
)

from .conftest import tiny_gpt2

LENGTH = 32


@lru_cache(maxsize=None)
def tokenizer_for(folder: str, vocab_size: int = 512):
    return train_tokenizer(datasets.load_dataset(folder, split="train")["text"], vocab_size)


def test_pack_keeps_every_token_once_in_order():
    texts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    blocks = list(pack(texts, eos_id=0, length=4))
    assert [len(b) for b in blocks] == [4, 4, 4, 3]
    assert sum(blocks, []) == [1, 2, 3, 0, 4, 0, 5, 6, 7, 8, 9, 0, 10, 11, 0]
    # A rest of only the last EOS has nothing to predict and is dropped.
    assert list(pack([[1, 2, 3]], eos_id=0, length=4)) == [[1, 2, 3, 0]]
    assert list(pack([[1, 2, 3, 4]], eos_id=0, length=4)) == [[1, 2, 3, 4]]


def test_packed_stream_holds_each_text_token_once(text_folder):
    tokenizer = tokenizer_for(str(text_folder))
    texts = datasets.load_dataset(str(text_folder), split="test")["text"]
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts if t)
    stream = packed_batches(str(text_folder), "test", tokenizer, LENGTH, batch_size=16)
    batches = list(stream)
    assert all(torch.equal(ids, labels) for ids, labels in batches)  # labels are the ids (shifted in evaluation)
    tokens = [ids.reshape(-1) for ids, _ in batches]
    total = sum(len(t) for t in tokens)
    assert total in (expected, expected - 1)  # a lone final EOS is dropped
    eos = tokenizer.eos_token_id
    assert sum(int((t == eos).sum()) for t in tokens) in (len(texts), len(texts) - 1)
    # Full blocks in full batches, then the shorter rest as a batch of its own: no padding.
    assert all(ids.shape == (16, LENGTH) for ids, _ in batches[:-2])
    assert batches[-1][0].shape[0] == 1 and batches[-1][0].shape[1] <= LENGTH


def test_packed_stream_parts_are_the_single_process_batches(text_folder):
    tokenizer = tokenizer_for(str(text_folder))
    stream = packed_batches(str(text_folder), "test", tokenizer, LENGTH, batch_size=8, limit=50, seed=3)
    whole = [ids for ids, _ in stream]
    parts = [[ids for ids, _ in stream.shard(index, 2)] for index in (0, 1)]
    assert sum(len(ids) for ids in whole) == 50
    assert len(parts[0]) + len(parts[1]) == len(whole)
    for number, ids in enumerate(whole):
        assert torch.equal(parts[number % 2][number // 2], ids)
    assert len(stream) == len(whole)
    # The same seed packs the same blocks; another seed shuffles the texts differently.
    assert torch.equal(next(iter(stream))[0], whole[0])
    other = packed_batches(str(text_folder), "test", tokenizer, LENGTH, batch_size=8, limit=50, seed=4)
    assert not torch.equal(next(iter(other))[0], whole[0])


def test_a_limit_beyond_the_split_is_an_error_when_strict(text_folder):
    tokenizer = tokenizer_for(str(text_folder))
    relaxed = packed_batches(str(text_folder), "test", tokenizer, LENGTH, batch_size=64, limit=100_000)
    blocks = sum(len(ids) for ids, _ in relaxed)
    strict = packed_batches(str(text_folder), "test", tokenizer, LENGTH, batch_size=64, limit=100_000,
                            strict_limit=True)
    with pytest.raises(DataError, match=f"more blocks of {LENGTH} tokens than .* packs into \\({blocks}\\)"):
        list(strict)


def write_split(folder, rows: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "train.parquet"))
    return str(folder)


def test_texts_empty_after_tokenization_are_an_error(text_folder, tmp_path):
    tokenizer = tokenizer_for(str(text_folder))
    empty = write_split(tmp_path / "empty", {"text": ["", "", None]})
    with pytest.raises(DataError, match="all empty after tokenization"):
        list(packed_batches(empty, "train", tokenizer, LENGTH))


def test_padded_batches_of_empty_texts_are_skipped_and_an_empty_split_refused(text_folder, tmp_path):
    """Padded batches whose texts are all empty have no token to run or score (a forward on a
    zero-width batch fails inside the model); a split of empty texts is a data error."""
    tokenizer = tokenizer_for(str(text_folder))
    mixed = write_split(tmp_path / "mixed", {"text": ["", None, "the merged model", "", "a", "b"]})
    batches = list(padded_lm_batches(mixed, "train", tokenizer, LENGTH, batch_size=2))
    assert len(batches) == 2 and all(inputs["input_ids"].shape[1] > 0 for inputs, _ in batches)
    empty = write_split(tmp_path / "empty", {"text": ["", "", None, ""]})
    with pytest.raises(DataError, match="are all empty"):
        list(padded_lm_batches(empty, "train", tokenizer, LENGTH, batch_size=2))


def test_a_tokenizer_file_the_tokenizers_library_rejects_is_a_data_error(text_folder, tmp_path):
    """tokenizers raises a bare Exception for a vocabulary its merges do not fit."""
    import json

    from hfrepair.text import load_tokenizer

    tokenizer_for(str(text_folder)).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    merged = saved["model"]["merges"][0]
    token = "".join(merged) if isinstance(merged, list) else merged.replace(" ", "")
    saved["model"]["vocab"][token + "_renamed"] = saved["model"]["vocab"].pop(token)
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    with pytest.raises(DataError, match="no usable tokenizer"):
        load_tokenizer(tmp_path)


def test_text_columns_are_detected_or_refused(tmp_path):
    features = datasets.Features({"title": datasets.Value("string"), "text": datasets.Value("string"),
                                  "label": datasets.Value("int64")})
    assert detect_text_column(features) == "text"
    assert detect_text_column(datasets.Features({"body": datasets.Value("string")})) == "body"
    with pytest.raises(DataError, match="several text columns \\(a, b\\); pass --text-column"):
        detect_text_column(datasets.Features({"a": datasets.Value("string"), "b": datasets.Value("string")}))
    with pytest.raises(DataError, match="no text column for a text model \\(columns: image, label\\)"):
        detect_text_column(datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])}))
    with pytest.raises(DataError, match="column 'label' holds Value\\(int64\\), not text"):
        detect_text_column(features, "label")
    with pytest.raises(DataError, match="no text column 'body'"):
        detect_text_column(features, "body")


def test_block_length_defaults_to_the_model_and_refuses_more():
    assert block_length({"n_positions": 64}, None) == 64
    assert block_length({"max_position_embeddings": 131072}, None) == DEFAULT_MAX_LENGTH
    assert block_length({"n_positions": 64}, 16) == 16
    with pytest.raises(DataError, match="--max-length 128 exceeds the model's 64 positions"):
        block_length({"n_positions": 64}, 128)


def test_different_tokenizers_are_refused(text_folder):
    tokenizer = tokenizer_for(str(text_folder))
    check_same_tokenizer(tokenizer, tokenizer_for(str(text_folder)))
    with pytest.raises(DataError, match="different tokenizers \\(512 vs 400 tokens\\)"):
        check_same_tokenizer(tokenizer, tokenizer_for(str(text_folder), 400))


def test_language_model_evaluation_is_transformers_next_token_loss(text_folder):
    tokenizer = tokenizer_for(str(text_folder))
    torch.manual_seed(0)
    model = tiny_gpt2(tokenizer).eval()
    batches = list(packed_batches(str(text_folder), "test", tokenizer, LENGTH, batch_size=8, limit=16))
    metrics = evaluate(model, batches)
    with torch.no_grad():
        # transformers averages over every shifted position: equal-length blocks weigh alike.
        expected = sum(model(ids, labels=ids).loss.item() for ids, _ in batches) / len(batches)
    assert metrics.loss == pytest.approx(expected, rel=1e-5)
    assert metrics.examples == 16 and metrics.predictions == 16 * (LENGTH - 1)


def test_padded_language_model_batches_score_every_real_token_and_no_padding(text_folder):
    tokenizer = tokenizer_for(str(text_folder))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # set to right on a copy: the endpoints' tokenizer is saved as it is
    torch.manual_seed(0)
    model = tiny_gpt2(tokenizer).eval()
    batches = list(padded_lm_batches(str(text_folder), "test", tokenizer, LENGTH, batch_size=8, limit=16))
    assert tokenizer.padding_side == "left"
    tokenizer.padding_side = side
    inputs, labels = batches[0]
    mask = inputs["attention_mask"]
    assert (mask[:, 0] == 1).all() and not mask.all()  # padded on the right, some rows shorter
    assert torch.equal(labels == -100, mask == 0)
    metrics = evaluate(model, batches)
    # The same texts one at a time, without any padding: transformers' own next-token loss.
    loss_sum, predictions = 0.0, 0
    with torch.no_grad():
        for inputs, _ in batches:
            for ids, real in zip(inputs["input_ids"], inputs["attention_mask"]):
                ids = ids[real.bool()][None]
                if ids.shape[1] > 1:
                    loss_sum += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                    predictions += ids.shape[1] - 1
    assert metrics.examples == 16 and metrics.predictions == predictions
    assert metrics.loss == pytest.approx(loss_sum / predictions, rel=1e-5)
    without_pad = copy.deepcopy(tokenizer)
    without_pad.pad_token = None
    inputs, _ = next(iter(padded_lm_batches(str(text_folder), "test", without_pad, LENGTH, batch_size=8, limit=8)))
    assert without_pad.pad_token_id is None  # the EOS token pads, on the stream's own copy
    assert (inputs["input_ids"][inputs["attention_mask"] == 0] == tokenizer.eos_token_id).all()


@lru_cache(maxsize=None)
def classifier_tokenizer():
    from hfrepair.corpora import package_docstrings

    return train_tokenizer(package_docstrings()[0], 600, classifier=True)


def tiny_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=5, pad_token_id=0)).eval()


def padded(texts: list[str], length: int | None) -> dict:
    """The texts cut at 24 tokens, padded to the longest (None) or to ``length``."""
    tokenizer = classifier_tokenizer()
    encoded = tokenizer(texts, truncation=True, max_length=24)
    return dict(tokenizer.pad(encoded, padding="max_length" if length else True, max_length=length,
                              return_tensors="pt"))


def test_padding_changes_no_statistic_and_no_correction():
    from hfrepair.batches import counting_real_tokens
    from hfrepair.corpora import package_docstrings
    from hfrepair.discovery import discover_spec
    from hfrepair.repair import ChannelBatchNorm
    from hfrepair.statistics import collect_statistics

    texts = package_docstrings()[0][:12:2] + ["short", "a few words"]
    tight, loose = padded(texts, None), padded(texts, 40)
    assert loose["input_ids"].shape[1] == 40 > tight["input_ids"].shape[1]
    real = int(tight["attention_mask"].sum())
    assert real < tight["attention_mask"].numel()  # some padding even in the tight batch
    model_a, model_b = tiny_bert(0), tiny_bert(1)
    sites = discover_spec(model_a, tight).sites
    stats = [collect_statistics(model_a, model_b, sites, [(batch, torch.zeros(len(texts)))]) for batch in (tight, loose)]
    token_sites = [s.module for s in sites if "pooler" not in s.module and "classifier" not in s.module]
    assert token_sites
    for name in token_sites:
        first, second = stats[0].pairs[name], stats[1].pairs[name]
        assert first.a.n == second.a.n == real * (first.a.n // real)  # real tokens only, whatever the padding
        torch.testing.assert_close(first.a.total, second.a.total, rtol=1e-6, atol=1e-6)
        # The padded forward rounds differently; counted padding would move these by far more.
        torch.testing.assert_close(first.cross, second.cross, rtol=1e-5, atol=1e-5)
    # REPAIR's corrector counts the same real positions of a (batch, sequence, units) activation:
    # one activation, cut to the tight batch's length or kept whole with garbage at its padding.
    activation = torch.randn(*loose["input_ids"].shape, 4, generator=torch.Generator().manual_seed(0))
    activation[~loose["attention_mask"].bool()] = 1e3
    sums = []
    for batch in (tight, loose):
        corrector = ChannelBatchNorm(4, axis=-1).train()
        with torch.no_grad(), counting_real_tokens(batch):
            corrector(activation[:, : batch["input_ids"].shape[1]])
        sums.append(corrector.sums.clone())
    assert sums[0][0, 0] == real
    torch.testing.assert_close(sums[0], sums[1])


def test_a_shard_that_breaks_the_stream_partway_is_a_one_line_error(text_folder, tmp_path):
    """Packed and padded text streams read their rows as image streams do: a second shard
    that is not parquet is a data error once the stream reaches it."""
    import pyarrow.parquet as pq

    folder = tmp_path / "texts"
    folder.mkdir()
    pq.write_table(pq.read_table(text_folder / "train.parquet").slice(0, 200), folder / "train-00000-of-00002.parquet")
    (folder / "train-00001-of-00002.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 20 + b"PAR1")
    tokenizer = tokenizer_for(str(text_folder))
    for stream in (packed_batches(str(folder), "train", tokenizer, LENGTH, batch_size=8),
                   padded_lm_batches(str(folder), "train", tokenizer, LENGTH, batch_size=8)):
        with pytest.raises(DataError, match="its files cannot be read past row"):
            list(stream)
