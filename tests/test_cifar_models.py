"""kdjax's CIFAR networks (``kdjax.models.cifar``) compute mdistiller's: a certificate per network.

The reference of each network is PyTorch: torchdistill's ``ResNet4Cifar`` for resnet8..110 (the
same network as mdistiller's, held to this file's rendering below), else the rendering of
mdistiller's definition in ``cifar_torch_reference`` (its forward returns mdistiller's
``(logits, feats)``). Every network is built in both frameworks from one random torch
state_dict (random weights, biases and normalisation affines, calibrated-then-perturbed
BatchNorm statistics: ``cifar_torch_reference.randomised``), 100 classes, 32 px, batch 4:

- parameter counts equal the torch network's and mdistiller's published figures (0.01M);
- ``to_flax`` then ``from_flax`` gives back the state_dict, which the rendering loads strictly;
- eval-mode logits and every feature tap against torch's (mdistiller's ``feats``,
  ``preact_feats``, ``pooled_feat``), and ``classify(backbone)`` against the logits;
- train mode on a padded batch with a mask (garbage padding) against torch on the real
  examples: logits, taps and the updated running statistics.

Tolerances, float32 with the highest matmul precision (tests/conftest.py): ``TOL = 1e-4`` on
the logits' and on each tap's max |difference| over their scale, 1 + max |value| (logits O(1-10),
activations up to ~10 after BatchNorm): oneDNN and XLA sum the up to 4608-term convolution
products in different orders, ~1e-7 relative per layer, which after 8-110 layers leaves ~1e-7 to
~5e-6 of the scale; each framework's float32 logits are as far from the float64 truth as the
other's (printed), so that is round-off. A real mistake (a padding, a stride, a transposed
kernel, a missing shuffle or ReLU) is >= 1e-2. The running statistics (variances up to ~10^2)
are compared elementwise relative to their size, |d| / (1 + |value|) <= ``STAT_TOL = 1e-5``,
where float32 resolves ~1e-7 and a wrong update rule (the biased variance, torch's vs flax's
momentum, one update instead of mdistiller's two) is >= 1e-2.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.cifar_torch_reference import randomised, rendering, torch_cifar, torchdistill_resnet
from kdjax import models
from kdjax.models import cifar, torchvision as tv
from torch_reference import images, numpy_state_dict, running_stats, stat_error

ARCHS = tuple(cifar.SPECS)
TOL = 1e-4
STAT_TOL = 1e-5

# mdistiller's / RepDistiller's published sizes (millions of parameters, 100 classes), to their
# two decimals: rounded, except vgg8's 3.96, which truncates its 3,965,028.
PUBLISHED_M = {"resnet20": 0.28, "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43,
               "wrn_16_2": 0.70, "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46, "mobilenetv2_cifar": 0.81,
               "shufflenetv1_cifar": 0.95, "shufflenetv2_cifar": 1.36}
# The exact counts at 100 classes, those of the torch networks: they change only if a network
# stops being mdistiller's.
PARAMETERS = {"resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
              "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
              "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
              "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
              "mobilenetv2_cifar": 812_836, "shufflenetv1_cifar": 949_258, "shufflenetv2_cifar": 1_355_528}


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch():
    """torch on one thread for this file: these networks' small convolutions are far slower
    spread over threads that contend with the other test worker for the CI's two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(arch: str, seed: int = 0) -> torch.nn.Module:
    """The torch network ``arch`` is certified against: torchdistill's where it has it, else the
    rendering; randomised, in eval mode."""
    torch.manual_seed(seed)
    net = torchdistill_resnet(arch)
    return torch_cifar(arch, seed) if net is None else randomised(net, seed)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def torch_run(net: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """``net``'s logits and, for a rendering, mdistiller's ``feats`` dict as NHWC numpy arrays."""
    with torch.no_grad():
        out = net(nchw(x))
    if isinstance(out, torch.Tensor):
        return out.numpy(), None
    logits, feats = out
    to_nhwc = lambda t: t.numpy() if t.ndim == 2 else t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return logits.numpy(), {k: [to_nhwc(t) for t in v] if isinstance(v, list) else to_nhwc(v)
                            for k, v in feats.items()}


def float64_logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """``net``'s logits in float64 (on a copy: ``net``'s running statistics stay), the truth that
    both float32 computations are measured from."""
    with torch.no_grad():
        out = copy.deepcopy(net).double()(nchw(x).double())
    return (out if isinstance(out, torch.Tensor) else out[0]).numpy()


def scaled_error(got, want) -> float:
    """max |difference| / (1 + max |want|): the error relative to the tap's scale."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / (1 + np.max(np.abs(want))))


def assert_taps_match(arch: str, taps: dict, feats: dict, rows: int) -> float:
    """kdjax's taps (the first ``rows`` examples) are mdistiller's ``feats`` of the same batch,
    and each ``stride<s>`` tap has 32/s positions a side; returns the largest ``scaled_error``."""
    spec = models.get(arch)
    assert tuple(taps) == spec.taps
    want = {"pool": feats["pooled_feat"], **{f"feat{i}": f for i, f in enumerate(feats["feats"])},
            **{f"preact{i}": f for i, f in enumerate(feats.get("preact_feats", ())) if i}}
    assert set(want) == {t for t in spec.taps if not t.startswith("stride")}
    worst = 0.0
    for name, value in want.items():
        got = np.asarray(taps[name])[:rows]
        assert got.shape == value.shape, (arch, name)
        worst = max(worst, scaled_error(got, value))
    for name in spec.taps:
        if name.startswith("stride"):
            side = 32 // int(name.removeprefix("stride"))
            assert np.shape(taps[name])[1:3] == (side, side), (arch, name)
    return worst


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_match_the_torch_networks_and_the_published_ones(arch):
    hundred, ten = (models.abstract_variables(models.create_model(arch, n), 32)["params"] for n in (100, 10))
    count = models.count_params(hundred)
    assert count == sum(p.numel() for p in rendering(arch).parameters())
    if (net := torchdistill_resnet(arch)) is not None:
        assert count == sum(p.numel() for p in net.parameters())
    assert count == PARAMETERS[arch]
    if arch in PUBLISHED_M:
        assert abs(count / 1e6 - PUBLISHED_M[arch]) < 0.01
    assert models.count_params(ten) == sum(p.numel() for p in rendering(arch, 10).parameters())
    # the head modes train the last Linear alone, the only parameters that depend on the classes
    spec = models.get(arch)
    assert ten[spec.head]["kernel"].shape == (spec.head_width, 10)
    shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
    assert {k for k in ten if shapes(ten[k]) != shapes(hundred[k])} == {spec.head}
    assert tv.head_key(arch) in rendering(arch).state_dict()


@pytest.mark.parametrize("arch", [a for a in ARCHS if torchdistill_resnet(a) is not None])
def test_the_rendering_of_the_resnets_is_torchdistills_resnet4cifar(arch):
    """resnet8..110's rendering (mdistiller's code) computes torchdistill's ResNet4Cifar: the
    same state_dict loads strictly and gives the same logits in eval and train mode (same torch
    kernels in the same order: equal to float32 round-off)."""
    net = reference(arch)
    ours = rendering(arch)
    ours.load_state_dict(net.state_dict(), strict=True)
    x = images(4, 32, seed=3)
    for train in (False, True):
        net.train(train), ours.train(train)
        np.testing.assert_allclose(torch_run(ours, x)[0], torch_run(net, x)[0], rtol=0, atol=1e-6)
    for key, value in net.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key].numpy(), value.numpy(), rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cifar_network_matches_pytorch(arch):
    spec = models.get(arch)
    model = models.create_model(arch, 100)
    net = reference(arch)
    state = numpy_state_dict(net)
    features_net = net
    if torchdistill_resnet(arch) is not None:  # the taps are read from the rendering's forward
        features_net = rendering(arch)
        features_net.load_state_dict(net.state_dict(), strict=True)
        features_net.eval()

    # conversion both ways: the state_dict back, which mdistiller's network loads strictly
    variables = tv.to_flax(state, arch)
    back = tv.from_flax(variables, arch)
    assert set(back) == set(state)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    rendering(arch).load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True)

    # one padded batch for both modes (eval and train then share their convolutions' compiled
    # kernels): four real examples, two of garbage that the mask keeps out of the statistics
    real = images(4, 32, seed=5)
    padded = jnp.asarray(np.concatenate([real, 100.0 * images(2, 32, seed=6)]))
    mask = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)

    # eval mode: logits, taps, and the backbone completed by the head
    logits, taps = model.apply(variables, padded, train=False, taps=True)
    want, _ = torch_run(net, real)
    truth = float64_logits(net, real)
    err = scaled_error(np.asarray(logits)[:4], want)
    ours, theirs = (float(np.max(np.abs(np.asarray(v)[:4] - truth))) for v in (logits, want))
    tap_err = assert_taps_match(arch, taps, torch_run(features_net, real)[1], 4)
    pooled = spec.backbone(model).apply(variables, padded, train=False)
    np.testing.assert_allclose(spec.classify(model, variables["params"][spec.head], pooled)[:4], logits[:4], rtol=0,
                               atol=1e-5)
    print(f"{arch} eval: logits {err:.1e} of their scale {np.max(np.abs(want)):.2f} (max|d| from float64: kdjax "
          f"{ours:.1e}, torch {theirs:.1e}), taps {tap_err:.1e} of their scale")
    assert err <= TOL
    assert tap_err <= TOL

    # train mode: the real examples' logits and taps, the running statistics
    features_copy = copy.deepcopy(features_net).train()
    truth = float64_logits(net.train(), real)
    want, _ = torch_run(net, real)  # torch updates its running statistics in place
    (logits, taps), updates = model.apply(variables, padded, train=True, mask=mask, taps=True,
                                          mutable=["batch_stats"])
    err = scaled_error(np.asarray(logits)[:4], want)
    ours, theirs = (float(np.max(np.abs(np.asarray(v)[:4] - truth))) for v in (logits, want))
    tap_err = assert_taps_match(arch, taps, torch_run(features_copy, real)[1], 4)
    after = numpy_state_dict(net)
    stats = running_stats(arch, updates["batch_stats"])
    assert set(stats) == {k for k in after if k.endswith(("running_mean", "running_var"))}
    stat_err = stat_error(stats, after)
    print(f"{arch} train: logits {err:.1e} of their scale (max|d| from float64: kdjax {ours:.1e}, torch {theirs:.1e}), "
          f"taps {tap_err:.1e} of their scale, running stats rel. {stat_err:.1e}")
    assert err <= TOL
    assert tap_err <= TOL
    assert stat_err <= STAT_TOL


def test_the_wide_resnets_update_the_preact_batch_norms_as_mdistiller_or_once():
    """mdistiller's WRN forward re-applies the three BatchNorms its ``preact_feats`` read, so in
    train mode their running statistics move twice per step; kdjax does the same by default and
    once with ``mdistiller_preact=False`` (RepDistiller's forward without ``preact``), the logits
    being the same."""
    arch = "wrn_16_2"
    once = randomised(rendering(arch, reapply_preact_bn=False))
    twice = copy.deepcopy(once)
    twice.reapply_preact_bn = True
    variables = tv.to_flax(numpy_state_dict(once), arch)
    real = images(4, 32, seed=7)
    padded = jnp.asarray(np.concatenate([real, images(2, 32, seed=8)]))  # the main test's batch shape
    results = {}
    for reapply, net in ((False, once), (True, twice)):
        want, _ = torch_run(net.train(), real)
        model = models.create_model(arch, 100).clone(mdistiller_preact=reapply)
        logits, updates = model.apply(variables, padded, train=True, mask=jnp.asarray([1, 1, 1, 1, 0, 0]),
                                      mutable=["batch_stats"])
        assert float(np.max(np.abs(np.asarray(logits)[:4] - want))) <= TOL
        results[reapply] = running_stats(arch, updates["batch_stats"])
        assert stat_error(results[reapply], numpy_state_dict(net)) <= STAT_TOL
    moved = {k for k in results[True] if not np.array_equal(results[True][k], results[False][k])}
    assert moved == {f"{bn}.running_{s}" for bn in ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")
                     for s in ("mean", "var")}


def test_the_cifar_entries_name_mdistillers_input_and_no_torchvision_builder():
    for arch in ARCHS:
        spec = models.get(arch)
        assert spec.input == cifar.CIFAR100_INPUT and (spec.input.crop_size, spec.input.resize_size) == (32, 32)
        assert spec.torchvision == cifar.NO_TORCHVISION and arch in cifar.MDISTILLER
    assert tv.head_key("mobilenetv2_cifar") == "classifier.0.weight"
    assert tv.head_key("vgg8") == "classifier.weight" and tv.head_key("shufflenetv2_cifar") == "linear.weight"


def test_vgg_pools_before_its_last_block_at_64_px_as_mdistiller():
    """mdistiller's VGG applies ``pool3`` only to a 64 px input (Tiny-ImageNet): at 64 px block 4
    runs at stride 16, so ``stride8`` is block 3's output; eval logits as torch's."""
    arch = "vgg8"
    net = torch_cifar(arch)
    variables = tv.to_flax(numpy_state_dict(net), arch)
    x = images(2, 64, seed=9)
    logits, taps = models.create_model(arch, 100).apply(variables, jnp.asarray(x), taps=True)
    want, feats = torch_run(net, x)
    assert scaled_error(logits, want) <= TOL
    assert np.shape(taps["feat4"])[1:3] == (4, 4) and taps["stride8"] is taps["feat3"]
    assert scaled_error(taps["feat4"], feats["feats"][4]) <= TOL


@pytest.mark.parametrize("arch", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2_cifar", "shufflenetv1_cifar",
                                  "shufflenetv2_cifar"])
def test_bfloat16_compute_keeps_float32_parameters_statistics_and_logits(arch):
    model = models.create_model(arch, 10, dtype=jnp.bfloat16)
    variables = models.abstract_variables(model, 32)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    (logits, taps), updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, taps=True, mutable=["batch_stats"]), variables, x)
    assert {leaf.dtype for leaf in jax.tree.leaves((variables, updates))} == {jnp.dtype(jnp.float32)}
    assert logits.dtype == taps["pool"].dtype == jnp.float32
    assert {taps[t].dtype for t in taps if t != "pool"} == {jnp.dtype(jnp.bfloat16)}


def test_an_mdistiller_checkpoint_converts_to_a_model_directory(tmp_path):
    """A teacher as mdistiller's cifar_teachers.tar holds one (RepDistiller's training loop: a dict
    of epoch, the state_dict under ``model``, the optimiser's state, a tensor accuracy and a numpy
    best accuracy), read without torch by ``kdjax convert``: its logits are the torch network's
    (TOL). A pickled numpy object array beside it is refused, nothing run."""
    import kdjax.cli
    from kdjax import checkpoint
    from kdjax.models import torchfile

    net = torch_cifar("resnet8", seed=3)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    net(torch.randn(2, 3, 32, 32))[0].sum().backward()
    optimiser.step()
    net.eval()
    src = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": net.state_dict(), "optimizer": optimiser.state_dict(),
                "accuracy": torch.tensor(72.5), "best_acc": np.float64(72.5)}, src)
    assert kdjax.cli.main(["convert", "--arch", "resnet8", "--src", str(src), "--out", str(tmp_path / "teacher"),
                           "--class-names", ",".join(f"c{i}" for i in range(100))]) == 0
    model, variables, meta = checkpoint.load_model(tmp_path / "teacher")
    assert (meta.arch, meta.num_classes, meta.mean) == ("resnet8", 100, cifar.CIFAR100_INPUT.mean)
    x = images(4, 32, seed=5)
    with torch.no_grad():
        want = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())[0].numpy()
    got = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
    assert float(np.max(np.abs(got - want))) <= TOL
    torch.save({"model": net.state_dict(), "names": np.array(["a", None], dtype=object)}, tmp_path / "bad.pth")
    with pytest.raises(torchfile.UnsafePickleError, match="not numeric|refusing to load global"):
        torchfile.load_state_dict(tmp_path / "bad.pth")
