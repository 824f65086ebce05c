"""`mixtral_jax.train.train_and_evaluate`: the training loop (mixtral_jax/training/loop.py) at the
path the README gives; `python -m mixtral_jax.train` runs the `mixtral-train` command line."""

from mixtral_jax.training.loop import NonFiniteError, train_and_evaluate

__all__ = ["NonFiniteError", "train_and_evaluate"]

if __name__ == "__main__":
  from absl import flags

  from mixtral_jax.cli import train as _train_cli
  flags.adopt_module_key_flags(_train_cli)
  _train_cli.run()
