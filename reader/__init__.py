"""Stream shardpack (and plain WebDataset) shards into training.

``ShardReader`` yields numpy batches; ``image_dataset_from_shards`` wraps it as a
``tf.data.Dataset`` like ``keras.utils.image_dataset_from_directory``. Both are imported
lazily, so ``import reader`` loads neither TensorFlow nor the decoding stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .contact_sheet import preview
    from .shard_reader import ShardReader
    from .state import ShardReaderCheckpoint
    from .tf_data import image_dataset_from_shards
    from .torch_data import ShardIterableDataset

__all__ = [
    "ShardReader",
    "image_dataset_from_shards",
    "preview",
    "ShardIterableDataset",
    "ShardReaderCheckpoint",
]

_WHERE = {
    "ShardReader": ".shard_reader",
    "image_dataset_from_shards": ".tf_data",
    "preview": ".contact_sheet",
    "ShardIterableDataset": ".torch_data",
    "ShardReaderCheckpoint": ".state",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'reader' has no attribute {name!r}")
