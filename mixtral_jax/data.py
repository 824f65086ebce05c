"""Language-model data: Python sources → TFDS → SentencePiece tokens → packed batches.

Everything expensive (dataset, tokenizer, token streams) is cached under `config.data.data_dir`,
so only the first run pays for it.
"""

import contextlib
import hashlib
import os
import pathlib
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator

import ml_collections
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds
from absl import logging

from mixtral_jax import tokenizer as tokenizer_lib

SOURCES = ("stdlib",)
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})

Batch = dict[str, np.ndarray]


@contextlib.contextmanager
def _timed(what: str) -> Iterator[None]:
  logging.info("%s...", what)
  start = time.perf_counter()
  yield
  logging.info("%s took %.2f s.", what, time.perf_counter() - start)


def _sha1(data: str | bytes) -> str:
  return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()


def read_source_files(files_root: str) -> tuple[dict[str, str], int]:
  """Returns ({relative path: text} in sorted path order, number of non-UTF-8 files skipped)."""
  root = pathlib.Path(files_root)
  texts, num_skipped = {}, 0
  for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
    relative_path = path.relative_to(root)
    if _EXCLUDED_DIRS.intersection(relative_path.parts) or not path.is_file():
      continue
    try:
      texts[relative_path.as_posix()] = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      num_skipped += 1
  if not texts:
    raise ValueError(f"No UTF-8 *.py files found under {files_root}")
  return texts, num_skipped


def is_eval_file(relative_path: str, eval_fraction: float) -> bool:
  """Holds out ~eval_fraction of files, chosen by path hash so the split never changes."""
  bucket = int(_sha1(relative_path)[:16], 16) / 16**16  # uniform in [0, 1)
  return bucket < eval_fraction


class PythonSourceFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One example {"text", "path"} per `.py` file under `files_root`; splits train/eval."""

  VERSION = tfds.core.Version("1.0.0")
  # Nothing is downloaded, so there is no checksums file to find next to this code; looking for
  # one trips tensorflow/datasets#11212 (an undeclared `importlib_resources` import).
  code_path = None

  def __init__(self, *, files_root: str, eval_fraction: float, data_dir: str):
    self._files_root = files_root
    self._eval_fraction = eval_fraction
    # Distinct corpora (and interpreters, whose stdlibs differ) must not share a cache dir.
    self.corpus_id = _sha1(f"{files_root}|{sys.version}|{eval_fraction}")[:12]
    super().__init__(data_dir=os.path.join(data_dir, f"corpus_{self.corpus_id}"),
                     file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Python sources under {self._files_root}",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),  # persists num_skipped_files next to the data
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    texts, num_skipped = read_source_files(self._files_root)
    if num_skipped:
      logging.warning("Skipped %d non-UTF-8 files under %s.", num_skipped, self._files_root)
    self.info.metadata["num_skipped_files"] = num_skipped
    num_bytes = sum(len(text.encode("utf-8")) for text in texts.values())
    logging.info("Dataset: %d files (%.1f MB) under %s.", len(texts), num_bytes / 1e6,
                 self._files_root)
    split_paths = {"train": [], "eval": []}
    for path in texts:
      split_paths["eval" if is_eval_file(path, self._eval_fraction) else "train"].append(path)
    for split, paths in split_paths.items():
      if not paths:  # TFDS cannot write an empty split
        raise ValueError(f"config.data.eval_fraction={self._eval_fraction} leaves the {split} "
                         f"split of the {len(texts)} files under {self._files_root} empty")
    return {split: self._generate_examples(texts, paths) for split, paths in split_paths.items()}

  def _generate_examples(self, texts: dict[str, str], paths: list[str]):
    for path in paths:
      yield path, {"text": texts[path], "path": path}


def build_dataset(data_config: ml_collections.ConfigDict) -> PythonSourceFiles:
  """Returns the prepared source-file dataset for `config.data`, building it on first use."""
  if data_config.source not in SOURCES:
    raise ValueError(f"config.data.source: unknown source {data_config.source!r}; "
                     f"expected one of {list(SOURCES)}")
  files_root = data_config.files_root or sysconfig.get_paths()["stdlib"]
  builder = PythonSourceFiles(files_root=os.path.abspath(os.path.expanduser(files_root)),
                              eval_fraction=data_config.eval_fraction,
                              data_dir=os.path.expanduser(data_config.data_dir))
  if not builder.is_prepared():
    tfds.disable_progress_bar()  # tqdm bars would flood the training logs
    with _timed("Building dataset"):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def split_texts(builder: PythonSourceFiles, split: str) -> list[str]:
  """All documents of `split`, in the dataset's fixed order."""
  # Data sources return Text features as UTF-8 bytes.
  return [example["text"].decode("utf-8") for example in builder.as_data_source(split=split)]


