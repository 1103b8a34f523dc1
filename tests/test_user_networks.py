"""Users' own networks (kdjax.models.user): a Linen module and an NNX one (through flax's bridge),
named ``MODULE:ATTRIBUTE`` on the command line or registered in Python, as teacher and student:
a feature loss on a named tap, vectorised runs, resume, the head modes, evaluate, predict, and
the errors (an unimportable module named by a meta.json, a head or tap that is not there, export).
The networks are tests/fixtures/user_nets.py."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.cli
from conftest import REPO, make_image_folder, read_history, read_metrics
from kdjax import checkpoint, models

FIXTURES = pathlib.Path(__file__).with_name("fixtures")


@pytest.fixture
def user_nets(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    yield
    for name in [n for n in models.ARCHS if n.startswith("user_nets:")]:
        del models.ARCHS[name]
    sys.modules.pop("user_nets", None)


def _main(*argv) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return kdjax.cli.main([str(a) for a in argv])


def test_linen_and_nnx_networks_of_ones_own_train_resume_evaluate_and_predict(user_nets, tmp_path, capsys, monkeypatch):
    images = make_image_folder(tmp_path / "images", {"train": {"a": 6, "b": 6}, "val": {"a": 3, "b": 3}})
    common = ["--data_dir", images, "--image_size", 32, "--batch_size", 4, "--cache_dir", tmp_path / "cache",
              "--init", "scratch", "--quiet"]
    assert _main("teacher", "--arch", "user_nets:teacher", "--num_epochs", 1, "--out", tmp_path / "teacher",
                 *common) == 0
    assert json.loads((tmp_path / "teacher" / "best" / "meta.json").read_text())["arch"] == "user_nets:teacher"

    # a Linen student, whole, FitNet on its named tap, two runs vectorised; the same command again resumes
    study = ["distill", "--student_arch", "user_nets:student", "--teacher_file", tmp_path / "teacher",
             "--student_train", "all", "--loss", "ce:1", "fitnet:1", "--fitnet_pairs", "stride2:stride2",
             "--n_exp", 2, "--vectorize", "on", "--num_epochs", 2, "--out", tmp_path / "linen", "--no_plots", *common]
    assert _main(*study) == 0
    runs = sorted((tmp_path / "linen").glob("alpha_*/run_*"))
    first = [read_history(r) for r in runs]
    assert len(runs) == 2 and [len(h) for h in first] == [2, 2]
    assert all(h[-1]["train"]["fitnet"] > 0 and h[-1]["val"]["fitnet"] > 0 for h in first)
    assert first[0][-1]["train"]["loss"] != first[1][-1]["train"]["loss"]  # two seeds
    assert _main(*study) == 0
    assert [read_history(r) for r in runs] == first  # restored from its checkpoints, nothing retrained

    # an NNX student (BatchNorm statistics, dropout), its head only
    assert _main("distill", "--student_arch", "user_nets:nnx_student", "--teacher_file", tmp_path / "teacher",
                 "--student_train", "fc", "--alpha", 0.5, "--n_exp", 1, "--num_epochs", 1, "--out", tmp_path / "nnx",
                 "--no_plots", *common) == 0
    run = tmp_path / "nnx" / "alpha_0.5" / "run_0"
    _, variables, meta = checkpoint.load_model(run / "best")
    assert meta.arch == "user_nets:nnx_student" and set(variables["params"]) == {"conv", "bn", "head"}
    assert _main("evaluate", "--checkpoint", run, "--data_dir", images, "--out", tmp_path / "eval",
                 "--cache_dir", tmp_path / "cache") == 0
    record = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert record["correct"] == round(read_metrics(run)["best_val_acc"] * 6)
    capsys.readouterr()
    image = next((images / "val" / "a").iterdir())
    assert kdjax.cli.main(["predict", "--checkpoint", str(run / "best"), str(image)]) == 0
    probs = json.loads(capsys.readouterr().out.splitlines()[-1])["probs"]
    assert set(probs) == {"a", "b"} and abs(sum(probs.values()) - 1) < 1e-5

    # export is for kdjax's own architectures
    assert kdjax.cli.main(["export", "--checkpoint", str(tmp_path / "teacher" / "best"),
                           "--out", str(tmp_path / "t.pth")]) == 2
    assert "'user_nets:teacher' is a network of your own" in capsys.readouterr().err

    # elsewhere, without the module: the model directory names what to make importable
    del models.ARCHS["user_nets:teacher"]
    sys.modules.pop("user_nets")
    # other test modules put the fixtures on the path as they are collected: take every entry off
    monkeypatch.setattr(sys, "path", [p for p in sys.path if str(p) != str(FIXTURES)])
    with pytest.raises(checkpoint.ModelDirError, match=r"its module 'user_nets' cannot be imported here .*PYTHONPATH"):
        checkpoint.load_model(tmp_path / "teacher" / "best")


class _Headless(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes, name="out")(x.mean((1, 2)))


class _Features(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Conv(self.num_classes, (3, 3), name="out")(x)  # a map, not pooled logits


def test_register_from_module_and_their_errors():
    with pytest.raises(ValueError, match="'resnet18' is one of kdjax's own architectures"):
        models.register("resnet18", models.UserSpec(_Headless))
    name = models.from_module(_Headless(5), taps={"pool": "nowhere"})
    try:
        model = models.create_model(name, 3)  # num_classes set per task
        variables = models.init_variables(model, jax.random.key(0), 8)
        assert variables["params"]["out"]["kernel"].shape == (3, 3)
        with pytest.raises(ValueError, match=r"names no classifier head \(UserSpec.head\).*--student_train all"):
            models.head_params(name, variables["params"])
        with pytest.raises(ValueError, match=r"taps \['pool'\] of this network were not produced: no submodule at "
                                             r"\['nowhere'\]"):
            model.apply(variables, jnp.zeros((1, 8, 8, 3)), taps=True)
        np.testing.assert_allclose(model.apply(variables, jnp.ones((2, 8, 8, 3))),
                                   _Headless(3).apply(variables, jnp.ones((2, 8, 8, 3))))  # its own variables
    finally:
        del models.ARCHS[name]
    name = models.from_module(_Features(5), head="fc")
    try:
        with pytest.raises(ValueError, match=r"_Features returned shape \(1, 8, 8, 3\), not \[batch, num_classes\] = "
                                             r"\[1, 3\] logits"):
            models.init_variables(models.create_model(name, 3), jax.random.key(0), 8)
        with pytest.raises(ValueError, match=r"its head 'fc' \(UserSpec.head\) is not a top-level entry of its "
                                             r"params, which holds \['out'\]"):
            models.head_params(name, {"out": {}})
    finally:
        del models.ARCHS[name]
    with pytest.raises(ValueError, match=r"network 'kdjax_no_such_pkg:build': its module 'kdjax_no_such_pkg' cannot "
                                         r"be imported here"):
        models.get("kdjax_no_such_pkg:build")
    with pytest.raises(ValueError, match=r"module 'json' has no attribute 'nope'"):
        models.get("json:nope")
    with pytest.raises(ValueError, match=r"calling dumps\(\) failed"):
        models.get("json:dumps")
    with pytest.raises(ValueError, match=r"__name__ is str, not a kdjax.models.UserSpec"):
        models.get("json:__name__")


@pytest.mark.parametrize("teacher_arch, student_arch", [("resnet8", "user_nets:student"),
                                                         ("user_nets:nnx_student", "resnet8")])
def test_registered_and_own_networks_teach_each_other_and_resume_exactly(user_nets, tmp_path, teacher_arch,
                                                                         student_arch):
    """A registered teacher (a CIFAR ResNet) of the Linen network, and the NNX network (BatchNorm,
    dropout) as teacher of a registered student, each trained whole: finite figures, and a run
    interrupted after its first epoch resumes to the uninterrupted run's metrics exactly."""
    from kdjax import data, engine
    from kdjax.config import DistillConfig, TrainConfig

    images = make_image_folder(tmp_path / "images", {"train": {"a": 5, "b": 5}, "val": {"a": 2, "b": 2}})
    dataset = data.load_splits(images, image_size=32, cache_dir=tmp_path / "cache")
    t_vars = models.init_variables(models.create_model(teacher_arch, 2), jax.random.key(1), 32)
    teacher = engine.teachers.from_variables(teacher_arch, t_vars)
    config = TrainConfig(distill=DistillConfig(alpha=0.5, student_train="all"), num_epochs=3, batch_size=4,
                         image_size=32)

    def student():
        return models.init_variables(models.create_model(student_arch, 2), jax.random.key(0), 32)

    def train(workdir, on_epoch=None):
        return engine.train_and_evaluate(engine.Run(config, workdir, student()), dataset, student_arch=student_arch,
                                         teacher=teacher, on_epoch=on_epoch)

    class Stop(Exception):
        pass

    def stop(record):
        if record["epoch"] == 1:
            raise Stop

    train(tmp_path / "whole")
    whole = read_history(tmp_path / "whole")
    assert len(whole) == 3 and all(np.isfinite(e["train"]["loss"]) and np.isfinite(e["val"]["loss"]) for e in whole)
    with pytest.raises(Stop):
        train(tmp_path / "cut", stop)
    train(tmp_path / "cut")
    assert read_history(tmp_path / "cut") == whole


