"""kdjax's splits (train, val, test) as slices of a dataset's own splits, in tfds's syntax.

``--train_split``, ``--val_split`` and ``--test_split`` take what ``tfds.load(split=...)`` takes
(``train``, ``train[:90%]``, ``train[-1000:]``, ``train+validation``; see
https://www.tensorflow.org/datasets/splits), parsed by tfds itself
(``tfds.core.ReadInstruction.from_spec``) and resolved against the dataset's split sizes as tfds
resolves them, whatever the kind of source. A role without a flag takes its kind's default:
train is ``train``, val the first of the kind's validation names that exists (tfds and Hugging
Face: ``validation``, ``val``, ``valid``, then ``test``; a folder: ``val``), test is ``test``
where it exists and val does not read it. A dataset without a validation split gets one only when
asked (``--train_split 'train[:90%]' --val_split 'train[90%:]'``); two roles that share examples
are refused.

``SlicedSource`` is a source whose splits are the roles: each role's examples are its slices of
the base source's examples, in order, under the base's names; its cache key adds the roles' specs.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable, Mapping, Sequence

import tensorflow_datasets as tfds
from PIL import Image

from kdjax.data.folder import DataError
from kdjax.data.records import LazySplits

ROLES = ("train", "val", "test")
FLAGS = {"train": "--train_split", "val": "--val_split", "test": "--test_split"}
# where a role's default looks, in order, for the kinds that hold named splits
RECORD_DEFAULTS = {"train": ("train",), "val": ("validation", "val", "valid", "test"), "test": ("test",)}
FOLDER_DEFAULTS = {"train": ("train",), "val": ("val",), "test": ("test",)}
SYNTAX = ("tfds's split syntax: a split name (train), a slice of one (train[:90%], train[10:], train[-500:]) "
          "or a sum (train+validation); see https://www.tensorflow.org/datasets/splits")


@dataclasses.dataclass(frozen=True)
class RoleRequest:
    """Which roles a command reads: ``needed`` ones must resolve, ``optional`` ones are read
    where their default exists (training: train and val, test where there is one; an evaluation:
    its one split)."""

    needed: tuple[str, ...] = ("train", "val")
    optional: tuple[str, ...] = ("test",)


def parse(spec: str, role: str):
    """``spec`` (the flag of ``role``) as tfds's split instruction; a ``DataError`` naming the
    flag when tfds cannot parse it."""
    try:
        return tfds.core.ReadInstruction.from_spec(str(spec).strip())
    except (ValueError, NotImplementedError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{FLAGS[role]} {spec!r} is not a split spec ({reason}); write it in {SYNTAX}") from None


def referenced(instruction) -> set[str] | None:
    """The dataset split names ``instruction`` reads, or None for tfds's ``all``."""
    if isinstance(instruction, tfds.core.ReadInstruction):
        return {instruction.split_name}
    if hasattr(instruction, "left") and hasattr(instruction, "right"):  # tfds' sum of two splits
        left, right = referenced(instruction.left), referenced(instruction.right)
        return None if left is None or right is None else left | right
    return None


def resolve(spec: str, role: str, shard_lengths: Mapping[str, Sequence[int]], dataset: str
            ) -> tuple[tuple[str, int, int], ...]:
    """``spec`` as ``((split, start, stop), ...)`` record ranges of ``dataset``'s splits (their
    ``shard_lengths``), as tfds resolves it; a ``DataError`` naming the flag for an unknown split
    or an impossible slice."""
    infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=list(lengths), num_bytes=0)
             for name, lengths in shard_lengths.items()}
    try:
        absolute = parse(spec, role).to_absolute(infos)
    except ValueError as err:
        sizes = ", ".join(f"{name} ({sum(lengths)})" for name, lengths in shard_lengths.items())
        raise DataError(f"{FLAGS[role]} {spec!r}: {str(err).splitlines()[0]} {dataset} holds the splits {sizes}; "
                        f"write it in {SYNTAX}") from None
    ranges = []
    for a in absolute:
        n = sum(shard_lengths[a.splitname])
        ranges.append((a.splitname, a.from_ or 0, n if a.to is None else a.to))
    return tuple(ranges)


