"""The tfds decode cache: decode once, reuse, notice changes, never import TensorFlow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from conftest import REPO, write_image
from kdjax import data
from kdjax.data import decode_cache, folder, transforms

SPEC = {"train": {"ants": 3, "bees": 2}, "val": {"ants": 2, "bees": 2}}


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = transforms.load_rgb

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(transforms, "load_rgb", counting)
    return calls


def test_second_load_decodes_nothing(image_folder, tmp_path, count_decodes):
    root = image_folder(SPEC)
    cold = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    assert cold.decoded and len(count_decodes) == 9
    warm = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    assert not warm.decoded and len(count_decodes) == 9
    assert warm.cache_path == cold.cache_path
    for split in SPEC:
        np.testing.assert_array_equal(warm[split].eval.images, cold[split].eval.images)
        assert warm[split].filenames == cold[split].filenames
    np.testing.assert_array_equal(warm["train"].train.canvas, cold["train"].train.canvas)


@pytest.mark.parametrize("change", ["edit", "add", "remove"])
def test_a_changed_file_gives_a_new_cache(image_folder, tmp_path, count_decodes, change):
    root = image_folder(SPEC)
    first = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    target = root / "val" / "bees" / "bees_0.jpg"
    if change == "edit":
        write_image(target, size=(40, 30), seed=999)
    elif change == "add":
        write_image(root / "val" / "bees" / "new.jpg", seed=1000)
    else:
        target.unlink()
    second = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    assert second.decoded and second.cache_path != first.cache_path
    assert second["val"].num_examples == {"edit": 4, "add": 5, "remove": 3}[change]


@pytest.fixture
def count_digests(monkeypatch):
    calls = []
    real = folder.tree_digest

    def counting(root, *args, **kwargs):
        calls.append(root)
        return real(root, *args, **kwargs)

    monkeypatch.setattr(folder, "tree_digest", counting)  # what a folder source's digest calls
    return calls


def test_a_warm_start_reads_no_file_and_verify_data_reads_them_all(image_folder, tmp_path, count_digests,
                                                                     count_decodes):
    root = image_folder(SPEC)
    cache = tmp_path / "cache"
    cold = data.load_splits(root, cache_dir=cache, image_size=32)
    assert cold.decoded and cold.digested and len(count_digests) == 1
    warm = data.load_splits(root, cache_dir=cache, image_size=32)
    assert not warm.decoded and not warm.digested and len(count_digests) == 1
    verified = data.load_splits(root, cache_dir=cache, image_size=32, verify_data=True)
    assert not verified.decoded and verified.digested and len(count_digests) == 2
    # a new mtime is a new fingerprint: the content is identified again and its cache reused
    first = root / "train" / "ants" / "ants_0.jpg"
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    touched = data.load_splits(root, cache_dir=cache, image_size=32)
    assert touched.digested and not touched.decoded and touched.cache_path == cold.cache_path
    assert len(count_decodes) == 9  # decoded once in all


def test_verify_data_finds_an_edit_that_kept_size_and_mtime(image_folder, tmp_path):
    root = image_folder(SPEC)
    cache = tmp_path / "cache"
    cold = data.load_splits(root, cache_dir=cache, image_size=32)
    target = root / "val" / "bees" / "bees_0.jpg"
    st = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 1  # inside the JPEG's entropy data: same size, another image
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.load_splits(root, cache_dir=cache, image_size=32).cache_path == cold.cache_path  # not seen
    verified = data.load_splits(root, cache_dir=cache, image_size=32, verify_data=True)
    assert verified.decoded and verified.cache_path != cold.cache_path
    # and the fingerprint now points at the verified content
    assert data.load_splits(root, cache_dir=cache, image_size=32).cache_path == verified.cache_path


def test_sizes_are_part_of_the_key(image_folder, tmp_path):
    root = image_folder(SPEC)
    a = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    b = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=24)
    c = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32, max_side=16)
    assert len({a.cache_path, b.cache_path, c.cache_path}) == 3 and b.decoded and c.decoded
    assert b["val"].eval.images.shape[1:] == (24, 24, 3)
    assert max(c["train"].train.sizes.max(axis=0)) == 16  # the 40x30 images shrunk to 16x12


def test_cache_dir_defaults_to_kdjax_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path / "kc"))
    assert decode_cache.default_cache_dir() == tmp_path / "kc" / "datasets"
    monkeypatch.delenv("KDJAX_CACHE")
    assert decode_cache.default_cache_dir().parts[-3:] == (".cache", "kdjax", "datasets")


@pytest.mark.parametrize("mode,ext", [("L", "jpg"), ("CMYK", "jpg"), ("RGBA", "png"),
                                      ("P", "png"), ("RGB", "bmp"), ("RGB", "webp")])
def test_every_mode_becomes_torchvisions_rgb(image_folder, tmp_path, mode, ext):
    root = image_folder({"train": {"a": 1}, "val": {"a": 1}}, size=(50, 40))
    path = write_image(root / "val" / "a" / f"odd.{ext}", size=(50, 40), seed=5, mode=mode)
    ds = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    i = ds["val"].filenames.index(f"val/a/odd.{ext}")
    with open(path, "rb") as f:  # torchvision's pil_loader
        reference = Image.open(f).convert("RGB")
    expected = np.asarray(T.Compose([T.Resize(36), T.CenterCrop(32)])(reference))
    np.testing.assert_array_equal(ds["val"].eval.images[i], expected)


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process, as a user's script; it must succeed."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_tensorflow_is_never_imported(image_folder, tmp_path):
    root = image_folder(SPEC)
    code = (
        "import sys\n"
        "from kdjax import data\n"
        f"ds = data.load_splits({str(root)!r}, cache_dir={str(tmp_path / 'c')!r}, image_size=32)\n"
        f"ds = data.load_splits({str(root)!r}, cache_dir={str(tmp_path / 'c')!r}, image_size=32)\n"
        "tf = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))\n"
        "print('TF', tf, ds['train'].num_examples)\n"
    )
    out = _python(code)
    assert "TF [] 5" in out.stdout


def test_cold_load_prints_one_kdjax_line_and_nothing_from_tfds(image_folder, tmp_path):
    """A fresh process (no logging configured, as a user's script): the cold load prints one
    kdjax line on stderr (its progress bar only on a terminal), the warm load nothing; tfds
    prints nothing and the program's logging and tfds' progress-bar switch are left as they were."""
    root = image_folder(SPEC)
    cache = tmp_path / "c"
    code = (
        "import logging, sys\n"
        "from tensorflow_datasets.core.utils import tqdm_utils\n"
        "from kdjax import data\n"
        "for _ in range(2):\n"
        f"    data.load_splits({str(root)!r}, cache_dir={str(cache)!r}, image_size=32)\n"
        "    print('=== load done', file=sys.stderr, flush=True)\n"
        "print('STATE', logging.root.handlers, tqdm_utils._active)\n"
    )
    out = _python(code)
    assert out.stdout == "STATE [] True\n"
    cold, warm, rest = out.stderr.split("=== load done\n")
    assert warm == rest == ""
    (line,) = [ln for ln in cold.splitlines() if "kdjax" in ln]
    (key,) = [d for d in os.listdir(cache) if d != "fingerprints"]
    assert sorted(os.listdir(cache)) == sorted([key, "fingerprints"])  # nothing else is left there
    assert line == (f"kdjax: decoding 9 images of {root} into {cache / key} "
                    "(once; later runs read the cache)")
    # stderr is a pipe here, not a terminal: the line and no progress bar (kdjax.console)
    assert cold == line + "\n", cold
    for tfds_text in ("Downloading and preparing", "Shuffling", "downloaded and prepared",
                      "Generating", "absl", "Variant folder"):
        assert tfds_text not in out.stderr


def test_runs_of_the_previous_cache_layout_keep_their_data_fingerprint(hymenoptera_dir, tmp_path):
    """Runs record ``Dataset.fingerprint``; 87e0e081... is what kdjax's 1.1.0 caches recorded for
    hymenoptera at 112 px (a methods-table run of issue #14): such runs still resume."""
    ds = data.load_splits(hymenoptera_dir, image_size=112, cache_dir=tmp_path / "cache", in_memory="off")
    assert ds.fingerprint == "87e0e081bbbce17a783dcad1" and ds.cache_path.name != ds.fingerprint


def test_a_stale_folder_under_the_key_is_replaced(image_folder, tmp_path):
    root = image_folder(SPEC)
    first = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    shutil.rmtree(first.cache_path)
    (first.cache_path / "decoded_image_folder").mkdir(parents=True)  # e.g. an older kdjax's, or a failed copy
    again = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    assert again.decoded and again.cache_path == first.cache_path and again["train"].num_examples == 5
