"""Summaries of runs: the seed's table, an honest table and plots (TensorBoard events written as
epochs end are ``kdjax.events``).

Inputs are run histories grouped by alpha, ``{alpha: [history, ...]}`` with runs in order; a
history is the list of per-epoch records that ``kdjax.engine`` writes::

    {"epoch": 1, "lr": 0.001, "train": {"loss", "acc", "ce", <each term of the loss>},
     "val": {"loss", "acc", "ce", <each term>, "teacher_acc", "diff_t_s", "agreement", "kl_t_s"},
     "seconds": 12.3}

(supervised runs have no teacher keys). Tables are pure functions returning plain Python
floats; ``write_summary`` and ``plot_curves`` write only under the paths they are given, so the
caller decides which process writes (process 0 when multi-host). matplotlib and scipy are
imported only inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from kdjax import checkpoint

Record = Mapping[str, Any]
History = Sequence[Record]
RunsByAlpha = Mapping[float, Sequence[History]]

# The seed's four figure names and the val key each one is read from.
SEED_FIGURES: tuple[tuple[str, str], ...] = (
    ("epoch_loss_l", "loss"),
    ("epoch_acc_l", "acc"),
    ("epoch_acc_teacher_l", "teacher_acc"),
    ("diff_t_s", "diff_t_s"),
)

# The seed's published table (SEED.md, "Experiment"), verbatim: mean +/- std pooled over all
# epochs of all runs. Kept as strings so the comparison shows exactly what was printed.
PUBLISHED_TABLE: dict[float, dict[str, str]] = {
    0.0: {
        "epoch_loss_l": "1.481328 +/- 0.585938",
        "epoch_acc_l": "0.945359 +/- 0.028460",
        "epoch_acc_teacher_l": "0.934641 +/- 0.0",
        "diff_t_s": "0.964709 +/- 0.226756",
    },
    0.5: {
        "epoch_loss_l": "0.823943 +/- 0.292539",
        "epoch_acc_l": "0.946863 +/- 0.018432",
        "epoch_acc_teacher_l": "0.934641 +/- 0.0",
        "diff_t_s": "0.957835 +/- 0.192383",
    },
    1.0: {
        "epoch_loss_l": "0.225731 +/- 0.090253",
        "epoch_acc_l": "0.941242 +/- 0.058033",
        "epoch_acc_teacher_l": "0.934641 +/- 0.0",
        "diff_t_s": "1.337674 +/- 0.274519",
    },
}

DIFF_T_S_NOTE = (
    "diff_t_s is the mean |teacher - student| logit difference; kdjax takes it over the whole "
    "validation set, the seed took it over its last (shuffled, partial) validation batch only."
)
SEED_TABLE_NOTE = (
    "Computed the seed's way: for each alpha, mean +/- sample standard deviation (ddof=1) of each "
    "val-phase figure pooled over all epochs of all runs. Epochs of one run are correlated and "
    "include the untrained first epochs, so the +/- is neither run-to-run spread nor an error bar."
)
HONEST_NOTE = (
    "Honest: the unit of replication is the run. Per run, the final-epoch val accuracy and the "
    "best val accuracy over epochs; then mean +/- sample std over runs and a 95% confidence "
    "interval for the mean, mean +/- t(0.975, n-1) * std / sqrt(n) (Student t, n-1 degrees of "
    "freedom; n/a with a single run; not clipped to [0, 1], so with few runs near 100% it can "
    "pass 1). The best epoch is chosen on the same validation images it "
    "is scored on, so best val accuracy is optimistically biased; the final accuracy is not "
    "selected. Accuracies move in steps of one validation image."
)
TEST_NOTE = (
    "Test: the data has a held-out test split. Each run's model is selected on val (its best "
    "epoch, as above) and scored once on test, which selection never saw: test acc is the "
    "unbiased figure of the selected model."
)


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` with the sample std (ddof=1); std is None when n < 2."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    return {
        "mean": float(np.mean(x)) if n else None,
        "std": float(np.std(x, ddof=1)) if n >= 2 else None,
        "n": n,
    }


def _ci95(values: Sequence[float]) -> list[float] | None:
    """``mean +/- t_{0.975, n-1} * s / sqrt(n)``; None for n < 2 (no spread to estimate)."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n < 2:
        return None
    from scipy import stats  # lazy: only the honest table needs it, and it is slow to import

    half = float(stats.t.ppf(0.975, n - 1)) * float(np.std(x, ddof=1)) / math.sqrt(n)
    mean = float(np.mean(x))
    return [mean - half, mean + half]


