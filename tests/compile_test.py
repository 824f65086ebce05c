"""`mixtral-compile`: the train step compiled by XLA:TPU for compile-only TPU devices, here."""

import json
import re
import subprocess
import sys

import pytest

from configs import default
from conftest import assert_output, user_env
from mixtral_jax.runtime import platforms
from mixtral_jax.tools import compile as compile_lib

pytest.importorskip("libtpu", reason="the tpu extra (make test installs it)")


def _default_config(dispatch, all_to_all):
  """The default config on a 4-chip slice with the expert axis over all 4, 2 layers."""
  config = default.get_config()
  config.model.update(num_layers=2, dispatch=dispatch, all_to_all=all_to_all)
  config.mesh.update(data=1, expert=4)
  return config


# Per MoE layer: tokens out and results back, and their two transposes; dropless also sends each
# row's expert id. The ragged exchange adds one tiny all-to-all of row counts per direction.
@pytest.mark.parametrize("dispatch,all_to_all,per_layer", [
    ("dropless", "padded", {"all-to-all": 5}),
    ("dropless", "ragged", {"ragged-all-to-all": 5}),
    ("capacity", "padded", {"all-to-all": 4})])
def test_the_default_step_compiles_for_tpu_with_experts_over_4_chips(dispatch, all_to_all,
                                                                     per_layer):
  config = _default_config(dispatch, all_to_all)
  report = compile_lib.report(config, "v5p-8")
  assert report["chips"] == 4 and report["mesh"]["expert"] == 4 and report["fits"]
  assert config.model.grouped_matmul == config.model.attention == "auto"  # resolved for TPU:
  # ragged_dot and splash attention (see config.py): forward and both backward kernels per layer
  # with remat off; the packed batches' segments make them the segmented variants.
  splash = {name: count for name, count in report["kernels"].items() if "splash" in name}
  assert splash == {f"splash_mha_{phase}_segmented_{residuals}": 2
                    for phase, residuals in (("fwd", "residuals"), ("dq", "no_residuals"),
                                             ("dkv", "no_residuals"))}
  # XLA:TPU lowers dropless' ragged_dot to its own grouped-matmul kernels.
  assert (report["kernels"].get("ragged-dot-none", 0) >= 2) == (dispatch == "dropless")
  for kind, count in per_layer.items():
    assert report["collectives"][kind]["count"] == count * config.model.num_layers
  if all_to_all == "ragged":
    assert report["collectives"]["all-to-all"]["bytes"] < 1e-3 * report["moe_all_to_all_bytes"]
  assert 0 < report["parameters"] < report["optimizer_state"] < report["total"]
  assert report["total"] < report["hbm_per_chip"]
  assert report["compiled_flops"] > 0 and report["model_flops"] > 0
  # Capacity buffers hold capacity_factor × the slots; padded dropless ones n·min(k, E/ep) rows
  # per peer (4 peers, k=2: 4×), plus each row's int32 expert id.
  # The ragged exchange's buffers are as large (what it sends depends on the routing).
  expected = {"capacity": config.model.capacity_factor, "dropless": 4.0}[dispatch]
  assert expected <= report["moe_all_to_all_ratio"]
  if all_to_all == "padded":
    assert report["moe_all_to_all_ratio"] < expected * 1.05
  text = compile_lib.format_report(report)
  assert "\nfits\n" in text and "MoE all-to-all" in text


@pytest.mark.skipif(platforms._has_tpu(), reason="a TPU host starts libtpu for its own chips")
def test_a_config_that_cannot_fit_says_so_with_the_numbers(tmp_path, repo):
  # As a user runs it: none of the variables the tests set for libtpu.
  env = user_env()
  out = subprocess.run(
      [sys.executable, "-m", "mixtral_jax.cli.compile", "--config=configs/default.py",
       "--topology=v5e-4", "--config.model.num_layers=1", "--config.model.vocab_size=2000000",
       "--config.model.hidden_size=1024", "--save", str(tmp_path)],
      cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 3, out.stderr[-3000:]
  # The report and nothing else: no libtpu start-up lines on a host without a TPU.
  assert_output(out, [r"v5e-4 \(v5e:2x2, 4 chips\), mesh .*: compiled in \d+ s",
                      r"HBM per chip: .*", r"does not fit: needs at least .* of 16\.00 GiB",
                      r"XLA:TPU: RESOURCE_EXHAUSTED: Ran out of memory on HBM, .*"], [])
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["fits"] is False and saved["total"] > saved["hbm_per_chip"]
  assert saved["parameters"] > 15 * 2**30  # 4.1B float32 embedding parameters, replicated


@pytest.mark.parametrize("args,code,message", [
    (["--topology=v9-8"], 1, "error: --topology=v9-8: unknown; one of v4-8"),
    (["--topology=v5p-8", "--config.model.num_experts=6"], 1,
     "error: config.model.num_experts: 6 is not divisible"),
    (["--topology=v5p-8", "--config.model.nope=1"], 2, "error:"),
])
def test_bad_input_gives_one_line(repo, args, code, message):
  out = subprocess.run([sys.executable, "-m", "mixtral_jax.cli.compile", "--config=configs/default.py",
                        "--config.mesh.data=1", "--config.mesh.expert=4", *args], cwd=repo,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == code, out.stderr[-2000:]
  assert_output(out, [], [re.escape(message) + ".*"])


def test_slice_names_map_to_topologies_and_chips():
  assert compile_lib.TOPOLOGIES["v5p-128"] == compile_lib.Topology("v5p:4x4x4", 64, 95)
  assert compile_lib.TOPOLOGIES["v5e-256"] == compile_lib.Topology("v5e:16x16", 256, 16)
  assert compile_lib.TOPOLOGIES["v6e-64"] == compile_lib.Topology("v6e:8x8", 64, 32)
  assert len(compile_lib.topology_devices("v5p-8")) == 4
  assert len(compile_lib.topology_devices("v6e-8")) == 8
  assert len(compile_lib.topology_devices("v4-8")) == 8  # 4 chips' TensorCores: no megacore


def test_scanned_layers_compile_as_one_block():
  config = _default_config("dropless", "padded")
  config.model.update(num_layers=4, scan_layers=True)
  report = compile_lib.report(config, "v5p-8")
  assert report["fits"] and report["scanned"]
  # One decoder block in the program, run 4 times: one layer's five exchanges.
  assert report["collectives"]["all-to-all"]["count"] == 5
  assert 4.0 <= report["moe_all_to_all_ratio"] < 4.2
