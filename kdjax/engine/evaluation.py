"""Evaluation: eval-mode outputs over fixed-shape batches (the last one padded, every example
counted once), for one network, a group of runs or the teacher(s), and the validation figures.

The jitted programs are module-level, compiled once per process for each distinct static part
(model, spec, mesh, mode) and shape, so every trainer and every command of one process reuses
them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import data, losses, models, sharding
from kdjax.data import augment, stream
from kdjax.engine import adapters
from kdjax.engine.groups import GroupMode, Layout, constrain, expand, squeeze, take
from kdjax.engine.step import StepSpec, apply_model, ensemble_logits, objective_loss, teacher_outputs


def eval_outputs(model: nn.Module, variables, images: jax.Array, taps: tuple[str, ...] = (),
                 mesh=None, view: augment.View | None = None) -> losses.Outputs:
    """Eval-mode outputs of one batch of uint8 eval views, as the network of ``view`` sees them."""
    x = constrain(augment.as_view(augment.normalize(images), view), mesh, 0)
    return apply_model(model, variables, x, taps, train=False)[0]


def group_eval_outputs(spec: StepSpec, variables, images: jax.Array, layout: Layout, mesh=None,
                       mode: GroupMode = "vmap") -> losses.Outputs:
    """``eval_outputs`` ``[K, B, ...]`` of every run's student ``variables`` ``[K]``; in the
    ``shared`` mode the backbone runs once per backbone group."""
    if mode == "single":
        return expand(eval_outputs(spec.student, squeeze(variables), images, spec.student_taps, mesh,
                                   spec.student_view))
    if mode == "vmap":
        return jax.vmap(lambda v: eval_outputs(spec.student, v, images, spec.student_taps, mesh,
                                               spec.student_view))(variables)
    arch = models.get(spec.student_arch)
    backbone = arch.backbone(spec.student)
    reps = take(variables, layout.group_rep)
    feats = jax.vmap(lambda v: eval_outputs(backbone, v, images, (), mesh, spec.student_view).logits)(reps)
    run_feats = jnp.take(feats, layout.run_group, axis=0)
    head = variables["params"][arch.head]
    return losses.Outputs(jax.vmap(lambda h, f: arch.classify(spec.student, h, f))(head, run_feats))


def map_eval_batches(fn: Callable[[jax.Array], Any], images, batch_size: int, example_axis: int = 0,
                     mesh=None) -> Any:
    """``fn`` over fixed-shape batches of ``images`` (the last one padded, so one compilation),
    its outputs (a pytree) joined along ``example_axis``, the padding cut off.

    ``images``: a device array ``[N, s, s, 3]``, or a streamed ``data.Split`` whose evaluation
    views each process reads on the host (its own rows of each batch, placed over ``mesh``)."""
    if isinstance(images, data.Split):
        n = images.num_examples
        mesh = mesh or sharding.data_mesh()
        out = [fn(b) for b in stream.eval_batches(images, batch_size, sharding.batch_sharding(mesh))]
    else:
        n = images.shape[0]
        steps = math.ceil(n / batch_size)
        pad = steps * batch_size - n
        if pad:
            images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
        out = [fn(images[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=example_axis), *out)
    return jax.tree.map(lambda a: jax.lax.slice_in_dim(a, 0, n, axis=example_axis), joined)


def eval_metrics(s_out: losses.Outputs, t_out: losses.Outputs | None, labels, hparams,
                 spec: StepSpec, aux=None) -> dict[str, jax.Array]:
    """Validation figures over the whole set (every example counted exactly once).

    ``diff_t_s`` is the mean |teacher - student| logit difference over all examples and classes
    (the seed took it on its last val batch only). ``agreement`` is teacher-student top-1
    agreement and ``kl_t_s`` the mean KL(softmax(t) || softmax(s)) at T = 1.
    """
    adapted, _ = adapters.adapt(spec.objective, aux or {}, s_out, t_out, False)
    loss, terms = objective_loss(spec, s_out, t_out, labels, None, hparams, adapted)
    s_logits = s_out.logits
    out = {"loss": loss, **terms, "acc": jnp.mean(jnp.argmax(s_logits, -1) == labels)}
    if t_out is not None:
        t_logits = t_out.logits if t_out.logits.ndim == 2 else ensemble_logits(t_out.logits)
        out.update(
            teacher_acc=jnp.mean(jnp.argmax(t_logits, -1) == labels),
            diff_t_s=jnp.mean(jnp.abs(t_logits - s_logits)),
            agreement=jnp.mean(jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)),
            kl_t_s=losses.hinton_kl(s_logits, t_logits, 1.0),
        )
    return out


def group_eval_metrics(s_out, t_out, labels, hparams, spec: StepSpec, mode: GroupMode = "vmap", aux=None):
    """``eval_metrics`` of every run: ``s_out`` ``[K, N, ...]``, ``hparams`` and ``aux`` ``[K]``
    (``hparams`` with the 1-based ``epoch`` of the evaluation)."""
    aux = {} if aux is None else aux
    if mode == "single":
        return expand(eval_metrics(squeeze(s_out), t_out, labels, squeeze(hparams), spec, squeeze(aux)))

    def metrics(s, t, y, h, a):
        return eval_metrics(s, t, y, h, spec, a)

    return jax.vmap(metrics, in_axes=(0, None, None, 0, 0))(s_out, t_out, labels, hparams, aux)


def _teacher_eval_outputs(spec: StepSpec, teacher_vars, images: jax.Array, mesh=None) -> losses.Outputs:
    return teacher_outputs(spec, teacher_vars, constrain(augment.normalize(images), mesh, 0))


eval_outputs_jit = jax.jit(eval_outputs, static_argnums=(0, 3, 4, 5))
group_eval_outputs_jit = jax.jit(group_eval_outputs, static_argnames=("spec", "mesh", "mode"))
group_eval_metrics_jit = jax.jit(group_eval_metrics, static_argnames=("spec", "mode"))
_teacher_eval_outputs_jit = jax.jit(_teacher_eval_outputs, static_argnames=("spec", "mesh"))


def all_outputs(model, variables, images: jax.Array, batch_size: int, taps=(), mesh=None,
                view: augment.View | None = None) -> losses.Outputs:
    """Eval-mode outputs for every image, in fixed-shape batches (the last one padded)."""
    return map_eval_batches(lambda b: eval_outputs_jit(model, variables, b, taps, mesh, view), images,
                            batch_size, mesh=mesh)


def teacher_eval_outputs(spec: StepSpec, teacher_vars, images: jax.Array, batch_size: int,
                         mesh=None) -> losses.Outputs:
    """The teacher's (or teachers': logits ``[M, N, C]``) eval-mode outputs on every eval view."""
    if not spec.teacher_groups:
        return all_outputs(spec.teacher, teacher_vars, images, batch_size, spec.teacher_taps, mesh,
                           spec.teacher_view)
    return map_eval_batches(lambda b: _teacher_eval_outputs_jit(spec, teacher_vars, b, mesh=mesh), images,
                            batch_size, example_axis=1, mesh=mesh)


def group_val_outputs(spec: StepSpec, states, val_images, layout: Layout, batch_size: int, mesh,
                      mode: GroupMode) -> losses.Outputs:
    """Every run's student outputs ``[K, N, ...]`` on the validation views."""
    s_vars = {"params": states.params, "batch_stats": states.batch_stats}
    return map_eval_batches(
        lambda b: group_eval_outputs_jit(spec, s_vars, b, layout, mesh=mesh, mode=mode),
        val_images, batch_size, example_axis=1, mesh=mesh)
