"""Tests for mixtral_jax.tokenizer on a few KB of generated Python."""

import os
import re

import pytest

from mixtral_jax.cli import tokenizer as tokenizer_cli
from mixtral_jax.data import tokenizer as tokenizer_lib

VOCAB_SIZE = 320  # 256 byte-fallback pieces + 4 specials + ~40 characters + merges


def _python_source(index: int) -> str:
  return "".join(f"def handler_{index}_{j}(request, limit={j * 7}):\n"
                 f'    """Handles request {j} of module {index}."""\n'
                 "\tif request.size > limit:\n"
                 f"        return [item for item in request.items if item.id % {j + 2} == 0]\n"
                 "\n"
                 f"    raise ValueError('bad request: %r' % (request,))\n\n\n"
                 for j in range(10))


CORPUS = [_python_source(i) for i in range(8)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
  return tokenizer_lib.train_tokenizer(CORPUS, VOCAB_SIZE,
                                       str(tmp_path_factory.mktemp("tok") / "code.model"))


def test_round_trips_source_exactly(model_path):
  tokenizer = tokenizer_lib.load_tokenizer(model_path)
  source = ("class Foo:\n"
            "\n\n"
            "    def bar(self):  \n"  # trailing spaces
            "\t\treturn {'ключ': '漢字 🐍'}\r\n"  # tabs, CRLF, byte-fallback characters
            "        \n"  # whitespace-only line
            "  x  =   1\n\n")
  assert tokenizer.decode(tokenizer.encode(source)) == source
  assert tokenizer.decode(tokenizer.encode(CORPUS)) == CORPUS


def test_special_ids_and_vocab_size(model_path):
  tokenizer = tokenizer_lib.load_tokenizer(model_path)
  assert tokenizer.vocab_size() == VOCAB_SIZE
  assert [tokenizer.pad_id(), tokenizer.unk_id(), tokenizer.bos_id(), tokenizer.eos_id()] == [
      0, 1, 2, 3]


def test_indentation_becomes_one_piece(model_path):
  tokenizer = tokenizer_lib.load_tokenizer(model_path)
  assert "▁" * 4 in tokenizer.encode("    return x\n", out_type=str)


def test_training_is_deterministic(tmp_path, model_path):
  retrained = tokenizer_lib.train_tokenizer(CORPUS, VOCAB_SIZE, str(tmp_path / "again.model"))
  with open(model_path, "rb") as f, open(retrained, "rb") as g:
    assert f.read() == g.read()


def test_write_replaces_the_model_atomically_without_leftovers(tmp_path):
  path = tmp_path / "code.model"
  path.write_bytes(b"stale")
  tokenizer_lib.train_tokenizer(CORPUS, VOCAB_SIZE, str(path))
  assert os.listdir(tmp_path) == ["code.model"]
  assert tokenizer_lib.load_tokenizer(str(path)).vocab_size() == VOCAB_SIZE


def test_overlong_lines_do_not_crash_training(tmp_path):
  blob = "DATA = '" + "ab" * 10_000 + "'\n"
  path = tokenizer_lib.train_tokenizer([blob, *CORPUS], VOCAB_SIZE, str(tmp_path / "t.model"))
  tokenizer = tokenizer_lib.load_tokenizer(path)
  assert tokenizer.decode(tokenizer.encode(blob)) == blob


def test_stops_reading_after_max_train_chars(tmp_path):
  def texts():
    yield from CORPUS
    raise AssertionError("read past max_train_chars")

  tokenizer_lib.train_tokenizer(texts(), VOCAB_SIZE, str(tmp_path / "t.model"),
                                max_train_chars=sum(map(len, CORPUS)))


def test_load_missing_file_names_the_path(tmp_path):
  path = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match=re.escape(path)):
    tokenizer_lib.load_tokenizer(path)


def test_load_invalid_file_names_the_path(tmp_path):
  path = tmp_path / "garbage.model"
  path.write_bytes(b"not a sentencepiece model")
  with pytest.raises(ValueError, match=re.escape(str(path))):
    tokenizer_lib.load_tokenizer(str(path))


def test_cli_trains_on_a_glob_and_reports_bad_input_in_one_line(tmp_path, capsys):
  for i, text in enumerate(CORPUS):
    (tmp_path / f"doc_{i}.txt").write_text(text)
  out = tmp_path / "cli.model"
  assert tokenizer_cli.main(["train", "--files", f"{tmp_path}/*.txt", "--vocab",
                             str(VOCAB_SIZE), "--out", str(out)]) == 0
  assert tokenizer_lib.load_tokenizer(str(out)).vocab_size() == VOCAB_SIZE
  assert tokenizer_cli.main(["train", "--files", f"{tmp_path}/*.md", "--vocab", "320",
                             "--out", str(tmp_path / "none.model")]) == 1
  error = capsys.readouterr().err
  assert re.fullmatch(r"error: --files: '.*\*\.md' matches no files\n", error), error
  assert not os.path.exists(tmp_path / "none.model")
