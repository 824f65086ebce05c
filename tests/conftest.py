"""Test setup and shared fixtures.

8 simulated CPU devices, configured before JAX initialises its backend; CLI runs the tests start
keep the same XLA flags but for the device count (`cpu_env`). The tests compile hundreds of tiny
programs that then run for milliseconds, so XLA:CPU compiles them without LLVM's optimisations:
that halves the suite's largest cost and leaves the HLO, what the tests check, as it is
(benchmarks and users compile at the default level). Compiled programs are
cached on disk for the session (and the CLI runs it starts): many tests compile the same tiny
train steps, and a cache hit skips XLA's compile, not any computation. pytest-xdist workers
inherit the directory from the controlling process, which removes it.
"""

import json
import os
import re
import shutil
import sys
import tempfile

_DEVICES_FLAG = "--xla_force_host_platform_device_count="
_FLAGS = ("--xla_backend_optimization_level=0", f"{_DEVICES_FLAG}8")
_inherited = os.environ.get("XLA_FLAGS", "").split()  # an xdist worker's holds _FLAGS already
os.environ["XLA_FLAGS"] = " ".join(_inherited + [f for f in _FLAGS if f not in _inherited])
# With libtpu installed (for the TPU compile tests) JAX would look for a TPU first; compile-only
# TPU devices need none, and several test workers may load libtpu at once.
os.environ.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="mixtral_jax_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402
from mixtral_jax.training import build as build_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end checks run by `make test-slow`, not "
                          "`make test` (each has a fast counterpart there)")


def pytest_sessionfinish(session, exitstatus):
  if _CACHE_DIR:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def cpu_env(devices: int) -> dict[str, str]:
  """The environment for a CLI run on `devices` simulated CPU devices."""
  return dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(f"{_DEVICES_FLAG}8",
                                                                    f"{_DEVICES_FLAG}{devices}"))


def user_env() -> dict[str, str]:
  """The environment as a user's command has it: none of the variables set above (or inherited)
  that keep JAX on the CPU and tell libtpu what host it is on."""
  return {k: v for k, v in os.environ.items()
          if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD",
                       "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")}


@pytest.fixture(name="cpu_env")
def cpu_env_fixture():
  """cpu_env(devices): `cpu_env`."""
  return cpu_env


@pytest.fixture
def repo() -> str:
  """The repository root (the working directory of CLI runs)."""
  return REPO


@pytest.fixture
def tiny_config(tmp_path):
  """tiny_config(**overrides): the default config shrunk to a 2-layer model of 4 experts over a
  16-file Python corpus written into tmp_path/src (data cached in tmp_path/data)."""
  os.makedirs(tmp_path / "src", exist_ok=True)
  for i in range(16):
    (tmp_path / "src" / f"module_{i}.py").write_text("".join(
        f"def f_{i}_{j}(x, y={j}):\n    return [v * {i + j} for v in range(x) if v > y]\n\n"
        for j in range(40)))

  def make(**overrides):
    config = default.get_config()
    config.update(num_train_steps=12, global_batch_size=8, seq_len=32, log_every_steps=4,
                  eval_every_steps=8, eval_batches=2, warmup_steps=2)
    config.model.update(vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, block_size=16)
    config.data.update(data_dir=str(tmp_path / "data"), source="files",
                       files=str(tmp_path / "src" / "*.py"), eval_fraction=0.25)
    config.update(overrides)
    return config

  return make


@pytest.fixture
def train_flags(tiny_config):
  """train_flags(workdir, steps, *flags) → `mixtral-train` flags for tiny_config()'s model and
  corpus: logs every step, checkpoints every 2 steps, keeps them all."""
  config = tiny_config()

  def make(workdir, steps, *flags):
    overrides = {"num_train_steps": steps, "global_batch_size": 8, "seq_len": 32,
                 "log_every_steps": 1, "eval_every_steps": 0, "eval_batches": 2,
                 "checkpoint_every_steps": 2, "keep_checkpoints": 100, "warmup_steps": 2,
                 "model.vocab_size": 320, "model.hidden_size": 32, "model.intermediate_size": 48,
                 "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
                 "model.head_dim": 8, "model.num_experts": 4, "model.block_size": 16,
                 "data.data_dir": config.data.data_dir, "data.source": config.data.source,
                 "data.files": config.data.files, "data.eval_fraction": 0.25}
    return (["--config=configs/default.py", f"--workdir={workdir}"] +
            [f"--config.{k}={v}" for k, v in overrides.items()] + list(flags))

  return make


