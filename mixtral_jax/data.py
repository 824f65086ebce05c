"""Language-model batches: corpus → SentencePiece tokens → packed rows → per-process batches.

Documents are tokenized as they are read, so a corpus of any size streams. The batches are
defined globally — the same for any number of processes — and each process computes only the
rows its devices hold (`Layout`). Training rows come from document streams, each packing its
own slice of the shuffled documents; every step draws each row from a random one of that row's
streams, so a batch mixes many documents and a long document's rows are spread over many steps.
The iterator state (each stream's cursor) is a few integers that go into the checkpoint: after
a resume, on any number of processes, the next batch is the one the uninterrupted run would
have drawn.
"""

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import sentencepiece as spm
from absl import logging
from jax.experimental import multihost_utils

from mixtral_jax import packing
from mixtral_jax import sources
from mixtral_jax import tokenizer as tokenizer_lib
from mixtral_jax.files import DirectoryLock, write_atomically

Batch = dict[str, np.ndarray]
# Documents sampled (in a fixed order) for the printed unigram-entropy baseline.
_ENTROPY_SAMPLE_CHARS = 8_000_000


@contextlib.contextmanager
def _timed(what: str) -> Iterator[None]:
  logging.info("%s...", what)
  start = time.perf_counter()
  yield
  logging.info("%s took %.2f s.", what, time.perf_counter() - start)


_MASK64, _GOLDEN = (1 << 64) - 1, 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
  """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
  x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
  return x ^ (x >> 31)


def permute(index: int, n: int, key: tuple[int, ...]) -> int:
  """Position `index` of a keyed random permutation of range(n), in O(1) time and memory.

  A 4-round Feistel network is a bijection on 2^(2h) ≥ n values; stepping again while the result
  is ≥ n (cycle walking) restricts it to range(n). Unlike a stored permutation this scales to
  corpora of billions of documents.
  """
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask = (1 << half) - 1
  seed = 0
  for value in key:
    seed = _mix(seed ^ _mix((value + _GOLDEN) & _MASK64))
  round_keys = [_mix(seed + r) for r in range(4)]
  x = index
  while True:
    left, right = x >> half, x & mask
    for round_key in round_keys:
      left, right = right, left ^ (_mix(right ^ round_key) & mask)
    x = (left << half) | right
    if x < n:
      return x


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


class LMData:
  """A corpus, its tokenizer, and the train and eval batches' `rows` (default: all of them)."""

  def __init__(self, corpus: sources.Corpus, tokenizer: spm.SentencePieceProcessor,
               unigram_entropy: float, *, seq_len: int, global_batch_size: int, num_streams: int,
               seed: int, rows: Optional[Sequence[int]] = None):
    self.corpus, self.tokenizer, self.unigram_entropy = corpus, tokenizer, unigram_entropy
    self.rows = list(range(global_batch_size)) if rows is None else list(rows)
    self._seq_len, self._global_batch_size = seq_len, global_batch_size
    self._num_streams, self._seed = num_streams, seed

  def tokenize(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text), np.int32)

  def train_iterator(self, state: Optional[dict[str, Any]] = None) -> TrainIterator:
    """Training batches from the start, or from a (merged) `get_state()` saved earlier."""
    return TrainIterator(self.corpus.train, self.tokenize, seq_len=self._seq_len,
                         global_batch_size=self._global_batch_size,
                         num_streams=self._num_streams, seed=self._seed,
                         bos=self.tokenizer.bos_id(), eos=self.tokenizer.eos_id(),
                         rows=self.rows, state=state)

  def eval_batches(self, num_batches: int) -> Iterator[Batch]:
    """The first `num_batches` eval batches; all-padding rows once the split ends.

    Global row r packs eval documents r, r + B, r + 2B, … in order, so every process yields
    the same batches (collective eval steps stay in step) and they do not depend on how many
    processes there are.
    """
    docs, step = self.corpus.eval, self._global_batch_size
    streams = [packing.Stream(
        lambda k, r=r: self.tokenize(docs[r + k * step]) if r + k * step < len(docs) else None,
        self._seq_len, self.tokenizer.bos_id(), self.tokenizer.eos_id()) for r in self.rows]
    for _ in range(num_batches):
      yield packing.stack_rows([stream.next_row() or packing.empty_row(self._seq_len)
                                for stream in streams])


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the tokens' empirical unigram distribution."""
  counts = np.bincount(tokens)
  probs = counts[counts > 0] / len(tokens)
  return float(-(probs * np.log(probs)).sum())


