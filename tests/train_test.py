"""Training loop: overfitting one batch, an end-to-end run with metrics, the CLI, bad configs,
one program for training and benchmarks, no per-step device reads, no flags on import."""

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA_LINES, LOG_LINES, assert_output
from mixtral_jax import config as config_lib
from mixtral_jax.data import pipeline as data_lib
from mixtral_jax.data import processes
from mixtral_jax.data import tokenizer as tokenizer_lib
from mixtral_jax.training import build as build_lib
from mixtral_jax.training import checkpoint
from mixtral_jax.training import loop as train


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_tiny_model_overfits_one_batch(tiny_config, build_on_one_device, dispatch):
  config = tiny_config(learning_rate=1e-2, warmup_steps=10, num_train_steps=300,
                       weight_decay=0.0, global_batch_size=4, seq_len=32)
  config.model.update(vocab_size=64, hidden_size=64, intermediate_size=64, dispatch=dispatch,
                      router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
  setup = build_on_one_device(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 33), 0, 64)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((4, 32))}
  state = setup.state
  for _ in range(config.num_train_steps):
    state, metrics = setup.train_step(state, batch)
  assert float(metrics["ce_loss"]) < 0.1


def test_gradient_accumulation_matches_one_big_batch(tiny_config, build_on_one_device):
  config = tiny_config(global_batch_size=4)
  # Router losses are per micro-batch statistics; the token-mean cross-entropy is not.
  config.model.update(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 33), 0, 320)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((4, 32))}
  results = []
  for accum in (1, 2, 4):
    config.grad_accum_steps = accum
    setup = build_on_one_device(config)
    results.append(setup.train_step(setup.state, batch))
  (state1, metrics1), *accumulated = results
  for state, metrics in accumulated:
    np.testing.assert_allclose(metrics["ce_loss"], metrics1["ce_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], metrics1["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, state1.params)


def test_training_run_writes_metrics_and_learns(tmp_path, tiny_config):
  config = tiny_config(num_train_steps=40, learning_rate=1e-2, log_every_steps=10,
                       eval_every_steps=20)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 10, 20, 30, 40]
  required = {"step", "loss", "ce_loss", "aux_loss", "z_loss", "learning_rate", "grad_norm",
              "tokens_per_sec", "dropped_fraction", "expert_load"}
  for record in records:
    assert required <= set(record)
    load = np.array(record["expert_load"])
    assert load.shape == (2, 4)
    np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-5)
  assert {r["step"] for r in records if "eval_loss" in r} == {20, 40}
  for name in ("config.json", "tokenizer.model", "metrics.jsonl"):  # shared like any file
    mode = os.stat(tmp_path / "run" / name).st_mode & 0o777
    assert mode == 0o666 & ~_umask(), (name, oct(mode))
  assert summary["final_loss"] < summary["first_loss"] - 1.0
  assert summary["eval_loss"] < summary["unigram_entropy"]


def test_resume_continues_exactly(tmp_path, tiny_config):
  config = tiny_config(num_train_steps=12, checkpoint_every_steps=0, log_every_steps=1)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6)
  assert train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6) == {
      "resumed_step": 6}
  train.train_and_evaluate(config, str(tmp_path / "resumed"))

  def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))}
  assert losses("resumed") == losses("straight")  # every step, bitwise
  assert sorted(losses("resumed")) == list(range(1, 13))

  setup = build_lib.build(config, abstract=True)
  finals = [setup.restore(checkpoint.Checkpointer(str(tmp_path / run)))
            for run in ("straight", "resumed")]
  assert int(finals[0][0].step) == int(finals[1][0].step) == 12
  assert finals[0][1].data_position == finals[1][1].data_position == 12
  jax.tree.map(np.testing.assert_array_equal, finals[0][0], finals[1][0])


