"""load_splits on the real set and on generated folders; padded, masked, sharded batches."""

from __future__ import annotations

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision
import torchvision.transforms as T
from PIL import Image

from conftest import train_batch, write_image
from kdjax import data, sharding
from kdjax.data import decode_cache, transforms
from kdjax.data.folder import DataError

_train_batch = jax.jit(train_batch, static_argnames=("image_size",))
_eval_batch = jax.jit(data.eval_batch)


@pytest.fixture(scope="module")
def real(hymenoptera_dir, tmp_path_factory):
    return data.load_splits(hymenoptera_dir, cache_dir=tmp_path_factory.mktemp("cache"))


def test_real_set_counts_labels_and_order(real, hymenoptera_dir):
    assert real.class_names == ("ants", "bees")
    for split, per_class in {"train": (123, 121), "val": (70, 83)}.items():
        s = real[split]
        assert np.bincount(s.eval.labels).tolist() == list(per_class)
        reference = torchvision.datasets.ImageFolder(str(hymenoptera_dir / split))
        assert s.eval.labels.tolist() == reference.targets
        assert s.filenames[0] == reference.samples[0][0][len(str(hymenoptera_dir)) + 1:]
    assert "train/ants/ant photos.jpg" in real["train"].filenames
    assert real["val"].train is None  # no training view kept for val


def test_real_val_views_equal_torchvision(real, hymenoptera_dir):
    resize_crop = T.Compose([T.Resize(256), T.CenterCrop(224)])
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])
    val = real["val"]
    expected = []
    for i, name in enumerate(val.filenames):
        with open(hymenoptera_dir / name, "rb") as f:
            view = resize_crop(Image.open(f).convert("RGB"))
        np.testing.assert_array_equal(val.eval.images[i], np.asarray(view), err_msg=name)
        if i < 32:
            expected.append(to_tensor(view).numpy().transpose(1, 2, 0))
    batch = _eval_batch(val.eval, np.arange(32), np.ones(32, bool))
    assert float(jnp.max(jnp.abs(batch.images - np.stack(expected)))) <= 1e-5
    assert batch.labels.tolist() == val.eval.labels[:32].tolist()


def test_real_train_cache_keeps_small_images_whole_and_caps_large_ones(real, hymenoptera_dir):
    tr = real["train"].train
    assert tr.canvas.shape == (244, 512, 512, 3)
    assert tr.sizes.max() == 512
    capped = np.flatnonzero(tr.orig_sizes.max(axis=1) > 512)
    assert len(capped) == 4 and (tr.sizes[capped].max(axis=1) == 512).all()
    for i in [0, real["train"].filenames.index("train/ants/ant photos.jpg"), int(capped[0])]:
        img = transforms.load_rgb(hymenoptera_dir / real["train"].filenames[i])
        assert tuple(tr.orig_sizes[i]) == (img.height, img.width)
        h, w = tr.sizes[i]
        if i not in capped:
            np.testing.assert_array_equal(tr.canvas[i, :h, :w], np.asarray(img))
        assert not tr.canvas[i, h:].any() and not tr.canvas[i, :, w:].any()


def test_real_train_batch_same_on_one_and_four_devices(real):
    arrays = real["train"].train
    idx, mask = data.epoch_order(244, 8, seed=0, epoch=0)
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.data_mesh(devices)
        placed = data.put_replicated(arrays, mesh)
        i, m = data.put_batch((idx[0], mask[0]), mesh)
        batch = _train_batch(placed, i, m, 0, 0, image_size=224)
        if len(devices) == 4:  # each device augments its own quarter of the batch
            assert batch.images.sharding.spec == jax.sharding.PartitionSpec("data")
        out.append(np.asarray(batch.images))
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0].shape == (8, 224, 224, 3) and np.isfinite(out[0]).all()


@pytest.mark.parametrize("n,batches,last", [(244, 8, 20), (153, 5, 25), (32, 1, 32), (3, 1, 3)])
def test_epoch_order_pads_and_masks_every_example_once(n, batches, last):
    idx, mask = data.epoch_order(n, 32, seed=1, epoch=4)
    assert idx.shape == mask.shape == (batches, 32) and idx.dtype == np.int32
    assert mask.sum() == n and mask[-1].sum() == last and mask[:-1].all()
    assert sorted(idx[mask].tolist()) == list(range(n))
    assert ((idx >= 0) & (idx < n)).all()


