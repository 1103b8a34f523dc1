"""kdjax.data.tfds_source: a tensorflow-datasets dataset by name (``--data tfds:NAME``), prepared
here by a tiny ``GeneratorBasedBuilder`` that the test writes as a package, read back without
TensorFlow through the data flags, the decode cache and the split flags; missing data, wrong
features and labels outside the class list stop with one clear error."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

import numpy as np
import pytest

from kdjax.cli import flags
from kdjax.data import sources, tfds_source, transforms
from kdjax.data.folder import DataError

SHAPES = "kdjax_test_shapes"  # ClassLabel names, PNG images of varied sizes, train + test
PLAIN = "kdjax_test_plain"  # plain integer labels, uint8 Tensor images, train only
CLASSES = ("circle", "square", "star")

BUILDERS = '''
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def image(seed, size):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


class KdjaxTestShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images encoded as PNG (tfds' Image feature), fine and coarse ClassLabels."""

    VERSION = tfds.core.Version("1.2.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(None, None, 3)),
            "kind": tfds.features.ClassLabel(names=["circle", "square", "star"]),
            "coarse": tfds.features.ClassLabel(names=["round", "angular"]),
        }), supervised_keys=("picture", "kind"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 24), "test": self._generate_examples(100, 9)}

    def _generate_examples(self, first, n):
        for i in range(n):
            seed = first + i
            # PIL images: tfds encodes numpy arrays with TensorFlow, PIL images with PIL
            yield i, {"picture": Image.fromarray(image(seed, (8 + seed % 5, 10 + seed % 3))), "kind": seed % 3,
                      "coarse": int(seed % 3 > 0)}


