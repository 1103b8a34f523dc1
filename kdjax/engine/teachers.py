"""Frozen teachers: loading one from a model directory, a run directory or a PyTorch file,
several as one ensemble, and the grouping by architecture that both the ensemble's variables and
the step's vmapped passes use.

A teacher is data (``Teacher``): its architecture, module, variables and the fingerprint that
runs record instead of its weights. An ensemble is one ``Teacher`` too: per architecture, in
first-appearance order, its members' variables stacked along a new leading axis, so each
architecture runs as one vmapped pass (``StepSpec.teacher_groups``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from kdjax import checkpoint, data, models, weights
from kdjax.engine.step import TeacherGroup, network_view

DEFAULT_ARCH = "resnet50"  # the seed's teacher; any registered architecture works


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its architecture, module, variables and fingerprint (what checkpoints
    record)."""

    arch: str
    model: nn.Module
    variables: Any
    fingerprint: str
    # an ensemble (``ensemble``): its teachers; ``variables`` then holds each architecture's
    # members stacked, ``arch`` and ``model`` are the first's
    members: tuple[Teacher, ...] = ()
    # its Normalize() statistics, ``(mean, std)``, as its model directory records them (None: its
    # architecture's input spec): a network trained on CIFAR sees CIFAR's statistics
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(m.arch for m in self.members) if self.members else (self.arch,)


def by_arch(teachers: Sequence[Teacher]) -> dict[str, list[Teacher]]:
    """``teachers`` grouped by architecture, in first-appearance order (the one grouping both the
    ensemble's stacked variables and the step's passes follow)."""
    groups: dict[str, list[Teacher]] = {}
    for t in teachers:
        groups.setdefault(t.arch, []).append(t)
    return groups


def ensemble(teachers: Sequence[Teacher]) -> Teacher:
    """Several frozen teachers as one: per architecture their variables stacked along a new
    leading axis, so each architecture runs as one vmapped pass. One teacher is returned as it is."""
    teachers = list(teachers)
    if len(teachers) == 1:
        return teachers[0]
    groups = by_arch(teachers)
    ordered = [t for members in groups.values() for t in members]
    variables = tuple(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[t.variables for t in members])
                      for members in groups.values())
    digest = checkpoint.fingerprint({"teachers": np.frombuffer(
        "|".join(t.fingerprint for t in ordered).encode(), np.uint8)})
    for arch, members in groups.items():
        if len({m.normalization for m in members}) > 1:
            raise ValueError(f"the {arch} teachers of the ensemble normalise their inputs differently "
                             f"({sorted({str(m.normalization) for m in members})}): one pass per architecture "
                             f"needs one Normalize()")
    return Teacher(ordered[0].arch, ordered[0].model, variables, digest, tuple(ordered), ordered[0].normalization)


def step_groups(teacher: Teacher, dtype, image_size: int) -> tuple[TeacherGroup, ...]:
    """The ``StepSpec.teacher_groups`` of an ensemble (empty for one teacher)."""
    if not teacher.members:
        return ()
    return tuple(TeacherGroup(arch, members[0].model.clone(dtype=dtype),
                              network_view(arch, image_size, members[0].normalization), len(members))
                 for arch, members in by_arch(teacher.members).items())


# --------------------------------------------------------------------------- loading


def teacher_source(path: str | pathlib.Path) -> pathlib.Path:
    """The model directory or PyTorch file ``--teacher_file`` names: a training run's directory
    (``kdjax teacher --out DIR``) stands for its ``best/``."""
    path = pathlib.Path(path)
    if path.is_dir() and not (path / checkpoint.META_FILE).is_file():
        best = path / "best"
        if (best / checkpoint.META_FILE).is_file():
            return best
        if (path / "checkpoints").is_dir() or (path / "metrics.json").is_file():
            raise ValueError(
                f"--teacher_file {path}: a training run without a best model yet ({best} is missing); "
                "let the run finish an epoch, or pass a model directory or PyTorch file")
        raise ValueError(
            f"--teacher_file {path}: neither a kdjax model directory (no {checkpoint.META_FILE}) "
            f"nor a training run (no best/{checkpoint.META_FILE}); pass the directory that holds "
            f"{checkpoint.META_FILE}, a run directory, or a PyTorch file")
    return path


def teacher_archs(archs, count: int) -> list[str | None]:
    """``--teacher_arch`` for ``count`` teacher files: none given, one for all, or one each."""
    if not archs:
        return [None] * count
    if len(archs) == 1:
        return list(archs) * count
    if len(archs) != count:
        raise ValueError(f"--teacher_arch gives {len(archs)} architectures for {count} --teacher_file: give one "
                         f"for all, or one per file")
    return list(archs)


def load_teacher(path: str | pathlib.Path, dataset: data.Dataset, arch: str | None = None) -> Teacher:
    """A frozen teacher from a model directory (its meta.json names the architecture), a
    training run's directory (its best/) or a PyTorch file of ``arch`` (state_dict or the seed's
    whole pickled model); its classes must be the data's."""
    source = teacher_source(path)
    fingerprint = normalization = None
    if source.is_dir():
        meta = checkpoint.read_meta(source)
        if arch is not None and arch != meta.arch:
            raise ValueError(f"--teacher_file {path} holds a {meta.arch}, but --teacher_arch is {arch}")
        arch, fingerprint = meta.arch, meta.fingerprint  # loading checks the weights against it
        normalization = recorded_normalization(meta)
    arch = arch or DEFAULT_ARCH
    variables, class_names, _ = weights.load_variables(source, arch)
    outputs = models.num_outputs(arch, variables)
    if outputs != len(dataset.class_names):
        raise ValueError(
            f"--teacher_file {path}: the teacher has {outputs} outputs but the data has "
            f"{len(dataset.class_names)} classes {list(dataset.class_names)}"
        )
    if class_names is not None and tuple(class_names) != tuple(dataset.class_names):
        raise ValueError(
            f"--teacher_file {path}: the teacher's classes {list(class_names)} are not the "
            f"data's {list(dataset.class_names)} (same order required)"
        )
    model = models.create_model(arch, outputs)
    return Teacher(arch, model, variables, fingerprint or checkpoint.fingerprint(variables),
                   normalization=normalization)


def recorded_normalization(meta: checkpoint.ModelMeta):
    """A model directory's Normalize() statistics where they are not its architecture's."""
    inputs = models.get(meta.arch).input
    recorded = (tuple(meta.mean), tuple(meta.std))
    return None if recorded == (tuple(inputs.mean), tuple(inputs.std)) else recorded


def from_variables(arch: str, variables: Any, normalization=None) -> Teacher:
    """A frozen teacher of ``arch`` from its variables (``{'params', 'batch_stats'}``) in Python,
    fingerprinted as a model directory of them would be; ``normalization`` is its ``(mean, std)``
    where they are not its architecture's."""
    model = models.create_model(arch, models.num_outputs(arch, variables))
    normalization = None if normalization is None else tuple(tuple(float(v) for v in x) for x in normalization)
    return Teacher(arch, model, variables, checkpoint.fingerprint(variables), normalization=normalization)
