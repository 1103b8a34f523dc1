"""Evaluate a saved model on one split of a dataset: an ImageFolder tree, or any ``--data SPEC``
of ``kdjax.data.sources`` (the command, ``kdjax evaluate`` or ``python -m kdjax.evaluate``, is
``kdjax.cli.evaluate``).

Writes ``evaluation.json``, ``evaluation.md`` and ``confusion.png`` into ``--out`` (default:
``eval_<split>`` beside the model directory): accuracy, per-class precision and recall, the
confusion matrix (rows: true class, columns: predicted class) and, with ``--teacher_file``, the
teacher's accuracy and its top-1 agreement with the model.

The figures are the training run's own: the split is read through kdjax's decode cache at the
checkpoint's image size (torchvision's Resize + CenterCrop of each original file, as training's
validation reads it), the model runs through the engine's evaluation forward
(``kdjax.engine.evaluation.all_outputs``: fixed-shape batches, the last one padded, every example counted
once) in the compute dtype its run validated in. So a run's ``best/`` evaluated on ``val`` scores
exactly that run's ``best_val_acc``. Only the requested split is loaded, so a tree holding just
``val/`` (or ``test/``) is enough; its decode cache is then its own, decoded once. With
``--data``, ``--split`` names the role and its flag (``--val_split`` ...) what it reads, as in
training (``kdjax.data.splits``).

A bad input (model directory, data folder, split, classes, teacher) raises a ``ValueError``
naming it (``ModelDirError``, ``DataError``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint, data, distributed, report, sharding
from kdjax.data import sources
from kdjax.data.folder import DataError
from kdjax.engine import evaluation, step, teachers

SPLITS = ("train", "val", "test")
JSON_FILE = "evaluation.json"
MARKDOWN_FILE = "evaluation.md"
PLOT_FILE = "confusion.png"
NOT_PREDICTED = "n/a"  # the Markdown's precision of a class the model never predicts (JSON: null)
ANNOTATE_MAX_CLASSES = 30  # confusion.png writes the counts into the cells up to this many classes


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What one evaluation reads: the model, the data split and, optionally, a teacher.

    ``checkpoint``: a model directory or a training run's directory (its ``best/``);
    ``teacher_file``: anything ``kdjax.engine.teachers.load_teacher`` accepts. ``dtype`` None computes in
    the dtype the model's training run validated in (its ``best/meta.json`` provenance), float32
    for a model without one. ``cache_dir`` is the decode cache's (``--cache_dir`` of training).
    """

    checkpoint: str | os.PathLike
    data_dir: str | os.PathLike | None  # an ImageFolder tree (``--data folder:DIR``); or ``data``
    split: str = "val"
    cache_dir: str | os.PathLike | None = None
    batch_size: int = 32
    teacher_file: str | os.PathLike | None = None
    teacher_arch: str | None = None
    dtype: str | None = None
    skip_bad_images: bool = False
    data: str | None = None  # ``--data SPEC`` (``kdjax.data.sources.open_data``), in place of ``data_dir``
    # how ``data`` is read: the split flags (the one of ``split`` is read), columns, class names
    source: sources.SourceOptions = sources.SourceOptions()

    def __post_init__(self):
        sources.data_spec(self.data, self.data_dir)  # not both
        if self.data is None and self.data_dir is None:
            raise ValueError("name the data to evaluate on: --data SPEC or --data_dir DIR")
        if self.split not in SPLITS:
            raise ValueError(f"--split {self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


def model_dir(path: str | os.PathLike) -> pathlib.Path:
    """The model directory ``--checkpoint`` names: a training run's directory stands for its
    ``best/`` (``kdjax.engine.teachers.teacher_source``'s rule)."""
    try:
        source = teachers.teacher_source(path)
    except ValueError as err:  # its messages name the teacher's flag
        raise checkpoint.ModelDirError(str(err).replace("--teacher_file", "--checkpoint", 1)) from None
    if source.is_file():
        raise checkpoint.ModelDirError(
            f"--checkpoint {path}: a file, not a kdjax model directory; convert a PyTorch file with "
            "`python -m kdjax.weights convert` (or pass it as --teacher_file)")
    return source


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 ``[C, C]`` counts: row = true class, column = predicted class."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def class_figures(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Per class: precision (correct / predicted as the class), recall (correct / support), the
    support (true examples) and how many were predicted as it. The precision of a class the model
    never predicts is 0/0: None (null in JSON, ``n/a`` in the Markdown), not 0, so that it is not
    mistaken for a class predicted always wrongly; recall is None likewise for a class without
    examples (which ``kdjax.data.load_splits`` does not let through)."""
    confusion = np.asarray(confusion)
    hits, predicted, support = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    return [{
        "class": name,
        "precision": float(hits[c] / predicted[c]) if predicted[c] else None,
        "recall": float(hits[c] / support[c]) if support[c] else None,
        "support": int(support[c]),
        "predicted": int(predicted[c]),
    } for c, name in enumerate(class_names)]


def _compute_dtype(requested: str | None, meta: checkpoint.ModelMeta) -> str:
    if requested is not None:
        return requested
    config = meta.provenance.get("config")
    return config.get("compute_dtype", "float32") if isinstance(config, dict) else "float32"


def _load_split(config: EvalConfig, meta: checkpoint.ModelMeta) -> data.Dataset:
    """The split alone, at the model's image size, after checking that it exists and that its
    classes are the model's (before anything is decoded)."""
    given = config.source.given
    folder_as_ever = config.data is None and all(spec is None or spec == role for role, spec in given.items())
    if not folder_as_ever:
        return _load_source_split(config, meta)
    root = pathlib.Path(config.data_dir).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"--data_dir {root}: no such folder")
    if not (root / config.split).is_dir():
        present = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise DataError(f"--data_dir {root}: no split folder {root / config.split} (found folders: "
                        f"{present or 'none'}); pass --split with one of them")
    source = sources.source_for(root, config.cache_dir, splits=(config.split,))
    if source.class_names != meta.class_names:
        raise DataError(f"--data_dir {root}: the class folders of {config.split}/ {list(source.class_names)} are not "
                        f"the checkpoint's classes {list(meta.class_names)} (same names, same order required)")
    return data.load_splits(source, image_size=meta.image_size, cache_dir=config.cache_dir, augment_splits=(),
                            skip_bad_images=config.skip_bad_images, resize_size=_eval_resize(meta))


