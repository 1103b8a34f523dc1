"""torchvision's mobilenet architectures in flax.linen (being written)."""

SPECS: dict = {}
