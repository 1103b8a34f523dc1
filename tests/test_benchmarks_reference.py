"""benchmarks.torch_reference: the PyTorch baseline keeps the seed's semantics.

Cheap by design (32 px images, batches of 4, one or two steps, a generated image folder): the
student modes touch exactly the parameters and statistics they should, the ``seed_as_executed``
variant costs time but not numbers, and the val figures cover every val image.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmarks import torch_reference as tr  # noqa: E402

SIZE = 32
BATCH = 4
# lr large enough that one step visibly moves every trainable parameter. One torch thread: on the
# shared 2-core machine two OpenMP threads that get preempted make tiny steps ~10x slower.
CONFIG = tr.ReferenceConfig(image_size=SIZE, batch_size=BATCH, lr=0.1, threads=1)
SPEC = {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 3}}  # partial last batches


@pytest.fixture(scope="module")
def teacher():
    """One clean-variant teacher shared by the tests that do not inspect it (building and
    calibrating a ResNet-50 is the slow part of these tests)."""
    return tr.make_teacher(CONFIG)


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_fc_mode_trains_only_the_head_but_updates_bn_statistics(teacher):
    ref = tr.build(CONFIG, teacher)
    before = _state(ref.student)
    ref.train_step(*tr.synthetic_batch(BATCH, SIZE))
    changed = _changed(before, _state(ref.student))
    params = {k for k, _ in ref.student.named_parameters()}
    assert changed & params == {"fc.weight", "fc.bias"}
    assert "bn1.running_mean" in changed and "layer4.1.bn2.running_var" in changed
    assert all(not p.requires_grad for k, p in ref.student.named_parameters() if not k.startswith("fc."))


def test_fc_frozen_bn_mode_keeps_bn_statistics(teacher):
    ref = tr.build(dataclasses.replace(CONFIG, mode="fc_frozen_bn"), teacher)
    before = _state(ref.student)
    ref.train_step(*tr.synthetic_batch(BATCH, SIZE))
    assert _changed(before, _state(ref.student)) == {"fc.weight", "fc.bias"}


def test_all_mode_trains_the_backbone(teacher):
    ref = tr.build(dataclasses.replace(CONFIG, mode="all"), teacher)
    before = _state(ref.student)
    ref.train_step(*tr.synthetic_batch(BATCH, SIZE))
    changed = _changed(before, _state(ref.student))
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.weight", "fc.weight"} <= changed


def test_variants_give_the_same_numbers_only_seed_as_executed_backpropagates_the_teacher(teacher):
    # each variant gets its own copy of the teacher: the test inspects the teachers' .grad
    refs = {v: tr.build(dataclasses.replace(CONFIG, variant=v), copy.deepcopy(teacher)) for v in tr.VARIANTS}
    batches = [tr.synthetic_batch(BATCH, SIZE, seed=s) for s in (0, 1)]  # 2nd step uses momentum
    losses = {v: [ref.train_step(*b) for b in batches] for v, ref in refs.items()}
    assert losses["clean"] == pytest.approx(losses["seed_as_executed"], rel=1e-6, abs=0)
    clean, seed = (_state(refs[v].student) for v in tr.VARIANTS)
    for k in clean:
        torch.testing.assert_close(seed[k], clean[k], rtol=1e-6, atol=1e-7, msg=k)

    assert all(p.grad is None for p in refs["clean"].teacher.parameters())
    seed_grads = [p.grad for p in refs["seed_as_executed"].teacher.parameters()]
    assert all(g is not None for g in seed_grads)
    assert refs["seed_as_executed"].teacher.conv1.weight.grad.abs().sum() > 0
    # the teacher itself is never updated
    torch.testing.assert_close(_state(refs["clean"].teacher), _state(refs["seed_as_executed"].teacher))


def test_run_epoch_figures_cover_the_whole_val_set(image_folder, teacher):
    root = image_folder(SPEC, size=(40, 30))
    ref = tr.build(dataclasses.replace(CONFIG, data_dir=str(root), lr=0.001), teacher)
    record = ref.run_epoch()
    assert set(record) >= {"epoch", "lr", "train_loss", "train_acc", *tr.FIGURES, "train_s", "val_s"}
    assert record["epoch"] == 1 and record["lr"] == pytest.approx(0.001)
    n_val = sum(SPEC["val"].values())
    for key in ("epoch_acc_l", "epoch_acc_teacher_l"):
        assert 0.0 <= record[key] <= 1.0
        assert record[key] * n_val == pytest.approx(round(record[key] * n_val))
    assert math.isfinite(record["epoch_loss_l"]) and record["epoch_loss_l"] > 0
    assert record["diff_t_s"] > 0

    # Recompute the val figures in one batch, without the shuffled loader. oneDNN picks kernels
    # by batch size, so logits agree to float32 round-off (~1e-5 relative), not bitwise.
    dataset = ref.loaders["val"].dataset
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    with torch.no_grad():
        s, t = ref.student.eval()(images), ref.teacher(images)
    assert record["diff_t_s"] == pytest.approx((t - s).abs().mean().item(), rel=1e-4)
    assert record["epoch_acc_l"] == pytest.approx((s.argmax(1) == labels).float().mean().item())
    assert record["epoch_loss_l"] == pytest.approx(tr.kd_loss(s, t, labels, 0.5).item(), rel=1e-4)


def test_cli_prints_one_json_line_per_epoch_and_a_summary(image_folder, capsys):
    root = image_folder(SPEC, size=(40, 30))
    tr.main(["--data_dir", str(root), "--image_size", str(SIZE), "--batch_size", str(BATCH),
             "--epochs", "1", "--alphas", "0", "1", "--threads", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("alpha") for r in lines[:2]] == [0.0, 1.0]
    assert all(r["mode"] == "fc" and r["epoch"] == 1 for r in lines[:2])
    assert all(math.isfinite(r[f]) for r in lines[:2] for f in tr.FIGURES)
    assert lines[2]["measure"] == "protocol"
    assert set(lines[2]["summary"]) == {"0.0", "1.0"}
    assert lines[2]["summary"]["0.0"]["epoch_acc_l"]["std"] == 0.0  # one epoch of one run
    assert 0 < lines[2]["teacher_s"] < lines[2]["wall_s"]  # the teacher is built once, inside


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="--variant"):
        tr.ReferenceConfig(variant="fast")
    with pytest.raises(ValueError, match="--mode"):
        tr.ReferenceConfig(mode="head")


def test_cli_bench_step_times_the_kd_step(capsys):
    tr.main(["--bench_step", "--image_size", str(SIZE), "--batch_size", str(BATCH), "--threads", "1",
             "--warmup", "0", "--steps", "2", "--variant", "seed_as_executed"])
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["measure"] == "train_step" and record["variant"] == "seed_as_executed"
    assert len(record["times_s"]) == 2 and record["images_per_s"] > 0
