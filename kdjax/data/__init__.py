"""The input pipeline: a data source (a folder, tfds, Parquet, arrays), its decode cache, torchvision's
transforms, the on-device augmentation and fixed-shape masked batches.

    folder        scan an ImageFolder tree (torchvision's rules), digest it
    hymenoptera   the study's data set: checksummed download and extraction
    sources       a dataset before decoding, the registry of its kinds, --data SPEC -> a source
    splits        kdjax's train/val/test as slices of a dataset's splits (tfds's syntax)
    records       datasets of numbered records (tfds, Parquet, arrays) as sources
    tfds_source   tfds:NAME[:VERSION], prepared ArrayRecord files read without TensorFlow
    parquet_source  hf:DIR|ID, Hugging Face Parquet files read with pyarrow
    arrays        from_arrays: (image, label) pairs held in Python as a source
    decode_cache  decode a source once into a tfds array_record cache keyed by its content
    transforms    torchvision's eval view (Resize + CenterCrop) on the host
    augment       RandomResizedCrop + flip + Normalize on the device, counter-based keys
    randaugment   RandAugment and TrivialAugmentWide on uint8 images (torchvision's ops, exactly)
    mixing        timm's RandomErasing and Mixup/CutMix
    views         a training batch's views: crop, strong augmentation, erasing, mixing
    batches       load the splits (held in memory or read on demand), epoch orders, batches
    stream        read a split's batches ahead on the host, each process its own rows (grain)

The names below are imported on first use, so ``kdjax.data.transforms`` (what prediction needs)
does not pull in tfds.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Batch": "batches", "Dataset": "batches", "EvalArrays": "batches", "Split": "batches",
    "TrainArrays": "batches", "epoch_order": "batches", "eval_batch": "batches",
    "load_splits": "batches", "LoadOptions": "batches", "put_batch": "batches",
    "put_epoch_order": "batches", "put_replicated": "batches", "take_rows": "batches",
    "train_views": "batches", "decide_in_memory": "batches", "IN_MEMORY_CHOICES": "batches",
    "DataError": "folder", "from_arrays": "arrays", "open_data": "sources", "SourceOptions": "sources",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"kdjax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kdjax.data' has no attribute {name!r}")
