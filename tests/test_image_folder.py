"""ImageFolder scanning: torchvision's classes, order and extensions; every malformed tree named."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torchvision

from conftest import write_image
from kdjax.data import hymenoptera
from kdjax.data.folder import DataError, ignored_notice, scan_image_folder, tree_digest, tree_fingerprint


def test_real_set_counts_classes_and_order_match_torchvision(hymenoptera_dir):
    index = scan_image_folder(hymenoptera_dir)
    assert index.class_names == ("ants", "bees")
    for split, per_class in {"train": (123, 121), "val": (70, 83)}.items():
        labels = [label for _, label in index.files[split]]
        assert (labels.count(0), labels.count(1)) == per_class
        reference = torchvision.datasets.ImageFolder(str(hymenoptera_dir / split))
        assert [(pathlib.Path(p).relative_to(hymenoptera_dir).as_posix(), t)
                for p, t in reference.samples] == list(index.files[split])
    assert ("train/ants/ant photos.jpg", 0) in index.files["train"]  # space in the name
    assert index.ignored == ("train/ants/imageNotFound.gif",)
    notice = ignored_notice(index)
    assert "ignored 1 file(s)" in notice and "1 .gif" in notice and "\n" not in notice


def test_real_set_digest_is_the_recorded_zip_content(hymenoptera_dir):
    assert tree_digest(hymenoptera_dir) == hymenoptera.CONTENT_SHA256


def test_extensions_case_insensitive_nested_files_and_ignored_files(image_folder):
    root = image_folder({"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    write_image(root / "train" / "a" / "UPPER.JPG", fmt="JPEG")
    write_image(root / "train" / "a" / "nested" / "deep.png")  # torchvision walks sub-folders
    write_image(root / "train" / "b" / "anim.gif")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    (root / "train" / "stray.jpg").write_bytes(b"")  # not in a class folder
    index = scan_image_folder(root)
    assert [p for p, _ in index.files["train"]] == [
        "train/a/UPPER.JPG", "train/a/a_0.jpg", "train/a/nested/deep.png", "train/b/b_0.jpg"
    ]
    assert sorted(index.ignored) == ["train/b/anim.gif", "train/b/notes.txt", "train/stray.jpg"]
    notice = ignored_notice(index)
    assert "3 file(s)" in notice and "1 .gif" in notice and "1 .jpg" in notice and "1 .txt" in notice
    assert ignored_notice(scan_image_folder(image_folder({"train": {"a": 1}, "val": {"a": 1}},
                                                        root=root.parent / "clean"))) is None


def test_missing_root_names_it_and_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist.*--data_dir"):
        scan_image_folder(tmp_path / "nowhere")


def test_missing_split_is_named(image_folder):
    root = image_folder({"train": {"a": 1}})
    with pytest.raises(DataError, match=r"no split folder 'val' \(found folders: \['train'\]\)"):
        scan_image_folder(root)


def test_class_in_one_split_only_is_named(image_folder):
    root = image_folder({"train": {"ants": 1, "bees": 1, "wasps": 1}, "val": {"ants": 1, "bees": 1}})
    with pytest.raises(DataError, match=r"class folder 'wasps' is in train but not in val"):
        scan_image_folder(root)


def test_every_missing_class_folder_is_one_error(image_folder):
    root = image_folder({"train": {"ants": 1, "bees": 1, "wasps": 1}, "val": {"ants": 1, "bees": 1, "flies": 1},
                         "test": {"ants": 1, "bees": 1, "wasps": 1}})
    with pytest.raises(DataError) as err:
        scan_image_folder(root)
    msg = str(err.value)
    assert "'flies' is in val but not in train, test" in msg and "'wasps' is in train, test but not in val" in msg


def test_a_test_folder_is_read_when_it_is_there(image_folder):
    root = image_folder({"train": {"ants": 2, "bees": 1}, "val": {"ants": 1, "bees": 1}})
    assert list(scan_image_folder(root).files) == ["train", "val"]
    image_folder({"test": {"ants": 1, "bees": 3}}, root=root)
    index = scan_image_folder(root)
    assert list(index.files) == ["train", "val", "test"]
    assert [label for _, label in index.files["test"]] == [0, 1, 1, 1]


def test_empty_class_is_named(image_folder):
    root = image_folder({"train": {"ants": 1, "bees": 1}, "val": {"ants": 1, "bees": 1}})
    (root / "val" / "bees" / "bees_0.jpg").unlink()
    write_image(root / "val" / "bees" / "only.gif")  # an unsupported file does not count
    with pytest.raises(DataError, match=r"val/bees holds no image with a supported extension"):
        scan_image_folder(root)


def test_split_without_class_folders_is_named(image_folder):
    root = image_folder({"train": {"a": 1}})
    (root / "val").mkdir()
    with pytest.raises(DataError, match=r"val has no class sub-folders"):
        scan_image_folder(root)


def test_tree_fingerprint_tracks_names_sizes_and_times(image_folder, tmp_path):
    root = image_folder({"train": {"a": 2}, "val": {"a": 1}})
    fingerprint, files, size = tree_fingerprint(root)
    assert files == 3 and size == sum(p.stat().st_size for p in root.rglob("*.jpg"))
    assert tree_fingerprint(root) == (fingerprint, files, size)
    first = root / "train" / "a" / "a_0.jpg"
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert tree_fingerprint(root)[0] != fingerprint
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tree_fingerprint(root)[0] == fingerprint
    copy = shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy)  # new mtimes
    assert tree_fingerprint(copy)[0] != fingerprint and tree_digest(copy) == tree_digest(root)


def test_tree_digest_tracks_content_not_location(image_folder, tmp_path):
    root = image_folder({"train": {"a": 2}, "val": {"a": 1}})
    digest = tree_digest(root)
    copy = shutil.copytree(root, tmp_path / "copy")
    assert tree_digest(copy) == digest
    first = copy / "train" / "a" / "a_0.jpg"
    data = first.read_bytes()
    first.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert tree_digest(copy) != digest
    first.write_bytes(data)
    assert tree_digest(copy) == digest
    first.rename(copy / "train" / "a" / "renamed.jpg")
    assert tree_digest(copy) != digest
    shutil.rmtree(copy / "train" / "a")
    assert tree_digest(copy) != digest
