"""The MoE's token dispatchers: the router's choices → grouped buffer → experts → combine.

One is chosen per model, here, from the resolved model config (`make_dispatcher`):
- `CapacityDispatcher`: one device, E equal groups of C rows, one batched matmul; slots past an
  expert's capacity are dropped.
- `DroplessDispatcher`: one device, groups padded to blocks, the config's grouped matmul
  (`blocked` on CPU, `ragged_dot` on GPU/TPU); nothing is dropped.
- `ExpertParallelDispatcher` (expert_parallel.py): a multi-device mesh, experts split over its
  `expert` axis, tokens exchanged by all-to-all (padded or ragged).
Each is called as `dispatcher(tokens [N, D], routing, gate_up, down) → (out [N, D], dropped
fraction [])`. Sampling picks its dispatchers the same way, from `sampling_configs`.
"""

import ml_collections
from jax.sharding import Mesh

from mixtral_jax.model import dispatch as dispatch_lib
from mixtral_jax.model.expert_parallel import ExpertParallelDispatcher
from mixtral_jax.model.experts import apply_experts, expert_kernel
from mixtral_jax.model.router import Routing


class CapacityDispatcher:
  """Each expert gets C = ceil(capacity_factor · N · k / E) rows: one batched matmul."""

  def __init__(self, config: ml_collections.FrozenConfigDict):
    self.num_experts, self.capacity_factor = config.num_experts, config.capacity_factor
    self.chunks, self.kernel = config.expert_mlp_chunks, expert_kernel("batched")

  def __call__(self, tokens, routing: Routing, gate_up, down):
    num_tokens, k = routing.expert_index.shape
    capacity = dispatch_lib.expert_capacity(num_tokens, self.num_experts, k,
                                            self.capacity_factor)
    layout = dispatch_lib.capacity_layout(routing.expert_index, self.num_experts, capacity)
    rows = apply_experts(dispatch_lib.gather_rows(tokens, layout), gate_up, down, self.kernel,
                         layout, self.chunks)
    return dispatch_lib.combine(rows, layout, routing.combine_weights), layout.dropped_fraction


class DroplessDispatcher:
  """Each expert's group padded to whole blocks; the grouped matmul skips the padding."""

  def __init__(self, config: ml_collections.FrozenConfigDict):
    self.num_experts, self.block_size = config.num_experts, config.block_size
    self.chunks, self.kernel = config.expert_mlp_chunks, expert_kernel(config.grouped_matmul)

  def __call__(self, tokens, routing: Routing, gate_up, down):
    num_tokens, k = routing.expert_index.shape
    block_size = dispatch_lib.dropless_block_size(self.block_size, num_tokens * k,
                                                  self.num_experts)
    layout = dispatch_lib.dropless_layout(routing.expert_index, self.num_experts, block_size)
    rows = apply_experts(dispatch_lib.gather_rows(tokens, layout), gate_up, down, self.kernel,
                         layout, self.chunks)
    return dispatch_lib.combine(rows, layout, routing.combine_weights), layout.dropped_fraction


def make_dispatcher(config: ml_collections.FrozenConfigDict, mesh: Mesh = None):
  """The dispatcher of a model built from `config` (resolved: config.model_config) on `mesh`."""
  if mesh is not None and mesh.size > 1:
    return ExpertParallelDispatcher(config, mesh)
  if config.dispatch == "capacity":
    return CapacityDispatcher(config)
  return DroplessDispatcher(config)


def sampling_configs(model_config: ml_collections.FrozenConfigDict, batch: int
                     ) -> tuple[ml_collections.FrozenConfigDict, ml_collections.FrozenConfigDict]:
  """(prefill, decode step) model configs of sampling `batch` rows, which choose their
  dispatchers through `make_dispatcher`.

  Both are dropless: capacity would drop slots depending on what else is in the batch. A decode
  step routes only batch × k token-slots, so its blocks are sized to them; on CPU (the blocked
  grouped matmul) a small batch instead takes capacity dispatch with one row per token and
  expert (capacity_factor E/k): it drops nothing and runs all experts in one batched matmul,
  E/k× the slots' FLOPs but no loop of tiny blocks that each copy their expert's weights;
  measured faster below batch · k = 8 · E (benchmarks/README.md, sampling).
  """
  prefill = model_config.as_configdict()
  prefill.dispatch = "dropless"
  step = prefill.copy_and_resolve_references()
  slots = batch * step.experts_per_token
  if step.grouped_matmul == "blocked" and slots < 8 * step.num_experts:
    step.update(dispatch="capacity", capacity_factor=step.num_experts / step.experts_per_token)
  else:
    step.block_size = min(step.block_size, max(8, -(-slots // 8) * 8))
  return ml_collections.FrozenConfigDict(prefill), ml_collections.FrozenConfigDict(step)
