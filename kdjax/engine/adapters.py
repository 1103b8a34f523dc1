"""The modules a feature loss trains beside the student (FitNets' regressors, projectors): their
initialisation and their forward pass, per term of the objective and per tap pair.

Their variables are ``TrainState.aux``: optimised with the student, checkpointed with it, never
exported. Sizes come from the tapped features' shapes, so one adapter entry fits any pair of
architectures.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kdjax import losses


def modules(objective: losses.Objective, student_features: Mapping, teacher_features: Mapping) -> dict:
    """``{term: (module per pair)}`` for the objective's adapted terms, sized from the taps."""
    return {name: tuple(losses.LOSSES[name].adapter(student_features[s].shape, teacher_features[t].shape)
                        for s, t in objective.pairs_of(name)) for name in objective.adapted}


def init(objective: losses.Objective, student_shapes: Mapping, teacher_shapes: Mapping, key: jax.Array) -> dict:
    """Fresh ``{"params", "batch_stats"}`` of the objective's adapters, from the tapped features'
    shapes (``jax.ShapeDtypeStruct``s) and a run's ``key``."""
    params, stats = {}, {}
    for name, mods in modules(objective, student_shapes, teacher_shapes).items():
        for i, ((s_tap, _), module) in enumerate(zip(objective.pairs_of(name), mods)):
            x = jnp.zeros(student_shapes[s_tap].shape, jnp.float32)
            variables = module.init(jax.random.fold_in(key, len(params) * 64 + i), x, train=False)
            params.setdefault(name, {})[str(i)] = variables["params"]
            stats.setdefault(name, {})[str(i)] = variables.get("batch_stats", {})
    return {"params": params, "batch_stats": stats}


def adapt(objective: losses.Objective, aux: Mapping, student: losses.Outputs, teacher: losses.Outputs, train: bool,
          mask=None) -> tuple[dict, Any]:
    """The adapted terms' student maps (``{term: (map per pair)}``) and the adapters' new
    BatchNorm statistics (updated in train mode, over the real examples of ``mask``)."""
    if not aux:
        return {}, aux
    adapted, stats = {}, {}
    for name, mods in modules(objective, student.features, teacher.features).items():
        maps = []
        for i, ((s_tap, _), module) in enumerate(zip(objective.pairs_of(name), mods)):
            variables = {"params": aux["params"][name][str(i)], "batch_stats": aux["batch_stats"][name][str(i)]}
            if train:
                y, updates = module.apply(variables, student.features[s_tap], train=True, mask=mask,
                                          mutable=["batch_stats"])
                stats.setdefault(name, {})[str(i)] = updates.get("batch_stats", {})
            else:
                y = module.apply(variables, student.features[s_tap], train=False)
                stats.setdefault(name, {})[str(i)] = variables["batch_stats"]
            maps.append(y)
        adapted[name] = tuple(maps)
    return adapted, {"params": aux["params"], "batch_stats": stats}