def test_invalid_config_fails_before_compiling_with_field_name(tiny_config):
  cases = {
      "model.experts_per_token": dict(experts_per_token=5),
      "model.num_heads": dict(num_heads=3),
      "model.dispatch": dict(dispatch="dense"),
      "model.hidden_size": dict(hidden_size=0),
      "model.num_experts": dict(num_experts=-2),
      "data.source": dict(source="web"),
      "data.tfds_name": dict(source="tfds"),
      "data.num_streams": dict(num_streams=0),
  }
  for field, overrides in cases.items():
    config = tiny_config()
    (config.data if field.startswith("data.") else config.model).update(overrides)
    with pytest.raises(config_lib.ConfigError, match=f"^config\\.{field.replace('.', '[.]')}:"):
      config_lib.validate(config)


@pytest.mark.parametrize("field,value", [("weight_decay", -0.1), ("adam_b1", 1.0),
                                         ("adam_eps", float("nan")), ("learning_rate", -1.0)])
def test_optimizer_settings_are_validated(tiny_config, field, value):
  config = tiny_config(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=f"^config\\.{field}: "):
    config_lib.validate(config)


def test_cli_reports_bad_config_in_one_line(tmp_path, repo):
  result = subprocess.run(
      [sys.executable, "-m", "mixtral_jax.main", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", "--config.model.experts_per_token=9"],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert_output(result, [], [re.escape(
      "error: config.model.experts_per_token: 9 exceeds model.num_experts=8")])
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("flag,message", [
    ("adam_eps=0.0", "config.adam_eps: must be positive and finite (it keeps AdamW's update "
                     "finite), got 0.0"),
    ("learning_rate=inf", "config.learning_rate: must be positive and finite, got inf"),
    ("adam_b2=1.0", "config.adam_b2: must be in [0, 1), got 1.0"),
])
def test_cli_refuses_optimizer_settings_that_would_train_on_nan(tmp_path, train_command, digest,
                                                                repo, flag, message):
  workdir = str(tmp_path / "run")
  args, env = train_command(workdir, 2)
  subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=300)
  saved = digest(workdir)
  args, env = train_command(workdir, 4, f"--config.{flag}")
  result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert_output(result, [DATA_LINES], [LOG_LINES, re.escape(f"error: {message}")])
  assert digest(workdir) == saved


@pytest.mark.parametrize("case", ["field typo", "config file missing", "tokenizer missing",
                                  "tokenizer corrupt", "tokenizer vocab", "vocab too small",
                                  "workdir file", "workdir empty", "workdir under a file"])
def test_cli_reports_bad_input_in_one_line(tmp_path, train_command, repo, case):
  workdir = tmp_path / "run"
  bogus = tmp_path / "bogus.model"
  bogus.write_bytes(b"not a sentencepiece model")
  other_vocab = str(tmp_path / "vocab300.model")
  if case == "tokenizer vocab":
    tokenizer_lib.train_tokenizer([f"def f{i}(x):\n    return x * {i}\n" for i in range(300)],
                                  300, other_vocab)
  flags, message = {
      "field typo": (["--config.learnig_rate=0.1"], "error: a --config.* flag names "
                     "'learnig_rate', which is no config field; did you mean learning_rate?"),
      "config file missing": ([f"--config={tmp_path}/nope.py"],
                              f"error: --config={tmp_path}/nope.py: cannot load it ([Errno 2] No "
                              f"such file or directory: '{tmp_path}/nope.py')"),
      "tokenizer missing": ([f"--config.data.tokenizer_path={tmp_path}/nope.model"],
                            "error: config.data.tokenizer_path: SentencePiece model not found: "
                            f"{tmp_path}/nope.model"),
      "tokenizer corrupt": ([f"--config.data.tokenizer_path={bogus}"],
                            f"error: config.data.tokenizer_path: Not a valid SentencePiece model: "
                            f"{bogus}"),
      "tokenizer vocab": ([f"--config.data.tokenizer_path={other_vocab}"],
                          f"error: tokenizer {other_vocab} has vocab size 300 but "
                          f"config.model.vocab_size is 320"),
      "vocab too small": (["--config.model.vocab_size=100"],
                          "error: config.model.vocab_size=100 is too small for a trained "
                          "tokenizer: byte fallback needs at least 260 pieces"),
      "workdir file": ([f"--workdir={bogus}"],
                       f"error: --workdir={bogus} is a file, not a directory"),
      "workdir empty": (["--workdir="], "error: --workdir is empty; name a directory"),
      "workdir under a file": ([f"--workdir={bogus}/run"], f"error: --workdir={bogus}/run: "
                               f"cannot create it (Not a directory)"),
  }[case]
  args, env = train_command(str(workdir), 2, *flags)
  result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert_output(result, [DATA_LINES], [LOG_LINES, re.escape(message)])
  assert not workdir.exists() or not (workdir / "config.json").exists()
  assert bogus.read_bytes() == b"not a sentencepiece model"


