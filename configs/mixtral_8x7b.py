"""Mixtral 8x7B (Jiang et al., 2024): 46.7B parameters, 12.9B active per token."""

from configs import default


def get_config():
  """The paper's sizes on top of the default training settings."""
  config = default.get_config()
  # Mixtral's released context length.
  config.seq_len = 32768
  model = config.model
  # SentencePiece vocabulary of the released model.
  model.vocab_size = 32000
  # Model dimension.
  model.hidden_size = 4096
  # Expert SwiGLU hidden size.
  model.intermediate_size = 14336
  # Decoder blocks.
  model.num_layers = 32
  # Query heads.
  model.num_heads = 32
  # Key/value heads.
  model.num_kv_heads = 8
  # Head width.
  model.head_dim = 128
  # Experts per layer.
  model.num_experts = 8
  # Experts per token.
  model.experts_per_token = 2
  # RoPE base.
  model.rope_theta = 1e6
  # Training at this size needs bf16 compute and rematerialised blocks.
  model.dtype = "bfloat16"
  # Recompute block activations in the backward pass.
  model.remat = True
  # 32 layers compile as one.
  model.scan_layers = True
  return config
