"""DP-SGD training and evaluation: ``train_and_evaluate(config, workdir) -> summary``.

A run in three sections, each readable on its own:

1. :func:`setup` validates nothing twice and returns a :class:`Trainer`: the data on the
   device mesh, the privacy plan (:mod:`fastdp_jax.dp.plan`), the model, the secret keys, the
   sampler, the compiled step, the checkpoint and the run state it resumes from, the
   schedule of events (:mod:`fastdp_jax.schedule`), the metric sinks and the profiler.
2. :func:`train` asks the schedule for each compiled call's length, runs the call
   (:meth:`Trainer.train_call`), then calls the hooks: progress, logging points, periodic
   checkpoints, epoch ends.
3. :func:`finalize` builds the summary, runs the privacy evaluation, writes
   ``summary.json``, ``final_params.npz`` and the exported model ``model/``.

Host code (sampling, accounting, evaluation bookkeeping) and device code (the compiled step)
are kept apart: the jitted step never does accounting. Benchmarks and notebooks reuse
:func:`setup` and :meth:`Trainer.train_call`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fastdp_jax.dp import accounting
from fastdp_jax import atomic
from fastdp_jax.dp import attack
from fastdp_jax.data import batch_stream
from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax import distributed
from fastdp_jax import errors
from fastdp_jax import export as export_lib
from fastdp_jax.dp import ghost
from fastdp_jax import metrics as metrics_lib
from fastdp_jax import models
from fastdp_jax.dp import noise
from fastdp_jax import parallel
from fastdp_jax.dp import plan as plan_lib
from fastdp_jax import preemption
from fastdp_jax.dp import privacy_eval
from fastdp_jax import profiling
from fastdp_jax.dp import release
from fastdp_jax.dp import sampling
from fastdp_jax import schedule as schedule_lib
from fastdp_jax import step as step_lib
from fastdp_jax.metrics import say

# Re-exported: the plan is part of the trainer's interface.
PrivacyPlan = plan_lib.PrivacyPlan
plan_privacy = plan_lib.plan_privacy
noise_warning = plan_lib.noise_warning


# What a full disk leaves (outputs are atomic, checkpoints renamed into place).
_KEPT = "the last checkpoint and every complete output are intact (the same command resumes)"


class NonFiniteParametersError(errors.UserError):
  """The noised parameters became non-finite (a diverging optimizer, not one row)."""


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = cfg.optimizer
  if o.name == "sgd":
    return optax.sgd(o.learning_rate, momentum=o.momentum or None)
  return optax.adam(o.learning_rate)


def build_eval(apply_fn: Callable, head: models.TaskHead = models.BINARY) -> Callable:
  """Jitted ``evaluate(params, x, y, mask) -> (loss_sum, correct, predictions)`` of a chunk.

  ``predictions`` are :meth:`fastdp_jax.models.TaskHead.predict`'s (what an exported model
  returns); ``correct`` counts right classes (binary: logit > 0, as the trainer always did;
  multiclass: the arg-max; 0 for regression).
  """
  @jax.jit
  def evaluate(params, x, y, mask):
    outputs = apply_fn(params, x)
    losses = head.losses(outputs, y)
    if head.kind == "binary":
      correct = (outputs > 0) == (y > 0.5)
    elif head.kind == "multiclass":
      correct = jnp.argmax(outputs, axis=-1) == y.astype(jnp.int32)
    else:
      correct = jnp.zeros(y.shape, bool)
    return (jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct & mask),
            head.predict(outputs))
  return evaluate


def evaluate_split(evaluate: Callable, params, x: np.ndarray, y: np.ndarray,
                   chunk: int) -> tuple[float, float, np.ndarray]:
  """Mean loss, accuracy and every row's prediction over a split, in fixed-size padded
  chunks (one compilation).

  Returns:
    ``(mean loss, accuracy, predictions [n] or [n, K])`` (accuracy 0 for regression).
  """
  chunk = min(chunk, len(y))
  loss, correct, preds = 0.0, 0, []
  for lo in range(0, len(y), chunk):
    xb, yb = x[lo:lo + chunk], y[lo:lo + chunk]
    n = len(yb)
    mask = np.arange(chunk) < n
    if n < chunk:
      xb = np.concatenate([xb, np.zeros((chunk - n, x.shape[1]), x.dtype)])
      yb = np.concatenate([yb, np.zeros((chunk - n,), y.dtype)])
    l, c, p = evaluate(params, xb, yb, mask)
    loss += float(l)
    correct += int(c)
    preds.append(np.asarray(p)[:n])
  return loss / len(y), correct / len(y), np.concatenate(preds)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve: P(score of a random positive > a random negative), ties 1/2.

  The Mann-Whitney statistic from average ranks (tied scores share their mean rank); NaN when
  one class is absent.
  """
  scores, pos = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
  # Average rank (1-based) of each group of equal scores.
  ends = np.cumsum(counts)
  ranks = np.empty(len(scores))
  ranks[order] = (ends - (counts - 1) / 2)[inverse]
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
  """Unweighted mean of the per-class F1 = 2 TP / (2 TP + FP + FN) over the classes that
  occur in the labels or the predictions (scikit-learn's ``f1_score(average='macro')``)."""
  predicted, labels = np.asarray(predicted, np.int64), np.asarray(labels, np.int64)
  f1 = []
  for c in np.union1d(predicted, labels):
    tp = int(np.sum((predicted == c) & (labels == c)))
    fp = int(np.sum((predicted == c) & (labels != c)))
    fn = int(np.sum((predicted != c) & (labels == c)))
    f1.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(f1)) if f1 else float("nan")


