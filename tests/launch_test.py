"""The launchers in launch/: their dry runs, argument checks and the GKE manifest (no JAX)."""

import os
import shlex
import stat
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
FLAGS = ["--config=configs/default.py", "--workdir=gs://bucket/run",
         "--config.data.files=/data/my corpus/*.txt", "--config.name=it's $HOME"]
TPU = ["--name=my-tpu", "--zone=us-central2-b", "--project=my-project"]


def _env(**extra) -> dict:
  """This environment without SLURM's or JAX's variables (the tests may run in a SLURM job)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k != "JAX_LOCAL_DEVICE_IDS"}
  return {**env, **extra}


def _run(script, *args, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, env=env or _env(), timeout=30)


def _commands(stdout) -> list[list[str]]:
  """The `+ `-prefixed lines, each split as a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _remote(command) -> list[str]:
  """The words of an ssh command's --command, split as the worker's shell would."""
  return shlex.split(command[command.index("--command") + 1])


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sbatch", "local.sh"])
def test_scripts_pass_bash_syntax_check(script):
  path = os.path.join(LAUNCH, script)
  result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
  assert result.returncode == 0 and not result.stderr, result.stderr


def test_tpu_vm_dry_run_copies_head_then_runs_on_every_worker():
  result = _run("tpu_vm.sh", *TPU, "--dry-run", "--", *FLAGS)
  assert result.returncode == 0, result.stderr
  archive, scp, unpack, train = _commands(result.stdout)
  assert archive[:2] == ["git", "-C"] and archive[3] == "archive" and archive[-1] == "HEAD"
  tarball = archive[-2].removeprefix("--output=")
  assert scp[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:"]
  for command in scp, unpack, train:
    assert {"--zone=us-central2-b", "--project=my-project", "--worker=all"} <= set(command)
  assert unpack[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "tar -xzf mixtral_jax.tar.gz -C ~/mixtral_jax" in unpack[unpack.index("--command") + 1]
  assert _remote(train) == ["cd", "~/mixtral_jax", "&&", "make", "install", "EXTRAS=tpu", "&&",
                            ".venv/bin/mixtral-train", "--distributed=yes", *FLAGS]
  assert not os.path.exists(tarball)


def test_tpu_vm_dry_run_with_git_fetches_the_ref_on_every_worker():
  result = _run("tpu_vm.sh", *TPU, "--code=git", "--git_url=https://example.com/m.git",
                "--git_ref=v1.0", "--remote_dir=~/my dir", "--dry-run", "--", *FLAGS)
  assert result.returncode == 0, result.stderr
  fetch, train = _commands(result.stdout)
  for command in fetch, train:
    assert {"--zone=us-central2-b", "--project=my-project", "--worker=all"} <= set(command)
    # The ~ stays unquoted, for the worker's shell to expand.
    assert command[command.index("--command") + 1].count("cd ~/'my dir' && ") == 1
  words = _remote(fetch)
  fetch_at = words.index("fetch")
  assert words[fetch_at - 1:fetch_at + 3] == ["git", "fetch", "https://example.com/m.git", "v1.0"]
  assert words[-4:] == ["git", "checkout", "--detach", "FETCH_HEAD"]
  assert _remote(train)[-len(FLAGS):] == FLAGS


def test_tpu_vm_runs_the_commands_it_prints(tmp_path):
  """A fake gcloud that treats a local directory as the one worker."""
  worker, bin_dir = tmp_path / "worker", tmp_path / "bin"
  (worker / "mixtral_jax" / ".venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  scripts = {
      bin_dir / "gcloud": ('[[ $4 == scp ]] && exec cp "$5" "$FAKE_WORKER/"\n'
                           'while [[ $1 != --command ]]; do shift; done\n'
                           'cd "$FAKE_WORKER" && HOME=$FAKE_WORKER exec bash -c "$2"\n'),
      bin_dir / "make": 'echo "$@" > "$HOME/make.log"\n',
      worker / "mixtral_jax" / ".venv" / "bin" / "mixtral-train":
          'printf "%s\\n" "$@" > "$HOME/argv"\nexit 143\n',
  }
  for path, body in scripts.items():
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
  env = _env(FAKE_WORKER=str(worker), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  result = _run("tpu_vm.sh", *TPU, "--", *FLAGS, env=env)
  assert result.returncode == 143, result.stderr  # the worker's exit status comes back
  assert (worker / "mixtral_jax" / "setup.py").exists()  # HEAD unpacked there
  assert not (worker / "mixtral_jax.tar.gz").exists()
  assert (worker / "make.log").read_text() == "install EXTRAS=tpu\n"
  assert (worker / "argv").read_text().splitlines() == ["--distributed=yes", *FLAGS]


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sbatch"])
@pytest.mark.parametrize("workdir", [[], ["--workdir="]])
def test_no_workdir_is_refused_in_one_line(script, workdir):
  args = [*TPU, "--dry-run", "--"] if script == "tpu_vm.sh" else []
  result = _run(script, *args, "--config=configs/default.py", *workdir, env=_env(DRY_RUN="1"))
  assert result.returncode == 2
  assert len(result.stderr.splitlines()) == 1 and "--workdir=" in result.stderr
  assert not _commands(result.stdout)


def test_tpu_vm_warns_once_about_a_workdir_workers_do_not_share():
  result = _run("tpu_vm.sh", *TPU, "--code=git", "--git_url=u", "--git_ref=r", "--dry-run",
                "--", "--workdir=runs/a")
  assert result.returncode == 0
  [warning] = result.stderr.splitlines()
  assert "warning" in warning and "--workdir=runs/a" in warning


@pytest.mark.parametrize("args, named", [
    ([*TPU, "--bogus", "--", *FLAGS], "--bogus"),
    ([*TPU, *FLAGS], FLAGS[0]),  # mixtral-train flags without the `--` before them
    ([*TPU, "--code=rsync", "--", *FLAGS], "rsync"),
    (["--zone=z", "--", *FLAGS], "--name"),
    (["--name=n", "--", *FLAGS], "--zone"),
])
def test_tpu_vm_bad_command_line_is_refused_naming_the_problem(args, named):
  result = _run("tpu_vm.sh", *args, "--dry-run")
  assert result.returncode == 2
  assert len(result.stderr.splitlines()) == 1 and named in result.stderr
  assert not result.stdout


def test_tpu_vm_help_prints_usage():
  result = _run("tpu_vm.sh", "--help")
  assert result.returncode == 0 and result.stdout.startswith("Runs mixtral-train")
  assert "Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE" in result.stdout


@pytest.mark.parametrize("slurm, device_ids", [
    ({}, None),
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}, "0,1,2,3,4,5,6,7"),
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_TASK": "1"}, "0"),
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}, None),  # JAX picks SLURM_LOCALID
])
def test_slurm_dry_run_prints_srun_with_the_flags(slurm, device_ids):
  result = _run("slurm.sbatch", *FLAGS, env=_env(DRY_RUN="1", **slurm))
  assert result.returncode == 0, result.stderr
  *exports, srun = _commands(result.stdout)
  assert srun[0] == "srun" and srun[-len(FLAGS) - 1:] == [".venv/bin/mixtral-train", *FLAGS]
  assert exports == ([["export", f"JAX_LOCAL_DEVICE_IDS={device_ids}"]] if device_ids else [])


