"""Training batches defined globally, each process computing only its rows, resumable from a few
integers on any number of processes.

Training rows come from document streams, each packing its own slice of the shuffled documents;
every step draws each row from a random one of that row's streams, so a batch mixes many
documents and a long document's rows are spread over many steps. The iterator state (each
stream's cursor) goes into the checkpoint: after a resume, on any number of processes, the next
batch is the one the uninterrupted run would have drawn.
"""

import functools
from typing import Any, Optional, Sequence

import numpy as np

from mixtral_jax.data import packing, sources
from mixtral_jax.data.permutation import permute

Batch = dict[str, np.ndarray]


class TrainIterator:
  """Training batches — this process's rows of them — deterministic in (seed, documents) and
  resumable, whatever the number of processes.

  Global row r of every batch owns streams r·m … r·m + m − 1 (m = ⌈num_streams / batch⌉), and
  stream s packs documents j = s, s + S, s + 2S, … (S = m · batch) of an endless sequence in which
  every `len(documents)` entries are a fresh seeded permutation (one epoch). At step n, row r
  takes its next row from one of its m streams, drawn by a generator seeded by (seed, n). So a
  batch mixes many documents and spreads a long one over many steps, and a process computes
  only its `rows`. The state (the step and every stream's cursor) is global: a run resumed on
  another number of processes continues the same sequence.
  """

  def __init__(self, documents, tokenize, *, seq_len: int, global_batch_size: int,
               num_streams: int, seed: int, bos: int, eos: int, rows: Sequence[int],
               state: Optional[dict[str, Any]] = None):
    if not len(documents):
      raise sources.DataError("the train split holds no documents")
    self._documents, self._tokenize, self._seed = documents, tokenize, seed
    self._batch_size, self._rows = global_batch_size, list(rows)
    self._per_row = -(-num_streams // global_batch_size)
    self._num_streams = self._per_row * global_batch_size
    state = state or {"step": 0, "cursors": [[0, 0]] * self._num_streams}
    if len(state["cursors"]) != self._num_streams:
      raise sources.DataError(
          f"the saved data state has {len(state['cursors'])} streams, this run "
          f"{self._num_streams} (data.num_streams rounded up to a multiple of "
          f"global_batch_size): keep both to resume")
    self.step = state["step"]
    owned = [row * self._per_row + j for row in self._rows for j in range(self._per_row)]
    self._streams = {
        s: packing.Stream(functools.partial(self._document, s), seq_len, bos, eos,
                          packing.Cursor(*state["cursors"][s]))
        for s in owned}

  def _document(self, stream: int, k: int) -> np.ndarray:
    epoch, index = divmod(stream + k * self._num_streams, len(self._documents))
    return self._tokenize(self._documents[permute(index, len(self._documents),
                                                  (self._seed, epoch))])

  def get_state(self) -> dict[str, Any]:
    """The position as far as this process knows it: the next step and each stream's cursor,
    [-1, -1] for the streams of other processes' rows (see `merge_states`)."""
    cursors = [[-1, -1]] * self._num_streams
    for s, stream in self._streams.items():
      cursors[s] = [stream.cursor.doc, stream.cursor.offset]
    return {"step": self.step, "cursors": cursors}

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rng = np.random.default_rng([self._seed, self.step, 1])
    chosen = rng.integers(self._per_row, size=self._batch_size)
    self.step += 1
    return packing.stack_rows([self._streams[r * self._per_row + chosen[r]].next_row()
                               for r in self._rows])


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The global iterator state from every process's `get_state()` (rows held twice agree).

  Raises DataError if some stream is in none of them.
  """
  cursors = np.max(np.stack([np.asarray(s["cursors"], np.int32) for s in states]), axis=0)
  if (cursors < 0).any():
    raise sources.DataError("the processes' data states leave some streams out")
  return {"step": states[0]["step"], "cursors": cursors.tolist()}
