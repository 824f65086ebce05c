"""`mixtral-tokenizer train`: a tokenizer for config.data.tokenizer_path from local files
(mixtral_jax/data/tokenizer.py).

    mixtral-tokenizer train --files 'corpus/**/*.txt' --vocab 32000 --out corpus.model
"""

import argparse
import sys
from typing import Optional

from mixtral_jax.cli import common
from mixtral_jax.data import sources
from mixtral_jax.data import tokenizer as tokenizer_lib


@common.one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
  """Trains the tokenizer; returns the exit code."""
  parser = argparse.ArgumentParser(prog="mixtral-tokenizer", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train a BPE model on local text/JSONL files")
  train.add_argument("--files", required=True, help="comma-separated globs; ** recurses")
  train.add_argument("--vocab", type=int, required=True, help="vocabulary size")
  train.add_argument("--out", required=True, help="path of the .model file to write")
  train.add_argument("--text_key", default="text", help="field of the text in .jsonl lines")
  train.add_argument("--max_train_chars", type=int,
                     default=tokenizer_lib.DEFAULT_MAX_TRAIN_CHARS,
                     help="train on (about) this many characters from the start of the files")
  args = parser.parse_args(argv)
  if args.vocab < tokenizer_lib.MIN_VOCAB_SIZE:
    raise sources.DataError(f"--vocab {args.vocab} is too small: byte fallback needs at least "
                            f"{tokenizer_lib.MIN_VOCAB_SIZE}")
  texts = (text for _, text in sources.read_documents(
      sources.match_files(args.files, field="--files"), args.text_key))
  try:
    tokenizer_lib.train_tokenizer(texts, args.vocab, args.out, args.max_train_chars)
  except (RuntimeError, OSError) as e:  # SentencePiece's, or the output file's
    raise sources.DataError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
  print(f"wrote {args.out} ({args.vocab} pieces)")
  return 0


def run() -> None:
  """Console-script entry point (`mixtral-tokenizer`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
