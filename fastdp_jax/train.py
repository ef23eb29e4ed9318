"""DP-SGD training and evaluation: ``train_and_evaluate(config, workdir) -> summary``.

Flow of one run:

1. validate the config (before any work), load and verify the data;
2. fix the privacy parameters: q = batch_size / N, T = epochs * round(N / batch_size) updates,
   sigma given or calibrated to ``dp.target_epsilon`` with ``dp_accounting``;
3. place the training rows on the device mesh (axis ``data``; one device = a mesh of size 1)
   and compile ONE function that runs ``steps_per_call`` updates: gather each device's
   Poisson-sampled rows on device, clip per example, ``psum`` the clipped sums across the
   mesh, add noise once, update;
4. per epoch: evaluate, account, attack, and write a line to the console and
   ``metrics.jsonl``; at the end ``summary.json`` and ``final_params.npz``.

Host code (sampling, accounting, evaluation bookkeeping) and device code (the compiled step)
are kept apart: the jitted step never does accounting.
"""

from __future__ import annotations

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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fastdp_jax import accounting
from fastdp_jax import attack
from fastdp_jax import clipping
from fastdp_jax import config as config_lib
from fastdp_jax import data as data_lib
from fastdp_jax import models
from fastdp_jax import noise
from fastdp_jax import parallel
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

  def epsilon(self, steps: int) -> float:
    if not self.enabled:
      return float("inf")
    return accounting.compute_epsilon(self.noise_multiplier, self.sampling_rate, steps,
                                      self.delta, self.accountant)


def plan_privacy(cfg: ml_collections.ConfigDict, num_examples: int) -> PrivacyPlan:
  """Derives q, the number of updates and sigma (calibrated if a target epsilon is given)."""
  q = cfg.batch_size / num_examples
  if not 0 < q <= 1:
    raise ValueError(f"sampling rate q = batch_size / N = {cfg.batch_size} / {num_examples} ="
                     f" {q:.4g} must be in (0, 1]; lower batch_size")
  steps_per_epoch = max(1, round(num_examples / cfg.batch_size))
  total = cfg.num_epochs * steps_per_epoch
  dp = cfg.dp
  if not dp.enabled:
    return PrivacyPlan(enabled=False, sampling_rate=q, steps_per_epoch=steps_per_epoch,
                       total_steps=total, l2_norm_clip=None, noise_multiplier=0.0,
                       delta=dp.delta, accountant=dp.accountant)
  sigma = dp.noise_multiplier
  if sigma is None:
    sigma = accounting.calibrate_noise_multiplier(dp.target_epsilon, q, total, dp.delta,
                                                  dp.accountant)
  if dp.delta >= 1 / num_examples:
    logging.warning("delta=%g is not below 1/N=%g: the guarantee is weak", dp.delta,
                    1 / num_examples)
  return PrivacyPlan(enabled=True, sampling_rate=q, steps_per_epoch=steps_per_epoch,
                     total_steps=total, l2_norm_clip=float(dp.l2_norm_clip),
                     noise_multiplier=float(sigma), delta=dp.delta, accountant=dp.accountant)


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