def test_epoch_order_depends_on_seed_and_epoch_only():
    a, _ = data.epoch_order(244, 32, seed=1, epoch=4)
    np.testing.assert_array_equal(a, data.epoch_order(244, 32, seed=1, epoch=4)[0])
    assert not np.array_equal(a, data.epoch_order(244, 32, seed=1, epoch=5)[0])
    assert not np.array_equal(a, data.epoch_order(244, 32, seed=2, epoch=4)[0])
    ordered, _ = data.epoch_order(40, 32, seed=1, epoch=4, shuffle=False)
    assert ordered.reshape(-1)[:40].tolist() == list(range(40))


@pytest.fixture
def small(image_folder, tmp_path):
    root = image_folder({"train": {"ants": 6, "bees": 5}, "val": {"ants": 3, "bees": 4}},
                        size=lambda seed: (40 + 7 * (seed % 5), 30 + 11 * (seed % 3)))
    return data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)


def _epoch(host_arrays, mesh, seed, epoch, batch_size=4):
    arrays = data.put_replicated(host_arrays, mesh)
    idx, mask = data.epoch_order(len(arrays.labels), batch_size, seed, epoch)
    views = {}
    for i, m in zip(idx, mask):
        b = _train_batch(arrays, *data.put_batch((i, m), mesh), seed, epoch, image_size=32)
        for k, (index, keep) in enumerate(zip(i, m)):
            if keep:
                views[int(index)] = np.asarray(b.images[k])
    return views


def test_resumed_run_sees_the_same_views(small):
    """Epoch 2 of an uninterrupted 4-device run = epoch 2 of a run resumed there on 1 device."""
    arrays = small["train"].train
    uninterrupted = [_epoch(arrays, sharding.data_mesh(), seed=3, epoch=e) for e in range(3)]
    resumed = _epoch(arrays, sharding.data_mesh(jax.devices()[:1]), seed=3, epoch=2)
    assert sorted(resumed) == list(range(11))
    for k, view in resumed.items():
        np.testing.assert_array_equal(view, uninterrupted[2][k])
        assert not np.array_equal(view, uninterrupted[1][k])


def test_every_example_counted_once_per_epoch(small):
    mesh = sharding.data_mesh()
    for split in ("train", "val"):
        arrays = small[split].eval
        idx, mask = data.epoch_order(len(arrays.labels), 4, seed=0, epoch=0)
        idx_d, mask_d = data.put_epoch_order(idx, mask, mesh)
        assert idx_d.sharding.spec == jax.sharding.PartitionSpec(None, "data")
        total, correct_labels = 0, 0
        for i, m in zip(idx, mask):
            b = _eval_batch(data.put_replicated(arrays, mesh), *data.put_batch((i, m), mesh))
            total += int(b.mask.sum())
            correct_labels += int(jnp.sum((b.labels == arrays.labels[i]) & b.mask))
        assert total == correct_labels == small[split].num_examples


def test_batch_not_divisible_by_devices_is_refused(small):
    idx, mask = data.epoch_order(11, 6, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"--batch_size 6 .*device count 4"):
        data.put_batch((idx[0], mask[0]), sharding.data_mesh())
    with pytest.raises(ValueError, match=r"--batch_size 6"):
        data.put_epoch_order(idx, mask, sharding.data_mesh())


