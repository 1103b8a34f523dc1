"""Fetching hymenoptera: the extracted content is verified; offline gives a clear way out."""

from __future__ import annotations

import os
import zipfile

import pytest

from kdjax import data, fetch
from kdjax.data import hymenoptera
from kdjax.data.folder import tree_digest


def _zip_tree(src, dest, extra: dict[str, bytes] | None = None):
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for dirpath, _, fnames in os.walk(src):
            for fname in fnames:
                path = os.path.join(dirpath, fname)
                zf.write(path, f"{hymenoptera.FOLDER}/{os.path.relpath(path, src)}")
        for name, payload in (extra or {}).items():
            zf.writestr(name, payload)
    return dest


def test_download_extracts_and_verifies_the_content(hymenoptera_dir, tmp_path, monkeypatch):
    served = _zip_tree(hymenoptera_dir, tmp_path / "served.zip",
                       {"__MACOSX/._junk": b"x", "hymenoptera_data/../escape.txt": b"x"})
    monkeypatch.setattr(hymenoptera, "URL", served.as_uri())
    downloads = tmp_path / "downloads"
    folder = hymenoptera.fetch_hymenoptera(downloads)
    assert folder == downloads / "hymenoptera_data"
    assert tree_digest(folder) == hymenoptera.CONTENT_SHA256
    assert sorted(p.name for p in downloads.iterdir()) == ["hymenoptera_data"]  # zip removed
    assert not (tmp_path / "escape.txt").exists()

    def no_network(*args, **kwargs):
        raise AssertionError("a verified folder must not be downloaded again")

    monkeypatch.setattr(fetch, "download", no_network)
    assert hymenoptera.fetch_hymenoptera(downloads) == folder


def test_wrong_content_is_refused_and_removed(image_folder, tmp_path, monkeypatch):
    fake = image_folder({"train": {"ants": 1, "bees": 1}, "val": {"ants": 1, "bees": 1}})
    monkeypatch.setattr(hymenoptera, "URL", _zip_tree(fake, tmp_path / "fake.zip").as_uri())
    downloads = tmp_path / "downloads"
    with pytest.raises(fetch.DownloadError, match=r"does not hold the expected hymenoptera files"):
        hymenoptera.fetch_hymenoptera(downloads)
    assert list(downloads.iterdir()) == []  # neither the zip nor a half-extracted folder


def test_offline_names_the_url_and_data_dir(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/hymenoptera_data.zip"  # discard port: refused at once
    monkeypatch.setattr(hymenoptera, "URL", url)
    with pytest.raises(fetch.DownloadError) as err:
        hymenoptera.fetch_hymenoptera(tmp_path / "downloads")
    assert url in str(err.value) and "--data_dir" in str(err.value)
    assert not (tmp_path / "downloads" / "hymenoptera_data.zip").exists()


def test_no_data_dir_means_hymenoptera(image_folder, tmp_path, monkeypatch):
    tiny = image_folder({"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})
    asked = []
    monkeypatch.setattr(hymenoptera, "fetch_hymenoptera", lambda d: asked.append(d) or tiny)
    ds = data.load_splits(None, cache_dir=tmp_path / "cache", image_size=32)
    assert asked == [tmp_path / "cache" / "downloads"] and ds.root == tiny
