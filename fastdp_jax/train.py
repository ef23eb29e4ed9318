"""DP-SGD training and evaluation: ``train_and_evaluate(config, workdir) -> summary``.

Flow of one run:

1. validate the config (before any work), load and verify the data;
2. fix the privacy parameters: q = batch_size / N, T = epochs * round(N / batch_size) updates,
   sigma given or calibrated to ``dp.target_epsilon`` with ``dp_accounting``;
3. place the training rows on the device mesh (axis ``data``; one device = a mesh of size 1)
   and compile ONE function that runs ``steps_per_call`` updates: gather each device's
   Poisson-sampled rows on device, clip per example, ``psum`` the clipped sums across the
   mesh, add noise once, update;
4. per epoch (and every ``log_every_steps`` updates): evaluate, account, attack, and hand the
   numbers to :class:`fastdp_jax.metrics.MetricWriter` (console and progress bar,
   ``metrics.jsonl``, ``steps.jsonl``, TensorBoard);
5. at the end: membership inference and, on an audit dataset, the canary audit
   (:mod:`fastdp_jax.privacy_eval`); ``summary.json``, ``final_params.npz`` and the exported
   model ``model/`` (:mod:`fastdp_jax.export`).

Host code (sampling, accounting, evaluation bookkeeping) and device code (the compiled step)
are kept apart: the jitted step never does accounting.
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

from fastdp_jax import accounting
from fastdp_jax import attack
from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax import data as data_lib
from fastdp_jax import distributed
from fastdp_jax import errors
from fastdp_jax import export as export_lib
from fastdp_jax import ghost
from fastdp_jax import metrics as metrics_lib
from fastdp_jax import models
from fastdp_jax import noise
from fastdp_jax import parallel
from fastdp_jax import profiling
from fastdp_jax import privacy_eval
from fastdp_jax import release
from fastdp_jax import sampling
from fastdp_jax import step as step_lib

@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
  """The public privacy parameters of a run (logged and written to the summary)."""

  enabled: bool
  sampling_rate: float
  steps_per_epoch: int
  total_steps: int
  l2_norm_clip: float | None
  noise_multiplier: float
  delta: float
  accountant: str
  overflow_probability: float = sampling.DEFAULT_OVERFLOW_PROBABILITY
  overflow_delta: float = 0.0
  delta_warning: str | None = None

  @property
  def delta_total(self) -> float:
    """The stated delta: the accountant's plus the union bound on any batch overflowing."""
    return self.delta + self.overflow_delta

  def epsilon(self, steps: int) -> float:
    if not self.enabled:
      return float("inf")
    return accounting.compute_epsilon(self.noise_multiplier, self.sampling_rate, steps,
                                      self.delta, self.accountant)