def _eval_resize(meta: checkpoint.ModelMeta) -> int | None:
    """The Resize() side of the evaluation views: the image as it is for a network that saw its
    images whole (``--crop pad``, the CIFAR networks), else training's 256/224 proportion."""
    return meta.image_size if meta.resize_size == meta.image_size else None


def _load_source_split(config: EvalConfig, meta: checkpoint.ModelMeta) -> data.Dataset:
    """``--data SPEC`` (or a folder sliced by a split flag): only ``config.split``'s role, read as
    its flag (``--val_split`` ...) or its default says."""
    from kdjax.data import splits

    spec = sources.data_spec(config.data, config.data_dir)
    options = dataclasses.replace(config.source, roles=splits.RoleRequest(needed=(config.split,), optional=()))
    source = sources.open_data(spec, config.cache_dir, options)
    if tuple(source.class_names) != tuple(meta.class_names):
        raise DataError(f"--data {spec}: its classes {list(source.class_names)} are not the checkpoint's classes "
                        f"{list(meta.class_names)} (same names, same order required; --class_names names "
                        "plain integer labels)")
    return data.load_splits(source, image_size=meta.image_size, cache_dir=config.cache_dir, augment_splits=(),
                            skip_bad_images=config.skip_bad_images, resize_size=_eval_resize(meta))


