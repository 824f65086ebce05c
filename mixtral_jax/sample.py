"""`mixtral_jax.sample.generate`: sampling with a KV cache (mixtral_jax/tools/sample.py) at the
path the README gives."""

from mixtral_jax.tools.sample import SampleError, generate, place

__all__ = ["SampleError", "generate", "place"]