def _library_blocks(**substitutions) -> list[str]:
    """The README's "As a library" code blocks, with its placeholder paths and sizes replaced."""
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index("### As a library"):text.index("### In your own training loop")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "README's 'As a library' holds the study call and the engine block"
    for old, replacement in substitutions.items():
        assert any(old in b for b in blocks), f"README's 'As a library' no longer says {old!r}"
        blocks = [b.replace(old, replacement) for b in blocks]
    return blocks


def test_the_readme_library_calls_run_the_commands_code_path(user_nets, tmp_path):
    """README's "As a library" blocks, run as written but for the placeholders (a generated
    folder, a teacher of the test's own variables, a small network registered in Python as the
    student, 32 px, one epoch, no ImageNet download): ``kdjax.distill(...)`` gives the runs the
    command line gives, ``kdjax.evaluate(...)`` scores one, the engine block trains a run; bad
    keywords raise."""
    import user_nets as nets

    import kdjax

    models.register("my_student", nets.small(4))
    try:
        images = make_image_folder(tmp_path / "images", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
        teacher = models.init_variables(models.create_model("user_nets:teacher", 2), jax.random.key(0), 32)
        checkpoint.save_model(tmp_path / "teacher", teacher, arch="user_nets:teacher", class_names=["a", "b"],
                              image_size=32, provenance={"note": "a test's own variables"})
        cache = f"cache_dir={str(tmp_path / 'cache')!r}"
        small = f"image_size=32, batch_size=4, {cache}"
        study_block, engine_block = _library_blocks(**{
            '"path/to/imagefolder"': repr(str(images)), '"models/teacher"': repr(str(tmp_path / "teacher")),
            '"runs/x"': repr(str(tmp_path / "api")), '"runs/mine"': repr(str(tmp_path / "engine")),
            '"resnet18"': '"my_student"',
            "num_epochs=30": f"num_epochs=1, warmup_epochs=0, {small}, init='scratch', quiet=True, no_plots=True",
            '"val")': f'"val", {cache})', "image_size=224": f"image_size=32, {cache}",
            '"imagenet"': '"scratch"', "TrainConfig(": "TrainConfig(num_epochs=1, batch_size=4, image_size=32, ",
        })
        namespace: dict = {}
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(study_block, "README.md (As a library)", "exec"), namespace)
            assert kdjax.cli.main(["distill", "--data_dir", str(images), "--teacher_file", str(tmp_path / "teacher"),
                                   "--student_arch", "my_student", "--out", str(tmp_path / "cli"), "--recipe",
                                   "timm_kd", "--n_exp", "2", "--image_size", "32",
                                   "--batch_size", "4", "--num_epochs", "1", "--warmup_epochs", "0", "--cache_dir",
                                   str(tmp_path / "cache"), "--init", "scratch", "--quiet", "--no_plots"]) == 0
        study, record = namespace["study"], namespace["record"]
        assert [r.path.name for r in study.runs] == ["run_0", "run_1"] and study.summary
        assert all(f"{r.path} {r.metrics['best_val_acc']}" in printed.getvalue() for r in study.runs)
        assert [read_history(r.path) for r in study.runs] == [
            read_history(p) for p in sorted((tmp_path / "cli").glob("alpha_*/run_*"))]
        assert record["num_examples"] == 4 and record["correct"] == round(study.runs[0].metrics["best_val_acc"] * 4)

        exec(compile(engine_block, "README.md (As a library, the engine)", "exec"), namespace)
        assert np.isfinite(read_metrics(tmp_path / "engine")["best_val_acc"])

        with pytest.raises(ValueError, match=r"no flag --num_epoch \(did you mean num_epochs\?\)"):
            kdjax.distill(data=images, out=tmp_path / "bad", num_epoch=3)
        with pytest.raises(ValueError, match=r"--student_train.*invalid choice: 'everything'"):
            kdjax.distill(data=images, out=tmp_path / "bad", student_train="everything")
    finally:
        del models.ARCHS["my_student"]


def test_the_readme_network_module_registers_as_written(tmp_path, monkeypatch):
    """README's "Your own networks" block, saved as the my_nets.py it says it is, names a network
    that builds, initialises and reads its tap."""
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Your own networks (Linen or NNX)"):]
    (tmp_path / "my_nets.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = models.create_model("my_nets:student", 3)
        variables = models.init_variables(model, jax.random.key(0), 32)
        logits, taps = model.apply(variables, jnp.ones((2, 32, 32, 3)), taps=True)
        assert logits.shape == (2, 3) and taps["stride2"].shape == (2, 16, 16, 64)
        assert models.head_params("my_nets:student", variables["params"])["head"]["kernel"].shape == (64, 3)
    finally:
        models.ARCHS.pop("my_nets:student", None)
        sys.modules.pop("my_nets", None)