def split_metrics(head: models.TaskHead, prefix: str, loss: float, accuracy: float,
                  predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The task's metrics of one split, named ``{prefix}_loss``, ``{prefix}_accuracy``, ...

  binary: loss (BCE), accuracy, AUC; multiclass: loss (cross-entropy), accuracy, macro-F1;
  regression: loss (squared or Huber, in units of half the public label range), RMSE and
  MAE in the label's units.
  """
  out = {f"{prefix}_loss": loss}
  if head.kind == "binary":
    out[f"{prefix}_accuracy"] = accuracy
    out[f"{prefix}_auc"] = binary_auc(predictions, labels)
  elif head.kind == "multiclass":
    out[f"{prefix}_accuracy"] = accuracy
    out[f"{prefix}_macro_f1"] = macro_f1(np.argmax(predictions, axis=-1), labels)
  else:
    err = np.asarray(predictions, np.float64) - np.asarray(labels, np.float64)
    out[f"{prefix}_rmse"] = float(np.sqrt(np.mean(err ** 2)))
    out[f"{prefix}_mae"] = float(np.mean(np.abs(err)))
  return out


def check_finite(metrics: dict[str, np.ndarray], step: int, k: int) -> None:
  """Stops the run at the first update whose noised parameters are not finite.

  Only the parameters are checked: they are the DP output, so stopping on them is
  post-processing. A non-finite per-example gradient or loss is zeroed and counted inside the
  step instead: halting on it would reveal that the row was sampled at that update.
  """
  bad = np.flatnonzero(~metrics["params_finite"][:k].astype(bool))
  if bad.size:
    raise NonFiniteParametersError(
        f"the parameters became non-finite at update {step + int(bad[0]) + 1}; lower the "
        "learning rate")


def run_identity(cfg: ml_collections.ConfigDict, plan: PrivacyPlan,
                 train: data_lib.Split) -> dict[str, Any]:
  """What a resumed run must share with its checkpoint (privacy, model, data, sampling)."""
  return dict(dp_enabled=plan.enabled, noise_multiplier=plan.noise_multiplier,
              l2_norm_clip=plan.l2_norm_clip, sampling_rate=plan.sampling_rate,
              batch_size=cfg.batch_size, delta=plan.delta, accountant=plan.accountant,
              model_hidden_sizes=list(cfg.model.hidden_sizes),
              num_features=int(train.features.shape[1]), data_digest=train.digest,
              seed=cfg.seed, sampling_seed=cfg.dp.sampling_seed,
              noise_seed=cfg.dp.noise_seed, optimizer=cfg.optimizer.to_dict(),
              # Only when they matter: a binary run's identity is what it was before tasks.
              **({"model_embedding_dim": cfg.model.embedding_dim} if train.embeddings else {}),
              **({"model_huber_delta": cfg.model.huber_delta}
                 if train.task.kind == "regression" else {}),
              **({"validation_fraction": cfg.data.validation_fraction}
                 if cfg.data.validation_fraction else {}))


def draw_keys(cfg: ml_collections.ConfigDict) -> checkpoint_lib.RunKeys:
  """The run's sampling and noise keys: OS entropy on process 0, broadcast to every process."""
  skey, sfixed = sampling.sampling_key(cfg.dp.sampling_seed)
  nkey, nfixed = noise.noise_key(cfg.dp.noise_seed)
  # uint32 words: JAX without x64 would truncate uint64 in the broadcast.
  words = distributed.broadcast_from_process_0(np.concatenate([skey.view(np.uint32), nkey]))
  words = np.asarray(words, np.uint32)
  return checkpoint_lib.RunKeys(sampling=words[:4].copy().view(np.uint64),
                                noise=words[4:].copy(), sampling_fixed=sfixed,
                                noise_fixed=nfixed)


def fresh_noise_key(keys: checkpoint_lib.RunKeys) -> checkpoint_lib.RunKeys:
  """The same keys with a new noise key (entropy unless the noise seed is fixed)."""
  if keys.noise_fixed:
    # Reproducibility run: a deterministic but different key for the redone updates.
    seq = np.random.SeedSequence([int(w) for w in keys.noise] + [1])
    nkey = seq.generate_state(noise.KEY_WORDS, np.uint32)
  else:
    nkey = noise.noise_key(None)[0]
  nkey = np.asarray(distributed.broadcast_from_process_0(nkey), np.uint32)
  return dataclasses.replace(keys, noise=nkey)


@dataclasses.dataclass(kw_only=True, eq=False)
class Trainer:
  """Everything a run needs, built once by :func:`setup`; ``state``, ``step`` and
  ``run_state`` advance with each call."""

  cfg: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  plan: PrivacyPlan
  keys: checkpoint_lib.RunKeys
  private: bool
  privacy_note: str | None
  train: data_lib.Split  # this process's training rows (a bounded sample when streaming)
  test: data_lib.Split  # the test rows (a bounded sample when streaming)
  dev: parallel.DeviceData | None  # the training rows on the devices (None when streaming)
  num_examples: int  # N, the training rows of all processes
  apply_fn: Callable
  run: step_lib.TrainStep | step_lib.StreamedStep  # the compiled step
  clipping: str  # the per-example clipping method it uses: 'ghost' or 'vmap'
  sampler: sampling.PoissonSampler | None  # None when the batches are streamed
  stream: batch_stream.BatchStream | None  # the materialised batches (data.batches)
  local_shards: list[int]
  evaluate: Callable
  ckpt: checkpoint_lib.Checkpointer | None
  schedule: schedule_lib.Schedule
  writer: metrics_lib.MultiSink
  prof: profiling.Profiler
  state: step_lib.State
  run_state: checkpoint_lib.RunState
  step: int
  attack_idx: int | None
  majority: dict[str, float]  # the task's baseline on the test rows (test metrics)
  head: models.TaskHead = models.BINARY  # the task, from the manifest
  validation: data_lib.Split | None = None  # held out of training (data.validation_fraction)
  canaries: privacy_eval.Canaries | None = None  # an audit dataset's (checked at set-up)
  cleanup: contextlib.ExitStack | None = None
  preemption: preemption.Watch | None = None  # SIGTERM: checkpoint and stop (None: ignored)
  _reader: batch_stream.Prefetcher | None = None
  t_start: float = dataclasses.field(default_factory=time.time)
  epoch_t0: float = dataclasses.field(default_factory=time.time)

  @property
  def is_writer(self) -> bool:
    return jax.process_index() == 0

  def epsilon(self) -> float:
    """Epsilon of the updates so far (inf when DP is off)."""
    return self.run_state.ledger.epsilon() if self.plan.enabled else float("inf")

  def _sampled_inputs(self, k: int) -> tuple:
    assert isinstance(self.run, step_lib.TrainStep) and self.sampler is not None
    chunk = self.cfg.steps_per_call
    with self.prof.phase("sampling"):
      batches = self.sampler.batches(self.step, k, shards=self.local_shards)
      pad = ((0, chunk - k), (0, 0), (0, 0))
      idx, msk = np.pad(batches.indices, pad), np.pad(batches.mask, pad)
      active = np.arange(chunk) < k
    with self.prof.phase("data transfer"):
      inputs = self.prof.sync(self.run.place(idx, msk, active))
    return (self.dev.features, self.dev.labels, *inputs)

  def _streamed_inputs(self, k: int) -> tuple:
    """This process's devices' slots of the next ``k`` materialised batches, placed."""
    assert isinstance(self.run, step_lib.StreamedStep) and self.stream is not None
    chunk, d = self.cfg.steps_per_call, int(self.mesh.devices.size)
    lo, hi = self.local_shards[0], self.local_shards[-1] + 1
    if self._reader is None:  # starts at the run's position (a resume seeks to it)
      self._reader = self.stream.reader(self.step, self.schedule.stop_at, device_slice=(
          batch_stream.device_slots(self.stream.capacity, d, (lo, hi))))
      if self.cleanup is not None:
        self.cleanup.callback(self._reader.close)
    with self.prof.phase("data read"):
      f, y, m = batch_stream.split_for_devices(*self._reader.take(k), hi - lo)
      shape = (chunk, d) + f.shape[2:]
      features = np.zeros(shape, np.float32)
      labels, mask = np.zeros(shape[:3], np.float32), np.zeros(shape[:3], bool)
      features[:k, lo:hi], labels[:k, lo:hi], mask[:k, lo:hi] = f, y, m
    with self.prof.phase("data transfer"):
      return self.prof.sync(self.run.place(features, labels, mask, np.arange(chunk) < k))

  def train_call(self, k: int) -> dict[str, np.ndarray]:
    """Runs ``k`` updates in one compiled call; returns their per-update metrics."""
    prof, step = self.prof, self.step
    inputs = self._streamed_inputs(k) if self.stream is not None else self._sampled_inputs(k)
    prof.before_call(step)
    with prof.phase("step"):
      self.state, m = self.run(self.state, *inputs)
      m = jax.device_get(m)
    prof.after_call(step + k, self.state)
    check_finite(m, step, k)
    rs = self.run_state
    self.run_state = dataclasses.replace(
        rs, partial={name: v + float(m[name][:k].sum()) for name, v in rs.partial.items()},
        ledger=rs.ledger.add(self.plan.noise_multiplier, self.plan.sampling_rate, k))
    self.step = step + k
    return m

  def test_metrics(self) -> dict[str, float]:
    """The task's metrics on the test split (streamed from disk with data.batches):
    ``test_loss`` and ``test_accuracy``/``test_auc``, ``test_macro_f1`` or ``test_rmse``/
    ``test_mae`` (:func:`split_metrics`)."""
    params = jax.device_get(self.state.params)
    if self.stream is None:
      return split_metrics(self.head, "test", *evaluate_split(
          self.evaluate, params, self.test.features, self.test.labels,
          self.cfg.eval_batch_size), self.test.labels)
    loss = correct = n = 0.0
    preds, labels = [], []
    for x, y in batch_stream.iter_split(self.cfg.data.path, "test",
                                        chunk_rows=self.cfg.eval_batch_size):
      chunk_loss, chunk_acc, p = evaluate_split(self.evaluate, params, x, y,
                                                self.cfg.eval_batch_size)
      loss, correct, n = loss + chunk_loss * len(y), correct + chunk_acc * len(y), n + len(y)
      preds.append(p)
      labels.append(y)
    return split_metrics(self.head, "test", loss / n, correct / n, np.concatenate(preds),
                         np.concatenate(labels))

  def validation_metrics(self) -> dict[str, float]:
    """The task's metrics on the validation rows (``validation_*``; empty without them)."""
    if self.validation is None or not len(self.validation):
      return {}
    v = self.validation
    return split_metrics(self.head, "validation", *evaluate_split(
        self.evaluate, jax.device_get(self.state.params), v.features, v.labels,
        self.cfg.eval_batch_size), v.labels)

  def save(self) -> None:
    if self.ckpt is not None:  # the noise key stays out of the arrays: it is in keys.json
      state = dataclasses.replace(self.state,
                                  opt_state=noise.without_key(self.state.opt_state))
      # A checkpoint that cannot fit is refused in one line before orbax starts writing (its
      # threads print screens of tracebacks on a full disk): room for one more like the last.
      atomic.ensure_free_space(
          self.ckpt.directory, max(atomic.largest_entry_bytes(self.ckpt.directory),
                                   2 * models.count_params(state) * 4 + (128 << 10)),
          f"the checkpoint of update {self.step}", _KEPT,
          agree=lambda ok: bool(distributed.broadcast_from_process_0(np.array(ok, np.uint8))))
      self.ckpt.save(self.step, state, self.run_state)


# --- 1. set-up ---------------------------------------------------------------------------------
def _load_data(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  # Each process reads its row range of the training rows and holds only its part, on its
  # devices of the global mesh; N is the global row count.
  train, dev = parallel.load_training_data(mesh, cfg.data.path,
                                           verify_checksum=cfg.data.verify_checksums,
                                           feature_bounds=cfg.data.feature_bounds,
                                           exclude=validation_rows(cfg))
  distributed.check_same_on_all_processes("config and data",
                                          (cfg.to_json_best_effort(), train.digest))
  test = data_lib.load_split(cfg.data.path, "test", verify_checksum=cfg.data.verify_checksums,
                             feature_bounds=cfg.data.feature_bounds)
  if train.features.shape[1] != test.features.shape[1]:
    raise data_lib.ShardError(f"{cfg.data.path}: train has {train.features.shape[1]} features,"
                              f" test {test.features.shape[1]}")
  return train, test, dev


VALIDATION_SEED = 70  # the train/test split's hash rule (split_lib.is_test_row) with another seed


def validation_rows(cfg: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray] | None:
  """``rows(ids) -> bool``: which global training rows are validation rows (None: none).

  The same hash rule as the train/test split (:func:`fastdp_jax.data.split.is_test_row`) with
  :data:`VALIDATION_SEED`: a function of the row number only, identical on every process.
  """
  fraction = float(cfg.data.validation_fraction)
  if not fraction:
    return None
  from fastdp_jax.data import split as split_lib  # local: the split rule, nothing else
  return lambda ids: split_lib.is_test_row(ids, seed=VALIDATION_SEED, test_fraction=fraction)


def _load_validation(cfg: ml_collections.ConfigDict,
                     given: bool) -> data_lib.Split | None:
  """The validation rows (every process reads all of them, a chunk at a time), or None.

  Raises:
    ConfigError: with ``data.batches`` (materialised batches are drawn from every training
      row) or with data given in memory.
  """
  rule = validation_rows(cfg)
  if rule is None:
    return None
  if cfg.data.batches or given:
    raise errors.ConfigError("data.validation_fraction needs the training rows read from "
                             "data.path (not data.batches or data given in memory); unset it")
  if not os.path.isdir(cfg.data.path):
    full = data_lib.load_split(cfg.data.path, "train", feature_bounds=cfg.data.feature_bounds)
    keep = rule(np.arange(len(full)))
    return dataclasses.replace(full, features=full.features[keep], labels=full.labels[keep])
  total = data_lib.read_manifest(cfg.data.path).rows("train")
  parts = []
  for lo in range(0, total, 1 << 20):  # bounded memory: one chunk and the validation rows
    hi = min(total, lo + (1 << 20))
    chunk = data_lib.load_split(cfg.data.path, "train", rows=(lo, hi),
                                verify_checksum=False,  # the training load verified them
                                feature_bounds=cfg.data.feature_bounds)
    keep = rule(np.arange(lo, hi))
    parts.append(dataclasses.replace(chunk, features=chunk.features[keep],
                                     labels=chunk.labels[keep]))
  if not parts:
    return None
  return dataclasses.replace(parts[0], features=np.concatenate([p.features for p in parts]),
                             labels=np.concatenate([p.labels for p in parts]))


def _task_of(cfg: ml_collections.ConfigDict, train: data_lib.Split
             ) -> tuple[models.TaskHead, tuple[models.EmbeddingInput, ...]]:
  """The model's task head and embedding inputs, from the manifest (via the split).

  Raises:
    ConfigError: ``model.task`` contradicts the manifest's task.
  """
  task = train.task
  if cfg.model.task is not None and cfg.model.task != task.kind:
    raise errors.ConfigError(f"model.task={cfg.model.task!r} contradicts the dataset's task "
                             f"{task.kind!r} (its manifest.json); unset model.task")
  head = models.TaskHead(kind=task.kind, num_classes=len(task.classes), bounds=task.bounds,
                         huber_delta=cfg.model.huber_delta if task.kind == "regression"
                         else None)
  return head, models.embedding_inputs(train.feature_names, train.embeddings,
                                       cfg.model.embedding_dim)


def _load_streamed(cfg: ml_collections.ConfigDict):
  """Bounded samples of the training and test rows (attacks, membership inference) and N.

  With ``data.batches`` the training rows are never all in memory: the updates stream from
  the materialised batches, and evaluation streams the test shards.
  """
  manifest = data_lib.read_manifest(cfg.data.path)
  n, n_test = manifest.rows("train"), manifest.rows("test")
  sample = max(1, cfg.data.attack_rows, cfg.privacy_eval.membership_rows)
  kw = dict(verify_checksum=cfg.data.verify_checksums, feature_bounds=cfg.data.feature_bounds)
  lo, hi = data_lib.process_row_ranges(n, parallel.devices_per_process(parallel.make_mesh()))[
      jax.process_index()]
  train = data_lib.load_split(cfg.data.path, "train", rows=(lo, min(hi, lo + sample)), **kw)
  test = data_lib.load_split(cfg.data.path, "test", rows=(0, min(n_test, sample)), **kw)
  distributed.check_same_on_all_processes("config and data",
                                          (cfg.to_json_best_effort(), train.digest))
  return train, test, n


def _open_stream(cfg: ml_collections.ConfigDict, plan: PrivacyPlan) -> batch_stream.BatchStream:
  """The materialised batches of ``data.batches``, verified, and refused unless they are this
  run's (dataset, batch size, epochs, q and the number of updates)."""
  if cfg.dp.overflow_probability is not None:
    raise errors.ConfigError("dp.overflow_probability is fixed by the batches' capacity with "
                             "data.batches; unset it (or rewrite the batches)")
  expected = dict(batch_stream.dataset_identity(cfg.data.path), batch_size=cfg.batch_size,
                  epochs=cfg.num_epochs, sampling_rate=plan.sampling_rate,
                  total_updates=plan.total_steps)
  return batch_stream.open_batches(cfg.data.batches, expected=expected)


def _streamed_keys(stream: batch_stream.BatchStream,
                   keys: checkpoint_lib.RunKeys) -> checkpoint_lib.RunKeys:
  """The run's keys with the batches' sampling key (its file may have been deleted)."""
  try:
    key, fixed = batch_stream.read_key(stream.path)
  except (errors.UserError, OSError):
    key, fixed = np.zeros(2, np.uint64), stream.sampling_fixed
  return dataclasses.replace(keys, sampling=np.asarray(key, np.uint64),
                             sampling_fixed=bool(fixed or stream.sampling_fixed))


def _majority(cfg: ml_collections.ConfigDict, test: data_lib.Split, streamed: bool,
              head: models.TaskHead = models.BINARY) -> dict[str, float]:
  """The task's constant baseline, computed on the TEST rows (a test metric, like accuracy).

  binary and multiclass: ``majority_class_rate`` (the test rows' most frequent class);
  regression: ``baseline_rmse`` and ``baseline_mae`` of predicting the test rows' mean.
  A baseline from the training rows would be an unaccounted statistic of them.
  """
  chunks = ([test.labels] if not streamed else
            [y for _, y in batch_stream.iter_split(cfg.data.path, "test",
                                                   chunk_rows=cfg.eval_batch_size)])
  if head.kind == "binary":
    if not streamed:
      rate = float(test.labels.mean())
    else:
      ones = total = 0.0
      for y in chunks:
        ones, total = ones + float(y.sum()), total + len(y)
      rate = ones / max(total, 1.0)
    return {"majority_class_rate": max(rate, 1 - rate)}
  total = max(sum(len(y) for y in chunks), 1)
  if head.kind == "multiclass":
    counts = sum(np.bincount(np.asarray(y, np.int64), minlength=head.num_classes)
                 for y in chunks)
    return {"majority_class_rate": float(np.max(counts)) / total}
  mean = sum(float(np.sum(y, dtype=np.float64)) for y in chunks) / total
  sq = sum(float(np.sum((np.asarray(y, np.float64) - mean) ** 2)) for y in chunks)
  ab = sum(float(np.sum(np.abs(np.asarray(y, np.float64) - mean))) for y in chunks)
  return {"baseline_rmse": float(np.sqrt(sq / total)), "baseline_mae": ab / total}


def _resolve_keys(cfg: ml_collections.ConfigDict, workdir: str,
                  ckpt: checkpoint_lib.Checkpointer | None) -> checkpoint_lib.RunKeys:
  """The keys of the run being resumed, or new ones (saved before the first update)."""
  if ckpt is not None and ckpt.latest_step() is not None:
    keys = checkpoint_lib.load_keys(workdir)
    if keys is None:
      raise checkpoint_lib.ResumeMismatchError(
          f"workdir {workdir} holds checkpoints but no {checkpoint_lib.KEYS_FILE}: the run "
          "cannot be resumed without its keys; use another --workdir")
    return keys
  keys = draw_keys(cfg)
  if jax.process_index() == 0 and ckpt is not None:
    checkpoint_lib.save_keys(workdir, keys)
  return keys


def _restore(cfg, workdir, ckpt, mesh, state, run_state, keys):
  """``(state, run_state, keys)`` from the workdir's latest checkpoint, if any."""
  if ckpt is None or ckpt.latest_step() is None:
    return state, run_state, keys
  saved = ckpt.restore_metadata()
  diffs = checkpoint_lib.compare_identity(saved.identity, run_state.identity)
  if diffs and not cfg.checkpoint.allow_changes:
    raise checkpoint_lib.ResumeMismatchError(
        f"workdir {workdir} holds a checkpoint of a different run; changed: "
        + "; ".join(diffs) + ". Use another --workdir, or --config.checkpoint.allow_changes"
        "=True to continue anyway (recorded in the summary; epsilon keeps accumulating)")
  state, saved = ckpt.restore(state)
  if diffs:
    # Updates after the checkpoint may have been seen (logged) with the old noise; redone
    # with changed parameters they must not reuse it.
    keys = fresh_noise_key(keys)
    if jax.process_index() == 0:
      checkpoint_lib.save_keys(workdir, keys)
  state = dataclasses.replace(state, opt_state=noise.with_key(state.opt_state, keys.noise))
  state = parallel.replicate(mesh, jax.device_get(state))
  saved = dataclasses.replace(saved, identity=run_state.identity,
                              overrides=saved.overrides + ((tuple(diffs),) if diffs else ()))
  say(f"resumed from {ckpt.directory} at update {int(state.step)} "
      f"(epsilon so far {saved.ledger.epsilon():.4f})")
  return state, saved, keys


def _stop_at(cfg: ml_collections.ConfigDict, plan: PrivacyPlan,
             ledger: accounting.PrivacyLedger) -> int:
  """The last update count within ``dp.max_epsilon`` (the plan's total without a cap)."""
  if not plan.enabled or cfg.dp.max_epsilon is None:
    return plan.total_steps
  more = ledger.steps_within(cfg.dp.max_epsilon, plan.noise_multiplier, plan.sampling_rate,
                             plan.total_steps - ledger.steps,
                             progress=accounting.progress_printer(
                                 f"privacy budget: finding the last update within "
                                 f"dp.max_epsilon={cfg.dp.max_epsilon}", unit="updates",
                                 write=say))
  stop = ledger.steps + more
  if stop < plan.total_steps:
    say(f"privacy budget: dp.max_epsilon={cfg.dp.max_epsilon} allows {stop} of "
        f"{plan.total_steps} updates")
  return stop


def _announce(t: Trainer, num_params: int) -> None:
  plan, mesh = t.plan, t.mesh
  logging.info("train rows %d, test rows %d, features %d, devices %d, params %d",
               t.num_examples, len(t.test), t.train.features.shape[1], mesh.devices.size,
               num_params)
  say(f"DP-SGD: q={plan.sampling_rate:.6g} sigma={plan.noise_multiplier:.4g} "
      f"C={plan.l2_norm_clip} updates={plan.total_steps} ({plan.steps_per_epoch}/epoch) "
      f"delta={plan.delta_total:.3g} accountant={plan.accountant} "
      f"devices={mesh.devices.size} capacity/device="
      f"{t.sampler.capacity if t.sampler else t.stream.capacity} private={t.private}"
      if plan.enabled else
      f"non-private SGD: updates={plan.total_steps} devices={mesh.devices.size}")
  if t.privacy_note and plan.enabled:
    say(f"WARNING: private: false: {t.privacy_note}")


def _read_inputs(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 data: tuple[data_lib.Split, data_lib.Split, parallel.DeviceData] | None,
                 streamed: bool):
  """``(train, test, device data or None, N)``: given, read from ``data.path``, or (when the
  batches are streamed) bounded samples of it."""
  if streamed:
    train, test, n = _load_streamed(cfg)
    return train, test, None, n
  train, test, dev = _load_data(cfg, mesh) if data is None else data
  return train, test, dev, dev.num_examples


def _plan_run(cfg: ml_collections.ConfigDict, n: int, mesh: jax.sharding.Mesh,
              streamed: bool) -> tuple[PrivacyPlan, batch_stream.BatchStream | None]:
  """The privacy plan and, with ``data.batches``, the verified batches it is checked against."""
  plan = plan_lib.plan_privacy(cfg, n, num_devices=int(mesh.devices.size))
  if not streamed:
    return plan, None
  stream = _open_stream(cfg, plan)
  # One capacity per update (not per device): the job's union bound.
  plan = dataclasses.replace(
      plan, overflow_probability=stream.overflow_probability,
      overflow_delta=sampling.overflow_delta(stream.overflow_probability, plan.total_steps, 1))
  return plan, stream


def _build_model(cfg: ml_collections.ConfigDict, plan: PrivacyPlan, num_features: int,
                 head: models.TaskHead = models.BINARY,
                 embeddings: tuple[models.EmbeddingInput, ...] = ()):
  """``(model, apply_fn, params, loss_fn)``; warns when the noise swamps the signal."""
  # cfg.seed initialises the model and nothing else: the batches and the noise come from
  # secret keys (OS entropy, unless dp.sampling_seed / dp.noise_seed fix them).
  model = models.create_model(num_features, cfg.model.hidden_sizes, cfg.seed,
                              num_outputs=head.num_outputs, embeddings=embeddings)
  if plan.enabled:
    models.check_dp_compatible(model)
  apply_fn, params = models.functional(model)
  if warning := noise_warning(plan, models.count_params(params), cfg.batch_size,
                              cfg.dp.target_epsilon):
    say(f"WARNING: {warning}")
  return model, apply_fn, params, models.example_loss(apply_fn, head)


def _open_checkpointer(cfg: ml_collections.ConfigDict, workdir: str,
                       cleanup: contextlib.ExitStack) -> checkpoint_lib.Checkpointer | None:
  if not cfg.checkpoint.enabled:
    return None
  ckpt = checkpoint_lib.Checkpointer(workdir)
  cleanup.callback(ckpt.close)
  return ckpt


def _initial_state(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, plan: PrivacyPlan,
                   train: data_lib.Split, params, keys: checkpoint_lib.RunKeys):
  """``(tx, state, run_state)`` before any update: the noised optimizer, the replicated
  parameters and optimizer state, an empty ledger."""
  tx = optax.chain(noise.privatize(plan.l2_norm_clip or 1.0, plan.noise_multiplier,
                                   cfg.batch_size, keys.noise), make_optimizer(cfg))
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))
  run_state = checkpoint_lib.RunState(identity=run_identity(cfg, plan, train),
                                      ledger=accounting.PrivacyLedger(plan.delta,
                                                                      plan.accountant))
  return tx, state, run_state


