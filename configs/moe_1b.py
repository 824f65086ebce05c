"""A ~1B-parameter MoE (8 experts, top-2; 0.34B active per token) to start pretraining from on
a 16-chip slice, v5e-16 or v4-32: `mixtral-compile --config=configs/moe_1b.py
--topology=v5e-16` checks it compiles and fits (benchmarks/README.md has the figures)."""

from configs import default


def get_config():
  """Sizes between TinyLlama and Mixtral, with the mesh and batch of a 16-chip run."""
  config = default.get_config()
  # Tokens per training sequence.
  config.seq_len = 2048
  # 8 sequences per chip on 16 chips: 262k tokens per step.
  config.global_batch_size = 128
  # ~26B tokens at that batch.
  config.num_train_steps = 100_000
  # Peak learning rate for a model of this width.
  config.learning_rate = 6e-4
  # Linear warmup steps.
  config.warmup_steps = 2000
  # Log every this many steps.
  config.log_every_steps = 10
  # Held-out evaluation every this many steps.
  config.eval_every_steps = 1000
  # A checkpoint every this many steps.
  config.checkpoint_every_steps = 1000
  model = config.model
  # A 32k SentencePiece vocabulary, trained on the corpus.
  model.vocab_size = 32000
  # Model dimension.
  model.hidden_size = 1024
  # Expert SwiGLU hidden size.
  model.intermediate_size = 2304
  # Decoder blocks.
  model.num_layers = 16
  # Query heads.
  model.num_heads = 16
  # Key/value heads.
  model.num_kv_heads = 8
  # Head width.
  model.head_dim = 64
  # Experts per layer.
  model.num_experts = 8
  # Experts per token.
  model.experts_per_token = 2
  # bf16 compute (parameters and optimizer state stay float32).
  model.dtype = "bfloat16"
  # Recompute block activations in the backward pass.
  model.remat = True
  # The 16 layers compile as one.
  model.scan_layers = True
  # Experts over 4 chips, parameters and optimizer state over 4: 16 chips.
  config.mesh.update(data=-1, fsdp=4, expert=4, tensor=1)
  return config
