"""The hymenoptera (ants vs bees) set of the PyTorch transfer-learning tutorial, fetched on demand.

The zip's own SHA-256 is not published, so what is checked is its *content*: after extraction,
``image_folder.tree_digest`` of the ``hymenoptera_data`` folder must equal ``CONTENT_SHA256``.
That digest was computed from an extracted copy of the official zip (``../shared/data``); it
identifies every file name and byte, so a corrupt or substituted download is refused just as a
zip checksum would refuse it. Only a verified tree is moved into place.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import zipfile

from kdjax import fetch
from kdjax.data.folder import tree_digest

URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
FOLDER = "hymenoptera_data"
# tree_digest(hymenoptera_data/): 398 files, train 124 + 121, val 70 + 83 (incl. one .gif).
CONTENT_SHA256 = "09b2329aa6956906521686a682b4c4793592134e6d718c3e9769e005ec240417"


def _extract_verified(zip_path: pathlib.Path, downloads: pathlib.Path) -> pathlib.Path:
    target = downloads / FOLDER
    tmp = downloads / f".{FOLDER}.extracting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():
                parts = pathlib.PurePosixPath(member).parts
                # Only the data folder, and nothing that could escape the extraction folder.
                if not parts or parts[0] != FOLDER or ".." in parts or member.startswith("/"):
                    continue
                zf.extract(member, tmp)
        actual = tree_digest(tmp / FOLDER)
        if actual != CONTENT_SHA256:
            zip_path.unlink(missing_ok=True)
            raise fetch.DownloadError(
                f"{zip_path} (from {URL}) does not hold the expected hymenoptera files: content "
                f"digest {actual}, expected {CONTENT_SHA256}. The zip was deleted; run again to "
                "download it afresh, or pass --data_dir to a verified extracted copy."
            )
        (tmp / FOLDER).rename(target)
    except zipfile.BadZipFile as err:
        zip_path.unlink(missing_ok=True)
        raise fetch.DownloadError(
            f"{zip_path} (from {URL}) is not a valid zip ({err}); it was deleted, run again."
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_hymenoptera(downloads: os.PathLike | str) -> pathlib.Path:
    """The extracted ``hymenoptera_data`` folder under ``downloads``, downloaded on first use.

    A folder already there was verified when it was extracted and is used as is.
    """
    downloads = pathlib.Path(downloads).expanduser()
    target = downloads / FOLDER
    if target.is_dir():
        return target
    zip_path = downloads / f"{FOLDER}.zip"
    try:
        fetch.download(URL, zip_path, sha256=None)  # content verified right below
    except fetch.DownloadError as err:
        raise fetch.DownloadError(
            f"{err}\nOr extract that zip anywhere and pass --data_dir <path>/{FOLDER}."
        ) from err
    target = _extract_verified(zip_path, downloads)
    zip_path.unlink()  # the verified tree is what is kept
    return target
