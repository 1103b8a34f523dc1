"""kdjax: knowledge distillation of BatchNorm CNNs in JAX/Flax, with parity against PyTorch."""

__version__ = "0.1.0"
