"""`python -m mixtral_jax.main`: the `mixtral-train` command line (mixtral_jax/cli/train.py),
kept at this path for the README, launch/ and sweep trials."""

from absl import flags

from mixtral_jax.cli import train as _train_cli

flags.adopt_module_key_flags(_train_cli)  # --help lists the command's flags

if __name__ == "__main__":
  _train_cli.run()
