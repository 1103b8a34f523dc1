"""torchvision's vit architectures in flax.linen (being written)."""

SPECS: dict = {}
