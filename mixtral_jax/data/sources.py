"""Corpora as TFDS `array_record` data sources: random access to documents, no TensorFlow.

`config.data.source` picks one:
- "stdlib": this interpreter's standard-library `.py` files (on every machine; the default);
- "files": local text files matching `config.data.files` (comma-separated globs, `**` recurses);
  `.jsonl` files give one document per line, its `config.data.text_key` field;
- "tfds": any TFDS dataset `config.data.tfds_name`, prepared once (array_record) in
  `config.data.data_dir`.

Local files are built into a TFDS dataset under data_dir on first use, keyed by the files' names,
sizes and modification times, so a changed corpus is rebuilt and an unchanged one is reused.
"""

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from mixtral_jax.config import DATA_SOURCES
from mixtral_jax.errors import UserError
from mixtral_jax.runtime.files import DirectoryLock
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})


class DataError(UserError, ValueError):
  """The configured corpus cannot be read; the message names the field, file or line."""


def _sha1(data: str) -> str:
  return hashlib.sha1(data.encode()).hexdigest()


def match_files(patterns: str, excluded_dirs: frozenset = frozenset(),
                field: str = "config.data.files") -> list[str]:
  """Sorted files matching comma-separated glob `patterns`; DataError naming `field` if none do."""
  paths = set()
  for pattern in filter(None, (p.strip() for p in patterns.split(","))):
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
               if os.path.isfile(p) and not excluded_dirs.intersection(p.split(os.sep))]
    if not matched:
      raise DataError(f"{field}: {pattern!r} matches no files")
    paths.update(os.path.abspath(p) for p in matched)
  if not paths:
    raise DataError(f"{field} is empty; give a glob such as '~/corpus/**/*.txt'")
  return sorted(paths)


def _decode(path: str) -> str | None:
  """The file's text, or None for a binary or non-UTF-8 file."""
  with open(path, "rb") as f:
    data = f.read()
  if b"\0" in data:
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


def file_documents(path: str, name: str, text_key: str) -> Iterator[tuple[str, str]]:
  """(key, text) of each non-empty document in file `path`, keyed by its `name`.

  Yields (name, None) once for a binary or non-UTF-8 file. A `.jsonl` line that is not a JSON
  object with string field `text_key` raises DataError.
  """
  text = _decode(path)
  if text is None:
    yield name, None
    return
  if not path.endswith(".jsonl"):
    if text:
      yield name, text
    return
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
      raise DataError(f"{path}:{number}: no string field {text_key!r} "
                      "(set config.data.text_key)")
    if record[text_key]:
      yield f"{name}:{number}", record[text_key]


def read_documents(paths: Sequence[str], text_key: str,
                   warn: bool = True) -> Iterator[tuple[str, str]]:
  """(key, text) of every document in `paths`; warns with the count of skipped files if `warn`.

  Keys are paths relative to the files' common directory, so they (and the eval split chosen
  from them) are the same wherever the corpus lives.
  """
  root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
  skipped = 0
  for path in paths:
    for key, text in file_documents(path, os.path.relpath(path, root), text_key):
      if text is None:
        skipped += 1
      else:
        yield key, text
  if skipped and warn:
    logging.warning("Skipped %d binary or non-UTF-8 files of %d.", skipped, len(paths))


def _key_hash(key: str) -> float:
  return int(_sha1(key)[:16], 16) / 16**16


def is_eval_document(key: str, eval_fraction: float) -> bool:
  """Holds out ~eval_fraction of documents, chosen by key hash so the split never changes."""
  return _key_hash(key) < eval_fraction


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One example {"text", "key"} per document of the given files; splits train/eval by key."""

  VERSION = tfds.core.Version("2.0.0")
  # Nothing is downloaded, so there is no checksums file to find next to this code; looking for
  # one trips tensorflow/datasets#11212 (an undeclared `importlib_resources` import).
  code_path = None

  def __init__(self, *, paths: Sequence[str], text_key: str, eval_fraction: float,
               data_dir: str):
    self._paths, self._text_key, self._eval_fraction = list(paths), text_key, eval_fraction
    # Set when the hash split leaves a split empty (a small corpus): the document moved over.
    self._moved_to_eval = self._moved_to_train = None
    stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in self._paths]
    self.corpus_id = _sha1(json.dumps([stats, text_key, eval_fraction, str(self.VERSION)]))[:12]
    super().__init__(data_dir=os.path.join(data_dir, f"files_{self.corpus_id}"),
                     file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"{len(self._paths)} local text files",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "key": tfds.features.Text()}))

  def _is_eval(self, key: str) -> bool:
    return key == self._moved_to_eval or (key != self._moved_to_train and
                                          is_eval_document(key, self._eval_fraction))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    counts = {"train": 0, "eval": 0}
    lowest = highest = None  # (hash, key) of the documents first held out / last kept
    for key, _ in read_documents(self._paths, self._text_key):
      ranked = (_key_hash(key), key)
      counts["eval" if ranked[0] < self._eval_fraction else "train"] += 1
      lowest, highest = min(lowest or ranked, ranked), max(highest or ranked, ranked)
    total = sum(counts.values())
    if not total:
      raise DataError(f"the {len(self._paths)} files of the corpus hold no UTF-8 text documents")
    if total == 1:
      raise DataError("the corpus holds 1 document: training needs at least 2, one of them held "
                      "out for evaluation")
    # Too few documents for the fraction: hold out (or keep) the one the hash ranks first.
    if not counts["eval"] and self._eval_fraction > 0:
      self._moved_to_eval, counts = lowest[1], {"train": total - 1, "eval": 1}
    elif not counts["train"]:
      self._moved_to_train, counts = highest[1], {"train": 1, "eval": total - 1}
    for split, count in counts.items():
      if not count:  # TFDS cannot write an empty split
        raise DataError(f"config.data.eval_fraction={self._eval_fraction} leaves the {split} "
                        f"split of {sum(counts.values())} documents empty")
    return {split: self._generate_examples(split) for split in counts}

  def _generate_examples(self, split: str):
    for key, text in read_documents(self._paths, self._text_key, warn=False):
      if self._is_eval(key) == (split == "eval"):
        yield key, {"text": text, "key": key}


class Texts(Sequence):
  """Random access to the documents of one split as str."""

  def __init__(self, data_source, text_key: str):
    self._source, self._text_key = data_source, text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    text = self._source[index][self._text_key]
    return text.decode("utf-8") if isinstance(text, bytes) else text

  def __iter__(self) -> Iterator[str]:  # the data source signals the end by ValueError
    return (self[i] for i in range(len(self)))


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and eval documents; `name` identifies the corpus in cache file names."""
  name: str
  train: Texts
  eval: Texts