def _messages(caplog) -> str:
    """What kdjax's input pipeline (the ``kdjax.data`` loggers) logged."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("kdjax.data"))


BAD_NAMES = ("train/ants/empty.jpg", "train/bees/cut.jpg", "val/bees/notes.png")


def _bad_folder(image_folder, root=None):
    spec = {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 2}}
    root = image_folder(spec, root=root)
    (root / "train" / "ants" / "empty.jpg").write_bytes(b"")
    big = write_image(root / "train" / "bees" / "cut.jpg", size=(200, 150), seed=7)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    (root / "val" / "bees" / "notes.png").write_text("this is not a png")
    return root


def test_the_first_bad_image_stops_a_cold_prepare(image_folder, tmp_path, monkeypatch):
    """Without --skip_bad_images the first unreadable file (in torchvision's order) stops the
    prepare, named with the way out, and the cache keeps nothing of it."""
    root = _bad_folder(image_folder)
    decoded = []
    real = decode_cache.decode_example
    monkeypatch.setattr(decode_cache, "decode_example",
                        lambda source, name, *a: decoded.append(name) or real(source, name, *a))
    for _ in range(2):
        with pytest.raises(DataError) as err:
            data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
        msg = str(err.value)
        assert msg.startswith(f"{root / BAD_NAMES[0]}: cannot read image") and "--skip_bad_images" in msg
        assert str(root / BAD_NAMES[1]) not in msg
    assert not list((tmp_path / "cache").rglob("*.array_record*"))
    assert len(decoded) < 2 * 13  # stopped early: not every file was decoded either time


def test_a_cache_prepared_with_skipping_names_every_bad_image_without_it(image_folder, tmp_path):
    root = _bad_folder(image_folder)
    data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32, skip_bad_images=True)
    with pytest.raises(DataError) as err:
        data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    msg = str(err.value)
    assert "3 unreadable image file(s)" in msg and "--skip_bad_images" in msg and "truncated" in msg
    for name in BAD_NAMES:
        assert str(root / name) in msg


def test_many_bad_images_name_the_first_20_and_count_the_rest(image_folder, tmp_path, caplog):
    root = image_folder({"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})
    for i in range(25):
        (root / "train" / "ants" / f"broken_{i:02d}.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="kdjax.data"):
        ds = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32, skip_bad_images=True)
    assert ds["train"].num_examples == 4
    warning = _messages(caplog)
    assert "left out 25 unreadable image file(s)" in warning and "... and 5 more" in warning
    assert "broken_19.jpg" in warning and "broken_20.jpg" not in warning


def test_skip_bad_images_lists_what_it_left_out(image_folder, tmp_path, caplog):
    root = _bad_folder(image_folder)
    with caplog.at_level(logging.WARNING, logger="kdjax.data"):
        ds = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32, skip_bad_images=True)
    assert ds["train"].num_examples == 6 and ds["val"].num_examples == 4
    warning = _messages(caplog)
    assert "left out 3 unreadable image file(s)" in warning
    assert str(root / "train" / "bees" / "cut.jpg") in warning


def test_bad_images_are_named_under_the_folder_loaded_now(image_folder, tmp_path, caplog):
    """A copied or moved tree has the same digest, so it reuses the cache built from the
    original: its warning and error must name the files where they are now."""
    original = _bad_folder(image_folder, root=tmp_path / "original")
    cache = tmp_path / "cache"
    cold = data.load_splits(original, cache_dir=cache, image_size=32, skip_bad_images=True)
    moved = tmp_path / "moved" / "images"
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdjax.data"):
        warm = data.load_splits(moved, cache_dir=cache, image_size=32, skip_bad_images=True)
    assert cold.decoded and not warm.decoded and warm.cache_path == cold.cache_path
    with pytest.raises(DataError) as err:
        data.load_splits(moved, cache_dir=cache, image_size=32)
    for text in (_messages(caplog), str(err.value)):
        assert "3 unreadable image file(s)" in text and "truncated" in text
        for name in BAD_NAMES:
            assert f"{moved / name}: cannot read image" in text
        assert str(original) not in text  # PIL's reason names the file too: not the old one


def test_class_emptied_by_skipping_is_an_error(image_folder, tmp_path):
    root = image_folder({"train": {"ants": 1, "bees": 1}, "val": {"ants": 1, "bees": 1}})
    (root / "val" / "bees" / "bees_0.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"val/bees have no readable image left"):
        data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32, skip_bad_images=True)


def test_ignored_files_get_a_one_line_notice(image_folder, tmp_path, caplog):
    root = image_folder({"train": {"ants": 1, "bees": 1}, "val": {"ants": 1, "bees": 1}})
    write_image(root / "train" / "ants" / "imageNotFound.gif")
    with caplog.at_level(logging.WARNING, logger="kdjax.data"):
        ds = data.load_splits(root, cache_dir=tmp_path / "cache", image_size=32)
    assert ds["train"].num_examples == 2
    (notice,) = [r.getMessage() for r in caplog.records if r.name.startswith("kdjax.data")]
    assert "1 .gif" in notice and "\n" not in notice


def test_end_to_end_small_folder(small):
    """What the engine will do: place once, then jit-ed batches over an epoch."""
    mesh = sharding.data_mesh()
    train = data.put_replicated(small["train"].train, mesh)
    idx, mask = data.epoch_order(small["train"].num_examples, 8, seed=0, epoch=0)
    seen = 0
    for i, m in zip(idx, mask):
        b = _train_batch(train, *data.put_batch((i, m), mesh), 0, 0, image_size=32)
        assert b.images.shape == (8, 32, 32, 3) and b.images.dtype == jnp.float32
        assert float(jnp.abs(b.images).max()) < 3.0  # normalised: (0..1 - mean) / std
        seen += int(b.mask.sum())
    assert seen == 11
