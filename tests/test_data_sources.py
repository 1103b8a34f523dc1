"""kdjax.data.sources: the registry, --data_dir -> a source, a folder source's examples and reads,
and the decode cache's keys through a source, which must stay those runs have recorded."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import make_image_folder, write_image
from kdjax import data
from kdjax.data import decode_cache, hymenoptera, sources, transforms
from kdjax.data.folder import IMG_EXTENSIONS, DataError, scan_image_folder, tree_digest, tree_fingerprint

SPEC = {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}, "test": {"ants": 1, "bees": 1}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A tree with a test/ split, a file torchvision does not read and one lying beside the classes."""
    root = make_image_folder(tmp_path_factory.mktemp("sources") / "images", SPEC)
    write_image(root / "train" / "ants" / "odd.gif", fmt="GIF")
    (root / "val" / "notes.txt").write_text("not an image")
    return root


def _todays_key(tree_hex: str, version: str, image_size: int = 32, splits=("train", "val", "test")) -> str:
    """``decode_cache.cache_key`` as kdjax computed it before sources existed (FolderIndex, its
    extensions): the payload every recorded cache name and data fingerprint is a digest of."""
    payload = {
        "format": version,
        "tree": tree_hex,
        "splits": list(splits),
        "extensions": sorted(e.lower() for e in IMG_EXTENSIONS),
        "image_size": image_size,
        "resize_size": transforms.resize_size_for(image_size),
        "max_side": decode_cache.DEFAULT_MAX_SIDE,
        "augment_splits": ["train"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# Runs record the data by a key at this version (``PreparedCache.identity``): changing it, or the
# payload above, makes every recorded run refuse to resume. Only a deliberate change of what is
# stored, with its note in the changelog, may change it.
RECORDED_CONTENT_VERSION = "1.1.0"


def test_the_registry_holds_todays_kinds():
    assert set(sources.SOURCES) == {"folder", "hymenoptera", "tfds", "hf"}
    assert all(spec.help for spec in sources.SOURCES.values())


def test_a_folder_source_is_the_scan(tree):
    source = sources.source_for(tree, None)
    index = scan_image_folder(tree)
    assert source.root == index.root and source.class_names == ("ants", "bees")
    assert source.examples == index.files and source.split_names == ("train", "val", "test")
    assert source.examples["train"][0] == ("train/ants/ants_0.jpg", 0)
    assert "1 .gif" in source.notice() and "1 .txt" in source.notice()
    only_val = sources.source_for(tree, None, splits=("val",))
    assert only_val.split_names == ("val", "test")  # test/ is read where it exists, as before


def test_reading_an_example_is_load_rgb(tree, tmp_path):
    source = sources.source_for(tree, None)
    for name, _ in source.examples["train"]:
        np.testing.assert_array_equal(np.asarray(source.read(name)), np.asarray(transforms.load_rgb(tree / name)))
        assert source.location(name) == str(tree / name)
    broken = make_image_folder(tmp_path / "broken", {"train": {"a": 1}, "val": {"a": 1}})
    (broken / "val" / "a" / "a_0.jpg").write_bytes(b"")
    with pytest.raises(transforms.ImageReadError, match="a_0.jpg: cannot read image"):
        sources.source_for(broken, None).read("val/a/a_0.jpg")


def test_keys_through_the_source_are_todays(tree, tmp_path):
    """The cache's name, its fingerprint record and the data's identity (``Dataset.fingerprint``)
    equal what today's formula gives for the same tree."""
    source = sources.source_for(tree, None)
    spec = decode_cache.CacheSpec(image_size=32)
    content, (fast, _, _) = tree_digest(tree), tree_fingerprint(tree)
    assert source.digest() == content and source.fingerprint()[0] == fast
    key = _todays_key(content, decode_cache.FORMAT_VERSION)
    identity = _todays_key(content, RECORDED_CONTENT_VERSION)
    assert decode_cache.cache_key(source, spec, content) == key
    assert decode_cache.cache_key(source, spec, content, decode_cache.CONTENT_VERSION) == identity
    assert decode_cache.cache_key(source, spec, fast) == _todays_key(fast, decode_cache.FORMAT_VERSION)

    cache = tmp_path / "cache"
    ds = data.load_splits(tree, image_size=32, cache_dir=cache)
    assert ds.cache_path.name == key[:24] and ds.fingerprint == identity[:24]
    record = cache / "fingerprints" / f"{_todays_key(fast, decode_cache.FORMAT_VERSION)[:24]}.json"
    assert json.loads(record.read_text()) == {"key": key[:24], "source": str(tree)}
    # the same source passed as one: the same cache, nothing decoded again
    again = data.load_splits(source, image_size=32, cache_dir=cache)
    assert not again.decoded and (again.cache_path, again.fingerprint) == (ds.cache_path, ds.fingerprint)
    assert again.root == ds.root and again.class_names == ds.class_names
    for split in SPEC:
        np.testing.assert_array_equal(again[split].eval.images, ds[split].eval.images)


def test_hymenoptera_keeps_the_identity_runs_recorded(hymenoptera_dir):
    """87e0e081... is what kdjax recorded for hymenoptera at 112 px (tests/test_decode_cache.py
    checks it through a full ``load_splits``); here through the source, without decoding."""
    source = sources.source_for(hymenoptera_dir, None)
    spec = decode_cache.CacheSpec(image_size=112)
    identity = decode_cache.cache_key(source, spec, source.digest(), decode_cache.CONTENT_VERSION)
    assert identity.startswith("87e0e081") and identity[:24] == "87e0e081bbbce17a783dcad1"
    assert decode_cache.cache_key(source, spec, source.digest())[:24] == "18c325e213e5de0aff38d338"


def test_no_data_dir_is_hymenoptera_fetched_into_the_cache(tree, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(hymenoptera, "fetch_hymenoptera", lambda d: asked.append(d) or tree)
    source = sources.source_for(None, tmp_path / "cache")
    assert asked == [tmp_path / "cache" / "downloads"] and source.root == tree
    with pytest.raises(ValueError, match="cache_dir"):
        sources.source_for(None, None)


def test_a_source_keeps_its_own_splits(tree, tmp_path):
    source = sources.source_for(tree, None, splits=("val",))
    with pytest.raises(ValueError, match=r"source_for"):
        data.load_splits(source, image_size=32, cache_dir=tmp_path, splits=("val",), augment_splits=())
    with pytest.raises(ValueError, match=r"augment_splits \['train'\]"):
        data.load_splits(source, image_size=32, cache_dir=tmp_path)  # train is not among val, test
    with pytest.raises(ValueError, match="--data_in_memory 'maybe'"):
        data.LoadOptions(in_memory="maybe")
    with pytest.raises(DataError, match="no split folder 'nowhere'"):
        sources.source_for(tree, None, splits=("nowhere",))


def test_load_options_and_keywords_are_the_same_call(tree, tmp_path):
    options = data.LoadOptions(image_size=32, cache_dir=tmp_path / "cache", splits=["val"], augment_splits=[])
    by_options = data.load_splits(tree, options)
    by_keywords = data.load_splits(tree, image_size=32, cache_dir=tmp_path / "cache", splits=("val",),
                                   augment_splits=())
    assert not by_keywords.decoded and by_keywords.cache_path == by_options.cache_path
    assert list(by_options.splits) == ["val", "test"] and by_options["val"].train is None
    overridden = data.load_splits(tree, options, in_memory="off")
    assert not overridden.in_memory and overridden.cache_path == by_options.cache_path
