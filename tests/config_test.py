"""config.model_config: each "auto" choice resolved per backend; explicit values win."""

import pytest

from configs import default
from mixtral_jax import config as config_lib


@pytest.mark.parametrize("platform,dtype", [("cpu", "float32"), ("gpu", "bfloat16"),
                                            ("tpu", "bfloat16")])
def test_dtype_auto_is_bf16_on_accelerators_and_f32_on_cpu(platform, dtype):
  model = default.get_config().model
  assert model.dtype == "auto"
  assert config_lib.model_config(model, platform).dtype == dtype
  for explicit in ("float32", "bfloat16"):  # a value the user wrote is kept on every backend
    model.dtype = explicit
    assert config_lib.model_config(model, platform).dtype == explicit


def test_an_unknown_dtype_is_refused_in_one_line():
  model = default.get_config().model
  model.dtype = "float16"
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.model\.dtype: unknown dtype 'float16'; expected one of "
                           r"\['auto', 'float32', 'bfloat16'\]$"):
    config_lib.validate_model(model)


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_a_note():
  config = default.get_config()
  saved = config_lib.json_of(config)
  del saved["model"]["router_balance"]  # as written before model.router_balance existed
  changes = config_lib.check_resume(saved, config, "ckpt")
  assert changes == ["model.router_balance: None → 'aux_loss'"]
  saved["model"]["router_balance"] = "aux_free"  # recorded, and different: refused
  with pytest.raises(config_lib.ConfigError, match=r"^config.model.router_balance: 'aux_loss' "
                                                   r"here, 'aux_free' in ckpt"):
    config_lib.check_resume(saved, config, "ckpt")
