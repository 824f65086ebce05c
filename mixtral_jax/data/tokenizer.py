"""SentencePiece BPE tokenizer for source code and text: byte fallback, whitespace kept verbatim.

    mixtral-tokenizer train --files 'corpus/**/*.txt' --vocab 32000 --out corpus.model
"""

import hashlib
import io
import os
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from mixtral_jax.runtime.files import write_atomically

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# 256 byte pieces (byte fallback) + the 4 specials.
MIN_VOCAB_SIZE = 260

# SentencePiece's own default; it silently skips longer sentences.
_MAX_SENTENCE_BYTES = 4192
# ~16M chars train in a few seconds on 2 cores and tokenize stdlib within 1% as compactly as all
# 31 MB of it would.
DEFAULT_MAX_TRAIN_CHARS = 16_000_000
# The learned merges depend on the trainer's thread count, so pin it for reproducible models.
_TRAIN_THREADS = 4


def _training_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Yields runs of whole lines of at most _MAX_SENTENCE_BYTES, stopping after ~max_chars.

  Multi-line sentences let BPE learn pieces spanning newlines (e.g. '):\\n\\n').
  """
  num_chars = 0
  for text in texts:
    sentence: list[str] = []
    sentence_bytes = 0
    for line in text.splitlines(keepends=True):
      line_bytes = len(line.encode("utf-8"))
      if line_bytes > _MAX_SENTENCE_BYTES:
        continue  # e.g. embedded data blobs: SentencePiece cannot train on them
      if sentence_bytes + line_bytes > _MAX_SENTENCE_BYTES:
        yield "".join(sentence)
        sentence, sentence_bytes = [], 0
      sentence.append(line)
      sentence_bytes += line_bytes
      num_chars += len(line)
    if sentence:
      yield "".join(sentence)
    if num_chars >= max_chars:
      return


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str,
                    max_train_chars: int = DEFAULT_MAX_TRAIN_CHARS) -> str:
  """Trains a byte-fallback BPE model on (a prefix of) `texts`, writes it to `model_path`.

  Training is deterministic for a given input order. Returns `model_path`.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_sentences(texts, max_train_chars),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      # Code needs its exact whitespace: no NFKC, no collapsing, no implicit leading space.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,  # indentation runs become single pieces
      split_digits=True,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      num_threads=_TRAIN_THREADS,
      minloglevel=2,  # the trainer's per-iteration progress lines would flood the logs
  )
  write_atomically(model_path, model.getvalue())
  return model_path


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model; errors name `path`."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SentencePiece model not found: {path}")
  try:
    return spm.SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"Not a valid SentencePiece model: {path}") from e


def model_id(tokenizer: spm.SentencePieceProcessor) -> str:
  """Short content hash of a tokenizer, for cache file names."""
  return hashlib.sha1(tokenizer.serialized_model_proto()).hexdigest()[:12]
