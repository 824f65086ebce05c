"""Orbax checkpoints of the train state in WORKDIR/checkpoints/<step>/ (async, last K kept)."""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves the train state every `every_steps` and at the end; restores the latest one."""

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

  def latest_step(self) -> Optional[int]:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """The state saved at `step` (default: latest), shaped and sharded like `abstract_state`."""
    step = self._manager.latest_step() if step is None else step
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def maybe_save(self, step: int, state: Any, is_last: bool) -> bool:
    """Starts an async save at the interval or the last step; returns whether it saved."""
    if not (is_last or (self.every_steps and step % self.every_steps == 0)):
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=is_last)

  def close(self) -> None:
    """Waits for in-flight saves to complete."""
    self._manager.wait_until_finished()
    self._manager.close()
