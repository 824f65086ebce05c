"""Tests for mixtral_jax.data on a small generated source tree (never the real stdlib)."""

import collections
import logging
import math
import os
import pathlib
import re

import ml_collections
import numpy as np
import pytest

from mixtral_jax import data as data_lib
from mixtral_jax import tokenizer as tokenizer_lib

VOCAB_SIZE = 320
EVAL_FRACTION = 0.25
SEQ_LEN = 16
GLOBAL_BATCH_SIZE = 4


def _python_source(index: int) -> str:
  return "".join(f"def handler_{index}_{j}(request, limit={j * 7}):\n"
                 f'    """Handles request {j} of module {index}."""\n'
                 "\tif request.size > limit:\n"
                 f"        return [item for item in request.items if item.id % {j + 2} == 0]\n\n"
                 for j in range(6))


@pytest.fixture
def corpus(tmp_path) -> tuple[pathlib.Path, dict[str, str]]:
  """A source tree, and the {relative path: text} the dataset must hold (the UTF-8 .py files)."""
  root = tmp_path / "src"
  expected = {f"pkg{i % 3}/sub{i % 2}/module_{i}.py": _python_source(i) for i in range(24)}
  ignored = {"site-packages/dep.py": "A = 1\n", "dist-packages/dep.py": "B = 2\n",
             "pkg0/notes.txt": "not python\n"}
  for relative_path, text in (expected | ignored).items():
    (root / relative_path).parent.mkdir(parents=True, exist_ok=True)
    (root / relative_path).write_text(text)
  (root / "pkg1/latin1.py").write_bytes(b"NAME = '\xe9t\xe9'\n")
  return root, expected


def _config(tmp_path: pathlib.Path, files_root: pathlib.Path,
            **data_overrides) -> ml_collections.ConfigDict:
  data = dict(source="stdlib", data_dir=str(tmp_path / "cache"), tokenizer_path="",
              eval_fraction=EVAL_FRACTION, files_root=str(files_root))
  return ml_collections.ConfigDict(dict(seed=0, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH_SIZE,
                                        model=dict(vocab_size=VOCAB_SIZE),
                                        data=data | data_overrides))


def _split_paths(builder: data_lib.PythonSourceFiles, split: str) -> set[str]:
  return {example["path"].decode() for example in builder.as_data_source(split=split)}


def _rows(batch: data_lib.Batch) -> set[tuple[int, ...]]:
  return {tuple(row) for row in batch["inputs"]}


def test_splits_partition_the_files_by_path_hash(tmp_path, corpus):
  root, expected = corpus
  builder = data_lib.build_dataset(_config(tmp_path, root).data)
  train, eval_ = _split_paths(builder, "train"), _split_paths(builder, "eval")
  assert train | eval_ == set(expected) and not train & eval_
  assert eval_ == {p for p in expected if data_lib.is_eval_file(p, EVAL_FRACTION)}
  assert sorted(data_lib.split_texts(builder, "eval")) == sorted(expected[p] for p in eval_)


def test_split_is_the_same_for_independent_builds(tmp_path, corpus):
  first = data_lib.build_dataset(_config(tmp_path / "a", corpus[0]).data)
  second = data_lib.build_dataset(_config(tmp_path / "b", corpus[0]).data)
  assert _split_paths(first, "eval") == _split_paths(second, "eval")


def test_non_utf8_files_are_skipped_and_counted(tmp_path, corpus, caplog):
  with caplog.at_level(logging.WARNING):
    builder = data_lib.build_dataset(_config(tmp_path, corpus[0]).data)
  assert builder.info.metadata["num_skipped_files"] == 1
  assert "Skipped 1 non-UTF-8 files" in caplog.text


def test_empty_dir_raises_naming_it(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=re.escape(str(empty))):
    data_lib.make_data(_config(tmp_path, empty))


def test_unknown_source_raises(tmp_path, corpus):
  with pytest.raises(ValueError, match=r"unknown source 'x'; expected one of \['stdlib'\]"):
    data_lib.make_data(_config(tmp_path, corpus[0], source="x"))


def test_batches_are_shifted_next_token_pairs(tmp_path, corpus):
  data = data_lib.make_data(_config(tmp_path, corpus[0]))
  for batch in (data.train_batch(0), next(data.eval_batches(1))):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((GLOBAL_BATCH_SIZE, SEQ_LEN), np.int32),
        "targets": ((GLOBAL_BATCH_SIZE, SEQ_LEN), np.int32),
        "weights": ((GLOBAL_BATCH_SIZE, SEQ_LEN), np.float32),
    }
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    np.testing.assert_array_equal(batch["weights"], 1.0)


