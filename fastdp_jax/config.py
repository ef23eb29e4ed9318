"""The configuration schema: every key a config may set, its default, and its validation.

Config files (``configs/*.py``) start from :func:`base_config` and change only what differs.
:func:`validate` runs once, after command-line overrides, before any work: unknown keys
(typos), wrong types and out-of-range values raise :class:`fastdp_jax.errors.ConfigError`
naming the key. The keys and types are checked by ml_collections (the config's values set on a
locked, type-safe copy of :func:`base_config`), the values by one table, :data:`RANGE_CHECKS`.
Reading and validating a config imports neither JAX nor Flax. :func:`settings` validates and
returns the typed, frozen :class:`RunConfig` that the trainer passes on, a part to each module.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
from ml_collections import config_dict

from fastdp_jax.dp import accounting
from fastdp_jax.errors import ConfigError

# The selectors' values live here, not in the JAX modules that implement them, so that reading
# a config imports no JAX: fastdp_jax.dp.clipping and fastdp_jax.step import them from here.
CLIPPING_METHODS = ("auto", "ghost", "vmap")  # fastdp_jax.dp.clipping.make_clipped_sum
OPTIMIZERS = ("sgd", "adam")
DECAYS = ("constant", "cosine", "linear")
STRATEGIES = ("auto", "shard_map")  # fastdp_jax.step.build_train_chunk
TASKS = ("binary", "multiclass", "regression")  # fastdp_jax.data.manifest.TASK_KINDS
TUNING = ("none", "unaccounted", "accounted")  # tuning.private_data
# Per user, so that every run of the same shapes shares it (a cache in each new workdir would
# never be hit again); fastdp_jax.services.use_compilation_cache makes it owner-only.
DEFAULT_COMPILATION_CACHE = "~/.cache/fastdp-jax/jax"


def _data_keys() -> ml_collections.ConfigDict:
  """The ``data`` group of :func:`base_config`."""
  data = ml_collections.ConfigDict()
  data.path = "data/generated/capums"  # dataset directory (manifest.json) or original .h5.
  data.batches = ""  # a directory of materialised Poisson batches of data.path
  #                    (python -m preprocessing.poisson_batches): stream the updates from it
  #                    in constant memory instead of holding the training rows.
  data.verify_checksums = True  # check every shard's sha256 against the manifest.
  data.public_num_examples = config_dict.placeholder(int)  # a PUBLIC training-set size
  #                          that fixes q, the number of updates and the default delta
  #                          (unset: a DP estimate of N, dp.count_epsilon).
  data.num_examples_public = False  # True: the user declares the dataset's exact number of
  #                          training rows public; q, T and delta derive from it and the card
  #                          says so (no DP count). Needed with data.batches.
  data.feature_bounds = config_dict.placeholder(tuple)  # PUBLIC feature bounds for data
  # that declares none (an original .h5, a manifest older than recorded bounds): (lo, hi)
  # for every feature or one (lo, hi) per feature; never computed from the data. Every row
  # outside them is refused before the first update. A manifest's own bounds take precedence.
  data.attack_column = "englishability"  # model-inversion attack target ('' to skip).
  data.attack_rows = 10_000  # training rows attacked (the original's figure).
  data.validation_fraction = 0.0  # >0: this fraction of the training rows (a hash of each
  #                  row's key, fastdp_jax.data.split.is_test_row with VALIDATION_SEED; of the
  #                  unit key with a privacy unit) is held out of training and evaluated each
  #                  epoch; its metrics are private.
  return data


def _dp_keys() -> ml_collections.ConfigDict:
  """The ``dp`` group of :func:`base_config`."""
  dp = ml_collections.ConfigDict()
  dp.enabled = True  # False: the same code path without clipping or noise (baseline).
  dp.l2_norm_clip = 3.0  # C: each example's gradient is clipped to this L2 norm.
  dp.noise_multiplier = config_dict.placeholder(float)  # sigma; or set target_epsilon.
  dp.target_epsilon = config_dict.placeholder(float)  # calibrate sigma to reach this
  #                                                      (takes precedence over sigma).
  dp.delta = config_dict.placeholder(float)  # unset: the largest power of ten at most
  #                                            1/(10 N); a delta >= 1/N is warned about.
  dp.max_epsilon = config_dict.placeholder(float)  # hard cap: stop before exceeding it.
  dp.accountant = "pld"  # 'pld' (tight) | 'rdp'.
  dp.noise_seed = config_dict.placeholder(int)  # unset: OS entropy; int: reproducible noise.
  dp.sampling_seed = config_dict.placeholder(int)  # unset: OS entropy (private); int:
  #                                                  reproducible batches, run is not private.
  dp.overflow_probability = config_dict.placeholder(float)  # per update, of a Poisson batch
  #                                                  above its padded capacity (None: automatic).
  dp.clipping = "auto"  # 'ghost' | 'vmap' | 'auto' (ghost when the model supports it).
  dp.count_epsilon = 0.01  # the Laplace count of the training rows whose estimate of N sets
  #                          q, T and delta (fastdp_jax.dp.count); it adds to the run's epsilon
  #                          and comes out of dp.target_epsilon / dp.max_epsilon. Unused when
  #                          N is public (data.public_num_examples, data.num_examples_public).
  dp.microbatch_size = config_dict.placeholder(int)  # vmap chunk size bounding memory.
  return dp


def _checkpoint_keys() -> ml_collections.ConfigDict:
  """The ``checkpoint`` group of :func:`base_config`."""
  checkpoint = ml_collections.ConfigDict()
  checkpoint.enabled = True  # save in WORKDIR/checkpoints and resume from it.
  checkpoint.every_steps = 1000  # also save at every epoch end (but see min_interval_s).
  checkpoint.min_interval_s = 0.0  # seconds: an epoch end saves only if at least this
  #   long has passed since the last save (the run's last update always saves; every_steps
  #   and SIGTERM's saves are kept); a crash redoes at most this much. 0: every epoch end.
  checkpoint.allow_changes = False  # resume even if privacy/model/data changed (recorded).
  checkpoint.keep_keys = True  # False: delete keys.json, checkpoints/ and the batch
  #   directory the run made (it holds the sampling key) when the run ends (or later:
  #   python -m fastdp_jax.checkpoint forget).
  return checkpoint


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default: the original system's sequential DP-SGD run."""
  c = ml_collections.ConfigDict()
  c.data = _data_keys()

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
  c.optimizer.weight_decay = 0.0  # decoupled weight decay (AdamW, or SGD with decay): it
  #                                 pulls the noise's random walk back towards 0, which
  #                                 keeps the logits from inflating (post-processing: free).
  c.optimizer.decay = "constant"  # 'constant' | 'cosine' | 'linear': the learning rate's
  #                                 decay to 0 over the planned updates. Late updates are
  #                                 mostly noise; a decay keeps them from undoing the fit.

  c.dp = _dp_keys()

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "shard_map"  # 'shard_map' (explicit psum) | 'auto' (XLA's all-reduce).

  c.checkpoint = _checkpoint_keys()

  c.steps_per_call = 128  # updates compiled into one device call (no per-step dispatch).
  c.padding_microbatch = config_dict.placeholder(int)  # rows: process each padded batch in
  #   microbatches of this size, skipping all-padding ones (faster; the step's duration then
  #   follows the batch size: docs/privacy.md "Step duration"). None: one pass, fixed time.
  c.eval_batch_size = 65_536  # evaluation chunk size.
  c.log_every_steps = 5000  # an eval record (test metrics + epsilon, metrics.jsonl) every N
  #                           updates, besides every epoch end (0: epoch ends only); each
  #                           point costs a test-set pass and ~0.2 s of PLD accounting.
  c.export_model = True  # write WORKDIR/model/ (parameters, feature spec, MODEL_CARD.md).
  c.export_test_metrics = False  # True: model/ and its card also state the test metrics,
  #   marked as not covered by the guarantee (exact statistics of private held-out rows).
  #   False: they stay in the private workdir (summary.json, metrics.jsonl).

  c.tuning = ml_collections.ConfigDict()  # how the settings were chosen (docs/privacy.md)
  c.tuning.private_data = "none"  # 'none': not chosen on this data (or on public data);
  #   'unaccounted': chosen by looking at results on this data (its validation or test rows,
  #   earlier runs), which no accountant covers: the run is private: false; 'accounted':
  #   chosen by an accounted tuning run (fastdp_jax.tune sets it; its epsilon is in the
  #   summary's tuning record).
  c.tuning.note = ""  # how they were chosen (stated with private: false).

  c.calibration = ml_collections.ConfigDict()  # classifiers (fastdp_jax.dp.calibration)
  c.calibration.epsilon = 0.0  # >0: choose a temperature for the probabilities on the
  #   validation rows (data.validation_fraction) with this much epsilon (exponential
  #   mechanism over a public grid); it adds to the run's epsilon, and with
  #   dp.target_epsilon or dp.max_epsilon training gets the rest. 0: no calibration.

  c.privacy_eval = ml_collections.ConfigDict()  # after training (fastdp_jax.dp.privacy_eval)
  c.privacy_eval.membership_rows = 10_000  # loss-threshold membership inference: train and
  #                                          as many test rows attacked (0: skip).
  c.privacy_eval.significance = 0.05  # of the canary audit, run when data.path is an audit
  #                                     dataset (python -m fastdp_jax.dp.privacy_eval).
  c.profile_steps = 0  # >0: JAX profiler trace of this many updates in WORKDIR/profile,
  #                      and a per-phase time table (fastdp_jax.profiling).
  c.compilation_cache_dir = DEFAULT_COMPILATION_CACHE  # JAX's persistent compilation cache
  #   (owner-only, as private as the data: its programs' shapes give N and the test size);
  #   a second run of the same shapes skips compiling. '' or None: no cache.
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