def plan_privacy(cfg: ml_collections.ConfigDict, num_examples: int,
                 num_devices: int = 1) -> PrivacyPlan:
  """Derives q, the number of updates, delta and sigma (calibrated to a target epsilon).

  Convention for N: q = batch_size / N and T = epochs * round(N / batch_size) treat the
  number of training rows as public, as Opacus, TF Privacy and jax_privacy do;
  ``data.public_num_examples`` derives q and T from a declared public figure instead. The
  guarantee is for adding or removing one row with q held fixed.
  """
  public_n = cfg.data.get("public_num_examples", None)
  if public_n is not None:
    num_examples = int(public_n)
  q = cfg.batch_size / num_examples
  if not 0 < q <= 1:
    raise ValueError(f"sampling rate q = batch_size / N = {cfg.batch_size} / {num_examples} ="
                     f" {q:.4g} must be in (0, 1]; lower batch_size")
  steps_per_epoch = max(1, round(num_examples / cfg.batch_size))
  total = cfg.num_epochs * steps_per_epoch
  dp = cfg.dp
  delta = release.default_delta(num_examples) if dp.get("delta") is None else float(dp.delta)
  p_over = dp.get("overflow_probability", None)
  if p_over is None:
    p_over = sampling.automatic_overflow_probability(delta, total, num_devices)
  if not dp.enabled:
    return PrivacyPlan(enabled=False, sampling_rate=q, steps_per_epoch=steps_per_epoch,
                       total_steps=total, l2_norm_clip=None, noise_multiplier=0.0,
                       delta=delta, accountant=dp.accountant, overflow_probability=p_over)
  sigma = dp.noise_multiplier
  if dp.target_epsilon is not None:
    # The target wins over a sigma inherited from the config file, so that
    # `--config.dp.target_epsilon=1` works from the command line; said aloud.
    sigma = accounting.calibrate_noise_multiplier(dp.target_epsilon, q, total, delta,
                                                  dp.accountant)
    print(f"noise multiplier calibrated to {sigma:.4f} for epsilon <= {dp.target_epsilon} "
          f"over {total} updates" + (f" (dp.noise_multiplier={dp.noise_multiplier} ignored)"
                                     if dp.noise_multiplier is not None else ""), flush=True)
  warning = None
  if delta >= 1 / num_examples:
    # A mechanism that publishes a random row outright is (0, 1/N)-DP: delta >= 1/N allows it.
    warning = (f"delta={delta:g} is not below 1/N: the guarantee allows releasing a whole "
               f"row; unset dp.delta for the default {release.default_delta(num_examples):g}")
    print(f"WARNING: {warning}", flush=True)
  return PrivacyPlan(enabled=True, sampling_rate=q, steps_per_epoch=steps_per_epoch,
                     total_steps=total, l2_norm_clip=float(dp.l2_norm_clip),
                     noise_multiplier=float(sigma), delta=delta, accountant=dp.accountant,
                     overflow_probability=p_over,
                     overflow_delta=sampling.overflow_delta(p_over, total, num_devices),
                     delta_warning=warning)


def noise_warning(plan: PrivacyPlan, num_params: int, batch_size: int,
                  target_epsilon: float | None) -> str | None:
  """A warning when the noise drowns any possible signal (the model cannot learn).

  Per update, the noise on the mean gradient has norm about sigma * C * sqrt(d) / B, and the
  mean of clipped gradients has norm at most C: their ratio sigma * sqrt(d) / B above 10
  means the noise is an order of magnitude above the largest possible signal.
  """
  if not plan.enabled:
    return None
  ratio = plan.noise_multiplier * np.sqrt(num_params) / batch_size
  if ratio <= 10:
    return None
  why = (f" (calibrated to dp.target_epsilon={target_epsilon})"
         if target_epsilon is not None else "")
  return (f"noise multiplier {plan.noise_multiplier:.4g}{why}: the noise norm per update is "
          f"{ratio:.3g} times the largest possible mean clipped gradient; the model is "
          "unlikely to learn. Raise the target epsilon, the batch size or lower the number "
          "of updates")


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = cfg.optimizer
  if o.name == "sgd":
    return optax.sgd(o.learning_rate, momentum=o.momentum or None)
  return optax.adam(o.learning_rate)


def build_eval(apply_fn: Callable) -> Callable:
  @jax.jit
  def evaluate(params, x, y, mask):
    logits = apply_fn(params, x)
    losses = optax.sigmoid_binary_cross_entropy(logits, y)
    correct = (logits > 0) == (y > 0.5)
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct & mask)
  return evaluate


def evaluate_split(evaluate: Callable, params, x: np.ndarray, y: np.ndarray,
                   chunk: int) -> tuple[float, float]:
  """Mean loss and accuracy over a split, in fixed-size padded chunks (one compilation)."""
  chunk = min(chunk, len(y))
  loss, correct = 0.0, 0
  for lo in range(0, len(y), chunk):
    xb, yb = x[lo:lo + chunk], y[lo:lo + chunk]
    n = len(yb)
    mask = np.arange(chunk) < n
    if n < chunk:
      xb = np.concatenate([xb, np.zeros((chunk - n, x.shape[1]), x.dtype)])
      yb = np.concatenate([yb, np.zeros((chunk - n,), y.dtype)])
    l, c = evaluate(params, xb, yb, mask)
    loss += float(l)
    correct += int(c)
  return loss / len(y), correct / len(y)



