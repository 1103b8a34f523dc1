"""benchmarks.run: the runner's records and ratios (shape only; speed is never asserted).

Cheap by design: 32 px images, a batch of 2, no warm-up and one round.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmarks import run  # noqa: E402

CASE = run.Case(mode="fc", image_size=32, batch=2, threads=1)
KEYS = {"name", "framework", "variant", "image_size", "batch", "median_s", "images_per_s",
        "rounds", "load_avg"}


@pytest.fixture(scope="module")
def records():
    return run.measure_step(CASE, rounds=1, warmup=0)


def test_step_records_have_the_documented_keys(records):
    for r in records:
        assert KEYS <= set(r), r
        json.dumps(r)  # JSON-ready
        assert r["image_size"] == 32 and r["batch"] == 2
    steps = [r for r in records if r["name"] == "train_step"]
    assert {(r["framework"], r["variant"]) for r in steps} == {
        ("kdjax", "jit"), ("torch", "clean"), ("torch", "seed_as_executed")
    }
    for r in steps:
        assert r["rounds"] == 1 and len(r["load_avg"]) == 1 and r["median_s"] > 0
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])


def test_compile_time_is_recorded_in_two_phases(records):
    phases = {r["variant"]: r for r in records if r["name"] == "compile"}
    assert set(phases) == {"lower", "compile"}
    assert all(r["median_s"] > 0 and r["images_per_s"] is None for r in phases.values())


def test_ratios_divide_kdjax_by_each_reference_variant(records):
    out = run.ratios(records)
    assert {r["variant"] for r in out} == {"clean", "seed_as_executed"}
    for r in out:
        assert r["ratio"] == pytest.approx(r["kdjax_images_per_s"] / r["torch_images_per_s"])
    table = run.markdown_table(records)
    assert table.count("| train_step |") == 2 and "compile" in table


def test_quick_plan_is_one_small_step_case():
    steps, epochs = run.plan(quick=True, torch_device="cpu", threads=2)
    assert [(c.mode, c.image_size, c.batch) for c in steps] == [("fc", 112, 32)] and epochs == []