def _compile(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, plan: PrivacyPlan,
             model, loss_fn: Callable, tx: optax.GradientTransformation, streamed: bool,
             head: models.TaskHead = models.BINARY
             ) -> tuple[step_lib.TrainStep | step_lib.StreamedStep, str]:
  """The compiled step and the per-example clipping method it uses ('ghost' or 'vmap')."""
  clipped_sum = ghost.make_clipped_sum(cfg.dp.clipping, model, loss_fn, plan.l2_norm_clip,
                                       microbatch_size=cfg.dp.microbatch_size, head=head)
  method = ghost.resolve_method(cfg.dp.clipping, model)
  logging.info("per-example clipping: %s", method)
  build = step_lib.build_streamed_chunk if streamed else step_lib.build_train_chunk
  microbatch = step_lib.padding_microbatch(cfg.padding_microbatch, method, cfg.dp.microbatch_size)
  return build(mesh, loss_fn, clipped_sum, tx, plan.l2_norm_clip, cfg.parallel.strategy,
               padding_microbatch=microbatch), method


def _make_sampler(cfg: ml_collections.ConfigDict, plan: PrivacyPlan,
                  keys: checkpoint_lib.RunKeys,
                  dev: parallel.DeviceData | None) -> sampling.PoissonSampler | None:
  """The in-memory Poisson sampler (None when the batches are streamed)."""
  if dev is None:
    return None
  return sampling.PoissonSampler(
      dev.num_examples, cfg.batch_size, keys.sampling, shard_bounds=dev.bounds,
      capacity_multiple=cfg.dp.microbatch_size,
      overflow_probability=plan.overflow_probability, sampling_rate=plan.sampling_rate)


