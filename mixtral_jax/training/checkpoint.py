"""Orbax checkpoints in WORKDIR/checkpoints/<step>/: async saves, the last K kept, safe resume.

A checkpoint holds three Orbax items: `params`, `train` (every other field of the train state:
step, optimizer state, RNG, …) and `meta` (a `Meta`: the config it was trained with and the data
position). The parameters are an item of their own so that export reads them alone, without the
AdamW moments (twice their size); a checkpoint imported from HF holds no `train` item and
resumes with a fresh optimizer state. Orbax writes a save into a temporary directory and renames
it only when complete, so a crash mid-save leaves no `<step>` directory, only a temporary one
that is ignored and cleaned up on restart.

    mixtral-checkpoint info [--verify] WORKDIR

`--verify` reads every array back (into host memory) and marks the checkpoints that fail.
"""

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from absl import flags
from etils import epath

from mixtral_jax.errors import UserError
from mixtral_jax.parallel import distributed
from mixtral_jax.runtime import event_loops
from mixtral_jax.runtime.workdir import WorkDir


class CheckpointError(UserError, ValueError):
  """A checkpoint cannot be used; the message names the directory and what does not match."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint's files cannot be read back (truncated, corrupt): an older one may serve."""


def _first_line(e: Exception) -> str:
  line = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  if len(line) > 200:  # the cause (e.g. "No space left on device") ends a long message
    line = f"{line[:120]} … {line[-75:]}"
  return f"{type(e).__name__}: {line}"


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _shapes(tree) -> dict[str, tuple]:
  return {_path_str(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


class _DropReadOnlyNote(logging.Filter):
  """Drops Orbax's note that a manager opened read-only is read-only: we asked for it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only(read_only: bool):
  """While a read-only manager is opened, its note about being read-only is not logged."""
  if not read_only:
    yield
    return
  note = _DropReadOnlyNote()
  logger = logging.getLogger("absl")
  logger.addFilter(note)
  try:
    yield
  finally:
    logger.removeFilter(note)


@dataclasses.dataclass(frozen=True)
class Meta:
  """What a checkpoint records besides arrays (its `meta` item, JSON)."""
  config: dict  # the training config, as JSON
  data_position: int  # index of the next training batch
  # The data iterator's global state (data.gather_data_state); None: the data starts afresh.
  data_state: Optional[dict] = None

  @classmethod
  def from_json(cls, record: dict) -> "Meta":
    return cls(record.get("config", {}), record.get("data_position", 0), record.get("data_state"))


def _train_item(state) -> dict[str, Any]:
  """Every field of a train-state dataclass but `params`."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "params"}


def _restore_args(tree) -> ocp.args.StandardRestore:
  return ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


class Checkpointer:
  """Saves train states (asynchronously unless told otherwise), keeping the last `keep`;
  restores the latest one.

  `save_bytes_in_flight` caps what a save encodes and writes at once (it must exceed the largest
  tensor). Orbax's default, 96 GB, lets one host saving a large model hold nearly a second copy
  of it in write buffers.
  """

  def __init__(self, workdir: str, keep: int = 1, read_only: bool = False,
               save_bytes_in_flight: Optional[int] = None, asynchronous: bool = True):
    self.workdir = WorkDir(workdir)
    self.directory = self.workdir.checkpoints
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory}: no checkpoints directory")
    event_loops.install()  # a failed read or write ends before we report it, not after
    if jax.process_count() > 1:
      # Orbax's default barrier is a device collective. Run from its background save thread it
      # can interleave with the train step's collectives in another order on each process
      # (gloo then aborts on a "collective mismatch"); the distributed client's barrier cannot.
      flags.FLAGS.set_default("experimental_orbax_use_distributed_barrier", True)
    limit = {"save_concurrent_gb": save_bytes_in_flight / 1e9} if save_bytes_in_flight else {}
    # Read-only, the saving options take the values Orbax would force (and warn about).
    saving = ({"save_interval_steps": 0, "max_to_keep": None, "cleanup_tmp_directories": False}
              if read_only else {"max_to_keep": keep, "cleanup_tmp_directories": True})
    # Reads go to the items' handlers, not through the manager, which ends each read at a
    # barrier of all processes: one whose shards fail to read would leave the others waiting
    # there (and meet them at the next read's). `restore` makes its own agreement instead.
    self._readers = {"params": ocp.StandardCheckpointHandler(),
                     "train": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with _quiet_read_only(read_only):
      self._manager = ocp.CheckpointManager(
          self.directory,
          item_handlers={"params": ocp.StandardCheckpointHandler(**limit),
                         "train": ocp.StandardCheckpointHandler(**limit),
                         "meta": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(
              enable_async_checkpointing=asynchronous, read_only=read_only,
              create=not read_only, **saving))

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    """The directory of checkpoint `step`."""
    return os.path.join(self.directory, str(step))

  def _read(self, step: int, item: str, args: ocp.args.CheckpointArgs) -> Any:
    """Item `item` of checkpoint `step`: this process's shards of it."""
    return self._readers[item].restore(epath.Path(self.step_dir(step)) / item, args=args)

  def meta(self, step: int) -> Meta:
    """The config and data position saved with `step`."""
    try:
      return Meta.from_json(self._read(step, "meta", ocp.args.JsonRestore()))
    except Exception as e:
      raise DamagedCheckpointError(f"{self.step_dir(step)} is not a readable mixtral_jax "
                                   f"checkpoint ({_first_line(e)})") from None

  def _check_shapes(self, step: int, meta: Meta, metadata, targets: dict[str, Any]) -> None:
    """Raises CheckpointError naming the first tensor of `targets` whose saved shape differs."""
    try:
      saved = _shapes({item: metadata[item] for item in targets})
    except Exception as e:
      raise CheckpointError(f"{self.step_dir(step)} holds no readable {' and '.join(targets)} "
                            f"({type(e).__name__})") from None
    for name, shape in _shapes(targets).items():
      if saved.get(name) != shape:
        raise CheckpointError(
            f"{self.step_dir(step)} does not match this model: {name} is "
            f"{saved.get(name, 'missing')} there, {shape} here "
            f"(checkpoint model config: {_model_summary(meta.config)})")

  def restore(self, abstract_state: Any, step: Optional[int] = None,
              from_params: Optional[Callable[[Any], Any]] = None,
              check: Optional[Callable[[Meta, bool], None]] = None) -> tuple[Any, Meta]:
    """(state, meta) saved at `step` (default: latest), shaped and sharded like `abstract_state`.

    `abstract_state` is a train-state dataclass of `jax.ShapeDtypeStruct`s (or arrays) with
    shardings; nothing is allocated but the restored arrays. A checkpoint of parameters alone (an
    HF import) gives `from_params(params)`, the step-0 state around them. `check(meta, has train
    state)`, if given, runs before any array is read and may raise. Raises CheckpointError
    naming the first tensor whose saved shape differs, and DamagedCheckpointError on every
    process if any process's shards do not read back (each reads its own; they agree through
    the coordination service, so all go on from the same checkpoint or none).
    """
    step = self.latest_step() if step is None else step
    meta = self.meta(step)
    metadata = self._manager.item_metadata(step)  # read once: it lists and shapes every item
    if check is not None:
      check(meta, metadata.get("train") is not None)
    targets = {"params": abstract_state.params}
    if metadata.get("train") is not None:
      targets["train"] = _train_item(abstract_state)
    elif from_params is None:
      raise CheckpointError(f"{self.step_dir(step)} holds parameters only (no optimizer state)")
    self._check_shapes(step, meta, metadata, targets)
    restored, failure = {}, ""
    try:
      for item, target in targets.items():
        restored[item] = self._read(step, item, _restore_args(target))
    except Exception as e:  # the shapes matched: the files themselves are bad
      failure = _first_line(e)
    failures = [(i, why) for i, why in enumerate(distributed.agree("restore", failure)) if why]
    if failures:
      process, why = failures[0]
      where = f" on process {process}" if jax.process_count() > 1 else ""
      raise DamagedCheckpointError(f"{self.step_dir(step)} is damaged: its arrays do not read "
                                   f"back{where} ({why})")
    if "train" not in restored:
      return from_params(restored["params"]), meta
    return abstract_state.replace(params=restored["params"], **restored["train"]), meta

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """The params of `step` (default: latest), shaped and sharded like `abstract_params`.

    Reads the `params` item alone, never the optimizer state. Raises CheckpointError naming the
    first parameter whose saved shape differs.
    """
    step = self.latest_step() if step is None else step
    self._check_shapes(step, self.meta(step), self._manager.item_metadata(step),
                       {"params": abstract_params})
    return self._read(step, "params", _restore_args(abstract_params))

  def verify(self, step: int) -> Optional[str]:
    """None if every array of checkpoint `step` reads back, else why not (one line).

    Reads the whole checkpoint into host memory, one item at a time.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    try:
      metadata = self._manager.item_metadata(step)
      for item in ("params", "train"):
        if metadata.get(item) is not None:
          target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                                metadata[item])
          self._read(step, item, ocp.args.StandardRestore(target))
    except Exception as e:
      return _first_line(e)
    return None

  def set_aside(self, step: int) -> str:
    """Renames damaged checkpoint `step` to `<step>.damaged` (kept for a look, no longer a
    step, so training can save that step again); returns the new path. Every process calls it:
    process 0 renames, and none goes on before the rename is done."""
    aside = f"{self.step_dir(step)}.damaged"
    if jax.process_index() == 0:
      os.replace(self.step_dir(step), aside)
    distributed.agree("set_aside", aside)
    self._manager.reload()
    return aside

  @contextlib.contextmanager
  def _saving(self):
    """Turns a failed save (e.g. a full disk), now or one in flight, into a one-line error."""
    try:
      yield
    except Exception as e:
      raise CheckpointError(f"saving a checkpoint in {self.directory} failed ({_first_line(e)}); "
                            f"{last_complete(self.workdir.path)}") from None

  def check(self) -> None:
    """Raises CheckpointError if an async save in flight has failed; cheap, never waits."""
    with self._saving():
      self._manager.check_for_errors()

  def save(self, step: int, state: Any, meta: Meta) -> None:
    """Starts an async save of `state` and `meta` as checkpoint `step`."""
    with self._saving():
      self._manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          train=ocp.args.StandardSave(_train_item(state)),
          meta=ocp.args.JsonSave(dataclasses.asdict(meta))), force=True)

  def save_params(self, step: int, params: Any, meta: Meta) -> None:
    """Starts an async save of `params` and `meta` alone (no train state) as checkpoint `step`.

    Pass jax arrays: Orbax copies numpy arrays whole before writing them.
    """
    with self._saving():
      self._manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          meta=ocp.args.JsonSave(dataclasses.asdict(meta))), force=True)

  def wait(self) -> None:
    """Blocks until in-flight saves are complete."""
    with self._saving():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves, then releases the manager and the readers."""
    self.wait()
    self._manager.close()
    for reader in self._readers.values():
      reader.close()


def last_complete(workdir: str) -> str:
  """Says which checkpoint is the last complete one ("the last complete checkpoint is step N",
  or that none is), as the disk says now: a manager that is saving also lists the step whose
  save just failed."""
  step = Checkpointer(workdir, read_only=True).latest_step()
  return "no checkpoint is complete yet" if step is None else (
      f"the last complete checkpoint is step {step}")


def _model_summary(config: dict) -> str:
  model = config.get("model", {})
  keys = ("num_layers", "hidden_size", "intermediate_size", "num_experts", "experts_per_token",
          "vocab_size")
  return ", ".join(f"{k}={model[k]}" for k in keys if k in model) or "unknown"


def info(workdir: str, verify: bool = False) -> list[dict[str, Any]]:
  """One record per complete checkpoint: step, size in bytes, data position, model summary;
  with `verify`, also `damaged`: None if every array reads back, else why not."""
  checkpointer = Checkpointer(workdir, read_only=True)
  records = []
  for step in checkpointer.all_steps():
    meta = checkpointer.meta(step)
    records.append({"step": step, "bytes": _dir_bytes(checkpointer.step_dir(step)),
                    "data_position": meta.data_position, "model": _model_summary(meta.config)})
    if verify:
      records[-1]["damaged"] = checkpointer.verify(step)
  return records
