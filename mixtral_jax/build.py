"""`mixtral_jax.build.build`: one config's training program (mixtral_jax/training/build.py) at the
path the README gives."""

from mixtral_jax.training.build import Setup, build, restore_params

__all__ = ["Setup", "build", "restore_params"]
