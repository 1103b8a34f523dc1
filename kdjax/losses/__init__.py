"""Distillation losses behind one interface: a registry of terms and their weighted sum.

A run's objective is ``sum_k w_k * term_k(student, teacher)`` over registry entries, given as
``--loss ce:1 at:500``; the seed's ``--alpha`` is the shorthand ``--loss TERM`` for
``ce:alpha TERM:(1 - alpha)`` (``alpha = 1``: supervised, ``alpha = 0``: pure distillation).
An entry (``LossSpec``) declares what its term reads (labels, logits, or pairs of named feature
taps of ``kdjax.models``, with an optional trained adapter per pair), its hyper-parameters (every
one a traced scalar, so a sweep over any of them compiles once, like the weights) and, where its
method has one, a warm-up of its weight. Every term's value is logged unweighted, by its name.

    core      masked mean, cross-entropy (with label smoothing)
    logits    the seed's logit MSE, Hinton's KD, Decoupled KD, DIST
    features  FitNets' hint, attention transfer, pooled-feature matching; their adapters

Adding a method touches its own module, one entry in ``LOSSES`` and a test.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.losses import features as _features, logits as _logits
from kdjax.losses.core import as_float, cross_entropy, masked_mean  # noqa: F401
from kdjax.losses.features import attention_map, attention_transfer, hint_mse, match_spatial, pooled_mse  # noqa: F401
from kdjax.losses.logits import decoupled_kd, dist_loss, hinton_kl, logit_mse  # noqa: F401


class Outputs(NamedTuple):
    """What a network produced on a batch: logits ``[B, C]`` and the feature taps a loss reads
    (``{}`` when it reads none)."""

    logits: jax.Array
    features: Mapping[str, jax.Array] = {}


@dataclasses.dataclass(frozen=True)
class HParam:
    """A traced hyper-parameter of a term: its default, its flag's help and its valid range."""

    default: float
    help: str
    minimum: float | None = None  # exclusive lower bound
    inclusive: bool = False  # ``minimum`` itself allowed

    def check(self, name: str, value: float) -> None:
        if self.minimum is None:
            return
        ok = value >= self.minimum if self.inclusive else value > self.minimum
        if not ok:
            raise ValueError(f"--{name} must be {'>=' if self.inclusive else '>'} {self.minimum:g}, got {value}")


