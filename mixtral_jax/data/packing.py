"""Packing: documents concatenated and cut into fixed-length rows with segment ids and positions.

A document of tokens t becomes the next-token example inputs = [BOS] + t, targets = t + [EOS].
Examples are laid end to end and cut every `seq_len` tokens, so rows are full (no padding) until
the documents run out. Within a row each piece of a document is its own segment (ids 1, 2, …;
0 = padding) with positions restarting at 0, so attention never crosses a document boundary and
RoPE sees every piece as a sequence of its own. A document longer than the space left in a row
continues at the start of the next row, as a new segment.
"""

import dataclasses
from collections.abc import Callable
from typing import Optional

import numpy as np

Row = dict[str, np.ndarray]
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions")


def document_example(tokens: np.ndarray, bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of one document: [BOS] + t and t + [EOS]."""
  tokens = np.asarray(tokens, np.int32)
  return (np.concatenate([np.array([bos], np.int32), tokens]),
          np.concatenate([tokens, np.array([eos], np.int32)]))


def empty_row(seq_len: int) -> Row:
  """An all-padding row: segment 0, so zero weight."""
  return {key: np.zeros(seq_len, np.int32) for key in ROW_KEYS}


@dataclasses.dataclass
class Cursor:
  """Where a stream stands: document `doc` of its sequence, `offset` example tokens already cut."""
  doc: int = 0
  offset: int = 0


class Stream:
  """Cuts rows from a sequence of documents, in order; resumable from a `Cursor`.

  `document(k)` returns the tokens of the stream's k-th document, or None after the last one
  (an endless stream never returns None).
  """

  def __init__(self, document: Callable[[int], Optional[np.ndarray]], seq_len: int, bos: int,
               eos: int, cursor: Optional[Cursor] = None):
    self._document, self._seq_len, self._bos, self._eos = document, seq_len, bos, eos
    self.cursor = dataclasses.replace(cursor) if cursor else Cursor()
    self._example = None  # (inputs, targets) of document `cursor.doc`, tokenized once

  def _current(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
    if self._example is None:
      tokens = self._document(self.cursor.doc)
      if tokens is None:
        return None
      self._example = document_example(tokens, self._bos, self._eos)
    return self._example

  def next_row(self) -> Optional[Row]:
    """The next row [seq_len] of each of ROW_KEYS, padded if the documents end in it, or None."""
    row = empty_row(self._seq_len)
    filled, segment = 0, 0
    while filled < self._seq_len:
      example = self._current()
      if example is None:
        break
      inputs, targets = example
      take = min(self._seq_len - filled, len(inputs) - self.cursor.offset)
      piece = slice(self.cursor.offset, self.cursor.offset + take)
      segment += 1
      row["inputs"][filled:filled + take] = inputs[piece]
      row["targets"][filled:filled + take] = targets[piece]
      row["segment_ids"][filled:filled + take] = segment
      row["positions"][filled:filled + take] = np.arange(take)
      filled += take
      self.cursor.offset += take
      if self.cursor.offset == len(inputs):
        self.cursor = Cursor(self.cursor.doc + 1, 0)
        self._example = None
    return row if filled else None


def stack_rows(rows: list[Row]) -> Row:
  """Rows → a batch [B, seq_len] of each key, plus float32 `weights` (0 on padding)."""
  batch = {key: np.stack([row[key] for row in rows]) for key in ROW_KEYS}
  batch["weights"] = (batch["segment_ids"] > 0).astype(np.float32)
  return batch