def _apply_to_schema(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                     prefix: str = "") -> None:
  """Sets every key of ``cfg`` on ``schema``, a locked copy of :func:`base_config`.

  ml_collections does the checks: a locked ConfigDict refuses a key it lacks (a typo) and a
  type-safe one a value whose type does not cast to the field's (a string for a number, a
  float for an integer). Both become a one-line :class:`ConfigError` naming the key.
  """
  for key in cfg.keys():
    name, value = f"{prefix}{key}", cfg[key]
    if key in schema and isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key {name!r} must be a group of keys")
      _apply_to_schema(value, schema[key], name + ".")
      continue
    try:
      schema[key] = value
    except (KeyError, AttributeError):
      raise ConfigError(unknown_key_message(name)) from None
    except TypeError:
      if isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key {name!r} is a value, not a group of keys") from None
      want = schema.get_type(key).__name__
      raise ConfigError(f"{name}={value!r} must be of type {want}, not "
                        f"{type(value).__name__}") from None


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)  # a bool is an int to Python only


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
  return _is_int(v) and v > 0


def _non_negative_int(v: Any) -> bool:
  return _is_int(v) and v >= 0


def _positive_finite(v: Any) -> bool:
  return _is_number(v) and math.isfinite(v) and v > 0


def _in_open_unit(v: Any) -> bool:
  return _is_number(v) and 0 < v < 1


