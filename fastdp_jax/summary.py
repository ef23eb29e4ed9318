"""The result of a run: a frozen, typed :class:`RunSummary` (``summary.json`` on disk).

:func:`fastdp_jax.train.finalize` builds it; the report, the model card, the notebook, the
benchmarks and the tests read it by attribute. ``to_json()`` and ``from_json()`` convert to and
from the file's dict, where a metric the task does not have is absent (not null).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

# Fields written to summary.json only when set: the task decides which metrics a run has.
_OMITTED_WHEN_UNSET = frozenset({
    "test_accuracy", "test_auc", "test_macro_f1", "test_rmse", "test_mae", "test_brier",
    "test_ece", "test_reliability", "base_rate_log_loss", "worse_than_base_rate",
    "validation_brier", "validation_ece", "validation_reliability",
    "majority_class_rate", "below_majority_class", "baseline_rmse", "baseline_mae",
    "below_baseline", "classes", "label_bounds", "validation_loss", "validation_accuracy",
    "validation_auc", "validation_macro_f1", "validation_rmse", "validation_mae",
    "validation_examples", "model_dir", "temperature", "calibration_epsilon",
    "training_epsilon", "tuning", "count_epsilon", "planned_num_examples",
    "num_examples_source", "spec_epsilon", "spec_delta", "privacy_unit", "max_rows_per_unit"})

# The summary's public parts: what an exported model states (fastdp_jax.export).
PRIVACY_FIELDS = ("private", "privacy_note", "dp_enabled", "epsilon", "delta",
                  "accountant_delta", "overflow_delta", "delta_warning", "accountant",
                  "noise_multiplier", "l2_norm_clip", "steps", "noise", "sampling",
                  "max_epsilon", "budget_exhausted", "ledger_composition", "training_epsilon",
                  "calibration_epsilon", "temperature", "tuning", "count_epsilon",
                  "planned_num_examples", "num_examples_source", "spec_epsilon", "spec_delta",
                  "privacy_unit", "max_rows_per_unit")
TEST_METRIC_FIELDS = ("task", "test_accuracy", "test_loss", "test_auc", "test_macro_f1",
                      "test_rmse", "test_mae", "test_brier", "test_ece", "majority_class_rate",
                      "below_majority_class", "base_rate_log_loss", "worse_than_base_rate",
                      "baseline_rmse", "baseline_mae", "below_baseline")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary:
  """What a run did and how good and how private its model is.

  Every field has a default, so that a summary of a partial record (an export test, an older
  ``summary.json``) can be built; a finished run sets them all.

  Privacy (public: the config and the accountant's result):
    private: whether (epsilon, delta) is a guarantee (secret keys, DP on, settings not chosen
      on this data without accounting: ``tuning.private_data``).
    privacy_note: why not, when ``private`` is false.
    dp_enabled: False for a non-private baseline run.
    epsilon: of the updates run (inf when DP is off).
    delta: the stated delta: the accountant's plus the batch-overflow term (None: DP off).
    accountant_delta, overflow_probability, overflow_delta: the two parts of ``delta`` and
      the per-update overflow probability behind the second.
    delta_warning: set when delta is not below 1/N.
    noise_multiplier, l2_norm_clip, sampling_rate, steps, accountant: sigma, C, q, T and the
      accountant ('pld' or 'rdp').
    ledger_composition: how the ledger composed its segments.
    privacy_ledger: every segment of updates (sigma, q, steps), as dicts.
    noise, sampling: where the keys came from ('os entropy' or 'fixed by ...').
    max_epsilon, budget_exhausted: the cap, and whether it stopped the run early.
    resume_overrides: the settings a resume changed (``checkpoint.allow_changes``).
  Model quality (held-out private rows, without noise; not covered by the guarantee):
    task: 'binary', 'multiclass' or 'regression'.
    test_loss and, by task, test_accuracy and test_auc (binary), test_accuracy and
      test_macro_f1 (multiclass), test_rmse and test_mae (regression, in the label's units).
      For classifiers, test_loss is the log-loss; test_brier and test_ece (15 equal-width
      bins) measure how well the probabilities are calibrated; test_reliability holds the
      bins (mean predicted probability, observed frequency, rows) of the reliability diagram.
    majority_class_rate and below_majority_class, or baseline_rmse, baseline_mae and
      below_baseline: the constant baseline on the test rows, and whether the model is worse.
    base_rate_log_loss and worse_than_base_rate: the log-loss of predicting the test rows'
      class frequencies, and whether the model's log-loss is above it (its probabilities are
      worse than knowing nothing about a row).
    classes (multiclass), label_bounds (regression).
    validation_*: the same metrics on the validation rows, and validation_examples.
  Training-row diagnostics (no noise; never exported):
    nonprivate_attack_accuracy: the model-inversion attack's accuracy on training rows.
    nonprivate_note: what the nonprivate_* figures are.
    privacy_eval: membership inference and, on an audit dataset, the canary audit.
  The run:
    train_examples, test_examples: N and the test size (private: kept in the workdir); with
      a privacy unit, N counts training UNITS (``privacy_unit``), the test size rows.
    batches: the materialised batch directory, if the updates streamed from one.
    data_digest: the training rows' digest (private).
    num_devices, num_processes, wall_time_s: how it ran.
    config: the whole config.
    model_dir: the exported model's directory, when exported.
  Calibration (``calibration.epsilon``; :mod:`fastdp_jax.dp.calibration`):
    temperature: the chosen temperature (the test metrics above are the calibrated model's).
    calibration_epsilon: the selection's epsilon; training_epsilon: training's; ``epsilon``
      is then their sum (with the count's, below).
  N as published (:mod:`fastdp_jax.dp.count`; public, unlike ``train_examples``):
    planned_num_examples: the N that q, the number of updates and the default delta derive
      from: a DP estimate of the training rows, or a figure the user declared public.
    num_examples_source: which (``'dp estimate'``, ``'declared public by the user (KEY)'``).
    count_epsilon: the estimate's epsilon (Laplace count), included in ``epsilon``.
  The feature spec's private estimates (``fastdp-spec init --epsilon``; public specs: None):
    spec_epsilon, spec_delta: what they cost, included in ``epsilon`` and ``delta`` (basic
      composition, as the calibration's).
  The privacy unit (the dataset manifest's; :mod:`fastdp_jax.data.units`):
    privacy_unit: the raw column(s) naming the unit whose adding or removing (epsilon, delta)
      bounds (a household: ``('SERIALNO',)``); None: every row is its own unit.
    max_rows_per_unit: the public bound k on a unit's training rows (rows beyond it were left
      out); None for a row-level run. N, q and the sampling are then about units.
  Tuning (``fastdp-tune``, :mod:`fastdp_jax.tune`):
    tuning: how the hyperparameters were chosen and what that cost: for a private random
      search, the distribution of the secret number of trials, each trial's sigma, q, T and
      score mechanism, and ``epsilon``, the whole procedure's (then also this summary's
      ``epsilon``; ``training_epsilon`` is the released trial's training alone); for a public
      proxy, the proxy and its trials (free). None: not tuned by ``fastdp-tune``.
  """

  private: bool = False
  privacy_note: str | None = None
  dp_enabled: bool = True
  epsilon: float = float("inf")
  delta: float | None = None
  accountant_delta: float | None = None
  overflow_probability: float | None = None
  overflow_delta: float | None = None
  delta_warning: str | None = None
  noise_multiplier: float | None = None
  l2_norm_clip: float | None = None
  sampling_rate: float | None = None
  steps: int | None = None
  accountant: str | None = None
  ledger_composition: str | None = None
  privacy_ledger: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  noise: str | None = None
  sampling: str | None = None
  max_epsilon: float | None = None
  budget_exhausted: bool = False
  resume_overrides: list[list[str]] = dataclasses.field(default_factory=list)
  task: str = "binary"
  test_loss: float | None = None
  test_accuracy: float | None = None
  test_auc: float | None = None
  test_macro_f1: float | None = None
  test_rmse: float | None = None
  test_mae: float | None = None
  test_brier: float | None = None
  test_ece: float | None = None
  test_reliability: list[Any] | None = None
  base_rate_log_loss: float | None = None
  worse_than_base_rate: bool | None = None
  majority_class_rate: float | None = None
  below_majority_class: bool | None = None
  baseline_rmse: float | None = None
  baseline_mae: float | None = None
  below_baseline: bool | None = None
  classes: list[Any] | None = None
  label_bounds: list[float] | None = None
  validation_loss: float | None = None
  validation_accuracy: float | None = None
  validation_auc: float | None = None
  validation_macro_f1: float | None = None
  validation_rmse: float | None = None
  validation_mae: float | None = None
  validation_brier: float | None = None
  validation_ece: float | None = None
  validation_reliability: list[Any] | None = None
  validation_examples: int | None = None
  nonprivate_attack_accuracy: float | None = None
  nonprivate_note: str = ""
  privacy_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
  train_examples: int = 0
  test_examples: int = 0
  batches: str | None = None
  data_digest: str | None = None
  num_devices: int = 1
  num_processes: int = 1
  wall_time_s: float = 0.0
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  model_dir: str | None = None
  temperature: float | None = None
  calibration_epsilon: float | None = None
  training_epsilon: float | None = None
  count_epsilon: float | None = None
  planned_num_examples: int | None = None
  num_examples_source: str | None = None
  tuning: dict[str, Any] | None = None
  spec_epsilon: float | None = None
  spec_delta: float | None = None
  privacy_unit: tuple[str, ...] | None = None
  max_rows_per_unit: int | None = None

  @property
  def below_constant_baseline(self) -> bool:
    """Whether the model is worse on the test rows than the task's constant prediction."""
    return bool(self.below_majority_class or self.below_baseline)

  def privacy_record(self) -> dict[str, Any]:
    """The privacy fields an exported model states (:data:`PRIVACY_FIELDS`), those set, and
    the unit: ``privacy_unit`` is the column list or ``'row'``, and ``unit_statement`` says
    what (epsilon, delta) holds for (:func:`unit_statement`; DP runs only)."""
    out = {k: getattr(self, k) for k in PRIVACY_FIELDS if getattr(self, k) is not None}
    out["privacy_unit"] = list(self.privacy_unit) if self.privacy_unit else ROW_UNIT
    if self.dp_enabled:
      out["unit_statement"] = unit_statement(self.privacy_unit, self.max_rows_per_unit)
    return out

  def test_record(self) -> dict[str, Any]:
    """The test metrics and baseline an exported model states, those the task has."""
    return {k: getattr(self, k) for k in TEST_METRIC_FIELDS if getattr(self, k) is not None}

  def to_json(self) -> dict[str, Any]:
    """The ``summary.json`` dict: every field, less the metrics the task does not have."""
    out = dataclasses.asdict(self)
    return {k: v for k, v in out.items() if v is not None or k not in _OMITTED_WHEN_UNSET}

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> RunSummary:
    """A summary from its ``summary.json`` dict (keys it does not know are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in record.items() if k in names}
    if fields.get("privacy_unit") is not None:  # a JSON list; the field is a tuple
      fields["privacy_unit"] = tuple(fields["privacy_unit"])
    return cls(**fields)


# What ``privacy_unit`` is called in a row-level run's model.json, card and report.
ROW_UNIT = "row"
# Unit columns whose meaning is public census coding: the word the statements use for them.
_UNIT_NOUNS = {("SERIALNO",): "household", ("SERIALNO", "SPORDER"): "person"}


def unit_name(privacy_unit: Sequence[str] | str | None) -> str:
  """The unit in words: ``'household (SERIALNO)'``, ``'pid'``, or ``'row'`` (None, ``'row'``).

  A unit named by PUMS household (or person) columns gets its word; any other unit is named by
  its columns alone, which is all the spec says about it.
  """
  if not privacy_unit or privacy_unit == ROW_UNIT:
    return ROW_UNIT
  cols = (privacy_unit,) if isinstance(privacy_unit, str) else tuple(map(str, privacy_unit))
  joined = ", ".join(cols)
  noun = _UNIT_NOUNS.get(cols)
  name = f"{noun} ({joined})" if noun else (joined if len(cols) == 1 else f"({joined})")
  return f"'{name}'" if name == ROW_UNIT else name  # a column named "row" is not the row


def unit_statement(privacy_unit: Sequence[str] | str | None,
                   max_rows_per_unit: int | None) -> str:
  """What (epsilon, delta) holds for, in the words every output uses (model.json, the card,
  the report, the console): the unit, its public bound k, and the neighbouring relation."""
  name = unit_name(privacy_unit)
  if name == ROW_UNIT:
    return "privacy unit: row; (epsilon, delta) hold for adding or removing one row"
  rows = "row" if max_rows_per_unit == 1 else "rows"
  return (f"privacy unit: {name}, at most {max_rows_per_unit} {rows} per unit; (epsilon, delta) "
          "hold for adding or removing one whole unit")


def unit_fields(unit: Any) -> dict[str, Any]:
  """A summary's unit fields from a run's unit (``columns``, ``max_rows``: the trainer's
  :class:`fastdp_jax.unit_batches.UnitSpec`), or none for a row-level run (``unit`` None)."""
  if unit is None:
    return {}
  return {"privacy_unit": tuple(unit.columns), "max_rows_per_unit": int(unit.max_rows)}


def unit_record_problem(priv: Mapping[str, Any]) -> str | None:
  """Why a model.json privacy section's unit entries disagree (None: they agree, or are
  absent, as in an export from before units).

  ``privacy_unit`` is ``'row'`` or a list of column names; a unit has an integer bound
  ``max_rows_per_unit`` in 1..64 and a row has none; ``unit_statement``, when present, is
  the one those two give (an edited statement would claim a guarantee the run lacks).
  """
  unit, k = priv.get("privacy_unit"), priv.get("max_rows_per_unit")
  if unit is None:
    return None if k is None and "unit_statement" not in priv else "is missing"
  if unit == ROW_UNIT:
    if k is not None:
      return f"is 'row' but max_rows_per_unit is {k!r}"
  elif not (isinstance(unit, list) and unit and all(isinstance(c, str) and c for c in unit)):
    return f"={unit!r} must be 'row' or a list of column names"
  elif not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 64):
    return f"names a unit but max_rows_per_unit={k!r} is not an integer in 1..64"
  said = priv.get("unit_statement")
  if said is not None and said != unit_statement(unit, k):
    return f"'s unit_statement {said!r} is not what the unit and its bound give"
  return None


def done_line(s: RunSummary, delta: float, private: bool) -> str:
  """The console's last line of a DP run: epsilon at delta, for which unit, and the result."""
  return (f"done: epsilon {s.epsilon:.4f} at delta {delta:.3g} "
          f"({unit_statement(s.privacy_unit, s.max_rows_per_unit)}), "
          f"private: {str(private).lower()}, {result_line(s)}")


def read_summary(workdir: str) -> RunSummary | None:
  """The run's ``summary.json`` (None if the run did not finish)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return RunSummary.from_json(json.load(f))


def task_metrics(head_kind: str, final: Mapping[str, Any], baseline: Mapping[str, float],
                 *, classes: tuple = (), label_bounds: tuple = (),
                 validation_examples: int | None = None) -> dict[str, Any]:
  """The task's fields of a summary: its test (and validation) metrics of the last epoch, its
  baseline, and whether the model is below that baseline."""
  out: dict[str, Any] = {"task": head_kind}
  out.update({k: v for k, v in final.items() if k.startswith(("test_", "validation_"))})
  out.update(baseline)
  if head_kind == "regression":
    out["below_baseline"] = bool(final["test_rmse"] > baseline["baseline_rmse"])
    out["label_bounds"] = list(label_bounds or ())
  else:
    out["below_majority_class"] = bool(final["test_accuracy"] < baseline["majority_class_rate"])
    out["worse_than_base_rate"] = bool(final["test_loss"] > baseline["base_rate_log_loss"])
  if head_kind == "multiclass":
    out["classes"] = list(classes)
  if validation_examples is not None:
    out["validation_examples"] = validation_examples
  return out


def result_line(s: RunSummary) -> str:
  """``test accuracy 0.8123 (majority class 0.6280)`` or ``test RMSE ... (baseline ...)``."""
  if s.task == "regression":
    return (f"test RMSE {s.test_rmse:.4f}, MAE {s.test_mae:.4f} (predicting the test mean: "
            f"RMSE {s.baseline_rmse:.4f})")
  extra = f", macro-F1 {s.test_macro_f1:.4f}" if s.task == "multiclass" else ""
  return (f"test accuracy {s.test_accuracy:.4f}{extra} (majority class "
          f"{s.majority_class_rate:.4f}), log-loss {s.test_loss:.4f} (base rate "
          f"{s.base_rate_log_loss:.4f}), ECE {s.test_ece:.4f}")


def calibrated(s: RunSummary, test: Mapping[str, Any], baseline: Mapping[str, float], *,
               temperature: float, calibration_epsilon: float) -> RunSummary:
  """``s`` after a calibration: the calibrated model's test metrics (and how they compare with
  the baseline), the temperature, and the epsilon of training plus the selection's."""
  from fastdp_jax.dp import calibration  # local: the summary type itself imports nothing
  fields = {k: v for k, v in test.items() if k in {f.name for f in dataclasses.fields(s)}}
  fields.update(
      below_majority_class=bool(test["test_accuracy"] < baseline["majority_class_rate"]),
      worse_than_base_rate=bool(test["test_loss"] > baseline["base_rate_log_loss"]))
  return dataclasses.replace(
      s, **fields, temperature=float(temperature),
      calibration_epsilon=float(calibration_epsilon),
      training_epsilon=s.epsilon if s.training_epsilon is None else s.training_epsilon,
      epsilon=calibration.total_epsilon(s.epsilon, calibration_epsilon))


def with_spec_estimate(s: RunSummary, epsilon: float, delta: float) -> RunSummary:
  """``s`` with the feature spec's private estimates (their ``(epsilon, delta)``) added to its
  epsilon and delta (basic composition, as the calibration's; ``(0, 0)``: ``s`` itself)."""
  from fastdp_jax.dp import calibration  # local: the summary type itself imports nothing
  if not epsilon or not s.dp_enabled:
    return s
  return dataclasses.replace(
      s, spec_epsilon=float(epsilon), spec_delta=float(delta),
      training_epsilon=s.epsilon if s.training_epsilon is None else s.training_epsilon,
      epsilon=calibration.total_epsilon(s.epsilon, epsilon),
      delta=None if s.delta is None else s.delta + float(delta))
