"""Mixtral 8x7B (Jiang et al., 2024): 46.7B parameters, 12.9B active per token, set up to
pretrain on a v5p-128 slice (64 chips): `mixtral-compile --config=configs/mixtral_8x7b.py
--topology=v5p-128` checks it compiles and fits (benchmarks/README.md has the figures)."""

from configs import default


def get_config():
  """The paper's sizes, with the mesh, batch and memory settings of a v5p-128 run."""
  config = default.get_config()
  # Pretraining sequence length (the released model was extended to 32768 tokens).
  config.seq_len = 4096
  # 4 sequences per chip on 64 chips: about 1M tokens per step.
  config.global_batch_size = 256
  # A pretraining run's length at that batch: ~100B tokens.
  config.num_train_steps = 100_000
  # Peak learning rate for a model of this width.
  config.learning_rate = 3e-4
  # Warmup at pod scale: the first 2000 steps.
  config.warmup_steps = 2000
  # Log, evaluate and checkpoint at pod-scale intervals.
  config.log_every_steps = 10
  # Held-out evaluation every this many steps.
  config.eval_every_steps = 1000
  # A checkpoint every this many steps (~50 minutes of a v5p-128 at its estimated speed).
  config.checkpoint_every_steps = 1000
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
  # Parameters and optimizer state split over 16 chips, experts over 4 (64 chips in all).
  config.mesh.update(data=-1, fsdp=16, expert=4, tensor=1)
  return config
