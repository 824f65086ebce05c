"""Language-model data: corpus → SentencePiece tokens (the tokenizer trained once and cached) →
the train iterator (iterator.py) and in-order eval batches. Documents are tokenized as they are
read, so a corpus of any size streams."""

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm
from absl import logging

from mixtral_jax.data import packing, sources
from mixtral_jax.data import tokenizer as tokenizer_lib
from mixtral_jax.data.iterator import Batch, TrainIterator
from mixtral_jax.runtime.files import DirectoryLock, write_atomically

# Documents sampled (in a fixed order) for the printed unigram-entropy baseline.
_ENTROPY_SAMPLE_CHARS = 8_000_000


@contextlib.contextmanager
def _timed(what: str) -> Iterator[None]:
  logging.info("%s...", what)
  start = time.perf_counter()
  yield
  logging.info("%s took %.2f s.", what, time.perf_counter() - start)


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
