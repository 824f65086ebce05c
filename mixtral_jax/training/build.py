"""One way to build a run: config → mesh → model → optimizer → sharded state → jitted steps.

Training, conversion, the benchmarks and the tests all call `build`, so each compiles the
program `mixtral-train` runs, under one jit policy: the state and batch shardings given, the
state donated to the step that replaces it.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from mixtral_jax import config as config_lib
from mixtral_jax.data import packing
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.parallel import sharding
from mixtral_jax.training import checkpoint as checkpoint_lib
from mixtral_jax.training import step as step_lib
from mixtral_jax.training.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class Setup:
  """A config's training program and what it runs on; made by `build`."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: Mixtral
  optimizer: optax.GradientTransformation
  # The train state as `jax.ShapeDtypeStruct`s carrying their shardings: nothing allocated.
  abstract_state: step_lib.TrainState
  # The step-0 state (fresh parameters from config.seed); None when built abstract.
  state: Optional[step_lib.TrainState]
  state_sharding: step_lib.TrainState  # a NamedSharding per leaf
  batch_sharding: NamedSharding  # [B, T] rows split over the batch axes
  train_step: Callable  # (state, batch) → (state, metrics); donates `state`
  eval_step: Callable  # (params, batch) → (Σ token losses, Σ weights)
  init_state: Callable  # () → the step-0 state, created sharded
  state_from_params: Callable  # params → the step-0 state around them; donates `params`

  @property
  def model_config(self) -> ml_collections.FrozenConfigDict:
    """The model config the program was built from: `config.model` with its "auto" choices
    resolved for the devices' platform. Read this, not `config.model`, past `build`."""
    return self.model.config

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One global training batch's shapes, dtypes and sharding, as the data pipeline makes it."""
    shape = (self.config.global_batch_size, self.config.seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
             for key in packing.ROW_KEYS}
    batch["weights"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.batch_sharding)
    return batch

  def restore(self, checkpointer: checkpoint_lib.Checkpointer, step: Optional[int] = None,
              check: Optional[Callable[[checkpoint_lib.Meta, bool], None]] = None
              ) -> tuple[step_lib.TrainState, checkpoint_lib.Meta]:
    """(state, meta) of checkpoint `step` (default: latest), restored straight into this mesh's
    shardings; a parameters-only checkpoint (an HF import) gets a fresh optimizer state.
    `check` is Checkpointer.restore's."""
    return checkpointer.restore(self.abstract_state, step, self.state_from_params, check)


def build(config: ml_collections.ConfigDict, devices: Optional[Sequence[jax.Device]] = None, *,
          abstract: bool = False) -> Setup:
  """Validates `config` and builds its training program over `devices` (default: all).

  `abstract=True` allocates nothing (no `state`): for restoring a checkpoint into, conversion,
  and compiling for devices this host cannot run (e.g. a TPU topology's compile-only devices).
  It also leaves out the check that the config's collectives exist on this backend, as
  nothing will run. Raises config.ConfigError naming the first invalid field.
  """
  devices = jax.devices() if devices is None else list(devices)
  platform = devices[0].platform
  config_lib.validate(config, len(devices), None if abstract else platform)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Mixtral(config_lib.model_config(config.model, platform), mesh)
  optimizer = make_optimizer(config)

  boxed = jax.eval_shape(lambda: step_lib.init_state(config, model, optimizer))
  state_sharding = sharding.tree_shardings(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
      state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  init_state = jax.jit(lambda: nn.unbox(step_lib.init_state(config, model, optimizer)),
                       out_shardings=state_sharding)
  state_from_params = jax.jit(
      lambda params: step_lib.state_from_params(config, params, optimizer),
      in_shardings=(state_sharding.params,), out_shardings=state_sharding, donate_argnums=(0,))
  train_step = jax.jit(step_lib.make_train_step(config, model, optimizer),
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(model),
                      in_shardings=(state_sharding.params, batch_sharding))
  return Setup(config=config, mesh=mesh, model=model, optimizer=optimizer,
               abstract_state=abstract_state, state=None if abstract else init_state(),
               state_sharding=state_sharding, batch_sharding=batch_sharding,
               train_step=train_step, eval_step=eval_step, init_state=init_state,
               state_from_params=state_from_params)


def on_one_device(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose mesh is a single device (for parameters restored to one host)."""
  config = config.copy_and_resolve_references()
  config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  config.mesh.dcn.update(data=1, fsdp=1, expert=1, tensor=1)
  return config


def host_abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shapes of `config`'s float32 parameters, placed on the host CPU (nothing allocated)."""
  return build(on_one_device(config), jax.devices("cpu")[:1], abstract=True).abstract_state.params


def restore_params(workdir: str,
                   step: Optional[int] = None) -> tuple[Any, ml_collections.ConfigDict]:
  """(params, training config) of checkpoint `step` (default: latest) in `workdir`, on the host.

  Reads the parameters alone: no optimizer state, no model initialised to restore into.
  """
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise checkpoint_lib.CheckpointError(f"{checkpointer.directory}: no complete checkpoint")
  config = ml_collections.ConfigDict(checkpointer.meta(step).config)
  params = checkpointer.restore_params(host_abstract_params(config), step)
  checkpointer.close()
  return params, config