def _check(runs_by_alpha: RunsByAlpha) -> list[float]:
    if not runs_by_alpha:
        raise ValueError("runs_by_alpha is empty: no alpha has any run")
    for alpha, runs in runs_by_alpha.items():
        if not runs:
            raise ValueError(f"alpha {alpha:g} has no runs")
        for i, history in enumerate(runs):
            if not history:
                raise ValueError(f"alpha {alpha:g} run {i + 1} has an empty history (no epoch finished)")
    return sorted(runs_by_alpha)


def alpha_label(alpha: float) -> str:
    """The seed's spelling of an alpha: 0, 0.5, 1."""
    return f"{float(alpha):g}"


def seed_table(runs_by_alpha: RunsByAlpha) -> list[dict[str, Any]]:
    """The seed's table: one row per alpha (ascending).

    For figure ``f`` (``epoch_loss_l`` = val.loss, ``epoch_acc_l`` = val.acc,
    ``epoch_acc_teacher_l`` = val.teacher_acc, ``diff_t_s`` = val.diff_t_s) and the pooled values
    ``x_1..x_N`` over all epochs of all runs: ``mean = sum x / N`` and
    ``std = sqrt(sum (x - mean)^2 / (N - 1))``. Row:
    ``{"alpha", "n_runs", "n_values", f: {"mean", "std", "n"} | None}``; a figure absent from
    the records (supervised runs have no teacher) is None, a std with N < 2 is None.
    """
    rows = []
    for alpha in _check(runs_by_alpha):
        records = [r for history in runs_by_alpha[alpha] for r in history]
        row: dict[str, Any] = {
            "alpha": float(alpha),
            "n_runs": len(runs_by_alpha[alpha]),
            "n_values": len(records),
        }
        for name, key in SEED_FIGURES:
            values = [r["val"][key] for r in records if key in r["val"]]
            row[name] = _stats(values) if values else None
        rows.append(row)
    return rows


