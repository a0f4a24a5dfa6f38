"""Models larger than memory: scoring and linear repair one layer at a time, and
writing pruned checkpoints tensor by tensor, straight from the base's
safetensors shards.

All of it works from a skeleton of the model built on the meta device
(parameters take no memory; buffers such as rotary frequencies are real), and
reads only the tensors it needs with ``safe_open``:

- **the layer walk** (`score_layers_sequentially`, `fit_linear_sequentially`)
  first runs every calibration window through the model with each decoder
  layer replaced by a stand-in that records what the model hands it: the
  hidden state, the attention mask for that layer's type (sliding or full)
  and the rotary embeddings. These are exactly what the full model would
  pass, because the model's own forward computed them. Then it loads one
  layer at a time (through transformers' own loading, so stored-per-expert
  MoE weights are fused as ``from_pretrained`` fuses them), runs the
  recorded inputs through it, keeps the outputs as the next layer's inputs
  and frees the layer. Scoring adds up the same per-token terms as
  `score_layers`; the repair gathers the same normal equations as
  ``prune(..., recovery="linear")``. Memory is one layer plus the
  activations (tokens x hidden).
- **materialize** (`materialize`) prunes the skeleton with the same `prune`
  that in-memory pruning uses, so the config, the tensor names and the shard
  layout are what `save_pruned` writes; it then copies each kept tensor from
  the base's shards into the new ones, one tensor in memory at a time, with
  any repair folded into the few tensors it changes. Removed layers are
  never read.
"""

from .checkpoint import Checkpoint, available_memory, checkpoint_bytes, meta_skeleton
from .walk import LinearRepair, fit_linear_sequentially, perplexity_sequentially, score_layers_sequentially
from .writing import materialize, pruned_record

__all__ = [
    "Checkpoint",
    "LinearRepair",
    "available_memory",
    "checkpoint_bytes",
    "fit_linear_sequentially",
    "materialize",
    "meta_skeleton",
    "perplexity_sequentially",
    "pruned_record",
    "score_layers_sequentially",
]