def run_identity(cfg: ml_collections.ConfigDict, plan: PrivacyPlan,
                 train: data_lib.Split) -> dict[str, Any]:
  """What a resumed run must share with its checkpoint (privacy, model, data, sampling)."""
  return dict(dp_enabled=plan.enabled, noise_multiplier=plan.noise_multiplier,
              l2_norm_clip=plan.l2_norm_clip, sampling_rate=plan.sampling_rate,
              batch_size=cfg.batch_size, delta=plan.delta, accountant=plan.accountant,
              model_hidden_sizes=list(cfg.model.hidden_sizes),
              num_features=int(train.features.shape[1]), data_digest=train.digest,
              seed=cfg.seed, sampling_seed=cfg.dp.get("sampling_seed", None),
              noise_seed=cfg.dp.noise_seed, optimizer=cfg.optimizer.to_dict())


def draw_keys(cfg: ml_collections.ConfigDict) -> checkpoint_lib.RunKeys:
  """The run's sampling and noise keys: OS entropy on process 0, broadcast to every process."""
  skey, sfixed = sampling.sampling_key(cfg.dp.get("sampling_seed", None))
  nkey, nfixed = noise.noise_key(cfg.dp.noise_seed)
  # uint32 words: JAX without x64 would truncate uint64 in the broadcast.
  words = distributed.broadcast_from_process_0(np.concatenate([skey.view(np.uint32), nkey]))
  words = np.asarray(words, np.uint32)
  return checkpoint_lib.RunKeys(sampling=words[:4].copy().view(np.uint64), noise=words[4:].copy(),
                                sampling_fixed=sfixed, noise_fixed=nfixed)


def fresh_noise_key(keys: checkpoint_lib.RunKeys) -> checkpoint_lib.RunKeys:
  """The same keys with a new noise key (entropy unless the noise seed is fixed)."""
  if keys.noise_fixed:
    # Reproducibility run: a deterministic but different key for the redone updates.
    nkey = np.random.SeedSequence([int(w) for w in keys.noise] + [1]).generate_state(4, np.uint32)
  else:
    nkey = noise.noise_key(None)[0]
  nkey = np.asarray(distributed.broadcast_from_process_0(nkey), np.uint32)
  return dataclasses.replace(keys, noise=nkey)


def _zero_partial() -> dict[str, float]:
  return dict(loss_sum=0.0, count=0.0, clipped=0.0, nonfinite=0.0)


def _ledger_add(ledger: list[dict], plan: PrivacyPlan, steps: int) -> list[dict]:
  segments = [checkpoint_lib.Segment(**s) for s in ledger]
  segments = checkpoint_lib.add_steps(segments, plan.noise_multiplier, plan.sampling_rate, steps)
  return [dataclasses.asdict(s) for s in segments]


def _ledger_eps(meta: dict[str, Any], plan: PrivacyPlan) -> float:
  if not plan.enabled:
    return float("inf")
  return checkpoint_lib.ledger_epsilon([checkpoint_lib.Segment(**s) for s in meta["ledger"]],
                                       plan.delta, plan.accountant)


def budget_stop_step(plan: PrivacyPlan, meta: dict[str, Any], max_epsilon: float | None) -> int:
  """The last update count whose epsilon stays within ``max_epsilon`` (binary search)."""
  done = sum(s["steps"] for s in meta["ledger"])
  if max_epsilon is None or not plan.enabled:
    return plan.total_steps

  def eps_at(total: int) -> float:
    return _ledger_eps(dict(ledger=_ledger_add(meta["ledger"], plan, total - done)), plan)

  if eps_at(plan.total_steps) <= max_epsilon:
    return plan.total_steps
  lo, hi = done, plan.total_steps  # eps_at(lo) <= cap (or lo == done), eps_at(hi) > cap
  if eps_at(lo) > max_epsilon:
    return done
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if eps_at(mid) <= max_epsilon else (lo, mid)
  return lo


class NonFiniteParametersError(errors.UserError):
  """The noised parameters became non-finite (a diverging optimizer, not one row)."""


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