def run_numbers(history: History, num_val: int, test: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One run's figures: final and best val accuracy (with image counts), best epoch, extras,
    and with ``test`` (``kdjax.engine.store.score_selected``'s record) the selected model's test accuracy.

    The best epoch is the first epoch reaching the maximum (as the engine selects it).
    """
    val_acc = [float(r["val"]["acc"]) for r in history]
    best_i = int(np.argmax(val_acc))  # argmax returns the first maximum
    last = history[-1]["val"]
    out: dict[str, Any] = {
        "epochs": len(history),
        "final_acc": val_acc[-1],
        "final_correct": int(round(val_acc[-1] * num_val)),
        "best_acc": val_acc[best_i],
        "best_correct": int(round(val_acc[best_i] * num_val)),
        "best_epoch": int(history[best_i]["epoch"]),
        "final_loss": float(last["loss"]),
    }
    for key in ("teacher_acc", "diff_t_s", "agreement", "kl_t_s"):
        if key in last:
            out[f"final_{key}"] = float(last[key])
    out["seconds"] = float(sum(float(r.get("seconds", 0.0)) for r in history))
    if test is not None:
        out.update(test_acc=float(test["acc"]), test_correct=int(test["correct"]), num_test=int(test["num_test"]))
    return out


def honest_table(runs_by_alpha: RunsByAlpha, num_val: int,
                 tests_by_alpha: Mapping[float, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """Run-level accuracy per alpha with 95% intervals, and the val-set resolution; with
    ``tests_by_alpha`` (each run's test record, in run order) also the selected models' test
    accuracy (``test_acc``, same statistics).

    For each alpha with n runs and per-run values ``a_1..a_n`` (final, resp. best, val
    accuracy): ``mean``, sample ``std`` (ddof=1) and ``ci95 = mean +/- t_{0.975,n-1} s/sqrt(n)``
    (both None when n = 1). Resolution: one image is ``100 / num_val`` percentage points.
    Returns ``{"num_val", "points_per_image", "acc_per_image", "rows": [{"alpha", "n_runs",
    "final_acc": {"mean","std","n","ci95"}, "best_acc": {...}, "runs": [run_numbers...]}]}``.
    """
    if num_val < 1:
        raise ValueError(f"num_val (validation set size) must be >= 1, got {num_val}")
    rows = []
    for alpha in _check(runs_by_alpha):
        tests = (tests_by_alpha or {}).get(alpha) or [None] * len(runs_by_alpha[alpha])
        runs = [run_numbers(h, num_val, t) for h, t in zip(runs_by_alpha[alpha], tests)]
        row: dict[str, Any] = {"alpha": float(alpha), "n_runs": len(runs)}
        keys = ("final_acc", "best_acc", "test_acc") if all(t is not None for t in tests) else ("final_acc", "best_acc")
        for key in keys:
            values = [r[key] for r in runs]
            row[key] = {**_stats(values), "ci95": _ci95(values)}
        row["runs"] = [{"run": i + 1, **r} for i, r in enumerate(runs)]
        rows.append(row)
    table = {
        "num_val": int(num_val),
        "points_per_image": 100.0 / num_val,
        "acc_per_image": 1.0 / num_val,
        "rows": rows,
    }
    if rows and all("test_acc" in r for r in rows):
        table["num_test"] = rows[0]["runs"][0]["num_test"]
    return table


# --------------------------------------------------------------------------- markdown


def _pm(stat: Mapping[str, Any] | None) -> str:
    if stat is None or stat["mean"] is None:
        return "n/a"
    std = "n/a" if stat["std"] is None else f"{stat['std']:.6f}"
    return f"{stat['mean']:.6f} +/- {std}"


def _ci(stat: Mapping[str, Any]) -> str:
    ci = stat.get("ci95")
    return "n/a (1 run)" if ci is None else f"[{ci[0]:.6f}, {ci[1]:.6f}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_seed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``seed_table`` rows as the seed's markdown table (6 decimals, ``mean +/- std``)."""
    header = ["alpha", "runs", *(name for name, _ in SEED_FIGURES)]
    body = [
        [alpha_label(r["alpha"]), str(r["n_runs"]), *(_pm(r[name]) for name, _ in SEED_FIGURES)]
        for r in rows
    ]
    return _md_table(header, body)


def format_published_table(alphas: Sequence[float] | None = None) -> str:
    """The seed's published figures (SEED.md), optionally only for ``alphas``."""
    keep = sorted(PUBLISHED_TABLE) if alphas is None else [a for a in sorted(PUBLISHED_TABLE) if a in alphas]
    header = ["alpha", *(name for name, _ in SEED_FIGURES)]
    body = [[alpha_label(a), *(PUBLISHED_TABLE[a][name] for name, _ in SEED_FIGURES)] for a in keep]
    return _md_table(header, body)


def format_honest_table(table: Mapping[str, Any]) -> str:
    """``honest_table`` as two markdown tables: per alpha, then per run (with a test column
    when the table has test accuracies)."""
    has_test = "num_test" in table
    test_head = ["test acc (selected on val)", "95% CI"] if has_test else []
    summary = _md_table(
        ["alpha", "runs", "final val acc", "95% CI", "best val acc", "95% CI", *test_head],
        [
            [
                alpha_label(r["alpha"]), str(r["n_runs"]),
                _pm(r["final_acc"]), _ci(r["final_acc"]), _pm(r["best_acc"]), _ci(r["best_acc"]),
                *([_pm(r["test_acc"]), _ci(r["test_acc"])] if has_test else []),
            ]
            for r in table["rows"]
        ],
    )
    n = table["num_val"]
    per_run = _md_table(
        ["alpha", "run", "epochs", "final val acc", "best val acc", "best epoch", *(["test acc"] if has_test else [])],
        [
            [
                alpha_label(r["alpha"]), str(run["run"]), str(run["epochs"]),
                f"{run['final_acc']:.6f} ({run['final_correct']}/{n})",
                f"{run['best_acc']:.6f} ({run['best_correct']}/{n})",
                str(run["best_epoch"]),
                *([f"{run['test_acc']:.6f} ({run['test_correct']}/{run['num_test']})"] if has_test else []),
            ]
            for r in table["rows"]
            for run in r["runs"]
        ],
    )
    return summary + "\n\n" + per_run


def resolution_line(num_val: int) -> str:
    """E.g. ``1 image = 0.65 points of accuracy (153 validation images)``."""
    return f"1 image = {100.0 / num_val:.2f} points of accuracy ({num_val} validation images)"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The ``summary.md`` text for a ``write_summary`` dictionary."""
    honest = summary["honest_table"]
    parts = [
        "# kdjax distillation summary",
        "## The seed's table (kdjax runs)",
        SEED_TABLE_NOTE + " " + DIFF_T_S_NOTE,
        format_seed_table(summary["seed_table"]),
    ]
    if summary.get("published") is not None:
        parts += [
            "## The seed's published figures (for comparison, not computed here)",
            "Published by the reference (PyTorch), as printed there; its diff_t_s is from its "
            "last validation batch.",
            format_published_table(),
        ]
    test_note = f" {TEST_NOTE} ({honest['num_test']} test images.)" if "num_test" in honest else ""
    parts += [
        "## Honest table",
        HONEST_NOTE + f" Resolution: {resolution_line(honest['num_val'])}." + test_note,
        format_honest_table(honest),
    ]
    extra = summary.get("extra") or {}
    if extra:
        parts += ["## Run", "\n".join(f"- {k}: {v}" for k, v in extra.items())]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- files


def write_summary(
    out_dir: str | os.PathLike,
    runs_by_alpha: RunsByAlpha,
    num_val: int,
    seed_reference: bool = True,
    extra: Mapping[str, Any] | None = None,
    tests_by_alpha: Mapping[float, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/summary.json`` and ``out_dir/summary.md``; return the JSON dictionary.

    JSON keys: ``seed_table`` (``seed_table`` rows), ``honest_table`` (``honest_table``, with
    per-run numbers), ``published`` (the seed's published strings, or None without
    ``seed_reference``), ``notes`` and ``extra`` (caller's metadata, e.g. command, machine,
    wall time; must be JSON-serialisable).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "seed_table": seed_table(runs_by_alpha),
        "honest_table": honest_table(runs_by_alpha, num_val, tests_by_alpha),
        "published": (
            [{"alpha": a, **PUBLISHED_TABLE[a]} for a in sorted(PUBLISHED_TABLE)] if seed_reference else None
        ),
        "notes": {"seed_table": SEED_TABLE_NOTE, "diff_t_s": DIFF_T_S_NOTE, "honest_table": HONEST_NOTE,
                  **({"test": TEST_NOTE} if tests_by_alpha else {})},
        "extra": dict(extra or {}),
    }
    checkpoint.write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    checkpoint.write_text_atomic(out / "summary.md", summary_markdown(summary))
    return summary


# --------------------------------------------------------------------------- plots

# (file stem, val key, y label, train curves too) of the seed's three figures. The loss figure
# draws the train loss beside the val loss (dashed, in each run's colour), so that a gap between
# them (over- or under-fitting) shows; the file keeps the seed's name.
PLOTS: tuple[tuple[str, str, str, bool], ...] = (
    ("val_loss", "loss", "loss", True),
    ("val_acc", "acc", "val accuracy", False),
    ("diff_t_s", "diff_t_s", "mean |teacher - student| logit", False),
)
ZOOM_EPOCHS = 15


def curves(runs: Sequence[History], key: str,
           phase: str = "val") -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """Per-run ``(epochs, values)`` of ``record[phase][key]`` and the mean over runs at each epoch.

    The mean at epoch e is over the runs that reached e (an unfinished run only shortens it).
    """
    per_run = []
    for h in runs:
        pts = [(int(r["epoch"]), float(r[phase][key])) for r in h if key in r.get(phase, {})]
        e, v = (np.array(x) for x in zip(*pts)) if pts else (np.array([], int), np.array([]))
        per_run.append((e, v))
    epochs = np.array(sorted({int(x) for e, _ in per_run for x in e}), dtype=int)
    mean = np.array([np.mean([v[e == ep][0] for e, v in per_run if ep in e]) for ep in epochs])
    return per_run, epochs, mean


_PRELOAD: list = []


def preload_plotting() -> None:
    """Import matplotlib's Agg figure on a background thread, so that the plots at the end of a
    study find it loaded: its import is most of a figure's cost and would otherwise add to the
    study's time after its last epoch (benchmarks/README.md, start-up). ``agg_figure``'s own import
    waits for it on Python's import lock; an import error surfaces there, in the usual words."""
    import threading

    def load():
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except ImportError:
            pass

    if not _PRELOAD:
        thread = threading.Thread(target=load, name="kdjax-preload-matplotlib", daemon=True)
        thread.start()
        _PRELOAD.append(thread)


def agg_figure(figsize: tuple[float, float]):
    """A matplotlib ``Figure`` on the Agg canvas directly: no pyplot global state, no GUI backend
    selection (kdjax's figures: these curves, ``kdjax.evaluate``'s confusion matrix)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("kdjax's figures need matplotlib (a kdjax dependency): pip install matplotlib") from e
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def curve_figure(alpha: float, runs: Sequence[History], stem: str):
    """The figure ``plot_curves`` saves as ``alpha<a>_<stem>.png`` (a matplotlib ``Figure`` on the
    Agg canvas), or None when no record holds its key.

    Whole run on the left, the last 15 epochs (all, if fewer) on the right. The val curves: one
    thin line per run (labelled ``run <i>``) and the mean over runs in bold black (``val
    mean``). The loss figure adds the train loss dashed: each run's in its val colour, the mean
    bold black (``train mean``). The accuracy figure adds the teacher's val accuracy (grey,
    dashed) when recorded.
    """
    [(key, ylabel, with_train)] = [(k, y, t) for s, k, y, t in PLOTS if s == stem]
    per_run, epochs, mean = curves(runs, key)
    if epochs.size == 0:
        return None
    train = curves(runs, key, "train") if with_train else None
    fig = agg_figure((11, 4))
    first_zoom = epochs[max(0, epochs.size - ZOOM_EPOCHS)]
    what = f"val {ylabel} and train {ylabel} (dashed)" if with_train else ylabel
    for ax, lo, title in zip(
        fig.subplots(1, 2),
        (epochs[0], first_zoom),
        (f"alpha = {alpha_label(alpha)}: {what}", f"last {min(ZOOM_EPOCHS, epochs.size)} epochs"),
    ):
        for i, (e, v) in enumerate(per_run):
            sel = e >= lo
            ax.plot(e[sel], v[sel], color=f"C{i % 10}", lw=1, alpha=0.6, marker=".", label=f"run {i + 1}")
        sel = epochs >= lo
        ax.plot(epochs[sel], mean[sel], color="black", lw=2.2, label="val mean" if with_train else "mean")
        if train is not None:
            t_runs, t_epochs, t_mean = train
            for i, (e, v) in enumerate(t_runs):
                sel = e >= lo
                ax.plot(e[sel], v[sel], color=f"C{i % 10}", lw=1, alpha=0.6, ls="--", label="_nolegend_")
            sel = t_epochs >= lo
            ax.plot(t_epochs[sel], t_mean[sel], color="black", lw=2.2, ls="--", label="train mean")
        if key == "acc":
            _, t_epochs, t_mean = curves(runs, "teacher_acc")
            if t_epochs.size:
                ts = t_epochs >= lo
                ax.plot(t_epochs[ts], t_mean[ts], color="grey", ls="--", lw=1.2, label="teacher")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    # fixed margins: tight_layout measures every text and took half of the drawing time
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.13, top=0.92, wspace=0.22)
    return fig


def plot_curves(out_dir: str | os.PathLike, runs_by_alpha: RunsByAlpha) -> list[pathlib.Path]:
    """PNG figures like the seed's: ``alpha<a>_<val_loss|val_acc|diff_t_s>.png`` in ``out_dir``
    (``curve_figure``; ``val_loss`` also draws the train loss). Figures whose key no record holds
    are skipped."""
    agg_figure((1, 1))  # no matplotlib: stop before any directory is made
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for alpha in _check(runs_by_alpha):
        for stem, *_ in PLOTS:
            fig = curve_figure(alpha, runs_by_alpha[alpha], stem)
            if fig is None:
                continue
            path = out / f"alpha{alpha_label(alpha)}_{stem}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
    return written
