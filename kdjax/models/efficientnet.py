"""torchvision's efficientnet architectures in flax.linen (being written)."""

SPECS: dict = {}