def _sample_entropy(corpus: sources.Corpus, tokenizer: spm.SentencePieceProcessor) -> float:
  """Unigram entropy of a fixed sample of train documents (~8M chars)."""
  order = np.random.default_rng(0).permutation(len(corpus.train))
  tokens, chars = [], 0
  for index in order:
    text = corpus.train[int(index)]
    tokens.append(np.asarray(tokenizer.encode(text), np.int32))
    chars += len(text)
    if chars >= _ENTROPY_SAMPLE_CHARS:
      break
  return unigram_entropy(np.concatenate(tokens))


def _cached_entropy(corpus: sources.Corpus, tokenizer: spm.SentencePieceProcessor,
                    data_dir: str) -> float:
  tokenizer_id = tokenizer_lib.model_id(tokenizer)
  path = os.path.join(data_dir, "stats", f"{corpus.name}-tok{tokenizer_id}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)["unigram_entropy"]
  with _timed("Measuring the unigram entropy"):
    entropy = _sample_entropy(corpus, tokenizer)
  write_atomically(path, json.dumps({"unigram_entropy": entropy}).encode())
  return entropy


def _train_tokenizer(corpus: sources.Corpus, vocab_size: int, path: str) -> None:
  """Trains the corpus's BPE tokenizer into `path`; DataError (one line) if it cannot."""
  if vocab_size < tokenizer_lib.MIN_VOCAB_SIZE:
    raise sources.DataError(
        f"config.model.vocab_size={vocab_size} is too small for a trained tokenizer: byte "
        f"fallback needs at least {tokenizer_lib.MIN_VOCAB_SIZE} pieces")
  with _timed(f"Training a {vocab_size}-piece BPE tokenizer"):
    try:
      tokenizer_lib.train_tokenizer(corpus.train, vocab_size, path)
    except RuntimeError as e:  # SentencePiece's reason follows its source location
      reason = str(e).strip().splitlines()[0].rsplit("] ", 1)[-1]
      raise sources.DataError(f"cannot train a {vocab_size}-piece tokenizer on {corpus.name}: "
                              f"{reason}") from None


def _get_tokenizer(config: ml_collections.ConfigDict,
                   corpus: sources.Corpus) -> spm.SentencePieceProcessor:
  """Loads config.data.tokenizer_path, or trains (once) a tokenizer on the train split."""
  vocab_size = config.model.vocab_size
  path = config.data.tokenizer_path
  if not path:
    path = os.path.join(os.path.expanduser(config.data.data_dir), "tokenizers",
                        f"{corpus.name}-bpe{vocab_size}.model")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      # Runs started together (a sweep's trials) train it once: the others wait, then load it.
      with DirectoryLock(os.path.dirname(path), ".train.lock"):
        if not os.path.exists(path):
          _train_tokenizer(corpus, vocab_size, path)
  try:
    tokenizer = tokenizer_lib.load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise sources.DataError(f"config.data.tokenizer_path: {e}") from None
  if tokenizer.vocab_size() != vocab_size:
    raise sources.DataError(f"tokenizer {path} has vocab size {tokenizer.vocab_size()} but "
                            f"config.model.vocab_size is {vocab_size}")
  if tokenizer.bos_id() < 0 or tokenizer.eos_id() < 0:
    raise sources.DataError(f"tokenizer {path} lacks a BOS or EOS token, needed around documents")
  return tokenizer


def make_data(config: ml_collections.ConfigDict, rows: Optional[Sequence[int]] = None) -> LMData:
  """Opens (building on first use) the corpus and tokenizer of `config`, for batch `rows`."""
  with _timed("Preparing data"):
    corpus = sources.open_corpus(config.data)
    tokenizer = _get_tokenizer(config, corpus)
    entropy = _cached_entropy(corpus, tokenizer, os.path.expanduser(config.data.data_dir))
    data = LMData(corpus, tokenizer, entropy, seq_len=config.seq_len,
                  global_batch_size=config.global_batch_size,
                  num_streams=config.data.num_streams, seed=config.seed, rows=rows)
  logging.info("Data: %s, %d train / %d eval documents; unigram entropy %.3f nats/token.",
               corpus.name, len(corpus.train), len(corpus.eval), data.unigram_entropy)
  return data


class Layout:
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


def make_process_data(config: ml_collections.ConfigDict, layout: Layout) -> LMData:
  """This process's data (its `layout` rows); process 0 first builds any missing dataset or
  tokenizer cache, which processes sharing a data_dir would otherwise race to build."""
  if jax.process_index() == 0:
    data = make_data(config, layout.rows)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mixtral_jax: data prepared")
  if jax.process_index() > 0:
    data = make_data(config, layout.rows)
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
