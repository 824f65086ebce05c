"""Installing: the cuda extra is jax's CUDA plugin, and `make install` adds it on a GPU machine."""

import importlib.metadata
import os
import stat
import subprocess

import pytest


def test_the_cuda_extras_are_jax_with_its_cuda_plugins():
  requires = importlib.metadata.requires("mixtral_jax")
  assert 'jax[cuda13]>=0.10.2; extra == "cuda"' in requires
  assert 'jax[cuda12]>=0.10.2; extra == "cuda12"' in requires


@pytest.mark.parametrize("gpus,extras", [("GPU 0: NVIDIA H200 (UUID: GPU-0)", "dev,cuda"),
                                         ("", "dev")])
def test_make_install_adds_cuda_where_nvidia_smi_lists_a_gpu(tmp_path, repo, gpus, extras):
  fake = tmp_path / "nvidia-smi"  # stands in for the driver's tool: lists `gpus`, or fails
  fake.write_text(f"#!/bin/sh\necho '{gpus}'\n" if gpus else "#!/bin/sh\nexit 9\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
  for name in ("EXTRAS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # as typed in a fresh shell
    env.pop(name, None)
  plan = subprocess.run(["make", "-n", "-B", "install"], cwd=repo, env=env, text=True,
                        capture_output=True, check=True).stdout
  assert f'pip install -q -e ".[{extras}]"' in plan, plan
