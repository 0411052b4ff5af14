"""Tensor (intra-layer) parallelism: Megatron-style sharded layers, sequence parallelism, plans.

- `layers.py`: column / row-parallel Linear, vocab-parallel Embedding, vocab-parallel cross-entropy;
- `tp_comm.py`: the collectives as autograd functions (f, g and their sequence-parallel forms);
- `plan.py`: `apply_tensor_parallel(model, mesh, plan)`; without a plan, the model's own
  (its ParallelSpec's `tp_plan`, plait.parallel_spec).
"""

from plait.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLoss,
    padded_vocab,
    vocab_parallel_cross_entropy,
)
from plait.tensor_parallel.plan import STYLES, TensorParallel, apply_tensor_parallel, plan_for
from plait.tensor_parallel.tp_comm import (
    all_reduce_grad_hook,
    copy_to_tp,
    gather_seq,
    reduce_from_tp,
    reduce_scatter_seq,
)

__all__ = [
    "STYLES", "ColumnParallelLinear", "RowParallelLinear", "TensorParallel",
    "VocabParallelEmbedding", "VocabParallelLoss", "all_reduce_grad_hook", "apply_tensor_parallel",
    "copy_to_tp", "gather_seq", "padded_vocab", "plan_for", "reduce_from_tp", "reduce_scatter_seq",
    "vocab_parallel_cross_entropy",
]
