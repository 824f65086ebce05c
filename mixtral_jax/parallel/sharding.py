"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and activation is annotated with logical names (`embed`, `mlp`, `exp`, …);
only `LOGICAL_AXIS_RULES` below says which mesh axis, if any, splits each of them.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from mixtral_jax.config import MESH_AXES, ConfigError, mesh_shape

# Tokens are split over every axis but `tensor`: expert-parallel devices also hold their own
# tokens (GShard), and exchange them with all-to-all.
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_AXIS_RULES = (
    # Activations.
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("exp_router", None),
    ("norm", None),
    ("layers", None),  # the stacked axis of scan_layers' parameters
)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with axes (data, fsdp, expert, tensor) over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  dcn = [mesh_config.dcn[a] for a in MESH_AXES]
  if math.prod(dcn) == 1:
    array = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
  else:
    processes = len({d.process_index for d in devices})
    if math.prod(dcn) != processes:
      raise ConfigError(f"config.mesh.dcn: sizes {dict(zip(MESH_AXES, dcn))} multiply to "
                        f"{math.prod(dcn)}, but the devices belong to {processes} processes")
    within = [shape[a] // d for a, d in zip(MESH_AXES, dcn)]
    array = mesh_utils.create_hybrid_device_mesh(within, dcn, devices, process_is_granule=True)
  # Auto axes: jit/GSPMD propagates shardings outside the explicit shard_map MoE.
  return Mesh(array, MESH_AXES)


def logical_to_spec(names: Sequence[Optional[str]]) -> PartitionSpec:
  """PartitionSpec of mesh axes for a tuple of logical axis names."""
  return nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES)


def named_sharding(mesh: Mesh, names: Sequence[Optional[str]]) -> NamedSharding:
  """NamedSharding on `mesh` for logical axis names."""
  return NamedSharding(mesh, logical_to_spec(names))


def constrain(x: jax.Array, names: Sequence[Optional[str]], mesh: Optional[Mesh]) -> jax.Array:
  """Sharding constraint by logical names; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names))


def tree_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a (possibly abstract) tree whose leaves carry logical axis metadata.

  Leaves without metadata (step counters, RNG keys) are replicated.
  """
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, T] batch: rows split over the batch axes."""
  return named_sharding(mesh, ("batch", "length"))


def rows_per_device(mesh: Optional[Mesh], batch_size: int) -> int:
  """Rows of a [batch_size, T] batch each device holds under batch_sharding (all without a mesh)."""
  return batch_sharding(mesh).shard_shape((batch_size, 1))[0] if mesh is not None else batch_size