def test_slurm_directives_come_before_any_command():
  """sbatch stops reading #SBATCH lines at the first command."""
  with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
    lines = [line.strip() for line in f if line.strip()]
  first_command = next(i for i, line in enumerate(lines) if not line.startswith("#"))
  directives = [line.split()[1] for line in lines[:first_command] if line.startswith("#SBATCH")]
  assert {"--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@120"} <= set(directives)
  assert not any(line.startswith("#SBATCH") for line in lines[first_command:])


def test_gke_jobset_is_an_indexed_tpu_slice_with_rbac_and_a_grace_period():
  yaml = pytest.importorskip("yaml")
  with open(os.path.join(LAUNCH, "gke_jobset.yaml")) as f:
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(f)}
  assert set(docs) == {"JobSet", "ServiceAccount", "Role", "RoleBinding"}
  jobset = docs["JobSet"]
  assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
  assert jobset["spec"]["network"]["enableDNSHostnames"] is True
  [replicated] = jobset["spec"]["replicatedJobs"]
  job = replicated["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
  assert job["parallelism"] == job["completions"] > 1
  pod = job["template"]["spec"]
  assert {"cloud.google.com/gke-tpu-accelerator",
          "cloud.google.com/gke-tpu-topology"} <= set(pod["nodeSelector"])
  assert pod["terminationGracePeriodSeconds"] >= 120
  [container] = pod["containers"]
  assert container["resources"]["limits"]["google.com/tpu"] > 0
  script = " ".join(container["args"])
  assert "make install EXTRAS=tpu" in script and "exec .venv/bin/mixtral-train --distributed=yes" \
      in script and "--workdir=gs://" in script
  account = docs["ServiceAccount"]["metadata"]["name"]
  assert pod["serviceAccountName"] == account
  [pods] = [rule for rule in docs["Role"]["rules"] if "pods" in rule["resources"]]
  assert {"get", "list", "watch"} <= set(pods["verbs"])
  binding = docs["RoleBinding"]
  assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
  assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                  "namespace": docs["ServiceAccount"]["metadata"]["namespace"]}]


def test_sweep_runs_mixtral_sweep_on_every_worker_and_wants_a_mounted_workdir():
  flags = ["--config=configs/sweeps/experts.py", "--workdir=/mnt/shared/sweep"]
  result = _run("tpu_vm.sh", *TPU, "--sweep", "--dry-run", "--", *flags)
  assert result.returncode == 0, result.stderr
  assert _remote(_commands(result.stdout)[-1])[-4:] == [".venv/bin/mixtral-sweep",
                                                        "--distributed=yes", *flags]
  result = _run("tpu_vm.sh", *TPU, "--sweep", "--dry-run", "--", "--workdir=gs://bucket/sweep")
  assert result.returncode == 2 and result.stderr.startswith(
      "tpu_vm.sh: --sweep: --workdir=gs://bucket/sweep must be an absolute path")
  result = _run("local.sh", "--sweep", "--num_processes=2", "--dry-run", "--", *flags)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert len(commands) == 2 and all(c[c.index("-m") + 1] == "mixtral_jax.cli.sweep"
                                    for c in commands)
