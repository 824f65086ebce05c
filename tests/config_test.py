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