def _dataset_id(builder: PythonSourceFiles) -> str:
  return f"{builder.name}-{builder.corpus_id}-{builder.version}"


def _get_tokenizer(config: ml_collections.ConfigDict,
                   builder: PythonSourceFiles) -> spm.SentencePieceProcessor:
  """Loads config.data.tokenizer_path, or trains (once) a tokenizer on the train split."""
  vocab_size = config.model.vocab_size
  path = config.data.tokenizer_path
  if not path:
    path = os.path.join(os.path.expanduser(config.data.data_dir), "tokenizers",
                        f"{_dataset_id(builder)}-bpe{vocab_size}.model")
    if not os.path.exists(path):
      with _timed(f"Training a {vocab_size}-piece BPE tokenizer"):
        tokenizer_lib.train_tokenizer(split_texts(builder, "train"), vocab_size, path)
  tokenizer = tokenizer_lib.load_tokenizer(path)
  if tokenizer.vocab_size() != vocab_size:
    raise ValueError(f"Tokenizer {path} has vocab size {tokenizer.vocab_size()} but "
                     f"config.model.vocab_size is {vocab_size}")
  if tokenizer.eos_id() < 0:
    raise ValueError(f"Tokenizer {path} defines no EOS token, needed between documents")
  return tokenizer


def _save_npy_atomically(path: str, array: np.ndarray) -> None:
  """Writes via a temp file in the same directory so readers never see a partial file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise


def _token_stream(builder: PythonSourceFiles, split: str, tokenizer: spm.SentencePieceProcessor,
                  data_dir: str) -> np.ndarray:
  """All documents of `split`, each followed by EOS, as one int32 stream (cached as .npy)."""
  tokenizer_id = _sha1(tokenizer.serialized_model_proto())[:12]
  path = os.path.join(data_dir, "tokens", f"{_dataset_id(builder)}-tok{tokenizer_id}-{split}.npy")
  if os.path.exists(path):
    return np.load(path)
  with _timed(f"Tokenizing the {split} split"):
    texts = split_texts(builder, split)
    eos = tokenizer.eos_id()
    stream = np.concatenate([np.array(doc + [eos], np.int32) for doc in tokenizer.encode(texts)])
  logging.info("%s: %d docs, %d tokens, %.2f chars/token.", split, len(texts), len(stream),
               sum(map(len, texts)) / len(stream))
  _save_npy_atomically(path, stream)
  return stream


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the tokens' empirical unigram distribution."""
  counts = np.bincount(tokens)
  probs = counts[counts > 0] / len(tokens)
  return float(-(probs * np.log(probs)).sum())