@pytest.fixture
def train_command(train_flags):
  """train_command(workdir, steps, *flags) → (argv, env) of `mixtral-train` with `train_flags`,
  on one device."""

  def make(workdir, steps, *flags):
    args = [sys.executable, "-u", "-m", "mixtral_jax.main"] + train_flags(workdir, steps, *flags)
    # One device, as `make train` runs (the tests' own process simulates 8).
    return args, cpu_env(1)

  return make


@pytest.fixture
def launch_command(train_flags):
  """launch_command(workdir, steps, processes, devices, *flags) → (argv, env) of
  `launch/local.sh` running `train_flags` as `processes` processes of `devices` CPU devices."""

  def make(workdir, steps, processes, devices, *flags):
    args = ["bash", os.path.join(REPO, "launch", "local.sh"), f"--num_processes={processes}",
            f"--devices_per_process={devices}", "--grace=60", "--"]
    return args + train_flags(workdir, steps, *flags), dict(os.environ, PYTHON=sys.executable)

  return make


def tree_digest(path, skip=()) -> dict[str, int]:
  """{relative path: hash of contents} of every file under `path`, but for the top-level
  entries named in `skip` (e.g. the checkpoints a running training is still writing)."""
  digest = {}
  for root, dirs, names in os.walk(path):
    if root == str(path):
      dirs[:] = [d for d in dirs if d not in skip]
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        digest[os.path.relpath(full, path)] = hash(f.read())
  return digest


def read_metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture
def metrics():
  """metrics(workdir): `read_metrics`."""
  return read_metrics


@pytest.fixture
def digest():
  """digest(path): `tree_digest`, to show that nothing saved was changed."""
  return tree_digest


@pytest.fixture
def build_on_one_device():
  """build_on_one_device(config, abstract=False): `build.build` on the first device alone."""
  return lambda config, abstract=False: build_lib.build(config, jax.devices()[:1],
                                                         abstract=abstract)


class Repeated:
  """In `assert_output`'s expected lines: any number of lines (none too) matching `pattern`."""

  def __init__(self, pattern: str):
    self.pattern = pattern

  def __repr__(self) -> str:
    return f"Repeated({self.pattern!r})"


# The lines a run prints as it goes: absl log records (stderr), TFDS's two lines about building
# a corpus's dataset and the progress bars (stdout).
LOG_LINES = Repeated(r"[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] .*")
DATA_LINES = Repeated(r"(Downloading and preparing dataset|Dataset \S+ downloaded and prepared) .*")
PROGRESS_LINES = Repeated(r"step \d+/\d+ \[[#.]+\] .*")


def _lines_match(lines: list[str], expected: list) -> bool:
  if not expected:
    return not lines
  first, rest = expected[0], expected[1:]
  if isinstance(first, Repeated):
    for n in range(len(lines) + 1):  # n lines of `first`, then the rest
      if _lines_match(lines[n:], rest):
        return True
      if n == len(lines) or not re.fullmatch(first.pattern, lines[n]):
        return False
    return False
  return bool(lines) and bool(re.fullmatch(first, lines[0])) and _lines_match(lines[1:], rest)


def assert_output(result, stdout=None, stderr=()) -> None:
  """A command's whole output, line by line: `stdout` and `stderr` are lists of regexes, each
  matching one line at its place, and `Repeated` regexes (any number of lines); None leaves
  that stream unchecked. By default stderr must be empty."""
  for name, expected in (("stdout", stdout), ("stderr", stderr)):
    text = getattr(result, name)
    if expected is not None:
      assert _lines_match(text.splitlines(), list(expected)), (
          f"{name} is not {expected}:\n{text[-4000:]}")