def test_train_batch_is_a_pure_function_of_seed_and_step(tmp_path, corpus):
  # Separate caches, so the resumed run rebuilds dataset, tokenizer and tokens from scratch.
  first = data_lib.make_data(_config(tmp_path / "a", corpus[0]))
  resumed = data_lib.make_data(_config(tmp_path / "b", corpus[0]))
  for step in (0, 1, 7, 1000):
    for key, value in first.train_batch(step).items():
      np.testing.assert_array_equal(resumed.train_batch(step)[key], value)
  assert not np.array_equal(first.train_batch(0)["inputs"], first.train_batch(1)["inputs"])


def test_each_epoch_visits_every_row_once_in_a_new_order():
  tokens = np.arange(40 * (SEQ_LEN + 1), dtype=np.int32)  # 40 rows, told apart by first token
  data = data_lib.LMData(None, tokens, tokens, seq_len=SEQ_LEN, global_batch_size=4, seed=3)
  epochs = [[row for step in range(start, start + 10) for row in data.train_batch(step)["inputs"][:, 0]]
            for start in (0, 10)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(0, len(tokens), SEQ_LEN + 1))
  assert epochs[0] != epochs[1]


def test_processes_get_disjoint_shares_of_each_global_batch(tmp_path, corpus):
  config = _config(tmp_path, corpus[0])
  whole = data_lib.make_data(config)
  shares = [data_lib.make_data(config, process_index=i, process_count=2) for i in range(2)]
  for batches in ([d.train_batch(5) for d in shares], [next(d.eval_batches(1)) for d in shares]):
    assert all(b["inputs"].shape == (GLOBAL_BATCH_SIZE // 2, SEQ_LEN) for b in batches)
    assert not _rows(batches[0]) & _rows(batches[1])
  np.testing.assert_array_equal(np.concatenate([d.train_batch(5)["inputs"] for d in shares]),
                                whole.train_batch(5)["inputs"])


def test_eval_batches_are_fixed_and_bounded(tmp_path, corpus):
  data = data_lib.make_data(_config(tmp_path, corpus[0]))
  all_batches = [b["inputs"] for b in data.eval_batches(data.num_eval_batches)]
  np.testing.assert_array_equal([b["inputs"] for b in data.eval_batches(2)], all_batches[:2])
  with pytest.raises(ValueError, match="eval batches"):
    next(data.eval_batches(data.num_eval_batches + 1))


def test_eval_split_smaller_than_a_batch_raises():
  train_tokens = np.zeros(100 * (SEQ_LEN + 1), np.int32)
  eval_tokens = np.zeros(3 * (SEQ_LEN + 1), np.int32)
  with pytest.raises(ValueError, match="eval_fraction.*seq_len.*global_batch_size"):
    data_lib.LMData(None, train_tokens, eval_tokens, seq_len=SEQ_LEN, global_batch_size=4, seed=0)


def test_unigram_entropy_matches_a_direct_computation(tmp_path, corpus):
  root, expected = corpus
  data = data_lib.make_data(_config(tmp_path, root))
  train_texts = [t for p, t in expected.items() if not data_lib.is_eval_file(p, EVAL_FRACTION)]
  counts = collections.Counter()
  for ids in data.tokenizer.encode(train_texts):
    counts.update(ids + [data.tokenizer.eos_id()])
  total = sum(counts.values())
  assert data.num_train_tokens == total
  assert data.unigram_entropy == pytest.approx(
      -sum(c / total * math.log(c / total) for c in counts.values()), rel=1e-9)


def test_given_tokenizer_must_match_the_model_vocab_size(tmp_path, corpus):
  root, expected = corpus
  path = tokenizer_lib.train_tokenizer(expected.values(), 340, str(tmp_path / "given.model"))
  with pytest.raises(ValueError, match=f"{re.escape(path)}.*340.*{VOCAB_SIZE}"):
    data_lib.make_data(_config(tmp_path, root, tokenizer_path=path))
  config = _config(tmp_path, root, tokenizer_path=path)
  config.model.vocab_size = 340
  assert data_lib.make_data(config).tokenizer.vocab_size() == 340


def test_second_call_reuses_every_cache(tmp_path, corpus, monkeypatch):
  config = _config(tmp_path, corpus[0])
  first = data_lib.make_data(config)
  cache = tmp_path / "cache"
  cache_files = [*cache.glob("tokenizers/*.model"), *cache.glob("tokens/*.npy")]
  assert len(cache_files) == 3
  mtimes = [os.stat(f).st_mtime_ns for f in cache_files]

  def fail(*args, **kwargs):
    raise AssertionError("cache miss")

  monkeypatch.setattr(data_lib.PythonSourceFiles, "_split_generators", fail)
  monkeypatch.setattr(data_lib, "split_texts", fail)
  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", fail)
  second = data_lib.make_data(config)
  assert [os.stat(f).st_mtime_ns for f in cache_files] == mtimes
  np.testing.assert_array_equal(second.train_batch(3)["inputs"], first.train_batch(3)["inputs"])
  assert not list(cache.rglob(".tmp-*"))
