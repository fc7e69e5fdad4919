"""Streamed batches: seeded shuffling, caps, and splits shorter than asked for."""

import datasets
import pytest
import torch

from hfrepair.data import DataError, ImageStream, builtin_transform, image_batches


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


def broken_copies(source, root):
    """Copies of ``source``'s train split, readable at first and broken further on: a corrupt
    row group of one file (row groups of 100 rows, the sixth overwritten), and a second
    shard that is not parquet. The test split stays intact."""
    import pyarrow.parquet as pq

    table = pq.read_table(source / "train.parquet").slice(0, 1000)
    corrupt = root / "corrupt_row_group"
    corrupt.mkdir()
    pq.write_table(table, corrupt / "train.parquet", row_group_size=100, compression="none")
    group = pq.ParquetFile(corrupt / "train.parquet").metadata.row_group(5).column(0)
    data = bytearray((corrupt / "train.parquet").read_bytes())
    start = group.data_page_offset
    data[start:start + 2000] = bytes((7 * i) % 251 for i in range(2000))
    (corrupt / "train.parquet").write_bytes(bytes(data))
    shards = root / "bad_shard"
    shards.mkdir()
    pq.write_table(table.slice(0, 300), shards / "train-00000-of-00002.parquet")
    (shards / "train-00001-of-00002.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 20 + b"PAR1")
    return corrupt, shards


def test_files_that_break_partway_through_the_stream_are_one_line_errors(mnist_folder, tmp_path):
    """Found only when the stream reaches them (the first rows read fine): a data error
    naming the dataset, not pyarrow's exception."""
    for folder in broken_copies(mnist_folder, tmp_path):
        stream = image_batches(str(folder), "train", lambda images: torch.zeros(len(images)), limit=1000,
                               batch_size=50)
        with pytest.raises(DataError, match=r"its files cannot be read past row \d+ of the stream: Arrow|OSError"):
            labels_of(stream)


def test_a_datasets_cache_that_cannot_be_used_is_named_not_blamed_on_the_dataset(mnist_folder, tmp_path,
                                                                               monkeypatch):
    """HF_HOME (the datasets cache under it) set to a file: the error says what failed, where it
    used to say that a dataset that exists was not found, or end in a traceback."""
    from hfrepair.data import open_split

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "a_file" / "datasets")
    with pytest.raises(DataError, match=r"cannot read dataset .*: NotADirectoryError: .*a_file"):
        open_split(str(mnist_folder), "train")


def test_a_local_folder_named_like_a_datasets_loader_is_read_as_the_folder(mnist_folder, tmp_path, monkeypatch):
    """``--dataset text`` (a folder in the working directory) must not pick datasets' "text" loader."""
    import shutil

    shutil.copytree(mnist_folder, tmp_path / "text")
    monkeypatch.chdir(tmp_path)
    stream = image_batches("text", "train", lambda images: torch.zeros(len(images)), limit=100, batch_size=50)
    assert len(labels_of(stream)) == 100


def test_class_labels_in_another_order_than_the_models_are_mapped_by_name():
    """A dataset whose ClassLabel orders the model's class names otherwise: scored by index,
    every label would be another class."""
    import datasets

    from hfrepair.data import class_order

    feature = datasets.ClassLabel(names=["cat", "dog", "bird"])
    assert class_order(feature, {"bird": 0, "cat": 1, "dog": 2}) == (1, 2, 0)
    assert class_order(feature, {"cat": 0, "dog": 1, "bird": 2}) is None  # the same order
    assert class_order(feature, {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}) is None  # unnamed: by index
    assert class_order(datasets.Value("int64"), {"bird": 0}) is None


def test_image_endpoints_that_prepare_their_inputs_differently_are_refused(tmp_path):
    import json

    from hfrepair.data import DataError, check_same_preprocessing

    folders = [tmp_path / name for name in "abc"]
    for folder, mean in zip(folders, (0.5, 0.5, 0.1307)):
        folder.mkdir()
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [mean], "image_std": [0.5],
                                                                     "processor_class": folder.name}))
    check_same_preprocessing(folders[:2])
    check_same_preprocessing([folders[0], tmp_path])  # no preprocessor config: nothing to compare
    with pytest.raises(DataError, match=r"A and B prepare their images differently \(preprocessor_config.json "
                                        r"field 'image_mean' is \[0.5\] and \[0.1307\]\)"):
        check_same_preprocessing([folders[0], folders[2]])