def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(tmp, path)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a model with DP-SGD as configured and writes its results into ``workdir``.

  Args:
    cfg: a config built from :func:`fastdp_jax.config.base_config` (validated here).
    workdir: output directory (created): ``metrics.jsonl``, ``summary.json``,
      ``final_params.npz``.

  Returns:
    The summary dict (also written to ``workdir/summary.json``).
  """
  config_lib.validate(cfg)
  t_start = time.time()
  train = data_lib.load_split(cfg.data.path, "train", verify_checksum=cfg.data.verify_checksums)
  test = data_lib.load_split(cfg.data.path, "test", verify_checksum=cfg.data.verify_checksums)
  if train.features.shape[1] != test.features.shape[1]:
    raise data_lib.ShardError(f"{cfg.data.path}: train has {train.features.shape[1]} features,"
                              f" test {test.features.shape[1]}")
  n = len(train)
  plan = plan_privacy(cfg, n)
  os.makedirs(workdir, exist_ok=True)
  is_writer = jax.process_index() == 0

  model = models.create_model(train.features.shape[1], cfg.model.hidden_sizes, cfg.seed)
  if plan.enabled:
    models.check_dp_compatible(model)
  apply_fn, params = models.functional(model)
  loss_fn = models.example_loss(apply_fn)
  key, deterministic = noise.noise_key(cfg.dp.noise_seed)
  tx = optax.chain(
      noise.privatize(plan.l2_norm_clip or 1.0, plan.noise_multiplier, cfg.batch_size, key),
      make_optimizer(cfg))

  mesh = parallel.make_mesh()
  dev = parallel.place_training_data(mesh, train.features, train.labels)
  sampler = sampling.PoissonSampler(n, cfg.batch_size, cfg.seed, shard_bounds=dev.bounds)
  clipped_sum = step_lib.vmap_clipped_sum(loss_fn, plan.l2_norm_clip, cfg.dp.microbatch_size)
  run = step_lib.build_train_chunk(mesh, loss_fn, clipped_sum, tx, plan.l2_norm_clip)
  evaluate = build_eval(apply_fn)
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(step_lib.State(params=params, opt_state=tx.init(params),
                               step=jnp.zeros((), jnp.int32)), replicated)

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
        f"delta={plan.delta:g} accountant={plan.accountant} devices={mesh.devices.size} "
        f"capacity/device={sampler.capacity}" if plan.enabled else
        f"non-private SGD: updates={plan.total_steps} devices={mesh.devices.size}", flush=True)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_writer:
    open(metrics_path, "w").close()
  chunk = cfg.steps_per_call
  history = []
  step = 0
  for epoch in range(1, cfg.num_epochs + 1):
    t0 = time.time()
    loss_sum = count = clipped = nonfinite = 0.0
    epoch_end = epoch * plan.steps_per_epoch
    while step < epoch_end:
      k = min(chunk, epoch_end - step)
      batches = sampler.batches(step, k)
      pad = chunk - k
      idx = np.pad(batches.indices, ((0, pad), (0, 0), (0, 0)))
      msk = np.pad(batches.mask, ((0, pad), (0, 0), (0, 0)))
      active = np.arange(chunk) < k
      state, m = run(state, dev.features, dev.labels, idx, msk, active)
      m = jax.device_get(m)
      step_losses = m["loss_sum"][:k]
      bad = np.flatnonzero(~np.isfinite(step_losses))
      if bad.size:
        raise FloatingPointError(f"non-finite training loss at step {step + int(bad[0]) + 1}; "
                                 "lower the learning rate or check the data")
      loss_sum += float(step_losses.sum())
      count += float(m["count"][:k].sum())
      clipped += float(m["clipped"][:k].sum())
      nonfinite += float(m["nonfinite"][:k].sum())
      step += k
    host_params = jax.device_get(state.params)
    train_time = time.time() - t0
    test_loss, test_acc = evaluate_split(evaluate, host_params, test.features, test.labels,
                                         cfg.eval_batch_size)
    eps = plan.epsilon(step)
    record = dict(epoch=epoch, step=step, train_loss=loss_sum / max(count, 1),
                  test_loss=test_loss, test_accuracy=test_acc, epsilon=eps,
                  clipped_fraction=clipped / max(count, 1), nonfinite_examples=int(nonfinite),
                  epoch_time_s=train_time)
    if attack_idx is not None:
      record["attack_accuracy"] = attack.model_inversion_accuracy(
          lambda x: jax.nn.sigmoid(apply_fn(host_params, x)), train.features, train.labels,
          attack_idx, cfg.data.attack_rows, seed=cfg.seed)
    history.append(record)
    if is_writer:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"epoch {epoch}/{cfg.num_epochs}  train_loss {record['train_loss']:.4f}  "
          f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  epsilon {eps:.4f}"
          + (f"  attack_acc {record['attack_accuracy']:.4f}" if attack_idx is not None else "")
          + f"  time {train_time:.1f}s", flush=True)

  final = history[-1]
  summary = dict(
      epsilon=final["epsilon"], delta=plan.delta if plan.enabled else None,
      noise_multiplier=plan.noise_multiplier, l2_norm_clip=plan.l2_norm_clip,
      sampling_rate=plan.sampling_rate, steps=step, accountant=plan.accountant,
      dp_enabled=plan.enabled, test_accuracy=final["test_accuracy"],
      test_loss=final["test_loss"], majority_class_rate=majority, train_examples=n,
      test_examples=len(test), attack_accuracy=final.get("attack_accuracy"),
      noise_key="deterministic (dp.noise_seed)" if deterministic else "os entropy",
      data_digest=train.digest, num_devices=int(mesh.devices.size),
      num_processes=jax.process_count(), wall_time_s=time.time() - t_start,
      config=json.loads(cfg.to_json_best_effort()))
  if is_writer:
    _write_json(os.path.join(workdir, "summary.json"), summary)
    np.savez(os.path.join(workdir, "final_params.npz"),
             **{k: np.asarray(v) for k, v in models.flatten_params(host_params).items()})
  if plan.enabled:
    print(f"done: epsilon {summary['epsilon']:.4f} at delta {plan.delta:g}, test accuracy "
          f"{summary['test_accuracy']:.4f} (majority class {majority:.4f})", flush=True)
  else:
    print(f"done (non-private): test accuracy {summary['test_accuracy']:.4f} "
          f"(majority class {majority:.4f})", flush=True)
  return summary
