"""Language-model batches: corpus → SentencePiece tokens → packed rows → per-process batches.

Documents are tokenized as they are read, so a corpus of any size streams. Each process reads
only its shard of the documents (every `process_count`-th one) and produces its share of each
global batch. Training rows come from `num_streams` streams per process, each packing its own
slice of the shuffled documents; every step draws its rows from a random subset of them, so a
batch mixes many documents and a long document's rows are spread over many steps. The iterator
state (each stream's cursor) is a few integers that go into the checkpoint: after a resume the
next batch is the one the uninterrupted run would have drawn.
"""

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import sentencepiece as spm
from absl import logging
from jax.experimental import multihost_utils

from mixtral_jax import packing
from mixtral_jax import sources
from mixtral_jax import tokenizer as tokenizer_lib
from mixtral_jax.files import write_atomically

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


def shard_indices(num_docs: int, process_index: int, process_count: int) -> range:
  """The documents process `process_index` reads: disjoint per process, all of them together."""
  return range(process_index, num_docs, process_count)


class TrainIterator:
  """This process's training batches, deterministic in (seed, documents) and resumable.

  Stream s packs documents j = s, s + S, s + 2S, … of an endless sequence in which every
  `len(documents)` entries are a fresh seeded permutation (one epoch). Step n's rows come from
  `batch_size` distinct streams drawn with a generator seeded by (seed, n).
  """

  def __init__(self, documents, tokenize, *, seq_len: int, batch_size: int, num_streams: int,
               seed: int, bos: int, eos: int, state: Optional[dict[str, Any]] = None):
    if not len(documents):
      raise sources.DataError("this process's shard of the train split holds no documents")
    self._documents, self._tokenize, self._seed = documents, tokenize, seed
    self._batch_size = batch_size
    self._num_streams = max(num_streams, batch_size)
    state = state or {"step": 0, "cursors": [[0, 0]] * self._num_streams}
    if len(state["cursors"]) != self._num_streams:
      raise sources.DataError(f"the saved data state has {len(state['cursors'])} streams, this "
                              f"run {self._num_streams}: keep config.data.num_streams to resume")
    self.step = state["step"]
    self._streams = [
        packing.Stream(functools.partial(self._document, s), seq_len, bos, eos,
                       packing.Cursor(*cursor))
        for s, cursor in enumerate(state["cursors"])]

  def _document(self, stream: int, k: int) -> np.ndarray:
    epoch, index = divmod(stream + k * self._num_streams, len(self._documents))
    return self._tokenize(self._documents[permute(index, len(self._documents),
                                                  (self._seed, epoch))])

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next step and each stream's cursor."""
    return {"step": self.step,
            "cursors": [[s.cursor.doc, s.cursor.offset] for s in self._streams]}

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rng = np.random.default_rng([self._seed, self.step, 1])
    chosen = rng.choice(self._num_streams, self._batch_size, replace=False)
    self.step += 1
    return packing.stack_rows([self._streams[s].next_row() for s in chosen])


class _Shard:
  """Documents `indices` of a split, as a sequence."""

  def __init__(self, texts: sources.Texts, indices: range):
    self._texts, self.indices = texts, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, k: int) -> str:
    return self._texts[self.indices[k]]


class LMData:
  """A corpus, its tokenizer, and this process's train and eval batches."""

  def __init__(self, corpus: sources.Corpus, tokenizer: spm.SentencePieceProcessor,
               unigram_entropy: float, *, seq_len: int, global_batch_size: int, num_streams: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count or not 0 <= process_index < process_count:
      raise sources.DataError(f"cannot split global_batch_size={global_batch_size} over "
                              f"process_count={process_count} for process_index={process_index}")
    self.corpus, self.tokenizer, self.unigram_entropy = corpus, tokenizer, unigram_entropy
    self.batch_size = global_batch_size // process_count
    self._seq_len, self._num_streams, self._seed = seq_len, num_streams, seed
    self.train_documents = _Shard(corpus.train, shard_indices(len(corpus.train), process_index,
                                                     process_count))
    self.eval_documents = _Shard(corpus.eval, shard_indices(len(corpus.eval), process_index,
                                                   process_count))

  def tokenize(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text), np.int32)

  def train_iterator(self, state: Optional[dict[str, Any]] = None) -> TrainIterator:
    """Training batches from the start, or from a `get_state()` saved earlier."""
    return TrainIterator(self.train_documents, self.tokenize, seq_len=self._seq_len,
                         batch_size=self.batch_size, num_streams=self._num_streams,
                         seed=self._seed, bos=self.tokenizer.bos_id(),
                         eos=self.tokenizer.eos_id(), state=state)

  def eval_batches(self, num_batches: int) -> Iterator[Batch]:
    """The first `num_batches` eval batches, in the split's order; all-padding once it ends.

    Every process yields the same number of batches, so collective eval steps stay in step.
    """
    docs = self.eval_documents
    stream = packing.Stream(lambda k: self.tokenize(docs[k]) if k < len(docs) else None,
                            self._seq_len, self.tokenizer.bos_id(), self.tokenizer.eos_id())
    for _ in range(num_batches):
      yield packing.stack_rows([stream.next_row() or packing.empty_row(self._seq_len)
                                for _ in range(self.batch_size)])


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


def make_data(config: ml_collections.ConfigDict, process_index: int = 0,
              process_count: int = 1) -> LMData:
  """Opens (building on first use) the corpus and tokenizer of `config` for one process."""
  with _timed("Preparing data"):
    corpus = sources.open_corpus(config.data)
    tokenizer = _get_tokenizer(config, corpus)
    entropy = _cached_entropy(corpus, tokenizer, os.path.expanduser(config.data.data_dir))
    data = LMData(corpus, tokenizer, entropy, seq_len=config.seq_len,
                  global_batch_size=config.global_batch_size,
                  num_streams=config.data.num_streams, seed=config.seed,
                  process_index=process_index, process_count=process_count)
  logging.info("Data: %s, %d train / %d eval documents; unigram entropy %.3f nats/token.",
               corpus.name, len(corpus.train), len(corpus.eval), data.unigram_entropy)
  return data


def make_process_data(config: ml_collections.ConfigDict) -> LMData:
  """This process's data; process 0 first builds any missing dataset or tokenizer cache.

  Processes sharing a data_dir would otherwise race to build the same files.
  """
  if jax.process_index() == 0:
    data = make_data(config, 0, jax.process_count())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mixtral_jax: data prepared")
  if jax.process_index() > 0:
    data = make_data(config, jax.process_index(), jax.process_count())
  return data


def global_batch(local_batch: Batch, batch_sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """This process's rows → global arrays on `batch_sharding` (every process passes its own)."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, value)
          for key, value in local_batch.items()}


def gather_data_states(batches: TrainIterator) -> list[dict]:
  """Every process's iterator state, by process index (a checkpoint's meta is global).

  Every process must call it: with several, it is a collective.
  """
  state = batches.get_state()
  if jax.process_count() == 1:
    return [state]
  cursors = multihost_utils.process_allgather(np.asarray(state["cursors"], np.int32))
  return [{"step": state["step"], "cursors": c.tolist()} for c in np.asarray(cursors)]


def process_data_state(states: Optional[list]) -> Optional[dict]:
  """This process's entry of `gather_data_states`; None (start afresh) if there is none."""
  if states is None:  # e.g. an imported HF model: no data consumed yet
    return None
  if len(states) != jax.process_count():
    logging.warning("The checkpoint's data state is for %d processes, this run has %d: the data "
                    "order restarts.", len(states), jax.process_count())
    return None
  return states[jax.process_index()]
