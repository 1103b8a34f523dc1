"""Users' own networks: any flax.linen Module (or a Flax NNX one, through flax's ``nnx.bridge``)
as a teacher or a student, registered beside kdjax's architectures.

A user describes the network with a ``UserSpec``: its constructor ``build(num_classes)`` (given
``dtype=`` too when it takes one), the top-level name of its classifier head in ``params``, its
input spec (size, mean, std) and optional named feature taps (a tap names a submodule path whose
output a feature loss reads, e.g. ``{"stride16": "stage3"}``). ``register(name, spec)`` adds it
to the registry; ``from_module(module, ...)`` registers a module instance under a name of its own.
From the command line, ``--student_arch my_pkg.my_module:build`` imports ``build`` (a
``UserSpec``, or a function of no arguments returning one) and registers it under that string,
which a model directory's meta.json then records: loading it elsewhere imports it again.

The module is called as ``module(x, train=...)`` on NHWC float images and returns logits. kdjax
wraps it (``UserNetwork``) so that it answers kdjax's calling convention (``taps=``, ``mask=``)
without changing its variables: the wrapper shares the module's scope (``nn.share_scope``), so
``params`` and ``batch_stats`` are the module's own, and the taps are read by intercepting the
named submodules' outputs (``nn.intercept_methods``). BatchNorm inside a user's module sees
every row of a batch: kdjax's padding mask reaches only kdjax's own BatchNorm.

NNX: ``nnx_module(cls, *args, **kwargs)`` is ``nnx.bridge.to_linen``, which builds the NNX module
inside a Linen scope (its ``nnx.BatchNorm`` statistics in ``batch_stats``, its ``nnx.Dropout``
drawing from the ``dropout`` stream that kdjax gives every train step). The bridge is used rather
than a second code path so that NNX modules run through the same compiled step, vmap over runs,
checkpoints and sharding as Linen ones; its cost is that the NNX object is rebuilt on every call
(at trace time only, under jit).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.spec import InputSpec, ModelSpec


@dataclasses.dataclass(frozen=True)
class UserSpec:
    """What kdjax needs to know of a user's network.

    - ``build(num_classes)`` (or ``build(num_classes, dtype=...)``): a flax.linen Module whose
      ``__call__(x, train=...)`` maps NHWC images to logits.
    - ``head``: the top-level key of its classifier in ``params`` (what ``--student_train fc``
      trains and a new task replaces); None: the head modes and head replacement are refused.
    - ``input``: the input it expects: ``InputSpec(crop_size, resize_size, mean=, std=)``.
    - ``taps``: ``{tap name: submodule path}`` ("stage3" or "encoder/block_2") whose outputs
      feature losses may read.
    - ``fixed_size``: it takes ``input.crop_size`` only (a position embedding).
    """

    build: Callable[..., nn.Module]
    head: str | None = None
    input: InputSpec = InputSpec()
    taps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fixed_size: bool = False

    def __post_init__(self):
        if not callable(self.build):
            raise TypeError(f"UserSpec.build must be callable (num_classes -> flax module), got {self.build!r}")
        object.__setattr__(self, "taps", dict(self.taps))


def _takes_dtype(build: Callable) -> bool:
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):
        return False
    return "dtype" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class UserNetwork(nn.Module):
    """A user's module in kdjax's calling convention: ``(x, train, mask=None, taps=False)`` ->
    logits, or ``(logits, {tap: output})`` with ``taps``; the variables are the module's own."""

    build: Callable[..., nn.Module]
    num_classes: int
    dtype: Any = jnp.float32
    tap_paths: tuple[tuple[str, str], ...] = ()

    def setup(self):
        kwargs = {"dtype": self.dtype} if _takes_dtype(self.build) else {}
        self.net = self.build(self.num_classes, **kwargs)
        if not isinstance(self.net, nn.Module):
            raise TypeError(f"{self.build!r} returned {type(self.net).__name__}, not a flax.linen Module "
                            "(an NNX module goes through kdjax.models.nnx_module)")
        nn.share_scope(self, self.net)

    def __call__(self, x, train: bool = False, mask=None, taps: bool = False):
        del mask  # the user's BatchNorm takes none
        if not taps:
            return self._logits(self.net(x, train=train), x)
        wanted = {path: name for name, path in self.tap_paths}
        got: dict[str, jax.Array] = {}

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = "/".join(context.module.path)
            if context.method_name == "__call__" and path in wanted:
                got[wanted[path]] = out
            return out

        with nn.intercept_methods(intercept):
            logits = self.net(x, train=train)
        missing = sorted(set(wanted.values()) - set(got))
        if missing:
            raise ValueError(f"taps {missing} of this network were not produced: no submodule at "
                             f"{[p for p, n in wanted.items() if n in missing]} was called (submodule paths are "
                             "their names in params, joined by '/')")
        return self._logits(logits, x), got

    def _logits(self, out, x):
        """``out`` if it is ``[batch, num_classes]`` logits; else a ValueError saying what came."""
        shape = getattr(out, "shape", None)
        if shape is None or tuple(shape) != (x.shape[0], self.num_classes):
            what = f"shape {tuple(shape)}" if shape is not None else f"a {type(out).__name__}"
            raise ValueError(f"{type(self.net).__name__} returned {what}, not [batch, num_classes] = [{x.shape[0]}, "
                             f"{self.num_classes}] logits: its __call__(x, train) must return the classifier's "
                             "outputs (pool and flatten inside it; features go to UserSpec.taps)")
        return out


def _backbone_unavailable(module: nn.Module) -> nn.Module:
    raise NotImplementedError("a user network has no separable backbone")


def model_spec(name: str, spec: UserSpec) -> ModelSpec:
    """The registry entry of a user's network."""
    tap_paths = tuple(spec.taps.items())

    def build(num_classes: int, dtype=jnp.float32) -> nn.Module:
        return UserNetwork(spec.build, num_classes, dtype, tap_paths)

    return ModelSpec(
        name=name, build=build, head=spec.head or "", head_width=0, input=spec.input, taps=tuple(spec.taps),
        backbone=None, classify=None, torchvision="", fixed_size=spec.fixed_size)


def resolve(name: str) -> UserSpec:
    """The ``UserSpec`` that ``module.path:attribute`` names: the attribute itself, or what it
    returns when called with no arguments. Errors say what to make importable."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{name!r}: a user network is named MODULE:ATTRIBUTE (e.g. my_pkg.nets:build)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"network {name!r}: its module {module_name!r} cannot be imported here ({err}); install "
                         "it or put its folder on PYTHONPATH") from err
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"network {name!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(found, UserSpec) and callable(found):
        try:
            found = found()
        except TypeError as err:
            raise ValueError(f"network {name!r}: calling {attr}() failed ({err}); name a kdjax.models.UserSpec or a "
                             "function of no arguments returning one") from err
    if not isinstance(found, UserSpec):
        raise ValueError(f"network {name!r}: {attr} is {type(found).__name__}, not a kdjax.models.UserSpec (or a "
                         "function of no arguments returning one)")
    return found


def nnx_module(cls, *args, **kwargs) -> nn.Module:
    """A Flax NNX module class (and its constructor arguments, ``rngs`` left out) as a Linen
    module through ``flax.nnx.bridge.to_linen``: what a ``UserSpec.build`` returns for NNX."""
    from flax.nnx import bridge

    return bridge.to_linen(cls, *args, **kwargs)