def test_cli_reports_a_glob_matching_nothing_in_one_line(tmp_path, repo):
  # Through the old entry point, `python -m mixtral_jax.train`, which runs the same CLI.
  result = subprocess.run(
      [sys.executable, "-m", "mixtral_jax.train", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", "--config.data.source=files",
       f"--config.data.files={tmp_path}/corpus/*.txt", f"--config.data.data_dir={tmp_path}"],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert_output(result, [], [LOG_LINES, re.escape(
      f"error: config.data.files: '{tmp_path}/corpus/*.txt' matches no files")])


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _compiled_text(step, *args) -> str:
  """The compiled HLO without source-location metadata (which names the calling frames)."""
  text = step.lower(*args).compile().as_text()
  text = re.sub(r"\nFileNames\n.*?\nStackFrames\n.*?\n\n", "\n", text, flags=re.S)
  return re.sub(r', metadata=\{(?:"(?:[^"\\]|\\.)*"|[^{}"])*\}', "", text)


def test_benchmark_step_is_the_program_training_runs(tmp_path, tiny_config, repo, monkeypatch):
  sys.path.insert(0, repo)
  from benchmarks import reference
  config = tiny_config(num_train_steps=1)
  setups = []
  real_build = build_lib.build
  monkeypatch.setattr(build_lib, "build", lambda *a, **k: setups.append(real_build(*a, **k))
                      or setups[-1])
  train.train_and_evaluate(config, str(tmp_path / "run"))
  trained, = setups
  # Training's step as the loop called it: on a batch from the real data pipeline.
  data = data_lib.make_data(config)
  layout = processes.ProcessRows(trained.batch_sharding, config.global_batch_size)
  batch = layout.global_batch(next(data.train_iterator()))
  trained_text = _compiled_text(trained.train_step, trained.abstract_state, batch)
  ours = reference.Ours(config)
  bench_batch = reference.make_batches(1, config.global_batch_size, config.seq_len,
                                       config.model.vocab_size)[0]
  bench_text = _compiled_text(ours.step_fn, ours.state, bench_batch)
  assert "input_output_alias" in trained_text  # the state is donated
  assert "metadata=" not in trained_text and "StackFrames" not in trained_text
  assert bench_text == trained_text


def _forbid_device_reads(monkeypatch):
  """Makes every device→host read on this thread raise, except inside train._device_reads.

  XLA:CPU ignores jax's transfer guards (its arrays live in host memory), so the reads are
  caught where jax.Array converts to host values; arrays spread over several devices (these
  tests have 8) have no zero-copy buffer to bypass that. Returns the list of steps (train_step
  calls so far) at which the loop entered its read scope.
  """
  array_type = type(jax.numpy.zeros(()))
  allowed, reads, calls = [], [], [0]

  def guarded(method):
    def f(self, *args, **kwargs):
      if not allowed and threading.current_thread() is threading.main_thread():
        raise AssertionError("device→host read outside train._device_reads")
      return method(self, *args, **kwargs)
    return f

  monkeypatch.setattr(array_type, "_value", property(guarded(array_type._value.fget)))
  monkeypatch.setattr(array_type, "__array__", guarded(array_type.__array__))
  monkeypatch.setattr(array_type, "item", guarded(array_type.item))

  real_scope = train._device_reads

  class Scope:
    def __enter__(self):
      reads.append(calls[0])
      allowed.append(True)
      self.inner = real_scope()
      return self.inner.__enter__()

    def __exit__(self, *exc):
      allowed.pop()
      return self.inner.__exit__(*exc)

  monkeypatch.setattr(train, "_device_reads", Scope)
  real_build = build_lib.build

  def counting_build(*args, **kwargs):
    setup = real_build(*args, **kwargs)
    step = setup.train_step

    def counted(*step_args):
      calls[0] += 1
      return step(*step_args)
    return dataclasses.replace(setup, train_step=counted)

  monkeypatch.setattr(build_lib, "build", counting_build)
  return reads


def test_loop_reads_no_device_value_between_log_steps(tmp_path, tiny_config, monkeypatch):
  config = tiny_config(num_train_steps=12, log_every_steps=6, eval_every_steps=0,
                       checkpoint_every_steps=0)
  probe = jax.device_put(jnp.arange(8.0), jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.devices()), ("d",)), jax.sharding.PartitionSpec("d")))
  reads = _forbid_device_reads(monkeypatch)
  for read in (lambda: float(probe[0]), lambda: np.asarray(probe), lambda: jax.device_get(probe)):
    with pytest.raises(AssertionError, match="outside train._device_reads"):
      read()  # the guard catches each way of reading
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(summary["eval_loss"])
  # Logs of steps 1 and 6, each read once the next step is queued; at step 12 the evaluation,
  # the checkpoint's NaN check and save, then step 12's log.
  assert reads == [2, 7, 12, 12, 12]


