"""Data across processes: which rows of each global batch this process's devices hold, each
process's data built without racing the others for the caches, and the iterator state they
share in a checkpoint."""

from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mixtral_jax.data.iterator import Batch, TrainIterator, merge_states
from mixtral_jax.data.pipeline import LMData, make_data


class ProcessRows:
  """Which rows of each global [B, …] batch this process's devices hold (t5x's data layout).

  Taken from the batch sharding rather than the process index, so any mesh and device order
  works: rows may be split over processes in any pattern, or held by several.
  """

  def __init__(self, batch_sharding: jax.sharding.Sharding, global_batch_size: int):
    self.sharding, self.global_batch_size = batch_sharding, global_batch_size
    ranges = {device: range(*index[0].indices(global_batch_size)) for device, index in
              batch_sharding.addressable_devices_indices_map((global_batch_size,)).items()}
    self.rows = sorted({row for rows in ranges.values() for row in rows})
    where = {row: i for i, row in enumerate(self.rows)}
    # Each device's rows, as a slice of the local batch (a device's rows are contiguous).
    self._pieces = [(device, slice(where[rows[0]], where[rows[0]] + len(rows)))
                    for device, rows in ranges.items()]

  def global_batch(self, local_batch: Batch) -> dict[str, jax.Array]:
    """This process's `rows` of a batch → global arrays on the batch sharding."""
    return {key: jax.make_array_from_single_device_arrays(
                (self.global_batch_size,) + value.shape[1:], self.sharding,
                [jax.device_put(value[rows], device) for device, rows in self._pieces])
            for key, value in local_batch.items()}


def make_process_data(config: ml_collections.ConfigDict, rows: ProcessRows) -> LMData:
  """This process's data (its `rows`); process 0 first builds any missing dataset or
  tokenizer cache, which processes sharing a data_dir would otherwise race to build."""
  if jax.process_index() == 0:
    data = make_data(config, rows.rows)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mixtral_jax: data prepared")
  if jax.process_index() > 0:
    data = make_data(config, rows.rows)
  return data


def gather_data_state(batches: TrainIterator) -> dict[str, Any]:
  """The global iterator state (a checkpoint's meta is global).

  Every process must call it: with several, it is a collective.
  """
  state = batches.get_state()
  if jax.process_count() == 1:
    return merge_states([state])
  cursors = multihost_utils.process_allgather(np.asarray(state["cursors"], np.int32))
  return merge_states([{"step": state["step"], "cursors": c} for c in np.asarray(cursors)])


def saved_data_state(state: Any) -> Optional[dict[str, Any]]:
  """A checkpoint's data state to resume the iterator from; None (start afresh) if it has none.

  Checkpoints written before the state was global held one state per process.
  """
  if state is None:  # e.g. an imported HF model: no data consumed yet
    return None
  if not isinstance(state, dict):
    logging.warning("The checkpoint's data state is per process (an older format): the data "
                    "order restarts.")
    return None
  return state