def _make_schedule(cfg: ml_collections.ConfigDict, plan: PrivacyPlan, stop_at: int,
                   ckpt: checkpoint_lib.Checkpointer | None,
                   prof: profiling.Profiler) -> schedule_lib.Schedule:
  return schedule_lib.Schedule(
      steps_per_epoch=plan.steps_per_epoch, stop_at=stop_at,
      steps_per_call=cfg.steps_per_call, log_every=cfg.log_every_steps,
      checkpoint_every=cfg.checkpoint.every_steps if ckpt is not None else 0,
      profile_window=(prof.trace_start, prof.trace_end) if prof.enabled else None)


def _make_writer(cfg: ml_collections.ConfigDict, workdir: str, stop_at: int,
                 run_state: checkpoint_lib.RunState, step: int,
                 cleanup: contextlib.ExitStack) -> metrics_lib.MultiSink:
  """Console, metrics.jsonl (cut back to the checkpoint, so a resumed run has no duplicates)
  and TensorBoard on process 0; nothing on the others. Closed by ``cleanup`` (a progress bar
  is cleared even when the run fails)."""
  writer = metrics_lib.make_sinks(
      workdir, process_index=jax.process_index(), total_steps=stop_at,
      num_epochs=cfg.num_epochs, history=run_state.history, start_step=step)
  cleanup.callback(writer.close)
  return writer


