"""benchmarks.run: the runner's records, ratios and plan (shape only; speed is never asserted).

Cheap by design: 32 px images, a batch of 2 (steps) or 4 (an epoch, and a protocol of 2 alphas x
1 run x 1 epoch, on a generated image folder), no warm-up and one round.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmarks import run  # noqa: E402
from conftest import make_image_folder, write_image  # noqa: E402
from kdjax import data, models  # noqa: E402
from kdjax.data import augment  # noqa: E402

CASE = run.Case(mode="fc", image_size=32, batch=2, threads=1)
KEYS = {"name", "framework", "variant", "image_size", "batch", "dtype", "median_s", "images_per_s",
        "rounds", "load_avg"}
PROTO_CASE = run.Case(mode="fc", image_size=32, batch=4, threads=1)
PROTO = run.Protocol(alphas=(0.0, 1.0), runs=1, epochs=1)
SPEC = {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 2}}  # a partial train batch


@pytest.fixture(scope="module")
def records():
    return run.measure_step(CASE, rounds=1, warmup=0)


def test_step_records_have_the_documented_keys(records):
    for r in records:
        assert KEYS <= set(r), r
        json.dumps(r)  # JSON-ready
        assert r["image_size"] == 32 and r["batch"] == 2 and r["dtype"] == "float32"
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


@pytest.fixture(scope="module")
def protocol_records(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("proto") / "images", SPEC)
    emitted = []
    records = run.measure_protocol(PROTO_CASE, PROTO, root, vectorize="off",
                                   cache_dir=root.parent / "cache", emit=emitted.append)
    return records, emitted


def test_protocol_times_the_whole_study_in_both_frameworks(protocol_records):
    records, emitted = protocol_records
    assert emitted == records  # each record is emitted as soon as it exists
    assert [(r["framework"], r["variant"]) for r in records] == [("kdjax", "sequential"), ("torch", "clean")]
    num_train = sum(SPEC["train"].values())
    for r in records:
        json.dumps(r)
        assert r["name"] == "protocol" and r["rounds"] == 1
        assert (r["alphas"], r["runs"], r["epochs"]) == ([0.0, 1.0], 1, 1)
        assert "random-init" in r["teacher"] and r["teacher_s"] > 0
        # throughput counts the train images of every epoch of every run of every alpha
        assert r["images_per_s"] == pytest.approx(2 * 1 * 1 * num_train / r["median_s"])
        assert r["train_s"] > 0
    kd = records[0]
    assert kd["compile_cache"] is not None  # conftest's persistent cache is recorded, not hidden
    # the teacher is given: building it is timed apart, data loading is part of the study
    assert kd["median_s"] == pytest.approx(kd["data_s"] + kd["train_s"])
    assert records[1]["median_s"] == pytest.approx(records[1]["train_s"])

    (ratio,) = run.ratios(records)
    assert (ratio["name"], ratio["kdjax_variant"], ratio["variant"]) == ("protocol", "sequential", "clean")
    assert ratio["ratio"] == pytest.approx(records[1]["median_s"] / kd["median_s"])
    table = run.markdown_table(records)
    assert "| protocol 2x1x1 |" in table and "protocol torch clean" in table


def test_epoch_records_count_the_train_images(image_folder, tmp_path):
    root = image_folder(SPEC, size=(40, 30))
    records = run.measure_epoch(PROTO_CASE, root, rounds=1, warmup=0, cache_dir=tmp_path / "cache")
    assert [(r["framework"], r["variant"]) for r in records] == [("kdjax", "host_loop"), ("torch", "clean")]
    num_train = sum(SPEC["train"].values())
    for r in records:
        assert r["name"] == "epoch" and r["images_per_s"] == pytest.approx(num_train / r["median_s"])
    (ratio,) = run.ratios(records)
    assert ratio["name"] == "epoch" and ratio["kdjax_variant"] == "host_loop"


def _fake(framework, variant, seconds, **point):
    r = run.record(point.pop("name", "protocol"), framework, variant, PROTO_CASE, 100, [(seconds, 0.0)])
    r.update(point)
    return r


def test_ratios_pair_every_kdjax_path_with_every_reference_variant_of_the_same_point():
    size = {"alphas": [0.0, 0.5, 1.0], "runs": 4, "epochs": 25}
    records = [
        _fake("kdjax", "sequential", 10.0, **size),
        _fake("kdjax", "vectorized", 5.0, **size),
        _fake("torch", "clean", 20.0, **size),
        _fake("torch", "clean", 1.0, **{**size, "epochs": 1}),  # another study size: no pair
    ]
    out = {(r["kdjax_variant"], r["variant"]): r["ratio"] for r in run.ratios(records)}
    assert out == {("sequential", "clean"): pytest.approx(2.0), ("vectorized", "clean"): pytest.approx(4.0)}


def test_vectorize_choices_follow_what_run_paper_offers():
    assert run.vectorize_choices("auto", supported=False) == [None]
    assert run.vectorize_choices("off", supported=False) == [None]
    assert run.vectorize_choices("auto", supported=True) == [False, True]
    assert run.vectorize_choices("on", supported=True) == [True]
    assert run.vectorize_choices("off", supported=True) == [False]
    with pytest.raises(ValueError, match="no 'vectorize' keyword"):
        run.vectorize_choices("both", supported=False)
    with pytest.raises(ValueError, match="--vectorize"):
        run.vectorize_choices("sometimes", supported=True)


def test_random_teacher_is_calibrated_on_train_images(image_folder, tmp_path):
    root = image_folder(SPEC, size=(40, 30))
    dataset = data.load_splits(root, image_size=32, cache_dir=tmp_path / "cache")
    variables = run.random_teacher_variables(dataset, 32)
    raw = models.init_variables(models.create_model("resnet50", 2), jax.random.key(1), 32)
    stats = variables["batch_stats"]
    # the running mean of the first BatchNorm is the mean of conv1's output over the images
    views = augment.normalize(dataset["train"].eval.images)
    conv1 = jax.lax.conv_general_dilated(
        views, raw["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    np.testing.assert_allclose(stats["bn1"]["mean"], conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(stats["bn1"]["var"], 1.0)
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], raw["params"]["fc"]["bias"])


def test_quick_plan_is_one_small_step_case():
    p = run.plan(quick=True, torch_device="cpu", threads=2)
    assert [(c.mode, c.image_size, c.batch) for c in p.steps] == [("fc", 112, 32)]
    assert p.epochs == () and p.protocols == ()


def test_plan_protocol_sizes_and_overrides():
    quick = run.plan(quick=True, torch_device="cpu", threads=2, protocol=True)
    assert [c.image_size for c in quick.protocols] == [112] and (quick.protocol.runs, quick.protocol.epochs) == (1, 1)
    full = run.plan(quick=False, torch_device="cuda", threads=2, protocol=True, dtype="bfloat16",
                    image_sizes=[224], batches=[32, 256], skip=["epoch"])
    assert [c.image_size for c in full.protocols] == [224] and (full.protocol.runs, full.protocol.epochs) == (4, 25)
    assert {(c.mode, c.batch) for c in full.steps} == {("fc", 32), ("fc", 256), ("all", 32), ("all", 256)}
    assert all(c.image_size == 224 and c.dtype == "bfloat16" and c.torch_device == "cuda" for c in full.steps)
    assert full.epochs == ()
    assert run.plan(quick=False, torch_device="cpu", threads=2, protocol=True, protocol_runs=2,
                    protocol_epochs=3).protocol == run.Protocol(runs=2, epochs=3)


def test_prepare_gpu_data_resizes_like_torchvision_and_copies_the_rest(tmp_path):
    # benchmarks.prepare_gpu_data is the GPU carry's helper; its few lines are checked here
    from PIL import Image
    from torchvision import transforms

    from benchmarks import prepare_gpu_data

    src = tmp_path / "src"
    big = write_image(src / "train" / "ants" / "big.jpg", (601, 403), seed=1)
    small = write_image(src / "val" / "bees" / "small.jpeg", (300, 200), seed=2)
    gif = write_image(src / "train" / "ants" / "odd.gif", (300, 300), seed=3, mode="P", fmt="GIF")
    stats = prepare_gpu_data.shrink_tree(src, tmp_path / "dest", short_side=256)
    assert (stats["files"], stats["resized"]) == (3, 1)
    with Image.open(big) as img, Image.open(tmp_path / "dest" / "train" / "ants" / "big.jpg") as out:
        assert out.size == transforms.Resize(256)(img.convert("RGB")).size == (381, 256)
    for p in (small, gif):  # no larger than the short side, or not a JPEG: byte for byte
        assert (tmp_path / "dest" / p.relative_to(src)).read_bytes() == p.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        prepare_gpu_data.shrink_tree(src, tmp_path / "dest")
