"""Which of JAX's platforms a command starts: the accelerators this host has, not every plugin
installed. libtpu (the `tpu` extra, which `make test` installs for the compile tests) otherwise
starts on any machine and prints five lines of errors where there is no TPU."""

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
