"""Data: packing, local-file and TFDS sources, per-process rows, resumable batches, bad input."""

import collections
import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from mixtral_jax.data import iterator as iterator_lib
from mixtral_jax.data import packing
from mixtral_jax.data import permutation, processes
from mixtral_jax.data import pipeline as data_lib
from mixtral_jax.data import sources
from mixtral_jax.parallel import sharding

VOCAB_SIZE = 320
BOS, EOS = 2, 3


def _text(index: int) -> str:
  return "".join(f"def handler_{index}_{j}(request, limit={j * 7}):\n"
                 f"    return [item for item in request.items if item.id % {j + 2} == 0]\n\n"
                 for j in range(3 + index % 5))


def _config(tmp_path, **data_overrides) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.update(seq_len=16, global_batch_size=4)
  config.model.vocab_size = VOCAB_SIZE
  config.data.update(source="files", data_dir=str(tmp_path / "cache"), eval_fraction=0.25,
                     num_streams=6)
  config.data.update(data_overrides)
  return config


@pytest.fixture
def corpus_dir(tmp_path) -> pathlib.Path:
  """30 .py files, a .txt and a .jsonl of 4 documents (one line blank)."""
  root = tmp_path / "corpus"
  for i in range(30):
    (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
    (root / f"pkg{i % 3}" / f"module_{i}.py").write_text(_text(i))
  (root / "notes.txt").write_text("plain text is one document\n")
  lines = [json.dumps({"text": _text(100 + i), "id": i}) for i in range(4)]
  (root / "records.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
  return root


def _expected_documents(root: pathlib.Path) -> set[str]:
  texts = {p.read_text() for p in root.rglob("*.py")} | {"plain text is one document\n"}
  return texts | {_text(100 + i) for i in range(4)}


def test_packing_hand_built_documents_gives_exact_rows():
  docs = [np.array([10, 11, 12]), np.array([20, 21]), np.array([30, 31, 32, 33, 34, 35])]
  stream = packing.Stream(lambda k: docs[k] if k < len(docs) else None, 5, BOS, EOS)
  rows = [stream.next_row() for _ in range(3)]
  assert stream.next_row() is None
  expected = {
      "inputs": [[BOS, 10, 11, 12, BOS], [20, 21, BOS, 30, 31], [32, 33, 34, 35, 0]],
      "targets": [[10, 11, 12, EOS, 20], [21, EOS, 30, 31, 32], [33, 34, 35, EOS, 0]],
      "segment_ids": [[1, 1, 1, 1, 2], [1, 1, 2, 2, 2], [1, 1, 1, 1, 0]],
      "positions": [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 3, 0]],
  }
  batch = packing.stack_rows(rows)
  for key, value in expected.items():
    np.testing.assert_array_equal(batch[key], value, err_msg=key)
  np.testing.assert_array_equal(batch["weights"], np.array(expected["segment_ids"]) > 0)


def test_stream_resumes_from_its_cursor():
  docs = [np.arange(100 * k, 100 * k + 3 + k) for k in range(12)]
  straight = packing.Stream(lambda k: docs[k % 12], 7, BOS, EOS)
  rows = [straight.next_row() for _ in range(10)]
  resumed = packing.Stream(lambda k: docs[k % 12], 7, BOS, EOS)
  for _ in range(4):
    resumed.next_row()
  resumed = packing.Stream(lambda k: docs[k % 12], 7, BOS, EOS, resumed.cursor)
  for row in rows[4:]:
    for key, value in resumed.next_row().items():
      np.testing.assert_array_equal(value, row[key])


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_permute_is_a_seeded_bijection(n):
  orders = [[permutation.permute(i, n, (0, epoch)) for i in range(n)] for epoch in range(2)]
  assert all(sorted(order) == list(range(n)) for order in orders)
  if n >= 7:
    assert orders[0] != orders[1] and orders[0] != list(range(n))


def test_local_files_build_a_tfds_dataset_of_every_document(tmp_path, corpus_dir):
  corpus = sources.open_corpus(_config(tmp_path, files=f"{corpus_dir}/**/*.py,"
                                                      f"{corpus_dir}/*.txt,{corpus_dir}/*.jsonl")
                               .data)
  train, held_out = list(corpus.train), list(corpus.eval)
  assert train and held_out and not set(train) & set(held_out)
  assert sorted(train + held_out) == sorted(_expected_documents(corpus_dir))
  # The split is by document name: a rebuild elsewhere gives the same one.
  again = sources.open_corpus(_config(tmp_path / "other", files=f"{corpus_dir}/**/*.py,"
                                      f"{corpus_dir}/*.txt,{corpus_dir}/*.jsonl").data)
  assert list(again.eval) == held_out


def test_a_corpus_another_run_finishes_building_meanwhile_is_read_whole(tmp_path, corpus_dir):
  # A sweep's two trials start together: this one makes its builder while the other is still
  # building the dataset, which is complete by the time this one checks.
  paths = sources.match_files(f"{corpus_dir}/**/*.py")
  make = lambda: sources.TextFiles(paths=paths, text_key="text", eval_fraction=0.25,
                                   data_dir=str(tmp_path))
  made_early = make()
  make().download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))  # the other run
  assert made_early.is_prepared() and not made_early.info.splits  # what this run would hold
  builders = iter([made_early])
  builder = sources._prepared(lambda: next(builders, None) or make(), str(tmp_path))
  assert len(builder.as_data_source(split="train")) > 0


