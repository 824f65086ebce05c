"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `min_learning_rate_ratio` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.min_learning_rate_ratio)


# Parameters that weight decay leaves alone, by name: RMSNorm scales and the router's aux-free
# selection bias (which takes no gradient either). By name, not by rank: scan_layers stacks a
# layer's vectors into matrices.
_NOT_DECAYED = ("scale", "bias")


def _name(path) -> str:
  """A parameter's name: the last dict key of its path (boxed leaves add keys of their own)."""
  return next(p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey))


def decay_mask(params):
  """True for each parameter that AdamW's weight decay applies to (every weight matrix)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _name(path) not in _NOT_DECAYED,
                                          params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW that decays weight matrices only (norm scales and the router bias are exempt)."""
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                      eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  return adamw