def _attack_index(cfg: ml_collections.ConfigDict, train: data_lib.Split) -> int | None:
  """The model-inversion attack's column (None, logged, when the data has no such column)."""
  col = cfg.data.attack_column
  if col and col in train.feature_names:
    return train.feature_names.index(col)
  if col:
    logging.info("model-inversion attack skipped: no column %r in the data", col)
  return None


def setup(cfg: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack, *,
          data: tuple[data_lib.Split, data_lib.Split, parallel.DeviceData] | None = None
          ) -> Trainer:
  """Builds a :class:`Trainer` for ``cfg`` in ``workdir``, resumed from its checkpoint.

  Args:
    cfg: a validated config.
    workdir: the run's directory.
    cleanup: closes the checkpointer when the run ends.
    data: ``(train, test, device data)`` already in memory (benchmarks, notebooks), instead
      of reading ``cfg.data.path``; the device data must be placed on
      ``parallel.make_mesh()``'s mesh.
  """
  mesh = parallel.make_mesh()
  streamed = data is None and bool(cfg.data.batches)
  validation = _load_validation(cfg, given=data is not None)
  train, test, dev, n = _read_inputs(cfg, mesh, data, streamed)
  plan, stream = _plan_run(cfg, n, mesh, streamed)
  head, embeddings = _task_of(cfg, train)
  model, apply_fn, params, loss_fn = _build_model(cfg, plan, train.features.shape[1], head,
                                                  embeddings)
  # Keys, then the state they noise, then the checkpoint's state and keys if resuming.
  ckpt = _open_checkpointer(cfg, workdir, cleanup)
  keys = _resolve_keys(cfg, workdir, ckpt)
  if stream is not None:
    keys = _streamed_keys(stream, keys)
  tx, state, run_state = _initial_state(cfg, mesh, plan, train, params, keys)
  state, run_state, keys = _restore(cfg, workdir, ckpt, mesh, state, run_state, keys)
  step, stop_at = int(state.step), _stop_at(cfg, plan, run_state.ledger)
  prof = profiling.Profiler(workdir, cfg.profile_steps, first_step=step, last_step=stop_at,
                            steps_per_call=cfg.steps_per_call)
  run, method = _compile(cfg, mesh, plan, model, loss_fn, tx, streamed, head)
  private, privacy_note = release.privacy_status(
      dp_enabled=plan.enabled, noise_fixed=keys.noise_fixed, sampling_fixed=keys.sampling_fixed)
  t = Trainer(
      cfg=cfg, workdir=workdir, mesh=mesh, plan=plan, keys=keys, private=private,
      privacy_note=privacy_note, train=train, test=test, dev=dev, num_examples=n,
      apply_fn=apply_fn, run=run, clipping=method, sampler=_make_sampler(cfg, plan, keys, dev),
      stream=stream, cleanup=cleanup,
      # An audit dataset's canaries, checked (path, sha256) before the first update.
      canaries=privacy_eval.load_canaries(cfg.data.path) if data is None else None,
      # This process computes only its own devices' batches (the others' never move).
      local_shards=[k for k, d in enumerate(mesh.devices.flat)
                    if d.process_index == jax.process_index()],
      evaluate=build_eval(apply_fn, head), ckpt=ckpt, head=head, validation=validation,
      schedule=_make_schedule(cfg, plan, stop_at, ckpt, prof),
      writer=_make_writer(cfg, workdir, stop_at, run_state, step, cleanup),
      prof=prof, state=state, run_state=run_state, step=step,
      attack_idx=_attack_index(cfg, train), majority=_majority(cfg, test, streamed, head),
      preemption=preemption.Watch(enabled=ckpt is not None))
  t.writer.write(metrics_lib.CONFIG, step, json.loads(cfg.to_json_best_effort()))
  _announce(t, models.count_params(params))
  return t


