"""Models larger than memory: score, repair, measure and write pruned checkpoints
one layer at a time, straight from the base's safetensors shards.

Everything works from a skeleton of the model on the meta device (parameters
take no memory; buffers such as rotary frequencies are real) and reads only
the tensors it needs with ``safe_open``. Memory is about one layer plus the
calibration activations (tokens x hidden), whatever the model's size.

- `checkpoint`: reading the shards safely, and the skeleton they fill;
- `walk`: the layer walk, and `LayerByLayerDriver`, which feeds it to the
  same metrics and repairs that run in memory (`score_layers_sequentially`,
  `fit_linear_sequentially`); `perplexity_sequentially`;
- `writing`: `materialize`, which writes what `save_pruned` would, tensor by
  tensor, and can verify it layer by layer before it is moved into place.
"""

from ..recovery.linear import LinearRepair
from .checkpoint import Checkpoint, available_memory, checkpoint_bytes, meta_skeleton
from .walk import (
    LayerByLayerDriver,
    WalkedReference,
    dense_driver,
    fit_linear_sequentially,
    perplexity_sequentially,
    score_layers_sequentially,
)
from .writing import materialize, pruned_record

__all__ = [
    "Checkpoint",
    "LayerByLayerDriver",
    "LinearRepair",
    "WalkedReference",
    "available_memory",
    "checkpoint_bytes",
    "dense_driver",
    "fit_linear_sequentially",
    "materialize",
    "meta_skeleton",
    "perplexity_sequentially",
    "pruned_record",
    "score_layers_sequentially",
]
