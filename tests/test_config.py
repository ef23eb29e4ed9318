"""The config checks: keys and types through a locked ml_collections ConfigDict, values through
one table (config.RANGE_CHECKS, config.DP_RANGE_CHECKS), and reading a config imports no JAX.

Command-line typos and values are tested as a user meets them in tests/test_cli.py."""

import math
import re
import subprocess
import sys

import ml_collections
import pytest

from fastdp_jax import config as config_lib
from fastdp_jax import errors
from tests.conftest import ROOT


def _valid():
  cfg = config_lib.base_config()
  cfg.dp.noise_multiplier = 1.0
  return cfg


def _leaves(cfg, prefix=""):
  for key in cfg.keys():
    if isinstance(cfg[key], ml_collections.ConfigDict):
      yield from _leaves(cfg[key], f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", cfg.get_type(key)


def _set(cfg, dotted, value):
  *groups, name = dotted.split(".")
  for g in groups:
    cfg = cfg[g]
  cfg[name] = value


@pytest.mark.parametrize("module", ["seq", "dist", "test", "fulton", "fulton_binned", "tabular"])
def test_reading_and_validating_a_config_imports_neither_jax_nor_flax(module):
  program = (f"import sys, configs.{module} as c, fastdp_jax.config as f\n"
             "f.validate(c.get_config())\n"
             "assert not {'jax', 'jaxlib', 'flax', 'optax', 'jax_privacy'} & set(sys.modules), "
             "sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax'))\n")
  subprocess.run([sys.executable, "-c", program], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("typo,meant", [
    ("dp.nosie_multiplier", "dp.noise_multiplier"),
    ("num_epoch", "num_epochs"),
    ("optimizer.learning_rat", "optimizer.learning_rate"),
])
def test_a_typo_in_a_config_file_is_refused_with_did_you_mean(typo, meant):
  # A config built without base_config() (nothing locked): the locked schema refuses the key.
  cfg = ml_collections.ConfigDict(_valid().to_dict())
  _set(cfg, typo, 3)
  with pytest.raises(errors.ConfigError) as e:
    config_lib.validate(cfg)
  message = str(e.value)
  assert message.startswith(f"unknown config key {typo}; did you mean {meant}? (known keys ")
  assert "\n" not in message


def test_an_unknown_group_is_refused():
  cfg = ml_collections.ConfigDict(_valid().to_dict())
  cfg.dpp = ml_collections.ConfigDict({"noise_multiplier": 1.0})
  with pytest.raises(errors.ConfigError, match="unknown config key dpp; did you mean dp?"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("key,value,message", [
    ("num_epochs", "10", "num_epochs='10' must be of type int, not str"),
    ("dp.noise_multiplier", "1.0", "dp.noise_multiplier='1.0' must be of type float, not str"),
    ("batch_size", 2.5, "batch_size=2.5 must be of type int, not float"),
    ("data.path", 3, "data.path=3 must be of type str, not int"),
])
def test_a_value_of_the_wrong_type_is_refused_by_the_schema(key, value, message):
  # type_safe=False: the config itself accepted anything; the schema does not.
  cfg = ml_collections.ConfigDict(_valid().to_dict(), type_safe=False)
  _set(cfg, key, value)
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_lib.validate(cfg)


def test_a_value_where_a_group_belongs_and_the_reverse():
  cfg = ml_collections.ConfigDict(_valid().to_dict(), type_safe=False)
  cfg.dp = 3
  with pytest.raises(errors.ConfigError, match="config key 'dp' must be a group of keys"):
    config_lib.validate(cfg)
  cfg = ml_collections.ConfigDict(_valid().to_dict(), type_safe=False)
  cfg.seed = ml_collections.ConfigDict({"a": 1})
  with pytest.raises(errors.ConfigError, match="config key 'seed' is a value, not a group"):
    config_lib.validate(cfg)


def test_an_int_where_a_float_belongs_is_fine():
  cfg = _valid()
  cfg.optimizer.learning_rate = 1
  config_lib.validate(cfg)


def test_every_number_of_the_schema_has_a_range_check():
  tables = set(config_lib.RANGE_CHECKS) | set(config_lib.DP_RANGE_CHECKS)
  numbers = {key for key, kind in _leaves(config_lib.base_config()) if kind in (int, float)}
  assert numbers - tables == set()
  assert tables - {key for key, _ in _leaves(config_lib.base_config())} == set()  # no stale key


# One value each key's check must refuse (of the schema's type, so that the table, not the
# type check, is what refuses it), and what the message must then say.
_BAD = {
    "num_epochs": 0, "batch_size": -1, "steps_per_call": 0, "eval_batch_size": 0,
    "log_every_steps": -1, "privacy_eval.membership_rows": -1,
    "privacy_eval.significance": 1.0, "profile_steps": -5, "checkpoint.every_steps": 0,
    "checkpoint.min_interval_s": -1.0,
    "padding_microbatch": 0, "model.hidden_sizes": (8, 0), "model.task": "multi",
    "model.embedding_dim": 0, "model.huber_delta": math.inf,
    "data.validation_fraction": 1.0, "optimizer.name": "sgdd",
    "optimizer.learning_rate": math.nan, "optimizer.momentum": 1.0, "data.attack_rows": -1,
    "optimizer.weight_decay": 1.0, "optimizer.decay": "exponential", "calibration.epsilon": -1.0,
    "seed": True, "data.public_num_examples": 0, "parallel.strategy": "psum",
    "dp.clipping": "jax", "dp.microbatch_size": 0, "dp.noise_seed": True,
    "dp.sampling_seed": False, "dp.overflow_probability": 0.0, "dp.l2_norm_clip": -1.0,
    "dp.noise_multiplier": -math.inf, "dp.target_epsilon": 0.0, "dp.max_epsilon": 0.0,
    "dp.delta": 1.0, "dp.accountant": "moments", "dp.count_epsilon": 0.0,
    "tuning.private_data": "maybe", "compilation_cache_dir": "cache\0dir",
}


@pytest.mark.parametrize("key", sorted(set(config_lib.RANGE_CHECKS)
                                       | set(config_lib.DP_RANGE_CHECKS)))
def test_each_range_check_refuses_a_bad_value_naming_key_and_value(key):
  assert key in _BAD, f"add a bad value for {key} to _BAD"
  cfg = _valid()
  if key == "dp.noise_multiplier":
    cfg.dp.target_epsilon = 1.0  # so that the bad sigma is not the one-of-two rule's business
  config_lib.validate(cfg)  # the defaults pass
  _set(cfg, key, _BAD[key])
  table = config_lib.RANGE_CHECKS if key in config_lib.RANGE_CHECKS else \
      config_lib.DP_RANGE_CHECKS
  with pytest.raises(errors.ConfigError) as e:
    config_lib.validate(cfg)
  assert str(e.value) == f"{key}={_BAD[key]!r} must be {table[key][1]}"


@pytest.mark.parametrize("seconds,ok", [(0.0, True), (60.0, True), (0.5, True),
                                        (math.inf, False), (math.nan, False), (-0.1, False)])
def test_checkpoint_min_interval_is_a_finite_non_negative_number_of_seconds(seconds, ok):
  cfg = _valid()
  cfg.checkpoint.min_interval_s = seconds
  if ok:
    assert config_lib.settings(cfg).checkpoint.min_interval_s == seconds
  else:
    with pytest.raises(errors.ConfigError, match=r"checkpoint\.min_interval_s="):
      config_lib.validate(cfg)


def test_dp_value_checks_apply_only_when_dp_is_on():
  cfg = _valid()
  cfg.dp.delta = 2.0
  with pytest.raises(errors.ConfigError, match=re.escape("dp.delta=2.0 must be in (0, 1)")):
    config_lib.validate(cfg)
  cfg.dp.enabled = False
  config_lib.validate(cfg)  # a non-private run has no delta to be wrong about