Pairs = tuple[tuple[str, str], ...]  # (student tap, teacher tap) per pair


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One term: ``term(student, teacher, labels, mask, hparams) -> scalar`` on ``Outputs``.

    ``reads``: "labels" (no teacher), "logits", or "features": the term then gets, as both
    outputs' ``features``, the tuple of its pairs' maps, the student's through ``adapter(student
    shape, teacher shape)`` (a flax module trained with the student, or None) where it has one.
    ``default_pairs(student taps, teacher taps)`` picks pairs when the run names none.
    ``warmup``: the hyper-parameter (in epochs) over which the term's weight ramps up as
    ``min(epoch / warmup, 1)``, epochs counted from 1 (DKD's schedule); None: no ramp.
    """

    name: str
    term: Callable[..., jax.Array]
    help: str
    hparams: Mapping[str, HParam] = dataclasses.field(default_factory=dict)
    reads: str = "logits"
    adapter: Callable[[tuple, tuple], nn.Module] | None = None
    default_pairs: Callable[[Sequence[str], Sequence[str]], Pairs] | None = None
    warmup: str | None = None


def _shared_stride_taps(student: Sequence[str], teacher: Sequence[str], wanted: Sequence[str]) -> Pairs:
    pairs = tuple((t, t) for t in wanted if t in student and t in teacher)
    if not pairs:
        raise ValueError(f"no default tap pair: the student's taps are {tuple(student)}, the teacher's "
                         f"{tuple(teacher)}; name the pairs (--<loss>_pairs STUDENT_TAP:TEACHER_TAP ...)")
    return pairs


def _stage_taps(student: Sequence[str], teacher: Sequence[str]) -> list[str]:
    """The stage outputs ``feat1``, ``feat2``, ... both networks have (the CIFAR networks' taps,
    mdistiller's ``feats``; ``feat0`` is the stem)."""
    return [t for t in student if t.startswith("feat") and t != "feat0" and t in teacher]


def _middle_hint(student, teacher) -> Pairs:
    """``stride16`` (ImageNet networks); for two networks with stage taps (the CIFAR networks)
    ``feat2``, mdistiller's FitNet hint layer."""
    if "feat2" in _stage_taps(student, teacher):
        return (("feat2", "feat2"),)
    return _shared_stride_taps(student, teacher, ("stride16",))


def _attention_pairs(student, teacher) -> Pairs:
    """``stride8/16/32`` (ImageNet networks); for two networks with stage taps (the CIFAR networks)
    every stage output past the stem that both have, as mdistiller's AT (``feats[1:]``)."""
    stages = _stage_taps(student, teacher)
    if stages:
        return tuple((t, t) for t in stages)
    return _shared_stride_taps(student, teacher, ("stride8", "stride16", "stride32"))


def _pooled_pair(student, teacher) -> Pairs:
    return _shared_stride_taps(student, teacher, ("pool",))


_TEMPERATURE = HParam(4.0, "softmax temperature T", minimum=0.0)

LOSSES: Mapping[str, LossSpec] = {
    "ce": LossSpec(
        "ce", _logits.ce_term,
        "cross-entropy with the labels (torch CrossEntropyLoss, with --label_smoothing)",
        hparams={"label_smoothing": HParam(0.0, "label smoothing eps of the cross-entropy", 0.0, inclusive=True)},
        reads="labels"),
    "mse": LossSpec(
        "mse", _logits.mse_term,
        "the seed's logit MSE: mean over batch x classes of (s - t)^2 (torch MSELoss)"),
    "kd": LossSpec(
        "kd", _logits.kd_term,
        "Hinton's soft targets: T^2 KL(softmax(t/T) || softmax(s/T)) (torchdistill KDLoss)",
        hparams={"temperature": _TEMPERATURE}),
    "dkd": LossSpec(
        "dkd", _logits.dkd_term,
        "Decoupled KD (Zhao et al. 2022): dkd_alpha * TCKD + dkd_beta * NCKD at temperature T, its "
        "weight warmed up over --warmup epochs (mdistiller's defaults)",
        hparams={"dkd_alpha": HParam(1.0, "DKD's target-class weight", 0.0, inclusive=True),
                 "dkd_beta": HParam(8.0, "DKD's non-target-class weight", 0.0, inclusive=True),
                 "temperature": _TEMPERATURE,
                 "warmup": HParam(20.0, "epochs over which the DKD weight ramps up to its value", 0.0)},
        warmup="warmup"),
    "dist": LossSpec(
        "dist", _logits.dist_term,
        "DIST (Huang et al. 2022): tau^2 (dist_beta * inter + dist_gamma * intra) Pearson terms "
        "(torchdistill DISTLoss)",
        hparams={"dist_beta": HParam(1.0, "DIST's inter-class weight", 0.0, inclusive=True),
                 "dist_gamma": HParam(1.0, "DIST's intra-class weight", 0.0, inclusive=True),
                 "dist_tau": HParam(1.0, "DIST's softmax temperature", minimum=0.0)}),
    "fitnet": LossSpec(
        "fitnet", _features.fitnet_term,
        "FitNets' hint: MSE between a student tap through a trained 1x1 conv + BatchNorm regressor and "
        "a teacher tap (default stride16:stride16)",
        reads="features", adapter=_features.regressor, default_pairs=_middle_hint),
    "at": LossSpec(
        "at", _features.at_term,
        "attention transfer (Zagoruyko & Komodakis 2017, p=2): sum over tap pairs of the mean squared "
        "difference of normalised attention maps (torchdistill ATLoss; default stride8/16/32 pairs; "
        "the paper's beta=1000 is weight 500)",
        reads="features", default_pairs=_attention_pairs),
    "pooled": LossSpec(
        "pooled", _features.pooled_term,
        "pooled-feature matching: MSE between the student's pooled features through a trained linear "
        "projector and the teacher's (default pool:pool)",
        reads="features", adapter=_features.projector, default_pairs=_pooled_pair),
}

KINDS: tuple[str, ...] = tuple(LOSSES)
# what earlier kdjax versions called a term
ALIASES: Mapping[str, str] = {"kl": "kd"}
DISTILL_KINDS: tuple[str, ...] = tuple(k for k, v in LOSSES.items() if v.reads != "labels")


def get(name: str) -> LossSpec:
    """The registry entry ``name`` (or its alias); a ValueError lists the known ones."""
    try:
        return LOSSES[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown distillation loss kind {name!r}; expected one of {KINDS}") from None


def parse(loss: str | Sequence[str]) -> tuple[tuple[str, float | None], ...]:
    """``--loss`` as ``((term, weight), ...)``: "kd" is ``(("kd", None),)`` (the alpha
    shorthand's term), "ce:0.5 kd:0.5" a weighted sum. Names are checked against the registry."""
    tokens = loss.split() if isinstance(loss, str) else [t for part in loss for t in part.split()]
    if not tokens:
        raise ValueError("--loss is empty: name a term (e.g. kd) or weighted terms (e.g. ce:0.5 kd:0.5)")
    if len(tokens) == 1 and ":" not in tokens[0]:
        name = ALIASES.get(tokens[0], tokens[0])
        get(name)
        if LOSSES[name].reads == "labels":
            raise ValueError(f"--loss {name} alone is supervised training: give weights (--loss ce:1 TERM:w) "
                             f"or a distillation term, one of {DISTILL_KINDS}")
        return ((name, None),)
    out: dict[str, float] = {}
    for token in tokens:
        name, sep, weight = token.partition(":")
        name = ALIASES.get(name, name)
        if not sep:
            raise ValueError(f"--loss {' '.join(tokens)}: {token!r} has no weight; write TERM:WEIGHT (e.g. kd:0.5)")
        get(name)
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"--loss: the weight of {name} must be a number, got {weight!r}") from None
        if not w >= 0 or w != w:
            raise ValueError(f"--loss: the weight of {name} must be >= 0, got {weight}")
        if name in out:
            raise ValueError(f"--loss names {name} twice")
        out[name] = w
    if not any(LOSSES[n].reads != "labels" for n in out):
        raise ValueError(f"--loss {' '.join(tokens)} has no distillation term (one of {DISTILL_KINDS})")
    return tuple(out.items())


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static part of a run's loss: its terms (registry names, in order) and each feature
    term's tap pairs. Hashable, part of the compiled step's spec; the weights are traced."""

    terms: tuple[str, ...]
    pairs: tuple[tuple[str, Pairs], ...] = ()

    def pairs_of(self, name: str) -> Pairs:
        return dict(self.pairs)[name]

    def _taps(self, side: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys(pair[side] for _, pairs in self.pairs for pair in pairs))

    @property
    def student_taps(self) -> tuple[str, ...]:
        return self._taps(0)

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return self._taps(1)

    @property
    def adapted(self) -> tuple[str, ...]:
        """The feature terms whose student maps go through a trained adapter."""
        return tuple(n for n in self.terms if LOSSES[n].adapter is not None)


def objective(terms: Sequence[str], pairs: Mapping[str, Pairs] | None = None,
              student_taps: Sequence[str] = (), teacher_taps: Sequence[str] = ()) -> Objective:
    """The ``Objective`` of ``terms``: each feature term's pairs from ``pairs`` or its default for
    networks with ``student_taps``/``teacher_taps``; every named tap is checked to exist."""
    pairs = dict(pairs or {})
    resolved = []
    for name in terms:
        spec = get(name)
        if spec.reads != "features":
            if name in pairs:
                raise ValueError(f"--{name}_pairs: {name} reads no feature taps")
            continue
        chosen = tuple(pairs.get(name) or spec.default_pairs(tuple(student_taps), tuple(teacher_taps)))
        for s, t in chosen:
            if s not in student_taps:
                raise ValueError(f"--{name}_pairs: the student has no tap {s!r} (its taps: {tuple(student_taps)})")
            if t not in teacher_taps:
                raise ValueError(f"--{name}_pairs: the teacher has no tap {t!r} (its taps: {tuple(teacher_taps)})")
        resolved.append((name, chosen))
    stray = sorted(set(pairs) - set(terms))
    if stray:
        raise ValueError(f"--{stray[0]}_pairs given, but {stray[0]} is not a term of --loss")
    return Objective(tuple(terms), tuple(resolved))


def weight_key(term: str) -> str:
    """The traced hyper-parameter holding ``term``'s weight."""
    return f"weight_{term}"


def total(
    obj: Objective,
    student: Outputs,
    teacher: Outputs | None,
    labels: jax.Array,
    hparams: Mapping[str, jax.Array],
    mask: jax.Array | None = None,
    adapted: Mapping[str, tuple[jax.Array, ...]] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``sum_k w_k * term_k`` and the unweighted terms ``{name: value}``.

    ``hparams`` holds every term's weight (``weight_key``) and hyper-parameters, and ``epoch``
    (1-based, a float) where a term warms up. ``adapted[name]`` are a feature term's student maps
    after its adapters (one per pair); without it the raw taps are compared. Gradients flow into
    both outputs: the caller stops the teacher's (``lax.stop_gradient``).
    """
    values: dict[str, jax.Array] = {}
    loss = None
    for name in obj.terms:
        spec = LOSSES[name]
        if spec.reads == "features":
            pairs = obj.pairs_of(name)
            s_maps = (adapted or {}).get(name) or tuple(student.features[s] for s, _ in pairs)
            t_maps = tuple(teacher.features[t] for _, t in pairs)
            value = spec.term(Outputs(student.logits, s_maps), Outputs(teacher.logits, t_maps), labels, mask,
                              hparams)
        else:
            value = spec.term(student, teacher, labels, mask, hparams)
        weight = jnp.asarray(hparams[weight_key(name)]).astype(value.dtype)
        if spec.warmup is not None:
            ramp = jnp.asarray(hparams["epoch"]).astype(value.dtype) / jnp.asarray(hparams[spec.warmup]).astype(
                value.dtype)
            weight = weight * jnp.minimum(ramp, 1.0)
        values[name] = value
        loss = weight * value if loss is None else loss + weight * value
    return loss, values



# The terms as plain functions on arrays, for a training loop of one's own: each is its registry
# entry's term (the same code the engine runs), its hyper-parameters keywords with the registry's
# defaults and checks, ``mask`` [B] (1 for real examples) optional. Every value is a mean over the
# real examples; jit, grad and vmap them freely.

def _plain(name: str, student_logits, teacher_logits, labels, mask, hparams: Mapping[str, float],
           features: tuple = ((), ())) -> jax.Array:
    spec = LOSSES[name]
    values = {k: hp.default for k, hp in spec.hparams.items()}
    values.update(hparams)
    for k, v in hparams.items():
        if isinstance(v, (int, float)):
            spec.hparams[k].check(k, v)
    student = Outputs(student_logits, features[0])
    teacher = None if teacher_logits is None and not features[1] else Outputs(teacher_logits, features[1])
    return spec.term(student, teacher, None if labels is None else jnp.asarray(labels), mask, values)


def ce(student_logits, labels, *, mask=None, label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy with integer ``labels`` [B] (torch's CrossEntropyLoss, with label smoothing)."""
    return _plain("ce", student_logits, None, labels, mask, {"label_smoothing": label_smoothing})


def mse(student_logits, teacher_logits, *, mask=None) -> jax.Array:
    """The seed's logit MSE, mean over batch x classes (torch's MSELoss)."""
    return _plain("mse", student_logits, teacher_logits, None, mask, {})


def kd(student_logits, teacher_logits, *, mask=None, temperature: float = 4.0) -> jax.Array:
    """Hinton's soft targets, ``T^2 KL(softmax(t/T) || softmax(s/T))`` (torchdistill's KDLoss)."""
    return _plain("kd", student_logits, teacher_logits, None, mask, {"temperature": temperature})


def dkd(student_logits, teacher_logits, labels, *, mask=None, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
        temperature: float = 4.0) -> jax.Array:
    """Decoupled KD, ``dkd_alpha * TCKD + dkd_beta * NCKD`` (mdistiller's); its warm-up (a weight
    ramp over epochs) is the caller's: multiply by ``min(epoch / 20, 1)`` as mdistiller does."""
    return _plain("dkd", student_logits, teacher_logits, labels, mask,
                  {"dkd_alpha": dkd_alpha, "dkd_beta": dkd_beta, "temperature": temperature})


def dist(student_logits, teacher_logits, *, mask=None, dist_beta: float = 1.0, dist_gamma: float = 1.0,
         dist_tau: float = 1.0) -> jax.Array:
    """DIST's inter- and intra-class Pearson terms (torchdistill's DISTLoss)."""
    return _plain("dist", student_logits, teacher_logits, None, mask,
                  {"dist_beta": dist_beta, "dist_gamma": dist_gamma, "dist_tau": dist_tau})


def _maps(x) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def fitnet(student_maps, teacher_maps, *, mask=None) -> jax.Array:
    """FitNets' hint: the sum over pairs of the MSE of a student map [B, H, W, C] (already through
    the caller's regressor, e.g. ``kdjax.losses.adapters.Regressor``) and a teacher map; a map or
    a sequence of them on each side. Maps of other sizes are pooled to the smaller, as in runs."""
    return _plain("fitnet", None, None, None, mask, {}, (_maps(student_maps), _maps(teacher_maps)))


def at(student_maps, teacher_maps, *, mask=None) -> jax.Array:
    """Attention transfer (p = 2) summed over pairs of maps [B, H, W, C] (torchdistill's ATLoss);
    the paper's beta = 1000 is a weight of 500 on this value."""
    return _plain("at", None, None, None, mask, {}, (_maps(student_maps), _maps(teacher_maps)))


def pooled(student_features, teacher_features, *, mask=None) -> jax.Array:
    """Pooled-feature matching: the MSE of pooled features [B, D] (the student's through the
    caller's projector, e.g. ``kdjax.losses.adapters.Projector``)."""
    return _plain("pooled", None, None, None, mask, {}, (_maps(student_features), _maps(teacher_features)))


PLAIN: Mapping[str, Callable[..., jax.Array]] = {
    "ce": ce, "mse": mse, "kd": kd, "dkd": dkd, "dist": dist, "fitnet": fitnet, "at": at, "pooled": pooled}
