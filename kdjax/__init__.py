"""kdjax: knowledge distillation of BatchNorm CNNs in JAX/Flax, with parity against PyTorch."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``kdjax.distill(...)`` and ``kdjax.evaluate(...)`` (``kdjax.api``), imported on first use so
    that ``import kdjax`` (and ``import kdjax.losses``) stays light."""
    if name == "distill":
        from kdjax.api import distill

        return distill
    if name == "evaluate":
        import importlib

        return importlib.import_module("kdjax.evaluate")
    raise AttributeError(f"module 'kdjax' has no attribute {name!r}")