def _prepared(make_builder: Callable[[], tfds.core.DatasetBuilder],
              data_dir: str) -> tfds.core.DatasetBuilder:
  """A builder of `make_builder`'s dataset, built unless it was; the build runs under a lock on
  data_dir, as runs started together (a sweep's trials) would otherwise race to rename the same
  finished build into place."""
  if not make_builder().is_prepared():
    os.makedirs(data_dir, exist_ok=True)
    with DirectoryLock(data_dir, ".prepare.lock"):
      builder = make_builder()  # reads what another run built while this one waited
      if not builder.is_prepared():
        tfds.disable_progress_bar()  # tqdm bars would flood the training logs
        logging.info("Building the dataset in %s...", builder.data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  # A builder reads the dataset's info (its splits) when it is made: one made while another run
  # was still building it has none, even once it is prepared. Made now, it has all.
  return make_builder()


def _files_corpus(data_config, paths: list[str], name: str) -> Corpus:
  data_dir = os.path.expanduser(data_config.data_dir)
  builder = _prepared(lambda: TextFiles(paths=paths, text_key=data_config.text_key,
                                        eval_fraction=data_config.eval_fraction,
                                        data_dir=data_dir), data_dir)
  return Corpus(f"{name}-{builder.corpus_id}",
                Texts(builder.as_data_source(split="train"), "text"),
                Texts(builder.as_data_source(split="eval"), "text"))


def _tfds_corpus(data_config) -> Corpus:
  name, data_dir = data_config.tfds_name, os.path.expanduser(data_config.data_dir)
  if not name:
    raise DataError("config.data.tfds_name is empty; name a TFDS dataset, e.g. 'lm1b'")
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # TFDS raises several types for unknown names and configs
    raise DataError(f"config.data.tfds_name={name!r}: {str(e).splitlines()[0][:200]}") from None
  if not builder.is_prepared():
    raise DataError(
        f"TFDS dataset {name!r} is not prepared in {data_dir}; prepare it once (with network) "
        f"by `tfds build {name} --data_dir={data_dir} --file_format=array_record` and share "
        "data_dir")
  splits = builder.info.splits
  eval_split = data_config.eval_split or next((s for s in ("validation", "test") if s in splits),
                                              None)
  for field, split in (("train_split", data_config.train_split), ("eval_split", eval_split)):
    if split not in splits:
      raise DataError(f"config.data.{field}={split!r}: {name} has splits {sorted(splits)}")
  if data_config.text_key not in builder.info.features:
    raise DataError(f"config.data.text_key={data_config.text_key!r}: {name} has features "
                    f"{sorted(builder.info.features)}")
  try:
    sources = [builder.as_data_source(split=s) for s in (data_config.train_split, eval_split)]
  except Exception as e:
    raise DataError(f"TFDS dataset {name!r} in {data_dir} has no random access (prepare it with "
                    f"--file_format=array_record): {str(e).splitlines()[0][:200]}") from None
  label = f"tfds-{name.replace('/', '_').replace(':', '_')}-{builder.version}"
  return Corpus(label, *(Texts(s, data_config.text_key) for s in sources))


def open_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """The train/eval documents of `config.data`, building local-file datasets on first use."""
  if data_config.source == "stdlib":
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = match_files(os.path.join(stdlib, "**", "*.py"), _STDLIB_EXCLUDED_DIRS)
    return _files_corpus(data_config, paths, f"stdlib{sys.version_info[0]}{sys.version_info[1]}")
  if data_config.source == "files":
    return _files_corpus(data_config, match_files(data_config.files), "files")
  if data_config.source == "tfds":
    return _tfds_corpus(data_config)
  raise DataError(f"config.data.source={data_config.source!r}; expected one of {list(DATA_SOURCES)}")
