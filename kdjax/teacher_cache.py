"""A teacher-output cache on disk, correct under augmentation.

The view of training example ``i`` in epoch ``e`` of a run seeded ``s`` depends on ``(s, e, i)``
alone (``kdjax.data``), and the frozen teacher sees it in eval mode, so its logits for that view
are a function of the teacher, the data and ``(s, e, i)``. They are stored per ``(seed,
epoch)`` as one array ``[..., num_train, classes]`` (the leading axis is the teachers of an
ensemble) under a directory named by a digest of everything else that could change them: the
teacher's fingerprint, the decode cache's key, image size, compute dtype, batch size and device
count (the last two keep a hit bit-identical to computing it: a batch's reductions may round
differently on another split). A study over the same seeds with another alpha or loss then
reads the teacher's outputs instead of running it, and trains exactly as without the cache.

torchdistill keyed its cache by sample index alone, which is wrong under random crops (every
epoch reused the first epoch's teacher outputs), and removed it (its PR #539).

    DIR/<digest>/key.json                 what the digest covers, readable
    DIR/<digest>/seed<s>_epoch<e>.npy     the teacher's logits for every training example

The teacher's logits on the validation views (fixed views, not keyed by seed or epoch) are kept
the same way, always, under ``$KDJAX_CACHE/teacher_val`` (``val_outputs_store``): a study rerun
with another alpha, loss or recipe reads them instead of running the teacher over the whole
validation split again (benchmarks/README.md, start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Mapping

import numpy as np

import kdjax

FORMAT = 1


VAL_FILE = "val_logits.npy"
# the teacher's validation logits are kept only up to this size (ImageNet's 50,000 x 1,000 would
# take 200 MB: recomputing them is then the better deal)
VAL_MAX_BYTES = 64 << 20


def val_outputs_store(key: Mapping) -> "TeacherCache":
    """The store of the teacher's validation logits for ``key`` (what they depend on)."""
    root = os.environ.get("KDJAX_CACHE") or os.path.join("~", ".cache", "kdjax")
    return TeacherCache(pathlib.Path(root).expanduser() / "teacher_val", key)


class TeacherCache:
    """The cache entries of one ``key`` (a JSON-able mapping) under ``root``."""

    def __init__(self, root: str | os.PathLike, key: Mapping):
        self.key = {"format": FORMAT, "kdjax": kdjax.__version__, **dict(key)}
        text = json.dumps(self.key, sort_keys=True)
        self.directory = pathlib.Path(root).absolute() / hashlib.sha256(text.encode()).hexdigest()[:20]
        self._key_text = text

    def path(self, seed: int, epoch: int, tag: str = "") -> pathlib.Path:
        return self.directory / f"seed{int(seed)}_epoch{int(epoch)}{tag}.npy"

    def load(self, seed: int, epoch: int, tag: str = "") -> np.ndarray | None:
        """The stored logits of ``(seed, epoch)`` (0-based epoch), or None when absent; ``tag``
        tells apart views of one seed that differ in traced values (mixing alphas)."""
        path = self.path(seed, epoch, tag)
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"--teacher_cache: unreadable entry {path} ({err}); delete it to recompute") from None

    def load_outputs(self) -> np.ndarray | None:
        """The stored validation logits, or None (absent or unreadable: they are computed again)."""
        try:
            return np.load(self.directory / VAL_FILE, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def save_outputs(self, logits: np.ndarray) -> None:
        """Store the validation logits (a failure to write leaves them uncached, nothing else)."""
        try:
            self._write(self.directory / VAL_FILE, logits)
        except OSError:
            pass

    def save(self, seed: int, epoch: int, logits: np.ndarray, tag: str = "") -> None:
        """Store ``(seed, epoch)``'s logits atomically (a reader never sees half an entry)."""
        self._write(self.path(seed, epoch, tag), logits)

    def _write(self, path: pathlib.Path, logits: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key.json"
        if not key_file.is_file():
            key_file.write_text(self._key_text + "\n")
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(logits), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise


def gather(arrays: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """An epoch's cached logits in step order: ``[steps, S, ..., B, C]`` from per-seed arrays
    ``[..., N, C]`` and the order ``[steps, S, B]`` (padding rows index real examples too)."""
    return np.stack([np.stack([np.take(a, order[step, k], axis=-2) for k, a in enumerate(arrays)])
                     for step in range(order.shape[0])])


def scatter(step_logits: np.ndarray, order: np.ndarray, mask: np.ndarray, num_examples: int) -> list[np.ndarray]:
    """Per-seed arrays ``[..., N, C]`` from an epoch's step outputs ``[steps, S, ..., B, C]``; every
    example of the epoch appears in exactly one real row (an incomplete epoch is an error)."""
    steps, seeds = order.shape[:2]
    out = []
    for k in range(seeds):
        shape = step_logits.shape[2:-2] + (num_examples, step_logits.shape[-1])
        arr = np.zeros(shape, step_logits.dtype)
        seen = np.zeros(num_examples, bool)
        for step in range(steps):
            rows = mask[step, k]
            idx = order[step, k][rows]
            arr[..., idx, :] = step_logits[step, k][..., rows, :]
            seen[idx] = True
        if not seen.all():
            raise RuntimeError(f"teacher cache: {int((~seen).sum())} examples missing from an epoch's outputs")
        out.append(arr)
    return out