def _top1(model, variables, view, images, batch_size: int, mesh) -> np.ndarray:
    """Top-1 classes of every example through the engine's evaluation forward, the network seeing
    the batch as ``view`` says (``kdjax.engine.step.network_view``)."""
    logits = evaluation.all_outputs(model, variables, images, batch_size, mesh=mesh, view=view).logits
    return np.argmax(distributed.to_host(logits), axis=-1)


def evaluate(config: EvalConfig, mesh=None) -> dict:
    """The evaluation record (what ``evaluation.json`` holds) of ``config``'s model on its split,
    batches split over ``mesh`` (default: every device)."""
    source = model_dir(config.checkpoint).absolute()
    meta = checkpoint.read_meta(source)
    dtype = _compute_dtype(config.dtype, meta)
    jnp_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    mesh = mesh or sharding.data_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    dataset = _load_split(config, meta)
    split = dataset[config.split]
    repl = sharding.replicated(mesh)
    # as training's validation: held views placed once on every device, or streamed batch by batch
    images = distributed.put_replicated(split.eval.images, repl) if dataset.in_memory else split
    labels = np.asarray(split.labels)
    num_classes = len(meta.class_names)
    # the teacher first: a teacher of other classes fails before anything runs
    teacher = None if config.teacher_file is None else teachers.load_teacher(config.teacher_file, dataset,
                                                                             config.teacher_arch)

    model, variables, _ = checkpoint.load_model(source, dtype=jnp_dtype, sharding=repl)
    view = step.network_view(meta.arch, meta.image_size, (meta.mean, meta.std))  # as the directory records
    predicted = _top1(model, variables, view, images, config.batch_size, mesh)
    confusion = confusion_matrix(labels, predicted, num_classes)
    correct = int(np.trace(confusion))
    record = {
        "checkpoint": str(source),
        "fingerprint": meta.fingerprint,
        "arch": meta.arch,
        "image_size": meta.image_size,
        "compute_dtype": dtype,
        "data_dir": str(dataset.root),
        "data": sources.data_spec(config.data, config.data_dir),
        "split": config.split,
        "data_fingerprint": dataset.fingerprint,
        "class_names": list(meta.class_names),
        "num_examples": int(labels.size),
        "correct": correct,
        "accuracy": correct / labels.size,
        "per_class": class_figures(confusion, meta.class_names),
        "confusion": confusion.tolist(),
        "teacher": None,
    }
    if teacher is not None:
        t_vars = distributed.put_replicated(teacher.variables, repl)
        # in the run's dtype and seeing the batch as in training (kdjax.engine.step.step_spec_for)
        t_view = step.network_view(teacher.arch, meta.image_size, teacher.normalization)
        t_predicted = _top1(teacher.model.clone(dtype=jnp_dtype), t_vars, t_view, images, config.batch_size, mesh)
        t_correct = int(np.sum(t_predicted == labels))
        agreements = int(np.sum(t_predicted == predicted))
        record["teacher"] = {
            "source": str(pathlib.Path(config.teacher_file).absolute()),
            "arch": teacher.arch,
            "fingerprint": teacher.fingerprint,
            "correct": t_correct,
            "accuracy": t_correct / labels.size,
            "agreements": agreements,
            "disagreements": int(labels.size) - agreements,
            "agreement": agreements / labels.size,
            # rows: the teacher's top-1 class, columns: the model's
            "agreement_matrix": confusion_matrix(t_predicted, predicted, num_classes).tolist(),
        }
    return record


# --------------------------------------------------------------------------- the report


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence], align: str) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    return lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]