def test_a_small_corpus_still_holds_out_one_document(tmp_path):
  # 17 names that the 2% hash split would all keep for training.
  names = [n for n in (f"LICENSE-{i}.txt" for i in range(100))
           if not sources.is_eval_document(n, 0.02)][:17]
  root = tmp_path / "licenses"
  root.mkdir()
  for i, name in enumerate(names):
    (root / name).write_text(_text(i))
  corpus = sources.open_corpus(_config(tmp_path, files=f"{root}/*.txt", eval_fraction=0.02).data)
  assert len(corpus.eval) == 1 and len(corpus.train) == 16
  assert sorted(list(corpus.train) + list(corpus.eval)) == sorted(_text(i) for i in range(17))
  # One document is too few, in one line.
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "LICENSE").write_text(_text(0))
  with pytest.raises(sources.DataError, match=r"^the corpus holds 1 document: training needs "
                                              r"at least 2"):
    sources.open_corpus(_config(tmp_path, files=f"{tmp_path}/one/*").data)


def test_jsonl_text_key_selects_the_field(tmp_path):
  root = tmp_path / "jsonl"
  root.mkdir()
  (root / "a.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(20)))
  corpus = sources.open_corpus(_config(tmp_path, files=f"{root}/*.jsonl", text_key="body",
                                       eval_fraction=0.3).data)
  assert sorted(list(corpus.train) + list(corpus.eval)) == sorted(f"doc {i}" for i in range(20))


def test_bad_files_are_skipped_with_a_count_and_bad_input_is_one_line(tmp_path, corpus_dir,
                                                                      caplog):
  (corpus_dir / "pkg0" / "latin1.py").write_bytes(b"NAME = '\xe9t\xe9'\n")
  (corpus_dir / "pkg1" / "blob.py").write_bytes(b"\x00\x01\x02binary")
  with caplog.at_level(logging.WARNING):
    corpus = sources.open_corpus(_config(tmp_path, files=f"{corpus_dir}/**/*.py").data)
  assert len(corpus.train) + len(corpus.eval) == 30
  assert "Skipped 2 binary or non-UTF-8 files of 32" in caplog.text

  with pytest.raises(sources.DataError, match=r"config.data.files: '.*nothing\*.txt' matches no"):
    sources.open_corpus(_config(tmp_path, files=f"{corpus_dir}/nothing*.txt").data)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  (empty / "b.txt").write_bytes(b"\xff\xfe")
  with pytest.raises(sources.DataError, match="hold no UTF-8 text documents"):
    sources.open_corpus(_config(tmp_path, files=f"{empty}/*.txt").data)
  (corpus_dir / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(sources.DataError, match=r"bad.jsonl:2: no string field 'text'"):
    sources.open_corpus(_config(tmp_path, files=f"{corpus_dir}/bad.jsonl").data)


class MixtralJaxTinyLines(tfds.core.GeneratorBasedBuilder):
  """A registered TFDS dataset made offline, standing in for lm1b & co."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"sentence": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(20)),
            "test": self._generate_examples(range(20, 26))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {"sentence": f"line {i}: " + _text(i)}


def test_tfds_source_reads_a_prepared_dataset_by_name(tmp_path):
  data_dir = str(tmp_path / "tfds")
  config = _config(tmp_path, source="tfds", tfds_name="mixtral_jax_tiny_lines",
                   text_key="sentence", data_dir=data_dir)
  with pytest.raises(sources.DataError, match="not prepared.*tfds build mixtral_jax_tiny_lines"):
    sources.open_corpus(config.data)
  tfds.builder("mixtral_jax_tiny_lines", data_dir=data_dir,
               file_format="array_record").download_and_prepare()
  corpus = sources.open_corpus(config.data)
  assert sorted(corpus.train) == sorted(f"line {i}: " + _text(i) for i in range(20))
  assert len(corpus.eval) == 6  # no "validation" split: "test" is held out
  with pytest.raises(sources.DataError, match="text_key='text'.*sentence"):
    sources.open_corpus(_config(tmp_path, source="tfds", tfds_name="mixtral_jax_tiny_lines",
                                data_dir=data_dir).data)
  with pytest.raises(sources.DataError, match="eval_split='validation'"):
    sources.open_corpus(_config(tmp_path, source="tfds", tfds_name="mixtral_jax_tiny_lines",
                                text_key="sentence", eval_split="validation",
                                data_dir=data_dir).data)
  with pytest.raises(sources.DataError, match="tfds_name='no_such_dataset'"):
    sources.open_corpus(_config(tmp_path, source="tfds", tfds_name="no_such_dataset").data)


@pytest.fixture
def data_config(tmp_path, corpus_dir):
  return _config(tmp_path, files=f"{corpus_dir}/**/*.py")


def test_processes_rows_together_are_the_one_process_batches(data_config):
  whole = data_lib.make_data(data_config)
  halves = [data_lib.make_data(data_config, rows) for rows in ([0, 3], [1, 2])]
  iterators = [data.train_iterator() for data in [whole] + halves]
  evals = [list(data.eval_batches(3)) for data in [whole] + halves]
  for batches in [[next(it) for it in iterators] for _ in range(5)] + list(zip(*evals)):
    full, first, second = batches
    for key in full:
      np.testing.assert_array_equal(full[key][[0, 3]], first[key], err_msg=key)
      np.testing.assert_array_equal(full[key][[1, 2]], second[key], err_msg=key)


def test_each_epoch_reads_every_document_once(data_config):
  data = data_lib.make_data(data_config)
  read = []
  tokenize = data.tokenize
  data.tokenize = lambda text: read.append(text) or tokenize(text)
  iterator = data.train_iterator()
  documents = list(data.corpus.train)
  while len(read) < 2.5 * len(documents):  # about two and a half epochs of batches
    next(iterator)
  counts = {doc: read.count(doc) for doc in documents}
  assert len(read) == sum(counts.values())  # only train documents
  # Epochs 0 and 1 read whole (each document twice); epoch 2 is under way. The streams keep
  # within a few documents of each other, so no document is read a third time early or
  # skipped.
  assert set(counts.values()) <= {2, 3} and 2 in counts.values() and 3 in counts.values()


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resuming_on_another_process_count_reads_each_document_once(data_config, before,
                                                                    after):
  """The state saved by `before` processes (merged, as the checkpoint holds it) resumes on
  `after`: the batches are the uninterrupted run's, and every document is read once."""
  split = {1: [[0, 1, 2, 3]], 2: [[0, 1], [2, 3]]}

  def reading(rows):
    data = data_lib.make_data(data_config, rows)
    read, tokenize = [], data.tokenize
    data.tokenize = lambda text: read.append(text) or tokenize(text)
    return data, read

  straight, straight_read = reading(None)
  iterator = straight.train_iterator()
  expected = [next(iterator) for _ in range(30)]  # over an epoch of this corpus
  first = [reading(rows) for rows in split[before]]
  iterators = [data.train_iterator() for data, _ in first]
  got = [[next(it) for it in iterators] for _ in range(13)]
  state = json.loads(json.dumps(iterator_lib.merge_states([it.get_state() for it in iterators])))
  second = [reading(rows) for rows in split[after]]
  iterators = [data.train_iterator(state) for data, _ in second]
  got += [[next(it) for it in iterators] for _ in range(17)]
  for want, parts in zip(expected, got):
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
  # A document under way at the save is tokenized again to continue it: count it once.
  continued = sum(1 for doc, offset in state["cursors"] if offset > 0)
  read = [text for _, r in first + second for text in r]
  assert continued and not collections.Counter(straight_read) - collections.Counter(read)
  assert sum((collections.Counter(read) - collections.Counter(straight_read)).values()) == continued


def test_batches_after_a_restored_state_equal_the_uninterrupted_run(data_config):
  data = data_lib.make_data(data_config)
  straight = data.train_iterator()
  batches = [next(straight) for _ in range(40)]  # several epochs of this small corpus
  interrupted = data.train_iterator()
  for _ in range(17):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # as stored in the checkpoint
  resumed = data_lib.make_data(data_config).train_iterator(state)
  for expected in batches[17:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  assert not np.array_equal(batches[0]["inputs"], batches[1]["inputs"])


def test_train_rows_are_full_next_token_pairs_within_documents(data_config):
  data = data_lib.make_data(data_config)
  for batch in (next(data.train_iterator()), next(data.eval_batches(1))):
    same = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    np.testing.assert_array_equal(batch["targets"][:, :-1][same], batch["inputs"][:, 1:][same])
  train = [next(it) for it in [data.train_iterator()] for _ in range(100)]
  assert all(b["weights"].min() == 1.0 for b in train)  # training rows are never padded
  # Only a row's first piece can continue a document; every later one starts with BOS.
  later_starts = np.concatenate([b["inputs"][:, 1:][b["positions"][:, 1:] == 0]
                                 for b in train])
  assert len(later_starts) and (later_starts == data.tokenizer.bos_id()).all()


def test_eval_batches_cover_the_split_in_order_then_pad(data_config):
  data = data_lib.make_data(data_config)
  batches = list(data.eval_batches(200))
  assert batches[-1]["weights"].sum() == 0  # the split ran out: padding only
  np.testing.assert_array_equal(list(data.eval_batches(4))[3]["inputs"], batches[3]["inputs"])
  # Row r is cut from eval documents r, r + B, …: reading it in order gives them back.
  documents, rows = data.corpus.eval, len(batches[0]["inputs"])
  for r in range(rows):
    tokens = np.concatenate([b["inputs"][r][b["weights"][r] > 0] for b in batches])
    expected = np.concatenate([[data.tokenizer.bos_id()] + data.tokenizer.encode(documents[i])
                               for i in range(r, len(documents), rows)])
    np.testing.assert_array_equal(tokens, expected)


def test_unigram_entropy_is_measured_once_and_cached(data_config, monkeypatch):
  data = data_lib.make_data(data_config)
  tokens = np.concatenate([data.tokenizer.encode(t) for t in data.corpus.train])
  assert data.unigram_entropy == pytest.approx(data_lib.unigram_entropy(tokens), rel=1e-9)
  monkeypatch.setattr(data_lib, "_sample_entropy", lambda *a: pytest.fail("not cached"))
  monkeypatch.setattr(data_lib.tokenizer_lib, "train_tokenizer",
                      lambda *a: pytest.fail("tokenizer not cached"))
  assert data_lib.make_data(data_config).unigram_entropy == data.unigram_entropy


def test_tokenizer_must_match_the_model_vocab_size(tmp_path, data_config):
  assert data_lib.make_data(data_config).tokenizer.vocab_size() == VOCAB_SIZE  # now cached
  data_config.model.vocab_size = VOCAB_SIZE + 20
  data_config.data.tokenizer_path = str(next((tmp_path / "cache" / "tokenizers").glob("*.model")))
  with pytest.raises(sources.DataError, match=f"vocab size {VOCAB_SIZE} but config.model"):
    data_lib.make_data(data_config)


def test_a_layout_assembles_its_rows_on_the_batch_sharding():
  """Rows split over (data, fsdp, expert) and replicated over tensor: every device gets its own."""
  mesh_config = default.get_config().mesh
  mesh_config.update(data=2, fsdp=1, expert=2, tensor=2)
  batch_sharding = sharding.batch_sharding(sharding.make_mesh(mesh_config, jax.devices()))
  layout = processes.ProcessRows(batch_sharding, 8)
  assert layout.rows == list(range(8))  # one process holds them all
  batch = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
  got = layout.global_batch(batch)["inputs"]
  assert got.sharding == batch_sharding
  for shard in got.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), batch["inputs"][shard.index])