# --- 2. the loop -------------------------------------------------------------------------------
def _progress(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  t.writer.write(metrics_lib.PROGRESS, t.step, metrics_lib.call_totals(m, k))


def _log_point(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  del m, k
  if t.schedule.is_log_point(t.step):
    t.writer.write(metrics_lib.EVAL, t.step, dict(t.test_metrics(), epsilon=t.epsilon()))


def _periodic_checkpoint(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  del m, k
  if t.schedule.is_checkpoint(t.step) and not t.schedule.is_epoch_end(t.step):
    t.save()


def _epoch_end(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  del m, k
  if not t.schedule.is_epoch_end(t.step):
    return
  epoch_time = time.time() - t.epoch_t0
  host_params = jax.device_get(t.state.params)
  with t.prof.phase("evaluation"):
    test = t.test_metrics()
    validation = t.validation_metrics()  # private rows held out of training
  with t.prof.phase("accounting"):
    eps = t.epsilon()
  part = t.run_state.partial
  count = max(part["count"], 1)
  record = {"epoch": (t.step - 1) // t.plan.steps_per_epoch + 1, "step": t.step,
            **test, "epsilon": eps, **validation, "epoch_time_s": epoch_time,
            release.TRAIN_LOSS: part["loss_sum"] / count,
            release.CLIPPED_FRACTION: part["clipped"] / count,
            release.NONFINITE_EXAMPLES: int(part["nonfinite"])}
  if t.attack_idx is not None and t.head.kind == "binary":  # the attack inverts P(y = 1)
    def predict_proba(x: np.ndarray) -> np.ndarray:
      return np.asarray(jax.nn.sigmoid(t.apply_fn(host_params, jnp.asarray(x))))
    record[release.ATTACK_ACCURACY] = attack.model_inversion_accuracy(
        predict_proba, t.train.features, t.train.labels, t.attack_idx,
        t.cfg.data.attack_rows, seed=t.cfg.seed)
  t.run_state = dataclasses.replace(t.run_state, history=t.run_state.history + (record,),
                                    partial=checkpoint_lib.zero_partial())
  t.writer.write(metrics_lib.EVAL, t.step, dict(test, epsilon=eps))
  t.writer.write(metrics_lib.EPOCH, t.step, record)
  t.save()
  t.epoch_t0 = time.time()


def _preempted(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  """After a SIGTERM (every process agreeing on this call): checkpoint, then stop."""
  del m, k
  if t.preemption is not None and t.preemption.requested():
    t.save()  # no second copy if an epoch end or a periodic checkpoint just saved this step
    raise preemption.Preempted(t.step, t.workdir)


HOOKS = (_progress, _log_point, _periodic_checkpoint, _epoch_end, _preempted)


def train(t: Trainer) -> None:
  """Runs the updates from ``t.step`` to the schedule's stop.

  Raises:
    preemption.Preempted: a SIGTERM arrived; the checkpoint of ``t.step`` is saved.
  """
  t.epoch_t0 = time.time()
  with t.preemption.armed() if t.preemption is not None else contextlib.nullcontext():
    while t.step < t.schedule.stop_at:
      k = t.schedule.call_length(t.step)
      metrics = t.train_call(k)
      for hook in HOOKS:
        hook(t, metrics, k)
  table = t.prof.report()  # None unless profile_steps > 0
  if table:
    say(table)


# --- 3. finalize -------------------------------------------------------------------------------
def _summary(t: Trainer) -> dict[str, Any]:
  plan, final, dp_on = t.plan, t.run_state.history[-1], t.plan.enabled
  ledger = t.run_state.ledger
  return dict(
      private=t.private, privacy_note=t.privacy_note,
      epsilon=final["epsilon"], delta=plan.delta_total if dp_on else None,
      accountant_delta=plan.delta if dp_on else None,
      overflow_probability=plan.overflow_probability if dp_on else None,
      overflow_delta=plan.overflow_delta if dp_on else None,
      delta_warning=plan.delta_warning, noise_multiplier=plan.noise_multiplier,
      l2_norm_clip=plan.l2_norm_clip, sampling_rate=plan.sampling_rate, steps=t.step,
      accountant=plan.accountant, ledger_composition=ledger.composition, dp_enabled=dp_on,
      **_task_summary(t, final),
      train_examples=t.num_examples, test_examples=len(t.test),
      batches=t.cfg.data.batches or None,
      **{release.ATTACK_ACCURACY: final.get(release.ATTACK_ACCURACY)},
      noise="fixed by dp.noise_seed" if t.keys.noise_fixed else "os entropy",
      sampling="fixed by dp.sampling_seed" if t.keys.sampling_fixed else "os entropy",
      nonprivate_note=release.NONPRIVATE_NOTE, max_epsilon=t.cfg.dp.max_epsilon,
      budget_exhausted=t.schedule.stop_at < plan.total_steps,
      privacy_ledger=[dataclasses.asdict(s) for s in ledger.segments],
      resume_overrides=[list(o) for o in t.run_state.overrides],
      data_digest=t.train.digest, num_devices=int(t.mesh.devices.size),
      num_processes=jax.process_count(), wall_time_s=time.time() - t.t_start,
      config=json.loads(t.cfg.to_json_best_effort()))


def _task_summary(t: Trainer, final: dict[str, Any]) -> dict[str, Any]:
  """The task, its test metrics and baseline, and the validation metrics of the last epoch.

  Keys: ``task``; ``test_loss`` and binary ``test_accuracy``, ``test_auc``; multiclass
  ``test_accuracy``, ``test_macro_f1``; regression ``test_rmse``, ``test_mae``; the baseline
  (``majority_class_rate`` and ``below_majority_class``, or ``baseline_rmse``,
  ``baseline_mae`` and ``below_baseline``); ``validation_*`` and ``validation_examples`` when
  there is a validation split. Every one is computed on held-out private rows, without noise.
  """
  out: dict[str, Any] = {"task": t.head.kind}
  out.update({k: v for k, v in final.items() if k.startswith(("test_", "validation_"))})
  out.update(t.majority)
  if t.head.kind == "regression":
    out["below_baseline"] = bool(final["test_rmse"] > t.majority["baseline_rmse"])
  else:
    out["below_majority_class"] = bool(final["test_accuracy"] < t.majority["majority_class_rate"])
  if t.head.kind == "multiclass":
    out["classes"] = list(t.train.task.classes)
  if t.head.kind == "regression":
    out["label_bounds"] = list(t.head.bounds or ())
  if t.validation is not None:
    out["validation_examples"] = len(t.validation)
  return out


def _result_line(summary: dict[str, Any]) -> str:
  """``test accuracy 0.8123 (majority class 0.6280)`` or ``test RMSE ... (baseline ...)``."""
  if summary["task"] == "regression":
    return (f"test RMSE {summary['test_rmse']:.4f}, MAE {summary['test_mae']:.4f} (predicting "
            f"the test mean: RMSE {summary['baseline_rmse']:.4f})")
  extra = (f", macro-F1 {summary['test_macro_f1']:.4f}" if summary["task"] == "multiclass"
           else "")
  return (f"test accuracy {summary['test_accuracy']:.4f}{extra} (majority class "
          f"{summary['majority_class_rate']:.4f})")


def _example_losses(t: Trainer, host_params: Any) -> Callable:
  """Per-example losses of the trained model (membership inference and canary audit)."""
  if t.head.kind == "binary":
    return privacy_eval.batched_losses(t.apply_fn, host_params, t.cfg.eval_batch_size)
  losses = jax.jit(lambda p, x, y: t.head.losses(t.apply_fn(p, x), y))

  def fn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    step = t.cfg.eval_batch_size
    return np.concatenate([np.asarray(losses(host_params, x[i:i + step], y[i:i + step]))
                           for i in range(0, len(y), step)] or [np.zeros(0, np.float32)])

  return fn


def _write_outputs(t: Trainer, summary: dict[str, Any], host_params: Any) -> None:
  if t.is_writer and t.cfg.export_model:
    summary["model_dir"] = export_lib.export_model(
        os.path.join(t.workdir, export_lib.MODEL_DIR), params=host_params,
        feature_names=t.train.feature_names, label_name=t.train.label_name,
        hidden_sizes=t.cfg.model.hidden_sizes, summary=summary,
        model=models.model_spec(hidden_sizes=t.cfg.model.hidden_sizes, head=t.head,
                                classes=t.train.task.classes,
                                feature_names=t.train.feature_names,
                                embeddings=_task_of(t.cfg, t.train)[1]),
        feature_spec=export_lib.dataset_feature_spec(t.cfg.data.path))  # raw-row encoding
  t.writer.write(metrics_lib.SUMMARY, t.step, summary)
  t.writer.close()
  if not t.is_writer:
    return
  # Atomic, and summary.json last: a workdir with a summary holds complete outputs.
  atomic.write_npz(os.path.join(t.workdir, "final_params.npz"),
                   models.flatten_params(host_params), mode=0o600)
  release.write_private_file(os.path.join(t.workdir, "summary.json"),
                             json.dumps(summary, indent=1, default=float))
  if not t.cfg.checkpoint.keep_keys and t.ckpt is not None:
    t.ckpt.close()
    checkpoint_lib.forget(t.workdir)


def finalize(t: Trainer) -> dict[str, Any]:
  """The summary of a trained run, with the privacy evaluation; writes the run's outputs."""
  if t.schedule.stop_at < t.plan.total_steps:
    say(f"stopped: the next update would exceed dp.max_epsilon={t.cfg.dp.max_epsilon} "
        f"(after {t.step} of {t.plan.total_steps} updates"
        f"{'; checkpoint saved' if t.ckpt is not None else ''})")
  host_params = jax.device_get(t.state.params)
  summary = _summary(t)
  # Empirical privacy: membership inference; the canary audit when the data is an audit set.
  summary["privacy_eval"], lines = privacy_eval.evaluate_privacy(
      _example_losses(t, host_params),
      train=(t.train.features, t.train.labels), test=(t.test.features, t.test.labels),
      membership_rows=t.cfg.privacy_eval.membership_rows, seed=t.cfg.seed,
      canaries=t.canaries, delta=t.plan.delta,
      epsilon=summary["epsilon"], significance=t.cfg.privacy_eval.significance)
  for line in lines:
    say(line)
  _write_outputs(t, summary, host_params)
  if summary.get("below_majority_class") or summary.get("below_baseline"):
    say(f"WARNING: {_result_line(summary)}: below the constant baseline; the model did not "
        "learn")
  if t.plan.enabled:
    say(f"done: epsilon {summary['epsilon']:.4f} at delta {t.plan.delta_total:.3g}, "
        f"private: {str(t.private).lower()}, {_result_line(summary)}")
  else:
    say(f"done (non-private): {_result_line(summary)}")
  return summary


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a model with DP-SGD as configured and writes its results into ``workdir``.

  Args:
    cfg: a config built from :func:`fastdp_jax.config.base_config` (validated here).
    workdir: output directory (created, owner-only): ``metrics.jsonl``, ``summary.json``,
      ``final_params.npz``, ``keys.json``, ``checkpoints/`` and the public ``model/``. If it
      holds a checkpoint, the run resumes from it (same parameters, noise and sampling as an
      uninterrupted run).

  Returns:
    The summary dict (also written to ``workdir/summary.json``).

  Raises:
    ConfigError: a bad config (before any work); ResumeMismatchError: the workdir's
      checkpoint belongs to a different run; WorkdirLockedError: another run uses the workdir;
      NonFiniteParametersError: the noised parameters diverged (naming the update);
      preemption.Preempted: a SIGTERM stopped the run after checkpointing (run it again to
      resume).
  """
  config_lib.validate(cfg)
  distributed.check_same_start(workdir, cfg.to_json_best_effort())  # same workdir, shared
  checkpoint_lib.check_writable(workdir)
  checkpoint_lib.check_not_forgotten(workdir)
  if jax.process_index() == 0:
    release.make_private_dir(workdir)  # everything but model/ is as private as the data
  with contextlib.ExitStack() as cleanup:
    if jax.process_index() == 0:
      lock = checkpoint_lib.WorkdirLock(workdir)
      lock.acquire()
      cleanup.callback(lock.release)
    # A full disk is one line (exit 2): every output is atomic and checkpoints are renamed
    # into place, so what was complete before stays complete.
    with atomic.disk_full_is_user_error(f"the workdir {workdir}", _KEPT):
      trainer = setup(cfg, workdir, cleanup)
      train(trainer)
      return finalize(trainer)
