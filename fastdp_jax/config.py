"""The configuration schema: every key a config may set, its default, and its validation.

Config files (``configs/*.py``) start from :func:`base_config` and change only what differs.
:func:`validate` runs once, after command-line overrides, before any work: unknown keys
(typos), wrong types and out-of-range values raise :class:`fastdp_jax.errors.ConfigError`
naming the key. Reading and validating a config imports neither JAX nor Flax.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator

import ml_collections
from ml_collections import config_dict

from fastdp_jax import accounting
from fastdp_jax.errors import ConfigError

# The selectors' values live here, not in the JAX modules that implement them, so that reading
# a config imports no JAX: fastdp_jax.ghost and fastdp_jax.step import them from here.
CLIPPING_METHODS = ("auto", "ghost", "vmap")  # fastdp_jax.ghost.make_clipped_sum
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("auto", "shard_map")  # fastdp_jax.step.build_train_chunk
TASKS = ("binary", "multiclass", "regression")  # fastdp_jax.data.TASK_KINDS


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default: the original system's sequential DP-SGD run."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.path = "data/generated/capums"  # dataset directory (manifest.json) or original .h5.
  c.data.batches = ""  # a directory of materialised Poisson batches of data.path
  #                      (python -m preprocessing.poisson_batches): stream the updates from it
  #                      in constant memory instead of holding the training rows.
  c.data.verify_checksums = True  # check every shard's sha256 against the manifest.
  c.data.public_num_examples = config_dict.placeholder(int)  # a PUBLIC training-set size
  #                            that fixes q and the number of updates (unset: N is public).
  c.data.feature_bounds = config_dict.placeholder(tuple)  # PUBLIC feature bounds for data
  #   that declares none (an original .h5, a manifest older than recorded bounds): (lo, hi)
  #   for every feature or one (lo, hi) per feature; never computed from the data. Every row
  #   outside them is refused before the first update. A manifest's own bounds take precedence.
  c.data.attack_column = "englishability"  # model-inversion attack target ('' to skip).
  c.data.attack_rows = 10_000  # training rows attacked (the original's figure).
  c.data.validation_fraction = 0.0  # >0: this fraction of the training rows (a hash of the
  #                    row number, fastdp_jax.schema.is_test_row with VALIDATION_SEED) is held
  #                    out of training and evaluated each epoch; its metrics are private.

  c.num_epochs = 10  # an epoch is round(N / batch_size) updates.
  c.batch_size = 256  # EXPECTED batch size; the sampling rate is q = batch_size / N.
  c.seed = 0  # model initialisation (batches: dp.sampling_seed; noise: dp.noise_seed).

  c.model = ml_collections.ConfigDict()
  c.model.hidden_sizes = (50,)  # the original 9-50-1 MLP; () is logistic regression.
  c.model.task = config_dict.placeholder(str)  # unset: the manifest's task; set, it must be
  #                                            the manifest's ('binary' | 'multiclass' |
  #                                            'regression').
  c.model.embedding_dim = 8  # width of each embedding table (the manifest's id columns).
  c.model.huber_delta = config_dict.placeholder(float)  # regression: Huber loss with this
  #                     delta in units of half the label range (unset: squared loss).

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # 'sgd' | 'adam'.
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.0  # SGD momentum (0 = the original's plain SGD).

  c.dp = ml_collections.ConfigDict()
  c.dp.enabled = True  # False: the same code path without clipping or noise (baseline).
  c.dp.l2_norm_clip = 3.0  # C: each example's gradient is clipped to this L2 norm.
  c.dp.noise_multiplier = config_dict.placeholder(float)  # sigma; or set target_epsilon.
  c.dp.target_epsilon = config_dict.placeholder(float)  # calibrate sigma to reach this
  #                                                        (takes precedence over sigma).
  c.dp.delta = config_dict.placeholder(float)  # unset: the largest power of ten at most
  #                                              1/(10 N); a delta >= 1/N is warned about.
  c.dp.max_epsilon = config_dict.placeholder(float)  # hard cap: stop before exceeding it.
  c.dp.accountant = "pld"  # 'pld' (tight) | 'rdp'.
  c.dp.noise_seed = config_dict.placeholder(int)  # unset: OS entropy; int: reproducible noise.
  c.dp.sampling_seed = config_dict.placeholder(int)  # unset: OS entropy (private); int:
  #                                                    reproducible batches, run is not private.
  c.dp.overflow_probability = config_dict.placeholder(float)  # per update, of a Poisson batch
  #                                                    above its padded capacity (None: automatic).
  c.dp.clipping = "auto"  # 'ghost' | 'vmap' | 'auto' (ghost when the model supports it).
  c.dp.microbatch_size = config_dict.placeholder(int)  # vmap chunk size bounding memory.

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "shard_map"  # 'shard_map' (explicit psum) | 'auto' (XLA's all-reduce).

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True  # save in WORKDIR/checkpoints and resume from it.
  c.checkpoint.every_steps = 1000  # also save at every epoch end.
  c.checkpoint.allow_changes = False  # resume even if privacy/model/data changed (recorded).
  c.checkpoint.keep_keys = True  # False: delete keys.json and checkpoints/ when the run ends
  #                                (or later: python -m fastdp_jax.checkpoint forget WORKDIR).

  c.steps_per_call = 128  # updates compiled into one device call (no per-step dispatch).
  c.eval_batch_size = 65_536  # evaluation chunk size.
  c.log_every_steps = 5000  # an eval record (test metrics + epsilon, metrics.jsonl) every N
  #                           updates, besides every epoch end (0: epoch ends only); each
  #                           point costs a test-set pass and ~0.2 s of PLD accounting.
  c.export_model = True  # write WORKDIR/model/ (parameters, feature spec, MODEL_CARD.md).

  c.privacy_eval = ml_collections.ConfigDict()  # after training (fastdp_jax.privacy_eval)
  c.privacy_eval.membership_rows = 10_000  # loss-threshold membership inference: train and
  #                                          as many test rows attacked (0: skip).
  c.privacy_eval.significance = 0.05  # of the canary audit, run when data.path is an audit
  #                                     dataset (python -m fastdp_jax.privacy_eval).
  c.profile_steps = 0  # >0: JAX profiler trace of this many updates in WORKDIR/profile,
  #                      and a per-phase time table (fastdp_jax.profiling).
  return c


def _keys(schema: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """Every dotted key of ``schema``, groups included (``dp``, ``dp.delta``, ...)."""
  for key in schema.keys():
    yield prefix + key
    if isinstance(schema[key], ml_collections.ConfigDict):
      yield from _keys(schema[key], f"{prefix}{key}.")


def unknown_key_message(name: str, schema: ml_collections.ConfigDict | None = None) -> str:
  """``unknown config key dp.nosie; did you mean dp.noise_multiplier? known keys in dp: ...``."""
  schema = base_config() if schema is None else schema
  *group_path, _ = name.split(".")
  group, where = schema, list[str]()  # the deepest group of ``name`` that exists
  for part in group_path:
    if part not in group or not isinstance(group[part], ml_collections.ConfigDict):
      break
    group, where = group[part], where + [part]
  prefix = "".join(f"{w}." for w in where)
  known = sorted(prefix + k for k in group.keys())
  close = difflib.get_close_matches(name, list(_keys(schema)), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]}?" if close else ""
  scope = f"in {prefix[:-1]}" if prefix else "at the top level"
  return f"unknown config key {name}{hint} (known keys {scope}: {', '.join(known)})"


def check_key(name: str) -> None:
  """Raises :class:`ConfigError` unless the dotted key ``name`` is in :func:`base_config`.

  For command-line overrides (``--config.dp.noise_multiplier=1``), checked before
  ``ml_collections`` applies them (it raises an ``AttributeError`` with a traceback).
  """
  node = base_config()
  for part in name.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(unknown_key_message(name))
    node = node[part]


def _check_keys(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                prefix: str = "") -> None:
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(unknown_key_message(name))
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"config key {name!r} must be a group of keys")
      _check_keys(cfg[key], schema[key], name + ".")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_finite(name: str, value) -> None:
  if not (_is_number(value) and math.isfinite(value) and value > 0):
    raise ConfigError(f"{name}={value!r} must be a positive finite number")


def _check_optional_int(name: str, value) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
    raise ConfigError(f"{name}={value!r} must be an integer (or unset)")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks a config before any work.

  Raises:
    ConfigError: naming the offending key and value.
  """
  _check_keys(cfg, base_config())
  if not cfg.data.path:
    raise ConfigError("data.path must be set")
  for key in ("num_epochs", "batch_size", "steps_per_call", "eval_batch_size"):
    if not isinstance(cfg[key], int) or cfg[key] <= 0:
      raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer")
  for key, value in (("log_every_steps", cfg.log_every_steps),
                     ("privacy_eval.membership_rows", cfg.privacy_eval.membership_rows)):
    if not isinstance(value, int) or value < 0:
      raise ConfigError(f"{key}={value!r} must be a non-negative integer")
  if not 0 < cfg.privacy_eval.significance < 1:
    raise ConfigError(f"privacy_eval.significance={cfg.privacy_eval.significance} must be in"
                      " (0, 1)")
  if not isinstance(cfg.profile_steps, int) or cfg.profile_steps < 0:
    raise ConfigError(f"profile_steps={cfg.profile_steps!r} must be a non-negative integer")
  if not cfg.checkpoint.every_steps > 0:
    raise ConfigError(f"checkpoint.every_steps={cfg.checkpoint.every_steps} must be positive")
  if any(int(h) <= 0 for h in cfg.model.hidden_sizes):
    raise ConfigError(f"model.hidden_sizes={tuple(cfg.model.hidden_sizes)} must be positive")
  if cfg.model.task is not None and cfg.model.task not in TASKS:
    raise ConfigError(f"model.task={cfg.model.task!r} must be one of {TASKS} (or unset: the "
                      "manifest's task)")
  if isinstance(cfg.model.embedding_dim, bool) or not isinstance(cfg.model.embedding_dim, int) \
      or cfg.model.embedding_dim <= 0:
    raise ConfigError(f"model.embedding_dim={cfg.model.embedding_dim!r} must be a positive "
                      "integer")
  if cfg.model.huber_delta is not None:
    _check_positive_finite("model.huber_delta", cfg.model.huber_delta)
  vf = cfg.data.validation_fraction
  if not (_is_number(vf) and 0 <= vf < 1):
    raise ConfigError(f"data.validation_fraction={vf!r} must be in [0, 1)")
  if cfg.optimizer.name not in OPTIMIZERS:
    raise ConfigError(f"optimizer.name={cfg.optimizer.name!r} must be one of {OPTIMIZERS}")
  _check_positive_finite("optimizer.learning_rate", cfg.optimizer.learning_rate)
  _check_optional_int("seed", cfg.seed)
  _check_optional_int("data.public_num_examples", cfg.data.public_num_examples)
  if cfg.data.public_num_examples is not None and cfg.data.public_num_examples <= 0:
    raise ConfigError(f"data.public_num_examples={cfg.data.public_num_examples} must be "
                      "positive")
  if cfg.parallel.strategy not in STRATEGIES:
    raise ConfigError(f"parallel.strategy={cfg.parallel.strategy!r} must be one of "
                      f"{STRATEGIES}")
  dp = cfg.dp
  if dp.clipping not in CLIPPING_METHODS:
    raise ConfigError(f"dp.clipping={dp.clipping!r} must be one of {CLIPPING_METHODS}")
  if dp.microbatch_size is not None and dp.microbatch_size <= 0:
    raise ConfigError(f"dp.microbatch_size={dp.microbatch_size} must be positive")
  _check_optional_int("dp.noise_seed", dp.noise_seed)
  _check_optional_int("dp.sampling_seed", dp.sampling_seed)
  if dp.overflow_probability is not None and not (
      _is_number(dp.overflow_probability) and 0 < dp.overflow_probability < 1):
    raise ConfigError(f"dp.overflow_probability={dp.overflow_probability!r} must be in (0, 1)"
                      " (or unset: automatic)")
  if dp.l2_norm_clip is not None:  # also when DP is off: a NaN here is a mistake either way
    _check_positive_finite("dp.l2_norm_clip", dp.l2_norm_clip)
  if not dp.enabled:
    return
  if dp.l2_norm_clip is None:
    raise ConfigError("dp.l2_norm_clip must be set when DP is on")
  if dp.noise_multiplier is None and dp.target_epsilon is None:
    raise ConfigError("set dp.noise_multiplier or dp.target_epsilon (or dp.enabled=False)")
  if dp.noise_multiplier is not None and not (
      _is_number(dp.noise_multiplier) and math.isfinite(dp.noise_multiplier)
      and dp.noise_multiplier > 0):
    raise ConfigError(f"dp.noise_multiplier={dp.noise_multiplier} must be a positive finite "
                      "number when DP is on (dp.enabled=False for a non-private run)")
  if dp.target_epsilon is not None:
    _check_positive_finite("dp.target_epsilon", dp.target_epsilon)
  if dp.max_epsilon is not None and not dp.max_epsilon > 0:  # inf: no cap
    raise ConfigError(f"dp.max_epsilon={dp.max_epsilon} must be positive")
  if dp.delta is not None and not (_is_number(dp.delta) and 0 < dp.delta < 1):
    raise ConfigError(f"dp.delta={dp.delta} must be in (0, 1)")
  if dp.accountant not in accounting.ACCOUNTANTS:
    raise ConfigError(f"dp.accountant={dp.accountant!r} must be one of "
                      f"{accounting.ACCOUNTANTS}")
  if (dp.target_epsilon is None and dp.accountant == "pld"
      and dp.noise_multiplier < accounting.MIN_PLD_NOISE_MULTIPLIER):
    raise ConfigError(
        f"dp.noise_multiplier={dp.noise_multiplier:g} is below "
        f"{accounting.MIN_PLD_NOISE_MULTIPLIER}: the PLD accountant cannot compute epsilon there"
        " (its loss distribution grows without bound), and DP-SGD gives no meaningful "
        "guarantee there; use a larger sigma, dp.accountant='rdp' (epsilon as large as it "
        "is), or dp.enabled=False")