def default_specs(available: Sequence[str], given: Mapping[str, str | None], roles: RoleRequest,
                  defaults: Mapping[str, Sequence[str]], dataset: str) -> dict[str, str]:
    """Role -> spec for the roles ``roles`` asks for: ``given`` where set, else the first of
    ``defaults[role]`` in ``available``. A needed role without either is a ``DataError`` saying
    which flag to pass; an optional one (test) is left out then, or when another role reads it."""
    wanted = [role for role in ROLES if role in roles.needed or role in roles.optional]
    specs = {role: given[role] for role in wanted if given.get(role) is not None}
    for role in wanted:
        if role in specs:
            continue
        found = next((name for name in defaults[role] if name in available), None)
        if role not in roles.needed and found is not None:
            read: set[str] = set()
            for other_role, other in specs.items():
                read |= referenced(parse(other, other_role)) or set(available)
            found = None if found in read else found
        if found is not None:
            specs[role] = found
        elif role in roles.needed:
            names = ", ".join(available) or "none"
            carve = ("; to carve a validation split out of train, pass --train_split 'train[:90%]' --val_split "
                     "'train[90%:]'" if role == "val" and "train" in available else "")
            raise DataError(f"{dataset} has no {' or '.join(repr(n) for n in defaults[role])} split (its splits: "
                            f"{names}): pass {FLAGS[role]} naming the split to use{carve}")
    return {role: specs[role] for role in ROLES if role in specs}


def check_disjoint(ranges: Mapping[str, tuple[tuple[str, int, int], ...]], specs: Mapping[str, str]) -> None:
    """A ``DataError`` when two roles read a record in common (val examples trained on)."""
    roles = list(ranges)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            for split, start, stop in ranges[a]:
                for other, o_start, o_stop in ranges[b]:
                    if split == other and max(start, o_start) < min(stop, o_stop):
                        raise DataError(
                            f"{FLAGS[a]} {specs[a]!r} and {FLAGS[b]} {specs[b]!r} both read records "
                            f"{max(start, o_start)}..{min(stop, o_stop) - 1} of split {split!r}: give them disjoint "
                            "slices, e.g. --train_split 'train[:90%]' --val_split 'train[90%:]'")


@dataclasses.dataclass(frozen=True, eq=False)
class SlicedSource:
    """A source whose splits are kdjax's roles, each a list of slices of ``base``'s splits
    (``base``: a data source with ``shard_lengths``, its records per split and shard)."""

    base: object
    specs: Mapping[str, str]  # role -> the spec as given (part of the cache key)
    ranges: Mapping[str, tuple[tuple[str, int, int], ...]]  # role -> resolved record ranges
    describe: str  # the dataset as messages name it

    def __post_init__(self):
        for role, parts in self.ranges.items():
            if sum(stop - start for _, start, stop in parts) <= 0:
                sizes = ", ".join(f"{s} has {sum(self.base.shard_lengths[s])}" for s in {p[0] for p in parts})
                raise DataError(f"{FLAGS[role]} {self.specs[role]!r} selects no example of {self.describe} ({sizes}); "
                                "choose a slice that holds some")

    @property
    def root(self) -> pathlib.Path:
        return self.base.root

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.base.class_names

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(self.ranges)

    @functools.cached_property
    def examples(self) -> Mapping[str, tuple[tuple[str, int], ...]]:
        """Role -> its slices of the base's examples, concatenated (read on first access)."""
        return LazySplits(self.split_names, self._role_examples)

    def _role_examples(self, role: str) -> tuple[tuple[str, int], ...]:
        return tuple(entry for split, start, stop in self.ranges[role]
                     for entry in self.base.examples[split][start:stop])

    def location(self, name: str) -> str:
        return self.base.location(name)

    def read(self, name: str) -> Image.Image:
        return self.base.read(name)

    def key_fields(self) -> dict:
        return {**self.base.key_fields(), "roles": dict(self.specs)}

    def fingerprint(self) -> tuple[str, int, int]:
        return self.base.fingerprint()

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        return self.base.digest(progress)

    def notice(self) -> str | None:
        return self.base.notice()


def sliced(base, given: Mapping[str, str | None], roles: RoleRequest, defaults: Mapping[str, Sequence[str]],
           dataset: str) -> SlicedSource:
    """``base`` with the roles ``roles`` asks for as its splits, each read as ``given`` says or by
    its default (``default_specs``)."""
    lengths = base.shard_lengths
    specs = default_specs(tuple(lengths), given, roles, defaults, dataset)
    ranges = {role: resolve(spec, role, lengths, dataset) for role, spec in specs.items()}
    check_disjoint(ranges, specs)
    return SlicedSource(base, specs, ranges, dataset)
