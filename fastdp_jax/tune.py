"""Tuning inside the budget: ``fastdp-tune --config=CONFIG [--search=SEARCH] --workdir=W``.

A random search over a PUBLIC search space (a Python config, :func:`default_search`), whose
whole cost is one (epsilon, delta): ``dp.target_epsilon`` is the total for the procedure.

- **Private** (the default): a secret number K of trials is drawn from a public distribution
  (Poisson, geometric, logarithmic or truncated negative binomial, mean ``trials.mean``) with
  OS entropy; each trial is a full DP-SGD run (:func:`fastdp_jax.train.train_and_evaluate`, its
  own secret keys, its hyperparameters drawn with secret randomness) in ``W/trials/NNN`` that
  scores itself privately on the validation rows (:func:`fastdp_jax.dp.tuning.noisy_score`).
  Trials of one shape (differing in learning rate, weight decay, C or seed only) train side
  by side in one compiled step (:mod:`fastdp_jax.trials`); ``search.trials.sequential=True``
  runs them one after the other.
  Only the best-scoring trial's model is released, into ``W/model/``. Every trial's sigma is
  calibrated so that ``dp_accounting``'s RDP accountant gives the procedure
  (``RepeatAndSelectDpEvent``, Papernot & Steinke 2022) at most the target
  (:mod:`fastdp_jax.dp.tuning`).
- **Public proxy** (``--proxy=DATASET``, a public table of the same schema, e.g. synthetic
  households from ``python -m preprocessing.synthesize``): ``round(trials.mean)`` trials on the
  proxy, scored exactly (nothing about the private data is used), then one private run of the
  best hyperparameters on the private data with the full budget (``W/run``), released into
  ``W/model/``.

Outputs: ``W/model/`` (public), and private: ``W/trials/`` (each trial's workdir, with no model
export and no keys kept), ``W/trials.json`` (every trial's hyperparameters, noisy score and
epsilon) and ``W/summary.json`` (the released model's summary). From a notebook:
``fastdp_jax.tune.tune(config, search, workdir)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_dict, config_flags

from fastdp_jax import __main__ as cli
from fastdp_jax import atomic
from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax.console import say
from fastdp_jax.data import units as units_lib
from fastdp_jax.dp import tuning

KINDS = ("log_uniform", "uniform", "choice", "log_scale")
# What a private search may vary: keys that change no trial's privacy event (q, T, sigma, the
# score and the temperature's epsilon stay those the procedure was accounted with).
_PRIVATE_KEYS = ("optimizer.", "model.hidden_sizes", "model.embedding_dim", "model.huber_delta",
                 "dp.l2_norm_clip", "dp.clipping", "seed")
# A search on a public proxy may also change the schedule (nothing is accounted on it).
_PROXY_KEYS = _PRIVATE_KEYS + ("batch_size", "num_epochs")


def default_search() -> ml_collections.ConfigDict:
  """The default search: the config's learning rate and clipping norm times 1/4 to 4
  (log-uniform), weight decay, and the MLP's width; K ~ Poisson(10); the Brier score.

  ``space`` holds ``(config key, kind, arguments)``: ``('log_uniform', (lo, hi))``,
  ``('uniform', (lo, hi))``, ``('choice', (v1, v2, ...))`` or ``('log_scale', (lo, hi))``
  (the config's own value times a log-uniform factor in [lo, hi]).
  """
  s = ml_collections.ConfigDict()
  s.trials = ml_collections.ConfigDict()
  s.trials.distribution = "poisson"  # | 'geometric' | 'logarithmic' |
  #                                    'truncated_negative_binomial' (with trials.shape).
  s.trials.mean = 10.0  # E[K]; the procedure costs about 2x one trial's epsilon at 10.
  s.trials.shape = config_dict.placeholder(float)  # eta of the truncated negative binomial.
  s.trials.seed = config_dict.placeholder(int)  # set: K, the draws and the score noise are
  #                   reproducible and PUBLIC: the tuning is then declared non-private.
  s.trials.sequential = False  # True: one trial after another, each through the trainer;
  #                   False: trials of one shape side by side in one compiled step
  #                   (fastdp_jax.trials), each still its own keys, plan and outputs.
  s.trials.epoch_metrics = False  # side by side: evaluate each trial (test, validation,
  #                   epsilon, attack) at its last update only (the same final metrics and
  #                   model; its metrics.jsonl without per-epoch curves); True: every epoch.
  s.score = ml_collections.ConfigDict()
  s.score.metric = "brier"  # 'brier' | 'accuracy' | 'log_loss' on the validation rows.
  s.score.noise_multiplier = 40.0  # the score's Gaussian noise, times its sensitivity.
  s.space = (
      ("optimizer.learning_rate", "log_scale", (0.25, 4.0)),
      ("dp.l2_norm_clip", "log_scale", (0.25, 4.0)),
      ("optimizer.weight_decay", "choice", (0.0, 1e-4, 1e-3)),
      ("model.hidden_sizes", "choice", ((), (32,), (64,))),
  )
  return s


# --- the search space -------------------------------------------------------------------------
def _check_space(space: Any, private: bool) -> list[tuple[str, str, tuple]]:
  """The search space as ``[(key, kind, args)]``, refused if malformed or (private) if it
  varies a key that changes the privacy event."""
  allowed = _PRIVATE_KEYS if private else _PROXY_KEYS
  out = []
  for dim in space:
    if len(dim) != 3:
      raise tuning.TuningError(f"search.space entry {dim!r} must be (key, kind, arguments)")
    key, kind, args = str(dim[0]), str(dim[1]), tuple(dim[2])
    config_lib.check_key(key)
    if not key.startswith(allowed) or key == "model.task":
      raise tuning.TuningError(
          f"search.space varies {key}, which {'a private search' if private else 'a search'} "
          f"may not change (allowed: {', '.join(allowed)}): every trial must have the same "
          "privacy event; tune batch_size and num_epochs on a public proxy (--proxy)")
    if kind not in KINDS:
      raise tuning.TuningError(f"search.space {key}: kind {kind!r} must be one of {KINDS}")
    if kind != "choice" and not (len(args) == 2 and 0 < args[0] <= args[1]
                                 or kind == "uniform" and len(args) == 2
                                 and args[0] <= args[1]):
      raise tuning.TuningError(f"search.space {key}: {kind} needs (lo, hi) with "
                               f"{'0 < ' if kind != 'uniform' else ''}lo <= hi, got {args}")
    if kind == "choice" and not args:
      raise tuning.TuningError(f"search.space {key}: choice needs at least one value")
    out.append((key, kind, args))
  return out


def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def _set(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *head, last = key.split(".")
  node = cfg
  for part in head:
    node = node[part]
  node[last] = value


def draw_hyperparameters(space: list[tuple[str, str, tuple]], base: ml_collections.ConfigDict,
                         rng: Any) -> dict[str, Any]:
  """One point of the search space (``rng``: secret in a private search)."""
  values: dict[str, Any] = {}
  for key, kind, args in space:
    if kind == "choice":
      value = args[int(rng.integers(len(args)))]
    elif kind == "uniform":
      value = float(rng.uniform(args[0], args[1]))
    else:
      value = float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
      if kind == "log_scale":
        value *= float(_get(base, key))
    if isinstance(_get(base, key), int) and not isinstance(_get(base, key), bool):
      value = int(round(value))
    values[key] = tuple(value) if isinstance(value, list) else value
  return values


def with_values(cfg: ml_collections.ConfigDict, values: dict[str, Any]
                ) -> ml_collections.ConfigDict:
  """A copy of ``cfg`` with ``values`` (dotted keys) set."""
  out = copy.deepcopy(cfg)
  for key, value in values.items():
    _set(out, key, value)
  return out


# --- the procedure's plan ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Procedure:
  """The public parameters of a private tuning run, fixed before its first trial.

  Attributes:
    count: the distribution of K.
    trial: every trial's privacy parameters (sigma calibrated to the target).
    epsilon: the procedure's epsilon at ``accountant_delta`` (RDP).
    accountant_delta: delta given to the RDP accountant.
    overflow_probability: each trial's per-update, per-device batch overflow probability.
    overflow_delta: the batch overflows' term in delta over all trials (E[K] of them).
    metric: the score.
    num_examples: the N that q, T and delta derive from (for every trial).
    num_examples_source: how N is known (:data:`fastdp_jax.dp.count.DP_ESTIMATE`: a Laplace
      count drawn once for all the trials, with ``count_epsilon``; or declared public).
    count_epsilon: that count's epsilon (0: N declared public), inside ``epsilon``.
    private: whether the procedure's (epsilon, delta) is a guarantee; ``note`` says why not.
  """
  count: tuning.TrialCount
  trial: tuning.TrialPlan
  epsilon: float
  accountant_delta: float
  overflow_probability: float
  overflow_delta: float
  metric: str
  num_examples: int
  num_examples_source: str
  count_epsilon: float
  private: bool
  note: str | None

  @property
  def delta(self) -> float:
    return self.accountant_delta + self.overflow_delta


def trial_count(search: ml_collections.ConfigDict) -> tuning.TrialCount:
  """The search's distribution of K (``trials.*``)."""
  return tuning.TrialCount(distribution=search.trials.distribution,
                           mean=float(search.trials.mean), shape=search.trials.shape)


def plan_procedure(rc: config_lib.RunConfig, search: ml_collections.ConfigDict,
                   rng: np.random.Generator) -> Procedure:
  """K's distribution, each trial's sigma, q and T, and the procedure's (epsilon, delta).

  q and T follow the trainer's rules (:func:`fastdp_jax.dp.plan.plan_privacy`) for the
  training rows' N as the trainer would publish it: declared public, or a DP count drawn here
  with ``rng``, once for all the trials (its epsilon is in the total); the delta is the run's
  (``dp.delta`` or the default below 1/N), of which :data:`~fastdp_jax.dp.sampling.OVERFLOW_SHARE` covers the batch
  overflows of all the trials (each trial's overflow probability is set to fit).
  """
  import jax  # pylint: disable=g-import-not-at-top  (the flags are checked without JAX)
  from fastdp_jax import inputs  # pylint: disable=g-import-not-at-top
  from fastdp_jax.dp import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from fastdp_jax.dp import count as count_lib  # pylint: disable=g-import-not-at-top
  from fastdp_jax.dp import sampling  # pylint: disable=g-import-not-at-top
  dp = rc.dp
  target = dp.target_epsilon
  if not dp.enabled or target is None:
    raise tuning.TuningError("fastdp-tune needs dp.target_epsilon: the total epsilon of the "
                             "whole tuning procedure (e.g. --config.dp.target_epsilon=1)")
  if dp.max_epsilon is not None and dp.max_epsilon < target:
    raise tuning.TuningError(f"dp.max_epsilon={dp.max_epsilon} is below dp.target_epsilon="
                             f"{target}, the procedure's total; unset it or raise it")
  if rc.data.batches:
    raise tuning.TuningError("fastdp-tune samples each trial's batches afresh: unset "
                             "data.batches (materialised batches fix one sampling key)")
  if not rc.data.validation_fraction > 0:
    raise tuning.TuningError("each trial scores itself on validation rows: set "
                             "data.validation_fraction (e.g. 0.1)")
  if jax.process_count() > 1:
    raise tuning.TuningError("fastdp-tune runs in one process")
  counts = inputs.training_row_count(rc.data)
  if counts is None:
    raise errors.ConfigError(f"data.path={rc.data.path} is not a dataset")
  n = _planned_rows(rc, counts[0], rng)
  count_lib.check_estimate(n, rc.batch_size)
  fixed = dataclasses.replace(dp, noise_multiplier=1.0, target_epsilon=None, max_epsilon=None)
  plan = plan_lib.plan_privacy(fixed, batch_size=rc.batch_size, num_epochs=rc.num_epochs,
                               num_examples=n.value, num_devices=jax.device_count())
  requested = plan.delta / (1 - sampling.OVERFLOW_SHARE)
  count = trial_count(search)
  say(f"tuning: calibrating each trial's noise so that {count.describe()} trials cost "
      f"epsilon <= {target} in all")
  trial = tuning.calibrate(target, plan.delta, count, sampling_rate=plan.sampling_rate,
                           steps=plan.total_steps,
                           score_noise_multiplier=float(search.score.noise_multiplier),
                           calibration_epsilon=float(rc.calibration.epsilon),
                           count_epsilon=n.epsilon)
  # Any overflow in any trial: at most E[K] * T * D * p by the union bound, in expectation
  # over K; p is chosen so that its term in delta is the overflow's share at the total epsilon.
  mean_updates = math.ceil(plan.total_steps * count.mean)  # rounded up: still a bound
  p_over = sampling.automatic_overflow_probability(requested, mean_updates,
                                                   jax.device_count(), target)
  seeded = [name for name, v in (("search.trials.seed", search.trials.seed),
                                 ("dp.sampling_seed", dp.sampling_seed),
                                 ("dp.noise_seed", dp.noise_seed)) if v is not None]
  return Procedure(
      count=count, trial=trial,
      epsilon=tuning.total_epsilon(trial, count, plan.delta, n.epsilon),
      accountant_delta=plan.delta, overflow_probability=p_over,
      overflow_delta=sampling.overflow_delta(p_over, mean_updates, jax.device_count(), target),
      metric=str(search.score.metric), num_examples=n.value,
      num_examples_source=n.source, count_epsilon=n.epsilon, private=not seeded,
      note=f"{', '.join(seeded)} set: the randomness is public" if seeded else None)


def _planned_rows(rc: config_lib.RunConfig, num_examples: int, rng: np.random.Generator
                  ) -> Any:
  """N as every trial plans with it (a :class:`fastdp_jax.dp.count.RowCount`): declared
  public, or one Laplace count of the training rows drawn with ``rng``."""
  from fastdp_jax.dp import count as count_lib  # pylint: disable=g-import-not-at-top
  d = rc.data
  if d.public_num_examples is not None or d.num_examples_public:
    value = d.public_num_examples if d.public_num_examples is not None else num_examples
    key = ("data.public_num_examples" if d.public_num_examples is not None
           else "data.num_examples_public")
    return count_lib.RowCount(value=int(value), epsilon=0.0,
                              source=f"{count_lib.DECLARED} ({key})")
  eps = float(rc.dp.count_epsilon)
  return count_lib.RowCount(value=count_lib.noisy_count(num_examples, eps, rng), epsilon=eps,
                            source=count_lib.DP_ESTIMATE)


def trial_config(cfg: ml_collections.ConfigDict, values: dict[str, Any],
                 proc: Procedure | None) -> ml_collections.ConfigDict:
  """A trial's config: ``cfg`` with the drawn ``values``; in a private search, the
  procedure's sigma instead of the target, and no cap. No trial exports a model or keeps
  its keys; the membership-inference audit is left to the released model's run."""
  out = with_values(cfg, values)
  out.export_model = False
  out.checkpoint.enabled = False
  out.privacy_eval.membership_rows = 0
  if proc is not None:
    # Every trial plans with the procedure's N (its count, if drawn, is accounted once).
    out.data.public_num_examples = proc.num_examples
    out.data.num_examples_public = False
    # The search is accounted; settings the config itself says were chosen on this data
    # without accounting (the schedule, the optimizer) stay so, and the model says it.
    if out.tuning.private_data != "unaccounted":
      out.tuning.private_data = "accounted"
      out.tuning.note = "a trial of fastdp-tune (its epsilon is the procedure's)"
    out.dp.noise_multiplier = proc.trial.noise_multiplier
    out.dp.target_epsilon = None
    out.dp.max_epsilon = None
    out.dp.overflow_probability = proc.overflow_probability
  return out


# --- the trials -------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True, eq=False)
class Trial:
  """One finished trial: its record (private) and, while it is the best, its model."""
  index: int
  workdir: str
  values: dict[str, Any]
  score: float
  summary: Any  # fastdp_jax.summary.RunSummary
  export: dict[str, Any] | None  # train.export_arguments: kept for the best trial only

  def record(self) -> dict[str, Any]:
    s = self.summary
    return dict(trial=self.index, workdir=self.workdir, hyperparameters=self.values,
                noisy_score=self.score, epsilon=s.epsilon, test_loss=s.test_loss,
                test_accuracy=s.test_accuracy, wall_time_s=s.wall_time_s,
                noise_multiplier=s.noise_multiplier, private=s.private)


def _score(t: Any, metric: str, score_noise: float, rng: Any) -> tuple[float, dict[str, Any]]:
  """A finished trial's noisy score: its (calibrated) model on the validation rows with the
  Gaussian mechanism (``score_noise`` times the sensitivity; 0: exact); and its model's
  export arguments (``t``: its :class:`fastdp_jax.train.Trainer`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fastdp_jax import metrics as evaluate_lib  # pylint: disable=g-import-not-at-top
  from fastdp_jax import train  # pylint: disable=g-import-not-at-top
  v, head = t.data.validation, t.data.head
  if head.kind == "regression":
    raise tuning.TuningError("fastdp-tune scores classifiers (Brier, accuracy or "
                             "log-loss); this dataset's task is regression")
  params = jax.device_get(t.progress.state.params)
  logits = evaluate_lib.outputs_of(t.compiled.apply_fn, params, v.features,
                                   t.config.eval_batch_size)
  classes = 2 if logits.ndim == 1 else logits.shape[1]
  scores = tuning.row_scores(logits, v.labels, metric, head.temperature)
  if t.data.validation_units is not None:
    # Each validation unit scored by its rows' mean: one unit moves the sum by at most S, as a
    # row does (its rows' sum would move it by up to k S: k times the noise).
    scores = scores * units_lib.unit_weights(t.data.validation_units)
  score = tuning.noisy_score(scores, tuning.score_sensitivity(metric, classes), score_noise, rng)
  return score, train.export_arguments(t, params)


def run_trial(cfg: ml_collections.ConfigDict, workdir: str, index: int,
              values: dict[str, Any], metric: str, score_noise: float, rng: Any) -> Trial:
  """Trains ``cfg`` in ``workdir`` alone and scores it (:func:`_score`)."""
  from fastdp_jax import train  # pylint: disable=g-import-not-at-top
  kept: dict[str, Any] = {}

  def score(t: train.Trainer, summary: Any) -> None:
    del summary
    kept["score"], kept["export"] = _score(t, metric, score_noise, rng)

  summary = train.train_and_evaluate(cfg, workdir, inspect=score)
  return Trial(index=index, workdir=workdir, values=values, score=kept["score"],
               summary=summary, export=kept["export"])


def run_side_by_side(cfgs: list[ml_collections.ConfigDict], workdirs: list[str],
                     indices: list[int], values: list[dict[str, Any]], metric: str,
                     score_noise: float, rng: Any, epoch_metrics: bool = True) -> list[Trial]:
  """Trains trials of one shape side by side (:func:`fastdp_jax.trials.run_trials`: one
  compiled step, each trial its own keys and hyperparameters) and scores each as
  :func:`run_trial` does."""
  from fastdp_jax import trials  # pylint: disable=g-import-not-at-top
  kept: dict[int, tuple[float, dict[str, Any]]] = {}

  def score(i: int, t: Any, summary: Any) -> None:
    del summary
    kept[i] = _score(t, metric, score_noise, rng)

  summaries = trials.run_trials(cfgs, workdirs, inspect=score, epoch_metrics=epoch_metrics)
  return [Trial(index=indices[i], workdir=workdirs[i], values=values[i], score=kept[i][0],
                summary=s, export=kept[i][1]) for i, s in enumerate(summaries)]


def _search_trials(cfg: ml_collections.ConfigDict, space: list, k: int, trials_dir: str,
                   metric: str, score_noise: float, rng: Any, proc: Procedure | None,
                   sequential: bool = False, epoch_metrics: bool = True
                   ) -> tuple[Trial | None, list[dict[str, Any]]]:
  """Runs ``k`` trials; returns the best (the only one whose model is kept) and the
  records of all.

  Trials of one shape run side by side (:mod:`fastdp_jax.trials`) unless
  ``search.trials.sequential`` (``sequential``) says one after the other; a shape drawn once
  runs alone through the trainer either way. Every trial is drawn, trained and scored as in
  the sequential search; only the order of the secret draws differs.
  """
  best: Trial | None = None
  records = []
  for t in _trials(cfg, space, k, trials_dir, metric, score_noise, rng, proc, sequential,
                   epoch_metrics):
    records.append(t.record())
    if best is None or t.score > best.score:
      best = t  # the previous best's parameters are dropped here
    else:
      t.export = None
  return best, records


def _trials(cfg: ml_collections.ConfigDict, space: list, k: int, trials_dir: str,
            metric: str, score_noise: float, rng: Any, proc: Procedure | None,
            sequential: bool, epoch_metrics: bool = True) -> Iterator[Trial]:
  """The ``k`` finished trials, in the order of their indices."""
  workdir = lambda i: os.path.join(trials_dir, f"{i:03d}")
  from fastdp_jax import unit_batches  # pylint: disable=g-import-not-at-top
  # A privacy unit's trials run one after another: the side-by-side step has no unit layout.
  if sequential or unit_batches.unit_spec(cfg.data.path) is not None:
    for i in range(k):
      values = draw_hyperparameters(space, cfg, rng)
      say(f"tuning: trial {i + 1}: {values}")
      yield run_trial(trial_config(cfg, values, proc), workdir(i), i, values, metric,
                      score_noise, rng)
    return
  from fastdp_jax import trials  # pylint: disable=g-import-not-at-top
  drawn = [draw_hyperparameters(space, cfg, rng) for _ in range(k)]
  cfgs = [trial_config(cfg, v, proc) for v in drawn]
  done: dict[int, Trial] = {}
  for group in trials.group_by_shape([config_lib.settings(c) for c in cfgs]):
    for i in group:
      say(f"tuning: trial {i + 1}: {drawn[i]}")
    if len(group) == 1:
      (i,) = group
      done[i] = run_trial(cfgs[i], workdir(i), i, drawn[i], metric, score_noise, rng)
      continue
    say(f"tuning: trials {', '.join(str(i + 1) for i in group)} side by side")
    for t in run_side_by_side([cfgs[i] for i in group], [workdir(i) for i in group], group,
                              [drawn[i] for i in group], metric, score_noise, rng,
                              epoch_metrics):
      done[t.index] = t
    # As the sequential search, keep no parameters that cannot be released: a trial scored
    # below another is never the best.
    top = max(t.score for t in done.values())
    for t in done.values():
      if t.score < top:
        t.export = None
  for i in range(k):
    yield done.pop(i)


def _sequential(search: ml_collections.ConfigDict) -> bool:
  """``search.trials.sequential`` (absent from search configs older than the key: False)."""
  return bool(search.trials.get("sequential", False))


def _epoch_metrics(search: ml_collections.ConfigDict) -> bool:
  """``search.trials.epoch_metrics`` (absent from search configs older than the key: True,
  what they did)."""
  return bool(search.trials.get("epoch_metrics", True))


# --- the procedure ----------------------------------------------------------------------------
def _release(best: Trial, workdir: str, **changes: Any) -> Any:
  """Exports ``best``'s model into ``workdir/model`` with its summary ``changes`` applied;
  writes ``workdir/summary.json`` (private); returns the released summary."""
  from fastdp_jax.export import layout  # pylint: disable=g-import-not-at-top
  from fastdp_jax.export import model_dir  # pylint: disable=g-import-not-at-top
  summary = dataclasses.replace(best.summary, **changes)
  assert best.export is not None
  summary = dataclasses.replace(summary, model_dir=model_dir.export_model(
      os.path.join(workdir, layout.MODEL_DIR), summary=summary, **best.export))
  atomic.write_private_file(os.path.join(workdir, "summary.json"),
                            json.dumps(summary.to_json(), indent=1, default=float))
  return summary


def _private_tuning(cfg: ml_collections.ConfigDict, search: ml_collections.ConfigDict,
                    workdir: str, t0: float) -> Any:
  space = _check_space(search.space, private=True)  # refused before the calibration
  seed = search.trials.seed
  rng = tuning.secret_rng() if seed is None else np.random.default_rng(seed)
  # K first: secret, never printed, never written outside the private records.
  k = trial_count(search).draw(rng)
  proc = plan_procedure(config_lib.settings(cfg), search, rng)
  trial = proc.trial
  say(f"tuning: each trial sigma {trial.noise_multiplier:.4f}, q {trial.sampling_rate:.4g}, "
      f"{trial.steps} updates; score: {proc.metric} + Gaussian noise "
      f"({trial.score_noise_multiplier:g} x its sensitivity); K ~ {proc.count.describe()}, "
      f"not released; total epsilon {proc.epsilon:.4f} at delta {proc.delta:.3g} (RDP)")
  best, records = _search_trials(cfg, space, k, os.path.join(workdir, "trials"), proc.metric,
                                 trial.score_noise_multiplier, rng, proc, _sequential(search),
                                 _epoch_metrics(search))
  description = tuning.describe(trial, proc.count, proc.epsilon, proc.accountant_delta,
                                proc.metric, proc.count_epsilon)
  from fastdp_jax.dp import release  # pylint: disable=g-import-not-at-top
  description["sampling_rate"] = release.public_sampling_rate(trial.sampling_rate)
  _write_records(workdir, records, best, description)
  if best is None:
    say("tuning: no trial was drawn (K = 0, as the Poisson distribution allows): nothing is "
        "released; the budget is spent")
    return None
  s = best.summary
  private = proc.private and all(r["private"] for r in records)
  return _release(
      best, workdir, epsilon=proc.epsilon, delta=proc.delta,
      accountant_delta=proc.accountant_delta, overflow_delta=proc.overflow_delta,
      overflow_probability=proc.overflow_probability, private=private,
      privacy_note=None if private else (proc.note or s.privacy_note),
      training_epsilon=s.training_epsilon if s.training_epsilon is not None else s.epsilon,
      count_epsilon=proc.count_epsilon or None, planned_num_examples=proc.num_examples,
      num_examples_source=proc.num_examples_source, tuning=description,
      wall_time_s=time.time() - t0)


def _proxy_tuning(cfg: ml_collections.ConfigDict, search: ml_collections.ConfigDict,
                  workdir: str, proxy: str, t0: float) -> Any:
  space = _check_space(search.space, private=False)
  k = max(1, round(float(search.trials.mean)))  # public data: a fixed, public number
  seed = search.trials.seed
  rng = tuning.secret_rng() if seed is None else np.random.default_rng(seed)
  on_proxy = copy.deepcopy(cfg)
  on_proxy.data.path = proxy
  metric = str(search.score.metric)
  best, records = _search_trials(on_proxy, space, k, os.path.join(workdir, "proxy_trials"),
                                 metric, 0.0, rng, None, _sequential(search),
                                 _epoch_metrics(search))
  assert best is not None
  say(f"tuning: the best of {k} trials on {proxy}: {best.values}; one private run on "
      f"{cfg.data.path}")
  final = run_trial(trial_config(cfg, best.values, None), os.path.join(workdir, "run"), k,
                    best.values, metric, 0.0, rng)
  description = dict(method="public proxy", proxy=os.path.abspath(proxy), trials=k,
                     score=metric, hyperparameters=best.values, accounted=True)
  _write_records(workdir, records, best, description)
  return _release(final, workdir, tuning=description, wall_time_s=time.time() - t0)


def _write_records(workdir: str, records: list[dict[str, Any]], best: Trial | None,
                   description: dict[str, Any]) -> None:
  atomic.write_private_file(
      os.path.join(workdir, "trials.json"),
      json.dumps(dict(procedure=description, released=None if best is None else best.index,
                      trials=records), indent=1, default=float))


def tune(config: ml_collections.ConfigDict, search: ml_collections.ConfigDict | None,
         workdir: str, *, proxy: str | None = None) -> Any:
  """Tunes ``config`` over ``search`` within ``config.dp.target_epsilon`` in all.

  Args:
    config: the trainer's config (:func:`fastdp_jax.config.base_config`); its
      ``dp.target_epsilon`` is the whole procedure's epsilon; it needs validation rows.
    search: the search (:func:`default_search`'s keys); None: the default.
    workdir: new directory: ``model/`` (public) and the private trial records.
    proxy: a public dataset of the same schema: tune on it for free (see the module doc).

  Returns:
    The released model's :class:`~fastdp_jax.summary.RunSummary`, or None when a Poisson
    K = 0 released nothing.

  Raises:
    TuningError, ConfigError: a procedure that cannot run (before any trial).
  """
  t0 = time.time()
  search = search if search is not None else default_search()
  config_lib.validate(config)
  if os.path.exists(os.path.join(workdir, "trials.json")) or os.path.isdir(
      os.path.join(workdir, "trials")) or os.path.isdir(os.path.join(workdir, "proxy_trials")):
    raise tuning.TuningError(f"workdir {workdir} holds a tuning run already; use another "
                             "(tuning again on the same data spends the budget again)")
  atomic.make_private_dir(workdir)
  if proxy is not None:
    return _proxy_tuning(config, search, workdir, proxy, t0)
  return _private_tuning(config, search, workdir, t0)


# --- the command ------------------------------------------------------------------------------
def _define_flags() -> None:
  """``--search`` and ``--proxy`` (beside the trainer's flags), defined once: at the command's
  start, not at import, so that a search config importing this module defines nothing."""
  if "search" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file(
      "search", None, "Python search config (configs/search/default.py); override keys with "
      "--search.x.y=... (default: fastdp_jax.tune.default_search())", lock_config=True)
  flags.DEFINE_string("proxy", None, "a PUBLIC dataset of the same schema: tune on it "
                      "(free), then one private run on data.path")


def main(argv: Sequence[str]) -> None:
  del argv
  cfg = cli._CONFIG.value  # pylint: disable=protected-access
  workdir = cli._WORKDIR.value or os.path.join(  # pylint: disable=protected-access
      "runs", time.strftime("tune-%Y%m%d-%H%M%S"))
  try:
    summary = tune(cfg, flags.FLAGS.search, workdir, proxy=flags.FLAGS.proxy)
  except (errors.UserError, FileNotFoundError, PermissionError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(errors.USER_ERROR_EXIT_CODE)
  if summary is not None:
    say(f"tuning done: epsilon {summary.epsilon:.4f} at delta {summary.delta:.3g} for the "
        f"whole procedure, private: {str(summary.private).lower()}; released "
        f"{summary.model_dir}")


def run() -> None:
  """The ``fastdp-tune`` console entry point (and ``python -m fastdp_jax.tune``)."""
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  # Through the package's module, so that a search config importing fastdp_jax.tune finds
  # the same module (and its flags) rather than a second copy.
  from fastdp_jax import tune as _this  # pylint: disable=import-self
  _this.run()