def _write_json(path: str, obj: Any) -> None:
  release.write_private_file(path, json.dumps(obj, indent=1, default=float))


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a model with DP-SGD as configured and writes its results into ``workdir``.

  Args:
    cfg: a config built from :func:`fastdp_jax.config.base_config` (validated here).
    workdir: output directory (created): ``metrics.jsonl``, ``summary.json``,
      ``final_params.npz`` and ``checkpoints/``. If it holds a checkpoint, the run resumes
      from it (same parameters, noise and sampling as an uninterrupted run).

  Returns:
    The summary dict (also written to ``workdir/summary.json``).

  Raises:
    ValueError: a bad config (before any work); ResumeMismatchError: the workdir's
      checkpoint belongs to a different run; WorkdirLockedError: another run uses the workdir;
      FloatingPointError: a non-finite loss or gradient (naming the update).
  """
  config_lib.validate(cfg)
  checkpoint_lib.check_writable(workdir)
  checkpoint_lib.check_not_forgotten(workdir)
  if jax.process_index() == 0:
    release.make_private_dir(workdir)  # everything but model/ is as private as the data
  with contextlib.ExitStack() as cleanup:
    if jax.process_index() == 0:
      lock = checkpoint_lib.WorkdirLock(workdir)
      lock.acquire()
      cleanup.callback(lock.release)
    return _train_and_evaluate(cfg, workdir, cleanup)


def _train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                        cleanup: contextlib.ExitStack) -> dict[str, Any]:
  t_start = time.time()
  # Each process reads only its training shards (balanced by rows) and holds only its part,
  # on its devices of the global mesh; N is the global row count.
  mesh = parallel.make_mesh()
  train, dev = parallel.load_training_data(mesh, cfg.data.path,
                                           verify_checksum=cfg.data.verify_checksums,
                                           feature_bounds=cfg.data.feature_bounds)
  distributed.check_same_on_all_processes("config and data",
                                          (cfg.to_json_best_effort(), train.digest))
  test = data_lib.load_split(cfg.data.path, "test", verify_checksum=cfg.data.verify_checksums,
                             feature_bounds=cfg.data.feature_bounds)
  if train.features.shape[1] != test.features.shape[1]:
    raise data_lib.ShardError(f"{cfg.data.path}: train has {train.features.shape[1]} features,"
                              f" test {test.features.shape[1]}")
  n = dev.num_examples
  plan = plan_privacy(cfg, n, num_devices=int(mesh.devices.size))
  is_writer = jax.process_index() == 0

  # cfg.seed initialises the model and nothing else: the batches and the noise come from
  # secret keys (OS entropy, unless dp.sampling_seed / dp.noise_seed fix them).
  model = models.create_model(train.features.shape[1], cfg.model.hidden_sizes, cfg.seed)
  if plan.enabled:
    models.check_dp_compatible(model)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  if warning := noise_warning(plan, models.count_params(params), cfg.batch_size,
                              cfg.dp.target_epsilon):
    print(f"WARNING: {warning}", flush=True)
  ckpt = checkpoint_lib.Checkpointer(workdir) if cfg.checkpoint.enabled else None
  if ckpt is not None:
    cleanup.callback(ckpt.close)
  resuming = ckpt is not None and ckpt.latest_step() is not None
  keys = checkpoint_lib.load_keys(workdir) if resuming else None
  if resuming and keys is None:
    raise checkpoint_lib.ResumeMismatchError(
        f"workdir {workdir} holds checkpoints but no {checkpoint_lib.KEYS_FILE}: the run "
        "cannot be resumed without its keys; use another --workdir")
  if keys is None:
    keys = draw_keys(cfg)
    if is_writer and ckpt is not None:
      checkpoint_lib.save_keys(workdir, keys)
  private, privacy_note = release.privacy_status(
      dp_enabled=plan.enabled, noise_fixed=keys.noise_fixed, sampling_fixed=keys.sampling_fixed)
  if privacy_note and plan.enabled:
    print(f"WARNING: private: false: {privacy_note}", flush=True)
  tx = optax.chain(
      noise.privatize(plan.l2_norm_clip or 1.0, plan.noise_multiplier, cfg.batch_size,
                      keys.noise),
      make_optimizer(cfg))

  sampler = sampling.PoissonSampler(n, cfg.batch_size, keys.sampling, shard_bounds=dev.bounds,
                                    capacity_multiple=cfg.dp.microbatch_size,
                                    overflow_probability=plan.overflow_probability,
                                    sampling_rate=plan.sampling_rate)
  # This process computes only its own devices' batches (the others' are never transferred).
  local_shards = [k for k, d in enumerate(mesh.devices.flat)
                  if d.process_index == jax.process_index()]
  clipped_sum = ghost.make_clipped_sum(cfg.dp.clipping, model, loss_fn, plan.l2_norm_clip,
                                       microbatch_size=cfg.dp.microbatch_size)
  logging.info("per-example clipping: %s", ghost.resolve_method(cfg.dp.clipping, model))
  run = step_lib.build_train_chunk(mesh, loss_fn, clipped_sum, tx, plan.l2_norm_clip,
                                   cfg.parallel.strategy)
  evaluate = build_eval(apply_fn)
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))

  majority = float(max(test.labels.mean(), 1 - test.labels.mean()))
  attack_col = cfg.data.attack_column
  attack_idx = (train.feature_names.index(attack_col)
                if attack_col and attack_col in train.feature_names else None)
  if attack_col and attack_idx is None:
    logging.info("model-inversion attack skipped: no column %r in the data", attack_col)
  logging.info("train rows %d, test rows %d, features %d, devices %d, params %d", n, len(test),
               train.features.shape[1], mesh.devices.size, models.count_params(params))
  print(f"DP-SGD: q={plan.sampling_rate:.6g} sigma={plan.noise_multiplier:.4g} "
        f"C={plan.l2_norm_clip} updates={plan.total_steps} ({plan.steps_per_epoch}/epoch) "
        f"delta={plan.delta_total:.3g} accountant={plan.accountant} "
        f"devices={mesh.devices.size} capacity/device={sampler.capacity} private={private}"
        if plan.enabled else
        f"non-private SGD: updates={plan.total_steps} devices={mesh.devices.size}", flush=True)

  # Resume from the workdir alone: the latest checkpoint carries the state (noise key and
  # counter included), the accountant's ledger and the metrics so far.
  identity = run_identity(cfg, plan, train)
  meta: dict[str, Any] = dict(identity=identity, ledger=[], history=[],
                              partial=_zero_partial(), overrides=[])
  if resuming:
    saved = ckpt.restore_metadata()
    diffs = checkpoint_lib.compare_identity(saved["identity"], identity)
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
      if is_writer:
        checkpoint_lib.save_keys(workdir, keys)
    state = dataclasses.replace(state, opt_state=noise.with_key(state.opt_state, keys.noise))
    state = parallel.replicate(mesh, jax.device_get(state))
    meta = dict(saved, identity=identity,
                overrides=saved["overrides"] + ([diffs] if diffs else []))
    print(f"resumed from {ckpt.directory} at update {int(state.step)} "
          f"(epsilon so far {_ledger_eps(meta, plan):.4f})", flush=True)
  step = int(state.step)
  stop_at = budget_stop_step(plan, meta, cfg.dp.max_epsilon)
  if stop_at < plan.total_steps:
    print(f"privacy budget: dp.max_epsilon={cfg.dp.max_epsilon} allows {stop_at} of "
          f"{plan.total_steps} updates", flush=True)

  # Console, metrics.jsonl (rewritten from the checkpoint's records, so a resumed run has no
  # duplicates), steps.jsonl and TensorBoard; only process 0 writes.
  writer = metrics_lib.MetricWriter(workdir, total_steps=stop_at, num_epochs=cfg.num_epochs,
                                    log_every_steps=cfg.log_every_steps, enabled=is_writer,
                                    history=meta["history"], start_step=step)
  writer.write_hparams(json.loads(cfg.to_json_best_effort()))
  eps_curve = metrics_lib.EpsilonCurve(plan.noise_multiplier if plan.enabled else 0.0,
                                       plan.sampling_rate, plan.delta, plan.accountant)

  def epsilon_now() -> float:
    # One (sigma, q) segment: the cached curve (bit-identical to the accountant, several times
    # faster); a resumed run that changed sigma or q composes its whole ledger.
    return eps_curve(step) if len(meta["ledger"]) == 1 else _ledger_eps(meta, plan)
  chunk = cfg.steps_per_call
  last_save = step

  def save():
    if ckpt is not None:  # the noise key stays out of the arrays: it is in keys.json
      ckpt.save(step, dataclasses.replace(state, opt_state=noise.without_key(state.opt_state)),
                meta)

  prof = profiling.Profiler(workdir, cfg.profile_steps, first_step=step, last_step=stop_at,
                            steps_per_call=chunk)
  while step < stop_at:
    epoch = step // plan.steps_per_epoch + 1
    t0 = time.time()
    part = meta["partial"]
    epoch_end = min(epoch * plan.steps_per_epoch, stop_at)
    while step < epoch_end:
      k = min(chunk, epoch_end - step, writer.steps_to_next_log(step))
      k = prof.call_length(step, k)  # when profiling, calls end at the traced window's edges
      with prof.phase("sampling"):
        batches = sampler.batches(step, k, shards=local_shards)
        pad = chunk - k
        idx = np.pad(batches.indices, ((0, pad), (0, 0), (0, 0)))
        msk = np.pad(batches.mask, ((0, pad), (0, 0), (0, 0)))
        active = np.arange(chunk) < k
      with prof.phase("data transfer"):
        inputs = prof.sync(run.place(idx, msk, active))
      prof.before_call(step)
      with prof.phase("step"):
        state, m = run(state, dev.features, dev.labels, *inputs)
        m = jax.device_get(m)
      prof.after_call(step + k, state)
      check_finite(m, step, k)
      for name in part:
        part[name] += float(m[name][:k].sum())
      meta["ledger"] = _ledger_add(meta["ledger"], plan, k)
      step += k
      writer.write_train_steps(step - k, m, k)
      if writer.log_due(step) and step < epoch_end:  # epoch ends are logged below
        point = evaluate_split(evaluate, jax.device_get(state.params), test.features,
                               test.labels, cfg.eval_batch_size)
        writer.write_point(step, dict(test_loss=point[0], test_accuracy=point[1],
                                      epsilon=epsilon_now()))
      if ckpt is not None and step - last_save >= cfg.checkpoint.every_steps:
        save()
        last_save = step
    host_params = jax.device_get(state.params)
    train_time = time.time() - t0
    with prof.phase("evaluation"):
      test_loss, test_acc = evaluate_split(evaluate, host_params, test.features, test.labels,
                                           cfg.eval_batch_size)
    with prof.phase("accounting"):
      eps = epsilon_now()
    count = max(part["count"], 1)
    record = {"epoch": epoch, "step": step, "test_loss": test_loss,
              "test_accuracy": test_acc, "epsilon": eps, "epoch_time_s": train_time,
              release.TRAIN_LOSS: part["loss_sum"] / count,
              release.CLIPPED_FRACTION: part["clipped"] / count,
              release.NONFINITE_EXAMPLES: int(part["nonfinite"])}
    if attack_idx is not None:
      def predict_proba(x: np.ndarray, p=host_params) -> np.ndarray:  # this epoch's params
        return np.asarray(jax.nn.sigmoid(apply_fn(p, jnp.asarray(x))))
      record[release.ATTACK_ACCURACY] = attack.model_inversion_accuracy(
          predict_proba, train.features, train.labels, attack_idx, cfg.data.attack_rows,
          seed=cfg.seed)
    meta["history"].append(record)
    meta["partial"] = _zero_partial()
    writer.write_point(step, dict(test_loss=test_loss, test_accuracy=test_acc, epsilon=eps))
    writer.write_epoch(record)
    save()
    last_save = step

  table = prof.report()  # None unless profile_steps > 0
  if table:
    print(table, flush=True)
  budget_exhausted = stop_at < plan.total_steps
  if budget_exhausted:
    print(f"stopped: the next update would exceed dp.max_epsilon={cfg.dp.max_epsilon} "
          f"(after {step} of {plan.total_steps} updates; checkpoint saved)", flush=True)
  host_params = jax.device_get(state.params)
  final = meta["history"][-1]
  summary = dict(
      private=private, privacy_note=privacy_note,
      epsilon=final["epsilon"], delta=plan.delta_total if plan.enabled else None,
      accountant_delta=plan.delta if plan.enabled else None,
      overflow_probability=plan.overflow_probability if plan.enabled else None,
      overflow_delta=plan.overflow_delta if plan.enabled else None,
      delta_warning=plan.delta_warning,
      noise_multiplier=plan.noise_multiplier, l2_norm_clip=plan.l2_norm_clip,
      sampling_rate=plan.sampling_rate, steps=step, accountant=plan.accountant,
      ledger_composition="rdp (adaptive)" if len(meta["ledger"]) > 1 else plan.accountant,
      dp_enabled=plan.enabled, test_accuracy=final["test_accuracy"],
      test_loss=final["test_loss"], majority_class_rate=majority,
      below_majority_class=bool(final["test_accuracy"] < majority), train_examples=n,
      test_examples=len(test), **{release.ATTACK_ACCURACY: final.get(release.ATTACK_ACCURACY)},
      noise="fixed by dp.noise_seed" if keys.noise_fixed else "os entropy",
      sampling="fixed by dp.sampling_seed" if keys.sampling_fixed else "os entropy",
      nonprivate_note=release.NONPRIVATE_NOTE, max_epsilon=cfg.dp.max_epsilon,
      budget_exhausted=budget_exhausted, privacy_ledger=meta["ledger"],
      resume_overrides=meta["overrides"],
      data_digest=train.digest, num_devices=int(mesh.devices.size),
      num_processes=jax.process_count(), wall_time_s=time.time() - t_start,
      config=json.loads(cfg.to_json_best_effort()))
  # Empirical privacy: membership inference; the canary audit when the data is an audit set.
  summary["privacy_eval"], lines = privacy_eval.evaluate_privacy(
      privacy_eval.batched_losses(apply_fn, host_params, cfg.eval_batch_size),
      train=(train.features, train.labels), test=(test.features, test.labels),
      membership_rows=cfg.privacy_eval.membership_rows, seed=cfg.seed,
      canaries=privacy_eval.load_canaries(cfg.data.path), delta=plan.delta,
      epsilon=summary["epsilon"], significance=cfg.privacy_eval.significance)
  for line in lines:
    writer.print(line)
  if is_writer and cfg.export_model:
    summary["model_dir"] = export_lib.export_model(
        os.path.join(workdir, export_lib.MODEL_DIR), params=host_params,
        feature_names=train.feature_names, label_name=train.label_name,
        hidden_sizes=cfg.model.hidden_sizes, summary=summary)
  writer.write_summary(summary)
  writer.close()
  if is_writer:
    _write_json(os.path.join(workdir, "summary.json"), summary)
    params_path = os.path.join(workdir, "final_params.npz")
    tmp = params_path + ".tmp.npz"
    # type: ignore: numpy's stub fears that a ** dict sets allow_pickle.
    np.savez(tmp, **{k: np.asarray(v)  # type: ignore[arg-type]
                     for k, v in models.flatten_params(host_params).items()})
    os.replace(tmp, params_path)
    if not cfg.checkpoint.get("keep_keys", True) and ckpt is not None:
      ckpt.close()
      checkpoint_lib.forget(workdir)
  if summary["below_majority_class"]:
    print(f"WARNING: test accuracy {summary['test_accuracy']:.4f} is below the majority-class "
          f"rate {majority:.4f}: the model did not learn", flush=True)
  if plan.enabled:
    print(f"done: epsilon {summary['epsilon']:.4f} at delta {plan.delta_total:.3g}, "
          f"private: {str(private).lower()}, test accuracy "
          f"{summary['test_accuracy']:.4f} (majority class {majority:.4f})", flush=True)
  else:
    print(f"done (non-private): test accuracy {summary['test_accuracy']:.4f} "
          f"(majority class {majority:.4f})", flush=True)
  return summary