def markdown(record: dict) -> str:
    """``evaluation.md``: the accuracy line, the per-class table and the confusion matrix."""
    n, names = record["num_examples"], record["class_names"]
    lines = [f"# Evaluation on {record['split']}", "",
             f"- model: `{record['checkpoint']}` ({record['arch']}, {record['fingerprint'][:19]}..., "
             f"{record['image_size']} px, {record['compute_dtype']})",
             f"- data: `{record['data_dir']}`, split {record['split']}, {n} examples",
             f"- **accuracy: {record['accuracy']:.4f} ({record['correct']}/{n})**"]
    t = record["teacher"]
    if t is not None:
        lines += [f"- teacher `{t['source']}` ({t['arch']}): accuracy {t['accuracy']:.4f} ({t['correct']}/{n}); "
                  f"top-1 agreement with the model {t['agreement']:.4f} ({t['disagreements']} of {n} differ)"]
    rows = [[c["class"], NOT_PREDICTED if c["precision"] is None else f"{c['precision']:.4f}",
             NOT_PREDICTED if c["recall"] is None else f"{c['recall']:.4f}", c["support"], c["predicted"]]
            for c in record["per_class"]]
    lines += ["", "## Per class", ""]
    lines += _table(["class", "precision", "recall", "support", "predicted"], rows, "lrrrr")
    if any(c["precision"] is None for c in record["per_class"]):
        lines += ["", f"Precision {NOT_PREDICTED}: the model never predicts the class (0/0; null in {JSON_FILE})."]
    lines += ["", "## Confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
    lines += _table(["true \\ predicted", *names], [[name, *row] for name, row in zip(names, record["confusion"])],
                    "l" + "r" * len(names))
    return "\n".join(lines) + "\n"


def plot_confusion(record: dict, path: pathlib.Path) -> pathlib.Path:
    """``confusion.png``: the confusion matrix as an image with the counts in the cells (up to
    ``ANNOTATE_MAX_CLASSES`` classes), written through a temporary file and a rename."""
    confusion = np.asarray(record["confusion"])
    names = record["class_names"]
    side = min(3.0 + 0.45 * len(names), 30.0)
    fig = report.agg_figure((side + 1.0, side))
    ax = fig.subplots()
    shown = ax.imshow(confusion, cmap="Blues", vmin=0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    slanted = len(names) > 4  # long lists of names would overlap
    ax.set_xticks(range(len(names)), names, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{record['split']}: accuracy {record['accuracy']:.4f} ({record['correct']}/{record['num_examples']})")
    if len(names) <= ANNOTATE_MAX_CLASSES:
        dark = confusion.max() / 2 if confusion.size else 0
        for (i, j), count in np.ndenumerate(confusion):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > dark else "black")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def default_out(record: dict) -> pathlib.Path:
    """``eval_<split>`` beside the model directory (for a run's ``best/``: inside the run)."""
    return pathlib.Path(record["checkpoint"]).parent / f"eval_{record['split']}"


def write_report(record: dict, out: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and ``confusion.png`` into ``out`` (created;
    default ``default_out``); returns their paths."""
    out = default_out(record) if out is None else pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / JSON_FILE, out / MARKDOWN_FILE]
    checkpoint.write_text_atomic(paths[0], json.dumps(record, indent=1) + "\n")
    checkpoint.write_text_atomic(paths[1], markdown(record))
    return paths + [plot_confusion(record, out / PLOT_FILE)]


def summary(record: dict) -> str:
    line = (f"{record['split']}: accuracy {record['accuracy']:.4f} ({record['correct']}/{record['num_examples']}) "
            f"of {record['checkpoint']}")
    t = record["teacher"]
    if t is not None:
        line += f"; teacher accuracy {t['accuracy']:.4f}, agreement {t['agreement']:.4f}"
    return line


class _CallableModule(type(sys)):
    """This module, callable: ``kdjax.evaluate(checkpoint=..., data=...)`` is
    ``kdjax.api.evaluate``, while ``kdjax.evaluate.evaluate(config)`` and the rest stay as they are."""

    def __call__(self, **flags):
        from kdjax import api

        return api.evaluate(**flags)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":  # ``python -m kdjax.evaluate``: the command lives in kdjax.cli.evaluate
    from kdjax.cli import evaluate as _command

    sys.exit(_command.main())
