"""kdjax.data.parquet_source: Hugging Face datasets in the hub's Parquet layout (``--data hf:DIR``
or a repository id in the hub cache), written here with pyarrow: image structs of encoded PNG and
JPEG with the ``huggingface`` schema metadata, raw arrays (nested lists, fixed_shape_tensor);
bad input stops with one clear error; one ``kdjax teacher`` run and its ``kdjax evaluate`` on a
generated set."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import kdjax.cli
from conftest import read_metrics
from kdjax import data, engine
from kdjax.cli import flags
from kdjax.config import DistillConfig, TrainConfig
from kdjax.data import sources, transforms
from kdjax.data.augment import View
from kdjax.data.folder import DataError

CLASSES = ("ants", "bees", "wasps")
MEAN, STD = ("0.5", "0.4", "0.3"), ("0.2", "0.25", "0.3")  # a dataset's own statistics


def _image(seed: int, size=(12, 10)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def _column(images, form: str) -> pa.Array:
    if form in ("PNG", "JPEG"):
        return pa.array([{"bytes": _encoded(im, form), "path": None} for im in images],
                        pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    if form == "tensor":
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(images))
    return pa.array([im.tolist() for im in images])  # nested lists [H][W][C]


def write_split(folder, split: str, seeds, labels, form: str = "PNG", names=None, shards: int = 1):
    """``folder/data/<split>-0000k-of-0000n.parquet`` of the images of ``seeds`` (row groups of 4),
    with Hugging Face's metadata naming the classes when ``names`` are given."""
    images = [_image(s, (12 + s % 3, 10 + s % 2)) if form != "tensor" else _image(s) for s in seeds]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(images)), shards)):
        table = pa.table({"image": _column([images[i] for i in part], form),
                          "label": pa.array([labels[i] for i in part], pa.int64())})
        if names is not None:
            features = {"image": {"_type": "Image"}, "label": {"names": list(names), "_type": "ClassLabel"}}
            table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        pq.write_table(table, folder / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet", row_group_size=4)
    return images


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Image structs: train as PNG in two files, validation as PNG, test as JPEG; class names in
    the metadata."""
    folder = tmp_path_factory.mktemp("hf") / "encoded"
    labels = {"train": [i % 3 for i in range(24)], "validation": [i % 3 for i in range(9)],
              "test": [(i + 1) % 3 for i in range(6)]}
    images = {"train": write_split(folder, "train", range(24), labels["train"], "PNG", CLASSES, shards=2),
              "validation": write_split(folder, "validation", range(100, 109), labels["validation"], "PNG", CLASSES),
              "test": write_split(folder, "test", range(200, 206), labels["test"], "JPEG", CLASSES)}
    return folder, images, labels


def _load(*argv):
    parser = argparse.ArgumentParser()
    flags.add_data_flags(parser)
    return flags.load_data(parser.parse_args(["--image_size", "16", *map(str, argv)]), "resnet18")


def test_image_structs_of_png_and_jpeg_with_class_names(encoded, tmp_path):
    folder, images, labels = encoded
    ds = _load("--data", f"hf:{folder}", "--cache_dir", tmp_path)
    assert ds.class_names == CLASSES and ds.root == folder and list(ds.splits) == ["train", "val", "test"]
    for role, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        assert ds[role].labels.tolist() == labels[split]
    for i in (0, 13, 23):  # both files, several row groups; PNG is lossless
        np.testing.assert_array_equal(ds["train"].eval.images[i], transforms.eval_view(Image.fromarray(
            images["train"][i]), 16))
        h, w = ds["train"].train.sizes[i]
        np.testing.assert_array_equal(ds["train"].train.canvas[i, :h, :w], images["train"][i])
    jpeg = Image.open(io.BytesIO(_encoded(images["test"][2], "JPEG"))).convert("RGB")
    np.testing.assert_array_equal(ds["test"].eval.images[2], transforms.eval_view(jpeg, 16))
    source = sources.open_data(f"hf:{folder}", None)
    assert source.location("train/13") == f"{folder}/data/train-00001-of-00002.parquet row 1 (split train record 13)"
    assert source.key_fields() == {"source": "hf", "name": "encoded", "revision": None, "image": "image",
                                   "label": "label", "class_names": list(CLASSES),
                                   "roles": {"train": "train", "val": "validation", "test": "test"}}


def test_the_content_digest_follows_the_files(encoded, tmp_path):
    folder, _, _ = encoded
    copy = tmp_path / "copy"
    for path in folder.rglob("*.parquet"):
        (copy / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(folder)).write_bytes(path.read_bytes())
    original, copied = sources.open_data(f"hf:{folder}", None), sources.open_data(f"hf:{copy}", None)
    assert copied.digest() == original.digest() and copied.fingerprint() != original.fingerprint()
    write_split(copy, "test", range(300, 306), [0] * 6, "JPEG", CLASSES)
    assert sources.open_data(f"hf:{copy}", None).digest() != original.digest()


def test_raw_arrays_nested_lists_and_tensors(tmp_path):
    nested, tensor = tmp_path / "nested", tmp_path / "tensor"
    images = write_split(nested, "train", range(8), [0, 1, 2, 0, 1, 2, 0, 1], "nested")
    write_split(nested, "val", range(10, 14), [2, 1, 0, 2], "nested")
    grey = tmp_path / "grey"  # [H][W] lists, the split's file directly in the folder
    grey.mkdir()
    pq.write_table(pa.table({"image": pa.array([np.full((6, 5), 7 * i, np.uint8).tolist() for i in range(4)]),
                             "label": pa.array([0, 1, 0, 1])}), grey / "train-0.parquet")
    source = sources.open_data(f"hf:{nested}", None)
    assert source.class_names == ("0", "1", "2") and source.split_names == ("train", "val")
    np.testing.assert_array_equal(np.asarray(source.read("train/5")), images[5])
    tensors = write_split(tensor, "train", range(6), [1, 0, 1, 0, 1, 0], "tensor")
    write_split(tensor, "test", range(6, 9), [0, 1, 0], "tensor")
    named = sources.open_data(f"hf:{tensor}", None, sources.SourceOptions(class_names=("no", "yes")))
    assert named.class_names == ("no", "yes") and named.split_names == ("train", "val")  # val reads test
    np.testing.assert_array_equal(np.asarray(named.read("train/4")), tensors[4])
    ds = data.load_splits(named, image_size=16, cache_dir=tmp_path / "cache")
    assert ds["val"].labels.tolist() == [0, 1, 0]
    flat = sources.open_data(f"hf:{grey}", None, sources.SourceOptions(train_split="train[:2]", val_split="train[2:]"))
    assert np.asarray(flat.read("train/3")).tolist() == [[[21] * 3] * 5] * 6  # grey [H][W] -> RGB


def test_a_repository_id_is_found_in_the_hub_cache(encoded, tmp_path, monkeypatch):
    folder, _, _ = encoded
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--kdjax--tiny"
    snapshot = repo / "snapshots" / "abc123"
    for path in folder.rglob("*.parquet"):
        (snapshot / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / path.relative_to(folder)).symlink_to(path)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    source = sources.open_data("hf:kdjax/tiny", None)
    assert source.root == snapshot and source.key_fields()["revision"] == "abc123"
    assert source.key_fields()["name"] == "kdjax/tiny" and source.class_names == CLASSES
    assert source.digest() == sources.open_data(f"hf:{folder}", None).digest()
    with pytest.raises(DataError) as err:
        sources.open_data("hf:kdjax/absent", None)
    assert str(err.value) == (
        f"Hugging Face dataset 'kdjax/absent' is not here (looked for {tmp_path}/hub/datasets--kdjax--absent/"
        "snapshots/*/data/<split>-*.parquet in the hub cache ($HF_HUB_CACHE, $HF_HOME/hub or "
        "~/.cache/huggingface/hub)). Nothing is downloaded here: on a machine with network run `huggingface-cli "
        "download kdjax/absent --repo-type dataset --local-dir DIR`, copy DIR here and pass --data hf:DIR")


def test_bad_input_is_named(encoded, tmp_path):
    folder, _, _ = encoded
    with pytest.raises(DataError, match=rf"not here \(looked for {tmp_path}/nowhere/data/<split>-\*\.parquet.*no "
                                        r"such folder\)\. --data names a local path, so nothing is downloaded"):
        sources.open_data(f"hf:{tmp_path}/nowhere", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Parquet file there"):
        sources.open_data(f"hf:{tmp_path}/empty", None)
    with pytest.raises(DataError, match=r"--image_column 'img': .*/data/test-00000-of-00001\.parquet has no such "
                                        "column; its columns: image, label"):
        sources.open_data(f"hf:{folder}", None, sources.SourceOptions(image_column="img"))
    with pytest.raises(DataError, match=r"--image_column 'label': .* holds int64 there, not images"):
        sources.open_data(f"hf:{folder}", None, sources.SourceOptions(image_column="label"))
    with pytest.raises(DataError, match=r"--train_split 'train\[:1/2\]' is not a split spec"):
        sources.open_data(f"hf:{folder}", None, sources.SourceOptions(train_split="train[:1/2]"))
    with pytest.raises(DataError, match=r"--test_split 'test\[6:\]' selects no example of hf:encoded \(test has 6\)"):
        sources.open_data(f"hf:{folder}", None, sources.SourceOptions(test_split="test[6:]"))
    with pytest.raises(ValueError, match="--class_names does not apply to --data folder"):
        sources.open_data(f"folder:{folder}", None, sources.SourceOptions(class_names=("a",)))
    with pytest.raises(DataError, match=r"--class_names names 2 classes, but hf:encoded .* has 3"):
        sources.open_data(f"hf:{folder}", None, sources.SourceOptions(class_names=("a", "b")))
    bad = tmp_path / "bad"
    write_split(bad, "train", range(4), [0, 1, 5, 1], "PNG", ("a", "b"))
    write_split(bad, "val", range(4, 6), [0, 1], "PNG", ("a", "b"))
    with pytest.raises(DataError, match=r"train-00000-of-00001\.parquet row 2 \(split train record 2\): label 5 is "
                                        r"outside the 2 classes \['a', 'b'\]"):
        data.load_splits(sources.open_data(f"hf:{bad}", None), image_size=16, cache_dir=tmp_path / "cache")
    broken = tmp_path / "broken"
    write_split(broken, "train", range(2), [0, 1], "PNG")
    pq.write_table(pa.table({"image": pa.array([{"bytes": b"not an image", "path": None}]), "label": pa.array([0])}),
                   broken / "data" / "val-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"val-00000-of-00001\.parquet row group 0 row 0 .*cannot read image"):
        data.load_splits(sources.open_data(f"hf:{broken}", None), image_size=16, cache_dir=tmp_path / "cache")


def test_a_teacher_run_and_its_evaluation_on_a_parquet_set(tmp_path):
    """``kdjax teacher --data hf:DIR`` trains (a CIFAR network, ``--crop pad``, the data's own
    ``--mean``/``--std``) and records the data's identity; ``kdjax evaluate --data hf:DIR`` scores
    the run's best/ at its best_val_acc, on the same views: the images as they are, normalised as
    in training, which best/'s meta.json records; as a teacher, best/ sees those statistics too."""
    folder = tmp_path / "set"
    write_split(folder, "train", range(24), [i % 3 for i in range(24)], "PNG", CLASSES)
    write_split(folder, "validation", range(50, 59), [i % 3 for i in range(9)], "JPEG", CLASSES)
    common = ["--data", f"hf:{folder}", "--cache_dir", str(tmp_path / "cache")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert kdjax.cli.main(["teacher", *common, "--init", "scratch", "--arch", "resnet8", "--image_size", "32",
                               "--crop", "pad", "--num_epochs", "1", "--batch_size", "8", "--out",
                               str(tmp_path / "run"), "--quiet", "--mean", *MEAN, "--std", *STD]) == 0
    metrics = read_metrics(tmp_path / "run")
    dataset = data.load_splits(sources.open_data(f"hf:{folder}", None), image_size=32, cache_dir=tmp_path / "cache",
                               resize_size=32)
    assert not dataset.decoded and metrics["run"]["data_fingerprint"] == dataset.fingerprint
    recipe = (tmp_path / "run" / "recipe.toml").read_text()
    assert 'data = "hf:' in recipe and 'crop = "pad"' in recipe and "mean = [0.5, 0.4, 0.3]" in recipe
    meta = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert (meta["image_size"], meta["resize_size"], meta["mean"], meta["std"]) == (32, 32, [0.5, 0.4, 0.3],
                                                                                    [0.2, 0.25, 0.3])
    teacher = engine.load_teacher(tmp_path / "run" / "best", dataset)
    config = TrainConfig(distill=DistillConfig(alpha=0.5), image_size=32, batch_size=8)
    assert engine.step.step_spec_for(config, dataset, "resnet8", teacher).teacher_view == View(32, (0.5, 0.4, 0.3),
                                                                                                (0.2, 0.25, 0.3))
    with contextlib.redirect_stdout(io.StringIO()):
        assert kdjax.cli.main(["evaluate", "--checkpoint", str(tmp_path / "run"), *common,
                               "--out", str(tmp_path / "eval")]) == 0
    record = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert record["data"] == f"hf:{folder}" and record["num_examples"] == 9
    assert record["correct"] == round(metrics["best_val_acc"] * 9)