class KdjaxTestPlain(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Raw uint8 images (a Tensor feature) and plain integer labels; no test split."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8, encoding="bytes"),
            "label": tfds.features.Scalar(dtype=np.int64),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(20):
            yield i, {"image": image(200 + i, (8, 8)), "label": i % 3}
'''


def _image(seed: int, size) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tfds data dir holding both builders' prepared files (ArrayRecord, no TensorFlow)."""
    root = tmp_path_factory.mktemp("tfds")
    package = root / "code" / "kdjax_test_builders"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "builders.py").write_text(textwrap.dedent(BUILDERS))
    sys.path.insert(0, str(root / "code"))
    try:
        module = importlib.import_module("kdjax_test_builders.builders")
        for cls in (module.KdjaxTestShapes, module.KdjaxTestPlain):
            cls(data_dir=str(root / "data"), file_format="array_record").download_and_prepare()
    finally:
        sys.path.remove(str(root / "code"))
        sys.modules.pop("kdjax_test_builders.builders", None)
        sys.modules.pop("kdjax_test_builders", None)
    return root / "data"


def _args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_data_flags(parser)
    return parser.parse_args([str(a) for a in argv])


def _load(*argv):
    return flags.load_data(_args("--image_size", 16, *argv), "resnet18")


def _source(tfds_dir, name=SHAPES, **options):
    return sources.open_data(f"tfds:{name}", None, sources.SourceOptions(tfds_data_dir=tfds_dir, **options))


def test_a_prepared_dataset_is_read_by_name_without_tensorflow(tfds_dir, tmp_path):
    ds = _load("--data", f"tfds:{SHAPES}", "--tfds_data_dir", tfds_dir, "--cache_dir", tmp_path)
    assert ds.decoded and ds.class_names == CLASSES and ds.root == tfds_dir / SHAPES / "1.2.0"
    assert list(ds.splits) == ["train", "val"]  # no validation split: val reads test, and test is not read twice
    assert ds["train"].num_examples == 24 and ds["val"].num_examples == 9
    source = _source(tfds_dir)
    for split, role in (("train", "train"), ("test", "val")):
        reader = source.base.table._sources[split]
        want = [int(reader[i]["kind"]) for i in range(len(reader))]
        assert ds[role].labels.tolist() == want
        assert ds[role].filenames[0] == f"{split}/0"
    # record 3 of train (tfds shuffles the records): its stored training image and eval view
    i = 3
    raw = np.asarray(source.read(f"train/{i}"))
    h, w = ds["train"].train.sizes[i]
    np.testing.assert_array_equal(ds["train"].train.canvas[i, :h, :w], raw)
    np.testing.assert_array_equal(ds["train"].eval.images[i], transforms.eval_view(source.read(f"train/{i}"), 16))
    assert any(np.array_equal(raw, _image(seed, (8 + seed % 5, 10 + seed % 3))) for seed in range(24))
    assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]


def test_a_warm_start_reads_no_label(tfds_dir, tmp_path, monkeypatch):
    cold = _load("--data", f"tfds:{SHAPES}", "--tfds_data_dir", tfds_dir, "--cache_dir", tmp_path)

    def refuse(self, split):
        raise AssertionError("a warm start read the labels")

    monkeypatch.setattr(tfds_source.TfdsTable, "labels", refuse)
    warm = _load("--data", f"tfds:{SHAPES}", "--tfds_data_dir", tfds_dir, "--cache_dir", tmp_path,
                 "--data_in_memory", "off")
    assert not warm.decoded and (warm.cache_path, warm.fingerprint) == (cold.cache_path, cold.fingerprint)
    assert warm["val"].labels.tolist() == cold["val"].labels.tolist()


def test_the_identity_is_kind_name_version_features_and_split_specs(tfds_dir):
    source = _source(tfds_dir)
    assert source.key_fields() == {"source": "tfds", "name": f"{SHAPES}/1.2.0", "version": "1.2.0",
                                   "image": "picture", "label": "kind", "class_names": list(CLASSES),
                                   "roles": {"train": "train", "val": "test"}}
    again = _source(tfds_dir, name=f"{SHAPES}:1.2.0")
    assert again.fingerprint() == source.fingerprint() and again.digest() == source.digest()
    carved = _source(tfds_dir, train_split="train[:75%]", val_split="train[75%:]")
    assert carved.key_fields()["roles"] == {"train": "train[:75%]", "val": "train[75%:]", "test": "test"}
    coarse = _source(tfds_dir, label_column="coarse")
    assert coarse.class_names == ("round", "angular") and coarse.key_fields()["label"] == "coarse"


def test_split_flags_slice_as_tfds_does(tfds_dir, tmp_path):
    ds = _load("--data", f"tfds:{SHAPES}", "--tfds_data_dir", tfds_dir, "--cache_dir", tmp_path,
               "--train_split", "train[:75%]", "--val_split", "train[75%:]")
    assert {s: ds[s].num_examples for s in ds.splits} == {"train": 18, "val": 6, "test": 9}
    assert ds["val"].filenames[0] == "train/18" and ds["test"].filenames[-1] == "test/8"
    with pytest.raises(DataError, match=r"--train_split 'train' and --val_split 'train\[50%:\]' both read records "
                                        r"12\.\.23 of split 'train'"):
        _source(tfds_dir, val_split="train[50%:]")
    with pytest.raises(DataError, match=r"--val_split 'valid':.*Unknown split 'valid'.*train \(24\), test \(9\)"):
        _source(tfds_dir, val_split="valid")
    with pytest.raises(DataError, match=r"--train_split 'train\[:90\]%' is not a split spec"):
        _source(tfds_dir, train_split="train[:90]%")
    with pytest.raises(DataError, match=r"--val_split 'test\[3:3\]' selects no example of tfds:kdjax_test_shapes"):
        _source(tfds_dir, val_split="test[3:3]")


def test_missing_data_is_one_error_saying_how_to_prepare_it(tfds_dir, tmp_path):
    for name, where in (("kdjax_nowhere", tmp_path), ("cifar100", tmp_path), (f"{SHAPES}:9.9.9", tfds_dir)):
        with pytest.raises(DataError) as err:
            _source(where, name=name)
        message = str(err.value)
        assert f"tfds dataset {name!r} is not prepared under {where}" in message
        assert f"`tfds build {name} --data_dir DIR`" in message
        assert f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()" in message
        assert "--tfds_data_dir DIR" in message and "Available datasets" not in message
    assert not (tmp_path / "cifar100").exists() and not (tmp_path / "downloads").exists()  # nothing fetched


def test_wrong_features_are_named_with_the_ones_there(tfds_dir):
    with pytest.raises(DataError, match=r"--image_column 'img': .* no such image feature .*picture \(Image\)"):
        _source(tfds_dir, image_column="img")
    with pytest.raises(DataError, match=r"--label_column 'picture': .*'picture' is not one"):
        _source(tfds_dir, label_column="picture")
    with pytest.raises(ValueError, match="--tfds_data_dir does not apply to --data hf:./x"):
        sources.open_data("hf:./x", None, sources.SourceOptions(tfds_data_dir=tfds_dir))


def test_plain_integer_labels_are_named_by_value_or_by_flag(tfds_dir, tmp_path):
    with pytest.raises(DataError, match=r"has no 'validation' or 'val' or 'valid' or 'test' split \(its splits: "
                                        r"train\): pass --val_split .* --train_split 'train\[:90%\]' --val_split"):
        _source(tfds_dir, name=PLAIN)
    carve = {"train_split": "train[:80%]", "val_split": "train[80%:]"}
    source = _source(tfds_dir, name=PLAIN, **carve)
    assert source.class_names == ("0", "1", "2") and source.key_fields()["class_names"] == "label values"
    assert source.split_names == ("train", "val")
    named = _source(tfds_dir, name=PLAIN, class_names=("a", "b", "c"), **carve)
    assert named.class_names == ("a", "b", "c")
    ds = _load("--data", f"tfds:{PLAIN}", "--tfds_data_dir", tfds_dir, "--cache_dir", tmp_path,
               "--train_split", "train[:80%]", "--val_split", "train[80%:]", "--class_names", "a,b,c")
    assert ds.class_names == ("a", "b", "c") and ds["val"].num_examples == 4
    raw = np.asarray(source.read("train/0"))
    assert raw.shape == (8, 8, 3) and any(np.array_equal(raw, _image(200 + i, (8, 8))) for i in range(20))
    too_few = _source(tfds_dir, name=PLAIN, class_names=("a", "b"), **carve)
    with pytest.raises(DataError, match=r"split train record \d+ .*label 2 is outside the 2 classes \['a', 'b'\]"):
        too_few.examples["train"]