def _unset_or(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda v: v is None or check(v)


def _one_of(values: tuple) -> Callable[[Any], bool]:
  return lambda v: v in values


_Check = tuple[Callable[[Any], bool], str]

# The value checks: key -> (predicate on its value, what the value must be). Checked in this
# order after the keys and types; the first failure raises "error: KEY=VALUE must be WHAT".
RANGE_CHECKS: dict[str, _Check] = {
    "num_epochs": (_positive_int, "a positive integer"),
    "batch_size": (_positive_int, "a positive integer"),
    "steps_per_call": (_positive_int, "a positive integer"),
    "eval_batch_size": (_positive_int, "a positive integer"),
    "log_every_steps": (_non_negative_int, "a non-negative integer"),
    "privacy_eval.membership_rows": (_non_negative_int, "a non-negative integer"),
    "privacy_eval.significance": (_in_open_unit, "in (0, 1)"),
    "calibration.epsilon": (lambda v: _is_number(v) and 0 <= v < math.inf,
                            "a non-negative finite number (0: no calibration)"),
    "padding_microbatch": (_unset_or(_positive_int), "a positive integer (or None: off)"),
    "profile_steps": (_non_negative_int, "a non-negative integer"),
    "compilation_cache_dir": (_unset_or(lambda v: isinstance(v, str) and "\0" not in v),
                              "a directory path ('' or None: no cache)"),
    "checkpoint.every_steps": (_positive_int, "positive"),
    "checkpoint.min_interval_s": (lambda v: _is_number(v) and 0 <= v < math.inf,
                                  "a non-negative finite number of seconds (0: every epoch end)"),
    "model.hidden_sizes": (lambda v: isinstance(v, (tuple, list)) and all(
        _positive_int(h) for h in v), "positive integers"),
    "model.task": (_unset_or(_one_of(TASKS)), f"one of {TASKS} (or unset: the manifest's task)"),
    "model.embedding_dim": (_positive_int, "a positive integer"),
    "model.huber_delta": (_unset_or(_positive_finite), "a positive finite number"),
    "data.validation_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    "optimizer.name": (_one_of(OPTIMIZERS), f"one of {OPTIMIZERS}"),
    "optimizer.learning_rate": (_positive_finite, "a positive finite number"),
    "optimizer.momentum": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    "optimizer.weight_decay": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    "optimizer.decay": (_one_of(DECAYS), f"one of {DECAYS}"),
    "data.attack_rows": (_non_negative_int, "a non-negative integer"),
    "seed": (_unset_or(_is_int), "an integer (or unset)"),
    "data.public_num_examples": (_unset_or(_positive_int), "a positive integer (or unset)"),
    "tuning.private_data": (_one_of(TUNING), f"one of {TUNING}"),
    "parallel.strategy": (_one_of(STRATEGIES), f"one of {STRATEGIES}"),
    "dp.clipping": (_one_of(CLIPPING_METHODS), f"one of {CLIPPING_METHODS}"),
    "dp.microbatch_size": (_unset_or(_positive_int), "a positive integer (or unset)"),
    "dp.noise_seed": (_unset_or(_is_int), "an integer (or unset)"),
    "dp.sampling_seed": (_unset_or(_is_int), "an integer (or unset)"),
    "dp.overflow_probability": (_unset_or(_in_open_unit), "in (0, 1) (or unset: automatic)"),
    # Also when DP is off: a NaN here is a mistake either way.
    "dp.l2_norm_clip": (_unset_or(_positive_finite), "a positive finite number"),
}
# Checked only when DP is on (a non-private run ignores them).
DP_RANGE_CHECKS: dict[str, _Check] = {
    "dp.noise_multiplier": (_unset_or(_positive_finite), "a positive finite number when DP is "
                            "on (dp.enabled=False for a non-private run)"),
    "dp.target_epsilon": (_unset_or(_positive_finite), "a positive finite number"),
    "dp.max_epsilon": (_unset_or(lambda v: _is_number(v) and v > 0), "positive (inf: no cap)"),
    "dp.delta": (_unset_or(_in_open_unit), "in (0, 1)"),
    "dp.accountant": (_one_of(accounting.ACCOUNTANTS), f"one of {accounting.ACCOUNTANTS}"),
    "dp.count_epsilon": (_positive_finite, "a positive finite number (to declare N public "
                         "instead: data.num_examples_public=True)"),
}


def _check_ranges(cfg: ml_collections.ConfigDict, table: dict[str, _Check]) -> None:
  for key, (ok, what) in table.items():
    value = cfg
    for part in key.split("."):
      value = value[part]
    if not ok(value):
      raise ConfigError(f"{key}={value!r} must be {what}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks a config before any work: keys and types, then :data:`RANGE_CHECKS`, then the
  rules that tie keys together.

  Raises:
    ConfigError: naming the offending key and value.
  """
  schema = base_config()
  schema.lock()
  _apply_to_schema(cfg, schema)
  if not cfg.data.path:
    raise ConfigError("data.path must be set")
  _check_ranges(cfg, RANGE_CHECKS)
  if cfg.calibration.epsilon and not cfg.data.validation_fraction:
    raise ConfigError(f"calibration.epsilon={cfg.calibration.epsilon} needs validation rows to "
                      "calibrate on: set data.validation_fraction (e.g. 0.1)")
  _check_row_count(cfg)
  dp = cfg.dp
  if not dp.enabled:
    return
  if dp.l2_norm_clip is None:
    raise ConfigError("dp.l2_norm_clip must be set when DP is on")
  if dp.noise_multiplier is None and dp.target_epsilon is None:
    raise ConfigError("set dp.noise_multiplier or dp.target_epsilon (or dp.enabled=False)")
  _check_ranges(cfg, DP_RANGE_CHECKS)
  if (dp.target_epsilon is None and dp.accountant == "pld"
      and dp.noise_multiplier < accounting.MIN_PLD_NOISE_MULTIPLIER):
    raise ConfigError(
        f"dp.noise_multiplier={dp.noise_multiplier:g} is below "
        f"{accounting.MIN_PLD_NOISE_MULTIPLIER}: the PLD accountant cannot compute epsilon there"
        " (its loss distribution grows without bound), and DP-SGD gives no meaningful "
        "guarantee there; use a larger sigma, dp.accountant='rdp' (epsilon as large as it "
        "is), or dp.enabled=False")


def _check_row_count(cfg: ml_collections.ConfigDict) -> None:
  """The rules on how N is known: a DP count, or one declaration of a public N."""
  if cfg.data.num_examples_public and cfg.data.public_num_examples is not None:
    raise ConfigError("data.num_examples_public=True declares the dataset's own row count "
                      f"public, data.public_num_examples={cfg.data.public_num_examples} "
                      "another figure: set one of them")
  if (cfg.data.batches and cfg.dp.enabled and not cfg.data.num_examples_public
      and cfg.data.public_num_examples is None):
    raise ConfigError(
        "data.batches were drawn at q = batch_size / N with the exact N, which the run would "
        "then publish: declare N public (data.num_examples_public=True, stated on the model "
        "card), or train from data.path alone (q from a DP estimate of N)")


# --- typed settings: the config after validation, as the modules receive it --------------------
# Each module takes the part it needs (a plan takes DPSettings, the data loader DataSettings),
# so a function's signature says which settings it depends on; the ConfigDict stops here.
@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings:
  """The ``data`` group: where the rows are and how they are read (see :func:`base_config`)."""
  path: str
  batches: str
  verify_checksums: bool
  public_num_examples: int | None
  num_examples_public: bool
  feature_bounds: tuple | None
  attack_column: str
  attack_rows: int
  validation_fraction: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSettings:
  """The ``model`` group: the MLP's widths, the task and the embedding width."""
  hidden_sizes: tuple[int, ...]
  task: str | None
  embedding_dim: int
  huber_delta: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
  """The ``optimizer`` group."""
  name: str
  learning_rate: float
  momentum: float
  weight_decay: float
  decay: str = "constant"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSettings:
  """The ``dp`` group: the mechanism's public parameters and the keys' seeds."""
  enabled: bool
  l2_norm_clip: float | None
  noise_multiplier: float | None
  target_epsilon: float | None
  delta: float | None
  max_epsilon: float | None
  accountant: str
  noise_seed: int | None
  sampling_seed: int | None
  overflow_probability: float | None
  clipping: str
  microbatch_size: int | None
  count_epsilon: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
  """The ``checkpoint`` group."""
  enabled: bool
  every_steps: int
  min_interval_s: float
  allow_changes: bool
  keep_keys: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyEvalSettings:
  """The ``privacy_eval`` group: the empirical checks after training."""
  membership_rows: int
  significance: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationSettings:
  """The ``calibration`` group: a private temperature for a classifier's probabilities."""
  epsilon: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningSettings:
  """The ``tuning`` group: whether the settings were chosen on this data, and how."""
  private_data: str
  note: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """A validated run configuration (:func:`settings`); every key of :func:`base_config`."""
  data: DataSettings
  model: ModelSettings
  optimizer: OptimizerSettings
  dp: DPSettings
  checkpoint: CheckpointSettings
  privacy_eval: PrivacyEvalSettings
  calibration: CalibrationSettings
  tuning: TuningSettings
  num_epochs: int
  batch_size: int
  seed: int | None
  strategy: str  # parallel.strategy
  steps_per_call: int
  padding_microbatch: int | None
  eval_batch_size: int
  log_every_steps: int
  export_model: bool
  export_test_metrics: bool
  profile_steps: int
  compilation_cache_dir: str | None  # '' or None: no persistent compilation cache
  json: str  # the whole config as JSON: what the summary records and every process compares

  def to_dict(self) -> dict[str, Any]:
    """The config as the ``config`` record of ``metrics.jsonl`` and ``summary.json``."""
    return json.loads(self.json)


def _group(cls: type, group: ml_collections.ConfigDict) -> Any:
  values = {f.name: group[f.name] for f in dataclasses.fields(cls)}
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def settings(cfg: ml_collections.ConfigDict | RunConfig) -> RunConfig:
  """Validates ``cfg`` (:func:`validate`) and returns it as typed, frozen settings.

  A :class:`RunConfig` is returned as it is (it was validated when it was made).

  Raises:
    ConfigError: naming the offending key and value.
  """
  if isinstance(cfg, RunConfig):
    return cfg
  validate(cfg)
  return RunConfig(
      data=_group(DataSettings, cfg.data), model=_group(ModelSettings, cfg.model),
      optimizer=_group(OptimizerSettings, cfg.optimizer), dp=_group(DPSettings, cfg.dp),
      checkpoint=_group(CheckpointSettings, cfg.checkpoint),
      privacy_eval=_group(PrivacyEvalSettings, cfg.privacy_eval),
      calibration=_group(CalibrationSettings, cfg.calibration),
      tuning=_group(TuningSettings, cfg.tuning),
      num_epochs=cfg.num_epochs, batch_size=cfg.batch_size, seed=cfg.seed,
      strategy=cfg.parallel.strategy, steps_per_call=cfg.steps_per_call,
      padding_microbatch=cfg.padding_microbatch, eval_batch_size=cfg.eval_batch_size,
      log_every_steps=cfg.log_every_steps, export_model=cfg.export_model,
      export_test_metrics=cfg.export_test_metrics,
      profile_steps=cfg.profile_steps, compilation_cache_dir=cfg.compilation_cache_dir,
      json=cfg.to_json_best_effort())
