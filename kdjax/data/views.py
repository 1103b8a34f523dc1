"""A training batch's views, end to end on the device: the crop and flip, then the strong
augmentation a recipe asks for, in torchvision's and timm's order:

    RandomResizedCrop + flip (or a padded random crop)  ->  RandAugment / TrivialAugment (uint8)
    ->  ToTensor + Normalize  ->  RandomErasing  ->  Mixup / CutMix (images and soft targets)

Every draw is keyed by (seed, epoch, example) as the crops are: the crop from the example's key
(``augment.example_key``), the strong augmentation and the erasing from streams folded off it,
the batch's mixing from (seed, epoch, the batch's first example). So a resumed run, a run trained
in a group and a run on more processes see the same views, and the teacher sees exactly the view
the student sees (function matching: it runs on the mixed images). With none of them on (the
seed's recipe) the batch is what ``augment.train_views`` gives, bit for bit.

``ViewPipeline`` is the static part (hashable, in the step's spec); the mixing alphas are traced
(``MixAlphas``), so runs that differ only in them share one compilation.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.data import augment, mixing, randaugment

# streams folded off an example's key, apart from its crop's
_AUGMENT_STREAM = 0x52414E44
_ERASE_STREAM = 0x45524153
_MIX_STREAM = 0x4D495845


@dataclasses.dataclass(frozen=True)
class ViewPipeline:
    """What a batch's views go through besides the crop (all off by default).

    ``augment`` is an entry of ``randaugment.AUGMENTS`` (its ``num_ops``/``magnitude`` replaced by
    ``randaugment_ops``/``randaugment_magnitude`` for RandAugment); ``random_erasing`` timm's
    probability (pixel mode); ``mixup``/``cutmix`` whether each is on (their alphas are traced);
    ``mix_prob``, ``mix_switch_prob``, ``mix_mode`` timm's Mixup's ``prob``, ``switch_prob``,
    ``mode``; ``num_classes`` the soft targets' width; ``crop`` the crop before them: ``resized``
    (RandomResizedCrop, ``augment.random_view``) or ``pad`` (a padded random crop at the image's
    size, ``augment.pad_crop_view``, by ``crop_padding`` pixels)."""

    augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    mixup: bool = False
    cutmix: bool = False
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    mix_mode: str = "batch"
    num_classes: int = 2
    crop: str = "resized"
    crop_padding: int = 4

    @property
    def mixing(self) -> bool:
        return self.mixup or self.cutmix

    @property
    def strong(self) -> randaugment.AugmentSpec | None:
        if self.augment == "none":
            return None
        spec = randaugment.AUGMENTS[self.augment]
        if self.augment == "randaugment":
            spec = dataclasses.replace(spec, num_ops=self.randaugment_ops, magnitude=self.randaugment_magnitude)
        return spec

    def mix_config(self) -> mixing.MixupConfig:
        """timm's Mixup settings; smoothing is left to the cross-entropy (``--label_smoothing``)."""
        return mixing.MixupConfig(mixup_alpha=1.0 if self.mixup else 0.0, cutmix_alpha=1.0 if self.cutmix else 0.0,
                                  prob=self.mix_prob, switch_prob=self.mix_switch_prob, mode=self.mix_mode,
                                  label_smoothing=0.0, num_classes=self.num_classes)


class MixAlphas(NamedTuple):
    """The traced Beta parameters of mixup and cutmix (unused where that mixing is off)."""

    mixup: jax.Array
    cutmix: jax.Array


class ViewKey(NamedTuple):
    """What keys a batch's views: the run's seed, the epoch and the mixing alphas (traced)."""

    seed: jax.Array
    epoch: jax.Array
    alphas: MixAlphas


def _stream(keys: jax.Array, stream: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def train_views(rows, indices: jax.Array, mask: jax.Array, key: ViewKey, image_size: int,
                pipeline: ViewPipeline = ViewPipeline()):
    """The batch ``(images [B, s, s, 3] normalised, labels [B], mask [B], targets)`` of the examples
    ``indices`` whose stored images are ``rows`` (``batches.TrainArrays``); ``targets`` are the
    mixed soft targets ``[B, C]`` with mixing on, else None. ``image_size`` and ``pipeline`` are
    static under jit."""
    from kdjax.data.batches import Batch

    indices = jnp.asarray(indices)
    keys = jax.vmap(lambda i: augment.example_key(key.seed, key.epoch, i))(indices)
    if pipeline.crop == "pad":
        crops = jax.vmap(augment.pad_crop_view, in_axes=(0, 0, 0, None, None))(
            keys, rows.canvas, rows.sizes, image_size, pipeline.crop_padding)
    else:
        crops = jax.vmap(augment.random_view, in_axes=(0, 0, 0, 0, None))(
            keys, rows.canvas, rows.sizes, rows.orig_sizes, image_size)  # float32 holding 0..255
    strong = pipeline.strong
    if strong is not None:
        crops = strong.apply(_stream(keys, _AUGMENT_STREAM), crops.astype(jnp.uint8))
    images = augment.normalize(crops)
    if pipeline.random_erasing:
        images = mixing.random_erasing(_stream(keys, _ERASE_STREAM), images, pipeline.random_erasing)
    labels, mask = jnp.asarray(rows.labels), jnp.asarray(mask)
    if not pipeline.mixing:
        return Batch(images, labels, mask)
    mix_key = jax.random.fold_in(jax.random.fold_in(augment.example_key(key.seed, key.epoch, indices[0]),
                                                    _MIX_STREAM), 0)
    config = pipeline.mix_config()
    params = mixing.sample_mix(mix_key, mask, image_size, image_size, config,
                               alphas=jnp.stack([key.alphas.mixup, key.alphas.cutmix]))
    targets = mixing.mix_targets(labels, params, config)
    return Batch(mixing.mix_images(images, params), labels, mask, targets)
