"""torchvision's convnext architectures in flax.linen (being written)."""

SPECS: dict = {}