def _pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts the stream into non-overlapping rows of seq_len + 1 tokens, dropping the remainder."""
  num_rows = len(tokens) // (seq_len + 1)
  return tokens[:num_rows * (seq_len + 1)].reshape(num_rows, seq_len + 1)  # [N, T + 1]


def _batch(rows: np.ndarray) -> Batch:
  """Next-token-prediction batch from packed rows [B, T + 1]."""
  return {
      "inputs": rows[:, :-1],  # [B, T]
      "targets": rows[:, 1:],  # [B, T]
      "weights": np.ones((rows.shape[0], rows.shape[1] - 1), np.float32),  # [B, T]
  }


class LMData:
  """Packed token rows served as deterministic, resumable per-process batches."""

  def __init__(self, tokenizer: spm.SentencePieceProcessor, train_tokens: np.ndarray,
               eval_tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(f"Cannot split global_batch_size={global_batch_size} over "
                       f"process_count={process_count} for process_index={process_index}")
    self._train_rows = _pack(train_tokens, seq_len)  # [N_train, T + 1]
    self._eval_rows = _pack(eval_tokens, seq_len)  # [N_eval, T + 1]
    if len(self._train_rows) < global_batch_size:
      raise ValueError(f"The train split has {len(self._train_rows)} rows of seq_len + 1 = "
                       f"{seq_len + 1} tokens, fewer than global_batch_size={global_batch_size}; "
                       "use a larger corpus or lower config.seq_len / config.global_batch_size")
    if len(self._eval_rows) < global_batch_size:
      raise ValueError(f"The eval split has {len(self._eval_rows)} rows of seq_len + 1 = "
                       f"{seq_len + 1} tokens, fewer than global_batch_size={global_batch_size}; "
                       "raise config.data.eval_fraction or lower config.seq_len / "
                       "config.global_batch_size")
    self.tokenizer = tokenizer
    self.num_train_tokens = len(train_tokens)
    self.num_eval_tokens = len(eval_tokens)
    self.unigram_entropy = unigram_entropy(train_tokens)
    self.num_eval_batches = len(self._eval_rows) // global_batch_size
    self._global_batch_size = global_batch_size
    self._batch_size = global_batch_size // process_count
    self._process_offset = process_index * self._batch_size
    self._seed = seed

  def train_batch(self, step: int) -> Batch:
    """This process's share of global batch `step`, a pure function of (seed, step).

    Rows are reshuffled every epoch; each epoch's last partial batch is dropped.
    """
    num_rows = len(self._train_rows)
    epoch, batch_in_epoch = divmod(step, num_rows // self._global_batch_size)
    row_order = np.random.default_rng([self._seed, epoch]).permutation(num_rows)
    start = batch_in_epoch * self._global_batch_size + self._process_offset
    return _batch(self._train_rows[row_order[start:start + self._batch_size]])

  def eval_batches(self, num_batches: int) -> Iterator[Batch]:
    """This process's share of the first `num_batches` eval batches, in a fixed order."""
    if num_batches > self.num_eval_batches:
      raise ValueError(f"Requested {num_batches} eval batches but the eval split only has "
                       f"{self.num_eval_batches} of global_batch_size={self._global_batch_size}")
    for index in range(num_batches):
      start = index * self._global_batch_size + self._process_offset
      yield _batch(self._eval_rows[start:start + self._batch_size])


def make_data(config: ml_collections.ConfigDict, process_index: int = 0,
              process_count: int = 1) -> LMData:
  """Builds (or loads from cache) the dataset, tokenizer and token streams for `config`."""
  with _timed("Preparing data"):
    builder = build_dataset(config.data)
    tokenizer = _get_tokenizer(config, builder)
    data_dir = os.path.expanduser(config.data.data_dir)
    data = LMData(tokenizer,
                  _token_stream(builder, "train", tokenizer, data_dir),
                  _token_stream(builder, "eval", tokenizer, data_dir),
                  seq_len=config.seq_len,
                  global_batch_size=config.global_batch_size,
                  seed=config.seed,
                  process_index=process_index,
                  process_count=process_count)
  logging.info("Data: %d train / %d eval tokens; unigram entropy %.3f nats/token.",
               data.num_train_tokens, data.num_eval_tokens, data.unigram_entropy)
  return data
