"""Checksummed downloads with a progress bar, and a clear stop when there is no network.

Shared by the weight fetcher and the dataset builder. A download goes to ``<dest>.part`` and is
renamed only after its SHA-256 matched, so an interrupted or corrupted transfer never leaves a
file that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.error
import urllib.request

from kdjax import console

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched or did not match its checksum; the message says what to do."""


def sha256_file(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: os.PathLike, sha256: str) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise DownloadError(
            f"{path}: SHA-256 is {actual}, expected {sha256}. The file is corrupt or not the "
            "published one; delete it and fetch it again."
        )


def download(
    url: str, dest: os.PathLike, sha256: str | None, *, timeout: float = 30.0
) -> pathlib.Path:
    """Fetch ``url`` to ``dest`` unless a file with the right checksum is already there.

    ``sha256=None`` is only for callers that verify the content themselves right after this
    returns, because no digest of the file is published (the hymenoptera zip: its extracted
    tree is checked against a recorded digest, see ``kdjax.data.hymenoptera``). The file still reaches
    ``dest`` only after a complete transfer.
    """
    dest = pathlib.Path(dest)
    if dest.exists():
        if sha256 is not None:
            verify_sha256(dest, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    console.line(f"kdjax: downloading {url} to {dest}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with console.bar(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        part.unlink(missing_ok=True)
        check = f"SHA-256 {sha256}" if sha256 else "its content is checked"
        raise DownloadError(
            f"could not download {url} ({err}). If this machine is offline, download that URL "
            f"elsewhere and place the file at {dest} ({check}); it is verified on use."
        ) from err
    if sha256 is not None:
        try:
            verify_sha256(part, sha256)
        except DownloadError:
            part.unlink(missing_ok=True)
            raise
    part.replace(dest)
    return dest
