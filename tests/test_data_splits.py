"""kdjax.data.splits and kdjax.data.arrays: the split flags in tfds's syntax on any source (arrays
through the Python API, an ImageFolder tree), their defaults, and their errors; a folder read
without split flags keeps its source and its cache keys."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import make_image_folder
from kdjax import data
from kdjax.data import arrays, folder, sources, splits, transforms
from kdjax.data.folder import DataError


def _images(n: int, first: int = 0) -> list[np.ndarray]:
    return [np.random.default_rng(first + i).integers(0, 256, (10, 12, 3), dtype=np.uint8) for i in range(n)]


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_arrays_as_pairs_or_as_images_and_labels(tmp_path):
    train, val = _images(12), _images(4, 50)
    pairs = data.from_arrays({"train": [(_png(im) if i % 2 else im, i % 2) for i, im in enumerate(train)],
                              "val": [(im, 1) for im in val]}, class_names=("cat", "dog"))
    stacked = data.from_arrays({"train": {"images": np.stack(train), "labels": np.arange(12) % 2},
                                "val": {"images": np.stack(val), "labels": [1, 1, 1, 1]}})
    assert pairs.class_names == ("cat", "dog") and stacked.class_names == ("0", "1")
    assert pairs.split_names == ("train", "val") and pairs.examples["train"][3] == ("train/3", 1)
    # bytes and arrays of the same pixels: the same content, the same decode
    assert pairs.digest() == data.from_arrays({"train": [(_png(im) if i % 2 else im, i % 2) for i, im in
                                                         enumerate(train)], "val": [(im, 1) for im in val]}).digest()
    ds = data.load_splits(pairs, image_size=16, cache_dir=tmp_path)
    for i in (0, 3):
        np.testing.assert_array_equal(ds["train"].eval.images[i], transforms.eval_view(Image.fromarray(train[i]), 16))
    assert ds.root == arrays.ROOT and ds["val"].labels.tolist() == [1, 1, 1, 1]
    again = data.load_splits(pairs, image_size=16, cache_dir=tmp_path)
    assert not again.decoded and again.fingerprint == ds.fingerprint
    other = data.load_splits(stacked, image_size=16, cache_dir=tmp_path)  # other class names: another cache
    assert other.decoded and other.fingerprint != ds.fingerprint
    carved = data.from_arrays({"train": [(im, 0) for im in train]}, train_split="train[:75%]",
                              val_split="train[75%:]")
    assert [len(carved.examples[r]) for r in carved.split_names] == [9, 3]


def test_bad_arrays_are_named():
    with pytest.raises(DataError, match=r"example 1 of split 'train' is not an \(image, label\) pair"):
        data.from_arrays({"train": [(np.zeros((4, 4, 3), np.uint8), 0), np.zeros(3)], "val": []})
    with pytest.raises(DataError, match=r"split 'train' is a mapping of \['pixels'\]; give 'images' and 'labels'"):
        data.from_arrays({"train": {"pixels": []}})
    with pytest.raises(DataError, match=r"the labels of split 'val' are float64, not integers"):
        data.from_arrays({"train": [(np.zeros((4, 4), np.uint8), 0)], "val": [(np.zeros((4, 4), np.uint8), 0.5)]})
    source = data.from_arrays({"train": [(np.zeros((4, 4), np.uint8), 0), (np.zeros((4, 4), np.uint8), 3)],
                               "val": [(np.zeros((4, 4, 2), np.uint8), 1)]}, class_names=("a", "b"))
    with pytest.raises(DataError, match=r"from_arrays split train example 1: label 3 is outside the 2 classes"):
        source.examples["train"]
    with pytest.raises(transforms.ImageReadError, match=r"from_arrays split val example 0: cannot read image \(an "
                                                        r"array of shape \(4, 4, 2\)"):
        source.read("val/0")
    with pytest.raises(DataError, match=r"--class_names a,a: give each class one distinct name"):
        data.from_arrays({"train": [(np.zeros((4, 4), np.uint8), 0)], "val": []}, class_names=("a", "a"))


@pytest.mark.parametrize("spec", ["train", "train[:33%]", "train[33%:]", "train[-3:]", "train[2:5]+test",
                                  "test[:50%]+train[90%:]", "all"])
def test_slices_are_tfds_own(spec):
    lengths = {"train": (7, 3), "test": (5,)}
    infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=list(n), num_bytes=0) for name, n in lengths.items()}
    want = [(a.splitname, a.from_ or 0, sum(lengths[a.splitname]) if a.to is None else a.to)
            for a in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)]
    assert list(splits.resolve(spec, "train", lengths, "x")) == want


def test_defaults_per_kind():
    record, roles = splits.RECORD_DEFAULTS, splits.RoleRequest()
    assert splits.default_specs(("train", "validation", "test"), {}, roles, record, "d") == {
        "train": "train", "val": "validation", "test": "test"}
    assert splits.default_specs(("train", "test"), {}, roles, record, "d") == {"train": "train", "val": "test"}
    assert splits.default_specs(("train", "test"), {"val": "train[90%:]", "train": "train[:90%]"}, roles, record,
                                "d") == {"train": "train[:90%]", "val": "train[90%:]", "test": "test"}
    evaluating = splits.RoleRequest(needed=("test",), optional=())
    assert splits.default_specs(("train", "validation", "test"), {"val": "x"}, evaluating, record, "d") == {
        "test": "test"}
    with pytest.raises(DataError, match=r"d has no 'val' split \(its splits: train, test\): pass --val_split"):
        splits.default_specs(("train", "test"), {}, roles, splits.FOLDER_DEFAULTS, "d")


def test_a_folder_without_split_flags_is_read_as_ever(tmp_path):
    root = make_image_folder(tmp_path / "images", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    plain = sources.open_data(f"folder:{root}", None)
    same = sources.open_data(f"folder:{root}", None, sources.SourceOptions(train_split="train", val_split="val"))
    for source in (plain, same):
        assert isinstance(source, folder.FolderSource)
        assert source.key_fields() == sources.source_for(root, None).key_fields()
    assert sources.data_spec(None, root) == f"folder:{root}"
    with pytest.raises(ValueError, match="both name the data: pass one"):
        sources.data_spec("tfds:mnist", root)


def test_a_folder_sliced_by_the_split_flags(tmp_path):
    root = make_image_folder(tmp_path / "images", {"train": {"a": 5, "b": 5}, "test": {"a": 1, "b": 1}})
    with pytest.raises(DataError, match=r"data folder .* has no 'val' split \(its splits: test, train\): pass "
                                        r"--val_split .*--train_split 'train\[:90%\]' --val_split 'train\[90%:\]'"):
        sources.open_data(f"folder:{root}", None, sources.SourceOptions(train_split="train[:80%]"))
    source = sources.open_data(f"folder:{root}", None,
                               sources.SourceOptions(train_split="train[:80%]", val_split="train[80%:]"))
    assert source.split_names == ("train", "val", "test")
    assert source.examples["val"] == (("train/b/b_3.jpg", 1), ("train/b/b_4.jpg", 1))
    ds = data.load_splits(source, image_size=16, cache_dir=tmp_path / "cache")
    assert {s: ds[s].num_examples for s in ds.splits} == {"train": 8, "val": 2, "test": 2}
    assert ds["val"].filenames == ("train/b/b_3.jpg", "train/b/b_4.jpg")
    with pytest.raises(DataError, match=r"--val_split 'all': name the split folders"):
        sources.open_data(f"folder:{root}", None, sources.SourceOptions(train_split="train", val_split="all"))
    with pytest.raises(ValueError, match=r"--data 'images': not a data spec; write one of: folder:PATH"):
        sources.open_data("images", None)
