"""Which of JAX's platforms a command starts: the accelerators this host has, not every plugin
installed. libtpu (the `tpu` extra, which `make test` installs for the compile tests) otherwise
starts on any machine and prints five lines of errors where there is no TPU; compile-only TPU
devices (mixtral-compile) load it on purpose, and it then needs to be told what it is not on."""

import glob
import os

import jax

# The PCI vendor id that TPU chips carry (Google's).
_TPU_VENDOR = "0x1ae0"


def _has_tpu() -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == _TPU_VENDOR:
          return True
    except OSError:
      continue
  return False


def _has_nvidia_gpu() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*"))


def use_present_platforms() -> None:
  """On a host without a TPU or an NVIDIA GPU, starts JAX's CPU backend alone (unless
  JAX_PLATFORMS says otherwise). Call before the first JAX computation."""
  if os.environ.get("JAX_PLATFORMS") or _has_tpu() or _has_nvidia_gpu():
    return
  jax.config.update("jax_platforms", "cpu")


def quiet_compile_only_tpu(slice_name: str) -> None:
  """Prepares libtpu to give compile-only devices (`slice_name`, e.g. v5p-128) without a TPU
  here: no metadata-server query (off Google Cloud it can hang), and the host facts it would
  otherwise look up and, not finding them, print five lines of errors about. Several processes
  may load it at once: nothing runs on a TPU. Call before JAX loads libtpu; variables already
  set are kept."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not _has_tpu():
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
