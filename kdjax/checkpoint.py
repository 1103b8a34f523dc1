"""The model directory: the one format that conversion, training, distillation and predict share.

A model directory holds::

    meta.json     arch, num_classes, class_names, input size and normalisation, provenance,
                  and the fingerprint of the weights
    variables/    {'params', 'batch_stats'} saved by orbax (ocp.args.StandardSave)

It is written into a sibling temporary directory and renamed into place, so a crash never
leaves a half-written model where a finished one is expected. Loading restores onto an explicit
abstract target (orbax needs one to restore on another device topology) and checks the
fingerprint, so a corrupted or swapped ``variables/`` is caught before it is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kdjax import models

FORMAT = "kdjax.model/1"
META_FILE = "meta.json"
VARIABLES_DIR = "variables"


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    provenance: dict = dataclasses.field(default_factory=dict)
    format: str = FORMAT
    interpolation: str = "bilinear"  # of the eval Resize (older directories: bilinear, all they had)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelMeta":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(d) - {"provenance", "format", "interpolation"}
        if missing:
            raise ValueError(f"missing fields {sorted(missing)}")
        d = {k: v for k, v in d.items() if k in fields}
        for key in ("class_names", "mean", "std"):
            d[key] = tuple(d[key])
        return cls(**d)


def fingerprint(variables: dict) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in a fixed order.

    Identifies a set of weights independently of how it was stored (the teacher's fingerprint
    is recorded in every distillation run instead of its weights).
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return "sha256:" + digest.hexdigest()


def _local_checkpointer() -> ocp.Checkpointer:
    """An orbax checkpointer for this process alone: a model directory holds host copies, so no
    barrier with the other processes of a multi-process run is needed (nor wanted: only one
    process writes, every process may read)."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=options),
                            multiprocessing_options=options)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader (or a resumed run) never sees half
    a file, and a crash leaves the previous version."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _host(variables: dict) -> dict:
    return {
        "params": jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables["params"]),
        "batch_stats": jax.tree_util.tree_map(
            lambda a: np.asarray(a, np.float32), variables.get("batch_stats", {})
        ),
    }


def save_model(
    directory: os.PathLike,
    variables: dict,
    *,
    arch: str,
    class_names: Sequence[str],
    provenance: dict,
    image_size: int = 224,
    inputs: models.InputSpec | None = None,
) -> ModelMeta:
    """Write ``{'params', 'batch_stats'}`` and ``meta.json`` to ``directory`` atomically.

    An existing model directory at that path is replaced only once the new one is complete.
    Host arrays are written by one process: in a multi-process run only process 0 may call
    this (orbax writes numpy arrays from process 0 only), the others skip it.
    """
    directory = pathlib.Path(directory).absolute()
    if jax.process_index() != 0:
        raise RuntimeError(f"{directory}: model directories are written by process 0 only")
    variables = _host(variables)
    num_classes = models.num_outputs(arch, variables)
    if len(class_names) != num_classes:
        raise ModelDirError(
            f"{directory}: {len(class_names)} class names {list(class_names)} for a head with "
            f"{num_classes} outputs"
        )
    _check_shapes(variables, arch, num_classes, directory)
    # what the network was trained on (a known torchvision weight's own transform, else the
    # architecture's IMAGENET1K_V1 one), recorded for prediction
    inputs = models.get(arch).input if inputs is None else inputs
    meta = ModelMeta(
        arch=arch,
        num_classes=num_classes,
        class_names=tuple(str(c) for c in class_names),
        image_size=int(image_size),
        resize_size=inputs.resize_for(int(image_size)),
        mean=inputs.mean,
        std=inputs.std,
        interpolation=inputs.interpolation,
        fingerprint=fingerprint(variables),
        provenance=dict(provenance),
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        with _local_checkpointer() as ckptr:
            ckptr.save(tmp / VARIABLES_DIR, args=ocp.args.StandardSave(variables))
        (tmp / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")  # inside tmp/
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _check_shapes(variables: dict, arch: str, num_classes: int, where) -> None:
    expected = models.abstract_variables(models.create_model(arch, num_classes))
    exp = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): np.shape(a) for p, a in jax.tree_util.tree_leaves_with_path(variables)}
    bad = sorted(k for k in exp.keys() | got.keys() if exp.get(k) != got.get(k))
    if bad:
        detail = ", ".join(f"{k}: expected {exp.get(k)}, got {got.get(k)}" for k in bad[:5])
        raise ModelDirError(f"{where}: weights do not fit arch {arch!r} ({len(bad)} mismatches: {detail})")


def read_meta(directory: os.PathLike) -> ModelMeta:
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: no such model directory")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ModelDirError(
            f"{directory}: not a kdjax model directory (no {META_FILE}); create one with "
            "`python -m kdjax.weights convert` or by training"
        )
    try:
        meta = ModelMeta.from_json(json.loads(meta_path.read_text()))
    except (ValueError, TypeError) as err:
        raise ModelDirError(f"{meta_path}: unreadable ({err})") from err
    if meta.format != FORMAT:
        raise ModelDirError(f"{meta_path}: format {meta.format!r}, this kdjax reads {FORMAT!r}")
    try:
        models.get(meta.arch)  # a user's MODULE:ATTRIBUTE network is imported here
    except ValueError as err:
        raise ModelDirError(f"{meta_path}: {err}") from None
    return meta


def load_model(
    directory: os.PathLike,
    *,
    arch: str | None = None,
    dtype: Any = jnp.float32,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[Any, dict, ModelMeta]:
    """Restore ``(module, {'params', 'batch_stats'}, meta)`` from a model directory.

    ``arch``, when given, must match the directory's (a ResNet-18 student directory passed
    where a ResNet-50 teacher is expected fails here, by name). ``sharding`` places every leaf
    (default: this process's first device). Every process of a multi-process run may load.
    """
    directory = pathlib.Path(directory).absolute()
    meta = read_meta(directory)
    if arch is not None and arch != meta.arch:
        raise ModelDirError(f"{directory}: holds a {meta.arch}, expected a {arch}")
    variables_dir = directory / VARIABLES_DIR
    if not variables_dir.is_dir():
        raise ModelDirError(f"{directory}: missing {VARIABLES_DIR}/ (incomplete model directory)")
    model = models.create_model(meta.arch, meta.num_classes, dtype)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=sharding),
        models.abstract_variables(model, meta.image_size),
    )
    try:
        with _local_checkpointer() as ckptr:
            variables = ckptr.restore(variables_dir, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # orbax raises several types for unreadable or misshapen trees
        raise ModelDirError(f"{variables_dir}: cannot restore weights for {meta.arch} ({err})") from err
    variables = dict(variables)
    actual = fingerprint(variables)
    if actual != meta.fingerprint:
        raise ModelDirError(
            f"{directory}: weights fingerprint {actual} does not match meta.json "
            f"({meta.fingerprint}); the directory was modified or is corrupt"
        )
    return model, variables, meta
