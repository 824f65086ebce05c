"""Default config: a tiny Mixtral-style MoE that trains in minutes on a laptop CPU."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default training configuration."""
  config = ml_collections.ConfigDict()

  # Number of optimizer updates.
  config.num_train_steps = 500
  # Sequences per optimizer update, summed over all devices and hosts.
  config.global_batch_size = 8
  # Tokens per training sequence.
  config.seq_len = 256
  # Seed for parameter init, data order and router jitter.
  config.seed = 0
  # Log metrics to the console and metrics.jsonl every this many steps.
  config.log_every_steps = 20
  # Run the held-out evaluation every this many steps (0 = only at the end).
  config.eval_every_steps = 250
  # Held-out batches per evaluation.
  config.eval_batches = 8
  # Save a checkpoint every this many steps (0 = only at the end); a rerun resumes from the latest.
  config.checkpoint_every_steps = 250
  # Checkpoints kept on disk (the oldest are deleted).
  config.keep_checkpoints = 2
  # Peak learning rate reached after warmup.
  config.learning_rate = 3e-3
  # Linear warmup steps before cosine decay.
  config.warmup_steps = 50
  # Final learning rate as a fraction of the peak.
  config.min_learning_rate_ratio = 0.1
  # AdamW decoupled weight decay (not applied to norms).
  config.weight_decay = 0.1
  # AdamW first-moment decay.
  config.adam_b1 = 0.9
  # AdamW second-moment decay.
  config.adam_b2 = 0.95
  # AdamW epsilon.
  config.adam_eps = 1e-8
  # Clip gradients to this global L2 norm (0 = no clipping).
  config.grad_clip_norm = 1.0
  # Stop after this many consecutive steps with NaN/Inf loss or gradients (those steps are not
  # applied), as seen at the next log or checkpoint step; 0 = never stop.
  config.max_nan_steps = 5
  # Split each global batch into this many micro-batches and sum their gradients.
  config.grad_accum_steps = 1
  # On CPU, keep XLA's per-step scratch memory mapped between steps instead of page-faulting it
  # in every step (mixtral_jax/runtime/cpu_runtime.py); applied by mixtral-train at startup.
  config.cpu_reuse_step_memory = True
  # Capture a jax.profiler trace of steps A to B ("A:B", e.g. "10:12") into WORKDIR/profile
  # ("" = none); open it in TensorBoard's profile plugin or Perfetto.
  config.profile_steps = ""
  # Resume even where model, tokenizer or data settings differ from the checkpoint's config
  # (each difference is then logged as a warning instead of refused).
  config.allow_resume_changes = False

  config.model = model = ml_collections.ConfigDict()
  # Tokenizer vocabulary size (the SentencePiece model must match).
  model.vocab_size = 8000
  # Residual stream width.
  model.hidden_size = 128
  # Width of each expert's SwiGLU hidden layer.
  model.intermediate_size = 256
  # Number of decoder blocks.
  model.num_layers = 4
  # Query heads per attention layer.
  model.num_heads = 4
  # Key/value heads (grouped-query attention); must divide num_heads.
  model.num_kv_heads = 2
  # Width of each attention head.
  model.head_dim = 32
  # Experts per MoE layer.
  model.num_experts = 8
  # Experts each token is routed to (top-k).
  model.experts_per_token = 2
  # Expert capacity = ceil(capacity_factor * tokens * k / E) for dispatch="capacity".
  model.capacity_factor = 1.25
  # "dropless" (sorted, grouped matmul, never drops) or "capacity" (fixed buffers, drops overflow).
  model.dispatch = "dropless"
  # Grouped matmul for dropless: "blocked" (fast on CPU), "ragged_dot" (GPU/TPU), "auto".
  model.grouped_matmul = "auto"
  # Rows per block of the dropless layout; each expert's group is padded to a multiple of it.
  # Larger blocks pad more but run faster matmuls (benchmarks/README.md, levers table).
  model.block_size = 256
  # The experts' SwiGLU over this many slices of its intermediate width in turn: the same
  # result, with one slice's gathered weights, gradients and activations live at a time (for
  # accelerator memory at FSDP scale; 1 = the whole width at once).
  model.expert_mlp_chunks = 1
  # Expert-parallel token exchange for dropless: "padded" (any backend) or "ragged" (GPU/TPU).
  model.all_to_all = "padded"
  # Weight of the Switch load-balancing loss (balanced routing gives experts_per_token).
  model.router_aux_loss_coef = 0.02
  # Weight of the ST-MoE router z-loss.
  model.router_z_loss_coef = 0.001
  # Multiplicative uniform jitter on router inputs during training (0 = off).
  model.router_jitter_noise = 0.0
  # How experts are kept in balance: "aux_loss" (the load-balancing loss above), "aux_free"
  # (DeepSeek-V3: a per-expert bias on the router's probabilities that shifts which experts are
  # selected, not their weights, nudged after every step toward the global balanced load; the
  # aux loss is then off) or "both" (the bias and the aux loss, then typically with a small coef).
  model.router_balance = "aux_loss"
  # Step of the aux-free bias per optimizer update: b_e += rate * sign(mean load - load_e).
  model.router_bias_rate = 1e-3
  # RoPE base frequency.
  model.rope_theta = 1e6
  # RMSNorm epsilon.
  model.rms_norm_eps = 1e-5
  # Attend to at most this many previous tokens, the current included (0 = full causal).
  model.sliding_window = 0
  # Attention kernel: "blocked" (XLA, queries in blocks; CPU), "splash" (Pallas TPU kernel),
  # "dot_product" (jax.nn.dot_product_attention, cuDNN on GPU) or "auto" (that order by backend).
  model.attention = "auto"
  # For attention="blocked": score queries in blocks of this many against only the keys they can
  # see (0 = one block); skips most of the masked-out score work.
  model.attention_query_chunk = 64
  # Compute dtype of activations and matmuls: "float32", "bfloat16" or "auto" (bfloat16 on
  # GPU/TPU, float32 on CPU); parameters and optimizer state stay float32.
  model.dtype = "auto"
  # Training loss applies the LM head to chunks of about this many tokens per device (its rows,
  # a slice of positions), never holding the [B, T, vocab] logits (0 = full logits; -1 = auto:
  # 512 on CPU, on accelerators as many as keep a chunk's logits within 256 MiB).
  model.loss_chunk_tokens = -1
  # Rematerialise each decoder block in the backward pass to save activation memory.
  model.remat = False
  # The decoder stack as one scanned block (parameters stacked on a layers axis): compile time
  # stops growing with depth, and with remat one layer's activations are kept.
  model.scan_layers = False

  config.mesh = mesh = ml_collections.ConfigDict()
  # Data-parallel replicas (-1 = all devices the other axes leave).
  mesh.data = -1
  # Fully-sharded data parallel: parameters and optimizer state split, batch split too.
  mesh.fsdp = 1
  # Expert parallel: experts split; tokens split too and exchanged by all-to-all.
  mesh.expert = 1
  # Tensor parallel: attention heads, expert hidden units and vocabulary split.
  mesh.tensor = 1
  # How many of each axis's shards lie across processes (hosts or slices), the rest within
  # one; all 1 = in jax.devices() order, which keeps the last axes inside a host. Else the
  # sizes multiply to the process count (e.g. dcn.expert=2: the expert exchange spans 2 hosts).
  mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))

  config.data = data = ml_collections.ConfigDict()
  # Corpus: "stdlib" (this Python's standard-library sources, on every machine), "files" (local
  # text/JSONL files) or "tfds" (a TFDS dataset prepared as array_record in data_dir).
  data.source = "stdlib"
  # For source="files": comma-separated globs ("**" recurses); *.jsonl gives a document per line.
  data.files = ""
  # Field holding the text in JSONL lines and TFDS examples.
  data.text_key = "text"
  # For source="tfds": the dataset name, e.g. "lm1b", "c4/en", "tiny_shakespeare".
  data.tfds_name = ""
  # For source="tfds": the split to train on.
  data.train_split = "train"
  # For source="tfds": the held-out split ("" = "validation", else "test").
  data.eval_split = ""
  # Fraction of documents held out for evaluation (stdlib and files; chosen by name hash).
  data.eval_fraction = 0.02
  # Directory of built datasets, tokenizers and statistics; share it between runs and machines.
  data.data_dir = "~/.cache/mixtral_jax"
  # Existing SentencePiece .model to use ("" = train one on the training split and cache it).
  data.tokenizer_path = ""
  # Document streams packed in parallel (rounded up to a multiple of global_batch_size): each
  # row of a batch owns a few and every step takes it from a random one of them.
  data.num_streams = 64
  return config
