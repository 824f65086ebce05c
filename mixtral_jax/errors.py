"""The base of every error a user causes and can fix: a bad config or flag, a damaged checkpoint,
a full disk, a lost peer process. Its message is one line naming what is wrong; every command
line catches this one type and prints that line (mixtral_jax/cli/common.py)."""


class UserError(Exception):
  """A run cannot go on for the reason its one-line message gives."""
