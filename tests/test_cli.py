"""kdjax.cli.flags: the runtime settings shared by the training commands."""

from __future__ import annotations

import jax
import pytest

from kdjax.cli import flags as cli


@pytest.fixture
def restore_cache_dir():
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_compile_cache_goes_where_asked_or_is_off(tmp_path, restore_cache_dir):
    assert cli.enable_compile_cache("none") is None
    target = tmp_path / "xla"
    assert cli.enable_compile_cache(str(target)) == str(target)
    assert jax.config.jax_compilation_cache_dir == str(target) and target.is_dir()
    # without a flag, an already configured cache (JAX_COMPILATION_CACHE_DIR) is kept
    assert cli.enable_compile_cache(None) == str(target)


def test_default_cache_is_under_kdjax_cache(tmp_path, monkeypatch, restore_cache_dir):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path))
    assert cli.enable_compile_cache(None) == str(tmp_path / "jax")


def test_cpu_defaults_to_float32():
    assert not cli.accelerated()
    assert cli.default_dtype(None) == "float32"
    assert cli.default_dtype("bfloat16") == "bfloat16"


# ----------------------------------------------------------------------------- recipes


@pytest.fixture
def console_level():
    """Commands set the ``kdjax`` logger's level from --quiet/--verbose: put it back."""
    import logging

    logger = logging.getLogger("kdjax")
    before = logger.level
    yield logger
    logger.setLevel(before)


def _distill_args(argv):
    from kdjax.cli import distill

    parser = distill.build_parser()
    return parser, cli.parse(parser, argv, command="distill")


def test_a_written_recipe_reads_back_as_the_same_flags_and_the_command_line_wins(tmp_path, console_level):
    from kdjax.cli import recipe

    given = ["--alpha", "0", "0.5", "--loss", "kd", "--temperature", "2.5", "--init", "scratch", "--lr", "0.1",
             "--s_lr_step_size", "3", "--no_plots", "--data_dir", str(tmp_path / "a \"quoted\" dir"),
             "--out", str(tmp_path / "out"), "--verbose"]
    parser, args = _distill_args(given)
    written = recipe.resolved(args, parser, dtype="float32", image_size=112)
    assert "verbose" not in written and "coordinator_address" not in written and "config" not in written
    assert written["step_size"] == 3 and written["dtype"] == "float32" and written["image_size"] == 112
    path = recipe.write(tmp_path / "out", "distill", written)
    assert path == tmp_path / "out" / "recipe.toml"

    _, again = _distill_args(["--config", str(path)])
    assert recipe.resolved(again, parser) == written  # every value, types and all (0.1 stays 0.1)
    _, overridden = _distill_args(["--config", str(path), "--lr", "0.2", "--alpha", "1"])
    assert overridden.lr == 0.2 and overridden.alpha == [1.0] and overridden.temperature == 2.5


@pytest.mark.parametrize("text, message", [
    ("num_epoch = 3", "num_epoch is not a flag of `kdjax distill` (did you mean num_epochs?)"),
    ("lr = \"fast\"", "lr = 'fast' is not a valid float"),
    ("num_epochs = 2.5", "num_epochs = 2.5 must be an integer"),
    ("student_train = \"most\"", "student_train = 'most' is not one of fc, fc_frozen_bn, all"),
    ("no_plots = 1", "no_plots = 1 must be true or false"),
    ("command = \"teacher\"", "is a recipe of `kdjax teacher`, not of `kdjax distill`"),
    ("lr = ", "not valid TOML"),
])
def test_a_bad_recipe_stops_naming_the_file_and_the_key(tmp_path, capsys, text, message, console_level):
    path = tmp_path / "recipe.toml"
    path.write_text(text + "\n")
    with pytest.raises(SystemExit) as info:
        _distill_args(["--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_a_missing_recipe_says_so(tmp_path, capsys, console_level):
    with pytest.raises(SystemExit):
        _distill_args(["--config", str(tmp_path / "nope.toml")])
    assert f"--config {tmp_path / 'nope.toml'}: no such file" in capsys.readouterr().err


def test_quiet_silences_the_console_and_verbose_keeps_it(console_level, capsys):
    from kdjax import console

    cli.setup_logging("quiet")
    assert not console.enabled()
    console.line("epoch 1/1")
    assert capsys.readouterr().err == ""
    cli.setup_logging("verbose")
    assert console.enabled()
    console.line("epoch 1/1")
    assert capsys.readouterr().err == "epoch 1/1\n"


# ----------------------------------------------------------------------------- the kdjax command


def test_kdjax_lists_its_commands_and_refuses_an_unknown_one(capsys):
    import kdjax.cli

    assert kdjax.cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in ("distill", "teacher", "predict", "evaluate", "convert", "export"))
    assert kdjax.cli.main(["distil"]) == 2
    assert "unknown command 'distil'" in capsys.readouterr().err


def test_kdjax_commands_speak_under_their_own_name(tmp_path, capsys):
    import kdjax.cli

    assert kdjax.cli.main(["convert", "--arch", "resnet18", "--src", str(tmp_path / "no.pth"),
                           "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith(f"kdjax convert: error: {tmp_path / 'no.pth'}")
    assert kdjax.cli.main(["predict", "--checkpoint", str(tmp_path), "x.jpg"]) == 2
    assert capsys.readouterr().err.startswith("kdjax predict: error:")
    with pytest.raises(SystemExit):
        kdjax.cli.main(["distill", "--student_arch", "resnet7"])
    assert "usage: kdjax distill" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wheel_holds_kdjax_alone_and_its_console_script(tmp_path):
    import subprocess
    import sys
    import zipfile

    from conftest import REPO

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("kdjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"kdjax", wheel.name.split("-py3")[0] + ".dist-info"}
    assert {"kdjax/cli/distill.py", "kdjax/cli/teacher.py", "kdjax/evaluate.py"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kdjax = kdjax.cli:console_main" in entry_points


def test_the_installed_script_and_the_checkout_shims_start():
    """The console script pip installed beside this interpreter, and ``python -m
    experiments.paper`` from the repository root, reach their commands."""
    import pathlib
    import subprocess
    import sys

    from conftest import REPO

    script = pathlib.Path(sys.executable).parent / "kdjax"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("kdjax ")
    for module, usage in (("experiments.paper", "usage: python -m experiments.paper"),
                          ("experiments.teacher", "usage: python -m experiments.teacher")):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0 and done.stdout.startswith(usage) and "--config" in done.stdout, done.stderr
