"""The training config (its fields, each with a comment, and defaults: configs/default.py): the
checks that reject a bad value in one line naming the field (checks.py), the per-backend
resolution of "auto" choices (resolve.py) and what a resumed run may change (resume.py). Import
the names from here."""

from mixtral_jax.config.checks import (ALL_TO_ALLS, ATTENTIONS, DATA_SOURCES, DISPATCH_MODES,
                                       DTYPES, GROUPED_MATMULS, MESH_AXES, ROUTER_BALANCES,
                                       ConfigError, mesh_shape, profile_range, validate,
                                       validate_data, validate_mesh, validate_model)
from mixtral_jax.config.resolve import AUTO_VALUES, model_config, require_resolved
from mixtral_jax.config.resume import check_resume, json_of

__all__ = ["ALL_TO_ALLS", "ATTENTIONS", "AUTO_VALUES", "DATA_SOURCES", "DISPATCH_MODES", "DTYPES",
           "GROUPED_MATMULS", "MESH_AXES", "ROUTER_BALANCES", "ConfigError", "check_resume", "json_of", "mesh_shape",
           "model_config", "profile_range", "require_resolved", "validate", "validate_data",
           "validate_mesh", "validate_model"]