def test_split_sizes_a_readme_states_are_not_trusted_over_the_rows(mnist_folder, tmp_path):
    """A stale README (fewer rows stated than there are, or more) neither cuts the split short
    nor refuses a cap the split fills."""
    import shutil

    names = "\n".join(f"          '{i}': '{i}'" for i in range(10))
    for stated in (100, 5000):
        folder = tmp_path / str(stated)
        folder.mkdir()
        shutil.copy(mnist_folder / "test.parquet", folder / "test.parquet")
        (folder / "README.md").write_text(
            "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n"
            f"      class_label:\n        names:\n{names}\n  splits:\n  - name: test\n    num_examples: {stated}\n"
            "configs:\n- config_name: default\n  data_files:\n  - split: test\n    path: test.parquet\n---\n")
        rows = len(labels_of(image_batches(str(folder), "test", lambda images: torch.zeros(len(images)),
                                           batch_size=256)))
        assert rows == 1000
        capped = image_batches(str(folder), "test", lambda images: torch.zeros(len(images)), limit=600,
                               batch_size=256, strict_limit=True)
        assert len(labels_of(capped)) == 600


def test_ambiguous_or_unreadable_datasets_are_refused_in_words(mnist_folder, tmp_path):
    """Two label columns (picking one would score the model on classes it may not predict),
    one column named for both images and labels, a README whose metadata is not YAML."""
    import shutil

    import pyarrow.parquet as pq

    table = pq.read_table(mnist_folder / "test.parquet").slice(0, 50)
    two = tmp_path / "two"
    two.mkdir()
    datasets.Dataset(table.append_column("parity", table.column("label"))).cast_column(
        "parity", datasets.ClassLabel(names=[str(i) for i in range(10)])).to_parquet(str(two / "test.parquet"))
    with pytest.raises(DataError, match=r"several label columns \(label, parity\); name one with --label-column"):
        image_batches(str(two), "test", torch.tensor)
    with pytest.raises(DataError, match="column 'image' cannot be both the images and the labels"):
        image_batches(str(mnist_folder), "test", torch.tensor, label_column="image")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(mnist_folder / "test.parquet", broken / "test.parquet")
    (broken / "README.md").write_text("---\nfoo: [\n---\n")
    with pytest.raises(DataError, match="its README.md metadata is not valid YAML"):
        image_batches(str(broken), "test", torch.tensor)


def test_sixteen_bit_images_are_scaled_not_clipped(mnist_folder, tmp_path):
    """A 16-bit grayscale PNG of a digit reads as the 8-bit digit it was made from (before,
    PIL's convert("L") turned every pixel above 255 of 65,535 white)."""
    import io

    import numpy as np
    from PIL import Image

    digit = datasets.load_dataset(str(mnist_folder), split="test[:1]")["image"][0]
    wide = np.asarray(digit, dtype=np.uint16) * 257
    stored = io.BytesIO()
    Image.fromarray(wide).save(stored, format="PNG")
    decoded = Image.open(io.BytesIO(stored.getvalue()))
    assert decoded.mode.startswith("I")  # what PIL decodes a 16-bit PNG to
    transform = builtin_transform({"image_size": 28, "in_channels": 1, "mean": [0.0], "std": [1.0]})
    torch.testing.assert_close(transform([decoded]), transform([digit]), rtol=0, atol=1 / 255)


def test_images_stored_as_bytes_or_file_paths_read_as_the_image_column(mnist_folder, tmp_path):
    """A column of encoded images (binary) or of image file paths (strings) is decoded like a
    datasets Image column (before: every batch was refused as "not images with class labels")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(mnist_folder / "test.parquet").slice(0, 40)
    encoded = [cell["bytes"] for cell in table.column("image").to_pylist()]
    (tmp_path / "files").mkdir()
    paths = []
    for index, data in enumerate(encoded):
        path = tmp_path / "files" / f"{index}.png"
        path.write_bytes(data)
        paths.append(str(path))
    column = table.schema.get_field_index("image")

    def read(name, cells, kind):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(table.set_column(column, "image", pa.array(cells, kind)), str(folder / "test.parquet"))
        return list(image_batches(str(folder), "test", builtin_transform({"image_size": 28}), batch_size=16))

    reference = list(image_batches(str(mnist_folder), "test", builtin_transform({"image_size": 28}), limit=40,
                                   batch_size=16))
    for batches in (read("bytes", encoded, pa.binary()), read("paths", paths, pa.string())):
        assert len(batches) == len(reference)
        for (inputs, labels), (want_inputs, want_labels) in zip(batches, reference):
            assert torch.equal(inputs, want_inputs) and torch.equal(labels, want_labels)