def test_importing_the_library_defines_no_flags(repo):
  # Every module but the command lines (cli/, and main.py, which is mixtral-train's).
  script = (
      "import importlib, pkgutil\n"
      "from absl import flags\n"
      "import mixtral_jax\n"
      "names = [m.name for m in pkgutil.walk_packages(mixtral_jax.__path__, 'mixtral_jax.')\n"
      "         if not m.name.startswith('mixtral_jax.cli') and m.name != 'mixtral_jax.main']\n"
      "assert {'mixtral_jax.train', 'mixtral_jax.build', 'mixtral_jax.training.step',\n"
      "        'mixtral_jax.tools.convert'} <= set(names), names\n"
      "for name in names:\n"
      "  importlib.import_module(name)\n"
      "by_module = flags.FLAGS.flags_by_module_dict\n"
      "ours = lambda: sorted(m for m in by_module() if 'mixtral_jax' in m)\n"
      "print(ours())\n"
      "import mixtral_jax.main\n"
      "print(ours(), sorted(f.name for f in by_module()['mixtral_jax.cli.train']))\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  main_flags = ["config", "coordinator_address", "distributed", "distributed_init_timeout",
                "heartbeat_timeout", "num_processes", "process_id", "shutdown_timeout",
                "stop_at_step", "workdir"]
  assert result.stdout.splitlines() == ["[]", f"['mixtral_jax.cli.train'] {main_flags}"]


def test_profile_steps_trace_those_steps_and_a_bad_range_is_one_line(tmp_path, tiny_config):
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_config(profile_steps="3:4"), str(run))
  traces = glob.glob(str(run / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  perfetto = glob.glob(str(run / "profile" / "**" / "perfetto_trace.json.gz"), recursive=True)
  assert len(perfetto) == 1 and os.path.getsize(perfetto[0]) > 0
  for bad, message in (("4:3", r"'4:3': need 1 <= 4 <= 3 <= num_train_steps=12"),
                       ("5:20", r"'5:20': need 1 <= 5 <= 20 <= num_train_steps=12"),
                       ("3-4", r"'3-4' is not FIRST:LAST")):
    with pytest.raises(config_lib.ConfigError, match=r"^config.profile_steps: " + message):
      config_lib.validate(tiny_config(profile_steps=bad))
