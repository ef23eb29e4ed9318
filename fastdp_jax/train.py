"""DP-SGD training and evaluation: ``train_and_evaluate(config, workdir) -> RunSummary``.

A run in three sections, each a call into the module that owns the work:

1. :func:`setup` turns the config into typed settings once (:func:`fastdp_jax.config.settings`)
   and returns a :class:`Trainer`: the rows (:mod:`fastdp_jax.inputs`), the privacy plan
   (:mod:`fastdp_jax.dp.plan`), the secret keys, the compiled step (:mod:`fastdp_jax.step`), the
   checkpoint it resumes from, the schedule of events and the sinks.
2. :func:`train` asks the schedule for each compiled call's length, runs the call
   (:meth:`Trainer.train_call`), then calls the hooks: progress, logging points, periodic
   checkpoints, epoch ends, preemption.
3. :func:`finalize` builds the :class:`~fastdp_jax.summary.RunSummary`, runs the privacy
   evaluation, writes ``summary.json``, ``final_params.npz`` and the exported model ``model/``.

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
import ml_collections
import numpy as np
from absl import logging

from fastdp_jax import atomic
from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax import distributed
from fastdp_jax import metrics as evaluate_lib
from fastdp_jax import feed
from fastdp_jax import inputs
from fastdp_jax import models
from fastdp_jax import parallel
from fastdp_jax import preemption
from fastdp_jax import records
from fastdp_jax import resume
from fastdp_jax import services as services_lib
from fastdp_jax import step as step_lib
from fastdp_jax import summary as summary_lib
from fastdp_jax import console
from fastdp_jax.console import say
from fastdp_jax.dp import attack
from fastdp_jax.dp import calibration
from fastdp_jax.dp import count as count_lib
from fastdp_jax.dp import keys as keys_lib
from fastdp_jax.dp import noise
from fastdp_jax.dp import plan as plan_lib
from fastdp_jax.dp import privacy_eval
from fastdp_jax.dp import release
from fastdp_jax.export import layout as export_layout
from fastdp_jax.export import model_dir as export_lib

# What a full disk leaves (outputs are atomic, checkpoints renamed into place).
_KEPT = "the last checkpoint and every complete output are intact (the same command resumes)"


# --- the trainer's typed parts ---------------------------------------------------------------
@dataclasses.dataclass(kw_only=True, eq=False)
class Compiled:
  """The device side: the mesh, the compiled step and the model's functions."""
  mesh: jax.sharding.Mesh
  run: step_lib.TrainStep | step_lib.StreamedStep
  clipping: str  # the per-example clipping method the step uses: 'ghost' or 'vmap'
  apply_fn: Any
  evaluate: Any  # evaluate_lib.build_eval's function


@dataclasses.dataclass(kw_only=True, eq=False)
class Trainer:
  """Everything a run needs, built once by :func:`setup`; ``progress`` advances each call.

  Attributes:
    config: the run's validated settings.
    workdir: the run's directory.
    plan: the public privacy parameters.
    private: whether the run's (epsilon, delta) is a guarantee; ``privacy_note`` says why not.
    data: the rows, the task and its baseline.
    batches: the sampler or the materialised batches.
    compiled: the mesh and the compiled step.
    progress: the parameters, optimizer and run state, the update count and the keys.
    services: checkpoints, schedule, sinks, profiler, preemption.
  """
  config: config_lib.RunConfig
  workdir: str
  plan: plan_lib.PrivacyPlan
  private: bool
  privacy_note: str | None
  data: inputs.RunData
  batches: feed.Batches
  compiled: Compiled
  progress: resume.Progress
  services: services_lib.Services

  @property
  def step(self) -> int:
    """Updates done so far."""
    return self.progress.step

  @property
  def is_writer(self) -> bool:
    return jax.process_index() == 0

  def epsilon(self) -> float:
    """Epsilon of the updates so far (inf when DP is off)."""
    return self.progress.run_state.ledger.epsilon() if self.plan.enabled else float("inf")

  def train_call(self, k: int) -> dict[str, np.ndarray]:
    """Runs ``k`` updates in one compiled call; returns their per-update metrics."""
    prof, p, run, s = self.services.prof, self.progress, self.compiled.run, self.services
    if isinstance(run, step_lib.StreamedStep):
      placed = self.batches.streamed(run, self.compiled.mesh, p.step, k, s.schedule.stop_at,
                                     prof, s.cleanup)
    else:
      placed = self.batches.sampled(run, self.data.dev, p.step, k, prof)
    prof.before_call(p.step)
    with prof.phase("step"):
      p.state, m = self.compiled.run(p.state, *placed)
      m = jax.device_get(m)
    prof.after_call(p.step + k, p.state)
    step_lib.check_finite(m, p.step, k)
    rs = p.run_state
    p.run_state = dataclasses.replace(
        rs, partial={name: v + float(m[name][:k].sum()) for name, v in rs.partial.items()},
        ledger=rs.ledger.add(self.plan.noise_multiplier, self.plan.sampling_rate, k))
    p.step += k
    return m

  def split_metrics(self, prefix: str) -> dict[str, float]:
    """The task's metrics on the test rows (``prefix='test'``; streamed from disk with
    materialised batches) or on the validation rows (``'validation'``; empty without them)."""
    params = jax.device_get(self.progress.state.params)
    if prefix == "validation":
      v = self.data.validation
      if v is None or not len(v):
        return {}
      return evaluate_lib.split_metrics_of(self.compiled.evaluate, params, self.data.head,
                                           prefix, rows=v, chunk=self.config.eval_batch_size)
    return evaluate_lib.split_metrics_of(self.compiled.evaluate, params, self.data.head, prefix,
                                         rows=self.data.test,
                                         streamed_from=self.data.streamed_from,
                                         chunk=self.config.eval_batch_size)

  def save(self) -> None:
    ckpt = self.services.ckpt
    if ckpt is None:
      return
    # The noise key stays out of the arrays: it is in keys.json.
    state = dataclasses.replace(self.progress.state,
                                opt_state=noise.without_key(self.progress.state.opt_state))
    # A checkpoint that cannot fit is refused in one line before orbax starts writing (its
    # threads print screens of tracebacks on a full disk): room for one more like the last.
    atomic.ensure_free_space(
        ckpt.directory, max(atomic.largest_entry_bytes(ckpt.directory),
                            2 * models.count_params(state) * 4 + (128 << 10)),
        f"the checkpoint of update {self.step}", _KEPT,
        agree=lambda ok: bool(distributed.broadcast_from_process_0(np.array(ok, np.uint8))))
    ckpt.save(self.step, state, self.progress.run_state)


# --- 1. set-up ---------------------------------------------------------------------------------
def _build_model(rc: config_lib.RunConfig, plan: plan_lib.PrivacyPlan, data: inputs.RunData):
  """``(model, apply_fn, params, loss_fn)``; warns when the noise swamps the signal."""
  # The seed initialises the model and nothing else: the batches and the noise come from
  # secret keys (OS entropy, unless dp.sampling_seed / dp.noise_seed fix them).
  model = models.create_model(data.train.features.shape[1], rc.model.hidden_sizes, rc.seed,
                              num_outputs=data.head.num_outputs, embeddings=data.embeddings)
  if plan.enabled:
    models.check_dp_compatible(model)
  apply_fn, params = models.functional(model)
  if warning := plan_lib.noise_warning(plan, models.count_params(params), rc.batch_size,
                                       rc.dp.target_epsilon):
    say(f"WARNING: {warning}")
  return model, apply_fn, params, models.example_loss(apply_fn, data.head)


def setup(cfg: ml_collections.ConfigDict | config_lib.RunConfig, workdir: str,
          cleanup: contextlib.ExitStack, *, data: inputs.Given | None = None) -> Trainer:
  """Builds a :class:`Trainer` for ``cfg`` in ``workdir``, resumed from its checkpoint.

  Args:
    cfg: a config (validated here) or its typed settings.
    workdir: the run's directory.
    cleanup: closes the checkpointer, the sinks and the batch reader when the run ends.
    data: ``(train, test, device data)`` already in memory (benchmarks, notebooks), instead
      of reading ``data.path``; the device data must be placed on ``parallel.make_mesh()``'s
      mesh.
  """
  rc = config_lib.settings(cfg)
  mesh = parallel.make_mesh()
  rows = inputs.load(rc, mesh, data)
  # N as the run may publish it: a DP estimate (kept in the workdir) or a declared figure.
  n = count_lib.resolve(workdir, rows.num_examples, rc.dp, rc.data, rows.train.digest)
  # The calibration's, the count's and the spec's epsilons come out of the target and the cap.
  budget = dataclasses.replace(rc, dp=calibration.training_share(
      rc.dp, count=n.epsilon, calibration=rc.calibration.epsilon, spec=rows.spec_estimate[0]))
  plan, stream = feed.plan_run(budget, n, mesh, rows)
  model, apply_fn, params, loss_fn = _build_model(rc, plan, rows)
  # Keys, then the state they noise, then the checkpoint's state and keys if resuming.
  ckpt = None
  if rc.checkpoint.enabled:
    ckpt = checkpoint_lib.Checkpointer(workdir)
    cleanup.callback(ckpt.close)
  keys = keys_lib.resolve(workdir, resuming=ckpt is not None and ckpt.latest_step() is not None,
                          checkpointing=ckpt is not None, sampling_seed=rc.dp.sampling_seed,
                          noise_seed=rc.dp.noise_seed, streamed=stream is not None)
  if stream is not None:
    keys = keys_lib.with_batches_key(keys, stream.path, stream.sampling_fixed)
  tx, progress = resume.initial(rc, mesh, plan, rows.train, params, keys)
  progress = resume.restore(rc.checkpoint.allow_changes, workdir, ckpt, mesh, progress,
                            streamed=stream is not None)
  services = services_lib.make_services(budget, workdir, plan, ckpt, progress, cleanup)
  run, method = step_lib.compile_step(
      mesh, plan, model, loss_fn, tx, dp=rc.dp, padding_microbatch_rows=rc.padding_microbatch,
      strategy=rc.strategy, streamed=stream is not None, head=rows.head)
  private, privacy_note = release.privacy_status(
      dp_enabled=plan.enabled, noise_fixed=progress.keys.noise_fixed,
      sampling_fixed=progress.keys.sampling_fixed, tuning=rc.tuning)
  t = Trainer(
      config=rc, workdir=workdir, plan=plan, private=private, privacy_note=privacy_note,
      data=rows, progress=progress, services=services,
      batches=feed.make_batches(mesh, plan, progress.keys, rows.dev, stream,
                                batch_size=rc.batch_size, steps_per_call=rc.steps_per_call,
                                microbatch_size=rc.dp.microbatch_size,
                                block=feed.unit_block(rc, method, plan)),
      compiled=Compiled(mesh=mesh, run=run, clipping=method, apply_fn=apply_fn,
                        evaluate=evaluate_lib.build_eval(apply_fn, rows.head)))
  services.writer.write(records.CONFIG, progress.step, rc.to_dict())
  logging.info("train %s %d, test rows %d, features %d, devices %d, params %d", "units" if
               rows.unit else "rows", rows.num_examples, len(rows.test), rows.train.features.shape[1],
               mesh.devices.size, models.count_params(params))
  console.announce_plan(plan, devices=int(mesh.devices.size), capacity=t.batches.capacity,
                        private=private, privacy_note=privacy_note)
  return t


# --- 2. the loop -------------------------------------------------------------------------------
def _progress(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  t.services.writer.write(records.PROGRESS, t.step, records.call_totals(m, k))


def _log_point(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  del m, k
  if t.services.schedule.is_log_point(t.step):
    t.services.writer.write(records.EVAL, t.step,
                            dict(t.split_metrics("test"), epsilon=t.epsilon()))


def _periodic_checkpoint(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  del m, k
  schedule = t.services.schedule
  if schedule.is_checkpoint(t.step) and not schedule.is_epoch_end(t.step):
    t.save()


def _epoch_end(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  del m, k
  s = t.services
  if not s.schedule.is_epoch_end(t.step):
    return
  epoch_time = time.time() - s.epoch_t0
  with s.prof.phase("evaluation"):
    test = t.split_metrics("test")
    validation = t.split_metrics("validation")  # private rows held out of training
  with s.prof.phase("accounting"):
    eps = t.epsilon()
  part = t.progress.run_state.partial
  count = max(part["count"], 1)
  record = {"epoch": (t.step - 1) // t.plan.steps_per_epoch + 1, "step": t.step,
            **test, "epsilon": eps, **validation, "epoch_time_s": epoch_time,
            release.TRAIN_LOSS: part["loss_sum"] / count,
            release.CLIPPED_FRACTION: part["clipped"] / count,
            release.NONFINITE_EXAMPLES: int(part["nonfinite"])}
  if t.data.attack_index is not None and t.data.head.kind == "binary":  # it inverts P(y = 1)
    record[release.ATTACK_ACCURACY] = attack.inversion_accuracy_of(
        t.compiled.apply_fn, jax.device_get(t.progress.state.params), t.data.train.features,
        t.data.train.labels, t.data.attack_index, t.config.data.attack_rows, t.config.seed)
  rs = t.progress.run_state
  t.progress.run_state = dataclasses.replace(rs, history=rs.history + (record,),
                                             partial=checkpoint_lib.zero_partial())
  s.writer.write(records.EVAL, t.step, dict(test, epsilon=eps))
  s.writer.write(records.EPOCH, t.step, record)
  s.save_at_epoch_end(t.step, t.save)  # checkpoint.min_interval_s may skip it
  s.epoch_t0 = time.time()


def _preempted(t: Trainer, m: dict[str, np.ndarray], k: int) -> None:
  """After a SIGTERM (every process agreeing on this call): checkpoint, then stop."""
  del m, k
  watch = t.services.preemption
  if watch is not None and watch.requested():
    t.save()  # no second copy if an epoch end or a periodic checkpoint just saved this step
    raise preemption.Preempted(t.step, t.workdir)


HOOKS = (_progress, _log_point, _periodic_checkpoint, _epoch_end, _preempted)
# What train_and_evaluate's caller may look at once a run is finished.
Inspect = Callable[[Trainer, summary_lib.RunSummary], None]


def train(t: Trainer) -> None:
  """Runs the updates from ``t.step`` to the schedule's stop.

  Raises:
    preemption.Preempted: a SIGTERM arrived; the checkpoint of ``t.step`` is saved.
  """
  s = t.services
  s.epoch_t0 = time.time()
  with s.preemption.armed() if s.preemption is not None else contextlib.nullcontext():
    while t.step < s.schedule.stop_at:
      k = s.schedule.call_length(t.step)
      metrics = t.train_call(k)
      for hook in HOOKS:
        hook(t, metrics, k)
  table = s.prof.report()  # None unless profile_steps > 0
  if table:
    say(table)


# --- 3. finalize -------------------------------------------------------------------------------
def _summary(t: Trainer) -> summary_lib.RunSummary:
  plan, dp_on, rs, rows = t.plan, t.plan.enabled, t.progress.run_state, t.data
  final, ledger, keys = rs.history[-1], rs.ledger, t.progress.keys
  return summary_lib.RunSummary(
      private=t.private, privacy_note=t.privacy_note,
      epsilon=final["epsilon"] + plan.count_epsilon, training_epsilon=final["epsilon"],
      count_epsilon=plan.count_epsilon or None, planned_num_examples=plan.num_examples,
      num_examples_source=plan.num_examples_source, delta=plan.delta_total if dp_on else None,
      accountant_delta=plan.delta if dp_on else None,
      overflow_probability=plan.overflow_probability if dp_on else None,
      overflow_delta=plan.overflow_delta if dp_on else None,
      delta_warning=plan.delta_warning, noise_multiplier=plan.noise_multiplier,
      l2_norm_clip=plan.l2_norm_clip, sampling_rate=plan.sampling_rate, steps=t.step,
      accountant=plan.accountant, ledger_composition=ledger.composition, dp_enabled=dp_on,
      **summary_lib.task_metrics(
          rows.head.kind, final, rows.baseline, classes=rows.train.task.classes,
          label_bounds=rows.head.bounds or (),
          validation_examples=len(rows.validation) if rows.validation is not None else None),
      train_examples=rows.num_examples, test_examples=len(rows.test),
      batches=t.config.data.batches or None,
      nonprivate_attack_accuracy=final.get(release.ATTACK_ACCURACY),
      noise="fixed by dp.noise_seed" if keys.noise_fixed else "os entropy",
      sampling="fixed by dp.sampling_seed" if keys.sampling_fixed else "os entropy",
      nonprivate_note=release.NONPRIVATE_NOTE, max_epsilon=t.config.dp.max_epsilon,
      budget_exhausted=t.services.schedule.stop_at < plan.total_steps,
      privacy_ledger=[dataclasses.asdict(s) for s in ledger.segments],
      resume_overrides=[list(o) for o in rs.overrides], **summary_lib.unit_fields(rows.unit),
      data_digest=rows.train.digest, num_devices=int(t.compiled.mesh.devices.size),
      num_processes=jax.process_count(), wall_time_s=time.time() - t.services.t_start,
      config=t.config.to_dict())


def export_arguments(t: Trainer, host_params: Any) -> dict[str, Any]:
  """:func:`fastdp_jax.export.model_dir.export_model`'s arguments for ``t``'s model, less
  the directory and the summary (``fastdp_jax.tune`` exports the best trial with them)."""
  rc, rows = t.config, t.data
  return dict(
      params=host_params, feature_names=rows.train.feature_names,
      label_name=rows.train.label_name, hidden_sizes=rc.model.hidden_sizes,
      model=models.model_spec(hidden_sizes=rc.model.hidden_sizes, head=rows.head,
                              classes=rows.train.task.classes,
                              feature_names=rows.train.feature_names,
                              embeddings=rows.embeddings),
      feature_spec=export_lib.dataset_feature_spec(rc.data.path),  # raw-row encoding
      include_test_metrics=rc.export_test_metrics)


def _write_outputs(t: Trainer, summary: summary_lib.RunSummary,
                   host_params: Any) -> summary_lib.RunSummary:
  """Exports the model (process 0), writes the summary to the sinks, ``final_params.npz`` and
  ``summary.json``; returns the summary with the model's directory."""
  rc = t.config
  if t.is_writer and rc.export_model:
    summary = dataclasses.replace(summary, model_dir=export_lib.export_model(
        os.path.join(t.workdir, export_layout.MODEL_DIR), summary=summary,
        **export_arguments(t, host_params)))
  record = summary.to_json()
  t.services.writer.write(records.SUMMARY, t.step, record)
  t.services.writer.close()
  if not t.is_writer:
    return summary
  # Atomic, and summary.json last: a workdir with a summary holds complete outputs.
  atomic.write_npz(os.path.join(t.workdir, "final_params.npz"),
                   models.flatten_params(host_params), mode=0o600)
  atomic.write_private_file(os.path.join(t.workdir, "summary.json"),
                             json.dumps(record, indent=1, default=float))
  if not rc.checkpoint.keep_keys and t.services.ckpt is not None:
    t.services.ckpt.close()
    say("; ".join(checkpoint_lib.forget(t.workdir, batches=rc.data.batches or None)))
  return summary


def _calibrated(t: Trainer, host_params: Any,
                summary: summary_lib.RunSummary) -> summary_lib.RunSummary:
  """The model with a temperature chosen on the validation rows, and its test metrics."""
  rows, eps = t.data, t.config.calibration.epsilon if t.plan.enabled else None
  rows.head = calibration.calibrated_head(
      rows.head, evaluate_lib.outputs_of(t.compiled.apply_fn, host_params,
                                         rows.validation.features, t.config.eval_batch_size),
      rows.validation.labels, eps, t.progress.keys, rows.validation_units)
  t.compiled.evaluate = evaluate_lib.build_eval(t.compiled.apply_fn, rows.head)
  return summary_lib.calibrated(summary, t.split_metrics("test"), rows.baseline,
                                temperature=rows.head.temperature,
                                calibration_epsilon=eps or 0.0)


def finalize(t: Trainer) -> summary_lib.RunSummary:
  """The summary of a trained run, with the privacy evaluation; writes the run's outputs."""
  if t.services.schedule.stop_at < t.plan.total_steps:
    say(f"stopped: the next update would exceed dp.max_epsilon={t.config.dp.max_epsilon} "
        f"(after {t.step} of {t.plan.total_steps} updates"
        f"{'; checkpoint saved' if t.services.ckpt is not None else ''})")
  host_params = jax.device_get(t.progress.state.params)
  summary = summary_lib.with_spec_estimate(_summary(t), *t.data.spec_estimate)
  rows, rc = t.data, t.config
  # Empirical privacy: membership inference; the canary audit when the data is an audit set.
  results, lines = privacy_eval.evaluate_privacy(
      evaluate_lib.example_losses(t.compiled.apply_fn, host_params, rows.head,
                                  rc.eval_batch_size),
      train=(rows.train.features, rows.train.labels), test=(rows.test.features,
                                                            rows.test.labels),
      membership_rows=rc.privacy_eval.membership_rows, seed=rc.seed,
      canaries=rows.canaries, delta=t.plan.delta,
      epsilon=summary.epsilon, significance=rc.privacy_eval.significance)
  for line in lines:
    say(line)
  summary = dataclasses.replace(summary, privacy_eval=results)
  if rc.calibration.epsilon:  # validation rows exist (checked with the config)
    summary = _calibrated(t, host_params, summary)
  summary = _write_outputs(t, summary, host_params)
  if summary.below_constant_baseline:
    say(f"WARNING: {summary_lib.result_line(summary)}: below the constant baseline; the model "
        "did not learn")
  elif summary.worse_than_base_rate:
    say(f"WARNING: test log-loss {summary.test_loss:.4f} is above the base rate's "
        f"{summary.base_rate_log_loss:.4f}: the predicted probabilities are worse than the "
        "test rows' class frequencies (overconfident); do not use them as probabilities")
  if t.plan.enabled:
    say(summary_lib.done_line(summary, t.plan.delta_total, t.private))
  else:
    say(f"done (non-private): {summary_lib.result_line(summary)}")
  return summary


def train_and_evaluate(cfg: ml_collections.ConfigDict | config_lib.RunConfig,
                       workdir: str, *, inspect: Inspect | None = None
                       ) -> summary_lib.RunSummary:
  """Trains a model with DP-SGD as configured and writes its results into ``workdir``.

  Args:
    cfg: a config built from :func:`fastdp_jax.config.base_config` (validated here), or its
      typed settings (:func:`fastdp_jax.config.settings`).
    workdir: output directory (created, owner-only): ``metrics.jsonl``, ``summary.json``,
      ``final_params.npz``, ``keys.json``, ``checkpoints/`` and the public ``model/``. If it
      holds a checkpoint, the run resumes from it (same parameters, noise and sampling as an
      uninterrupted run).
    inspect: called with the finished trainer and its summary before the workdir is
      released (``fastdp_jax.tune`` scores a trial's model with it).

  Returns:
    The run's :class:`~fastdp_jax.summary.RunSummary` (also ``workdir/summary.json``).

  Raises:
    ConfigError: a bad config (before any work); ResumeMismatchError: the workdir's
      checkpoint belongs to a different run; WorkdirLockedError: another run uses the workdir;
      NonFiniteParametersError: the noised parameters diverged (naming the update);
      preemption.Preempted: a SIGTERM stopped the run after checkpointing (run it again to
      resume).
  """
  rc = config_lib.settings(cfg)
  inputs.check_enough_rows(rc)  # before the workdir exists: a refusal leaves nothing behind
  distributed.check_same_start(workdir, rc.json)  # same workdir, shared
  checkpoint_lib.check_writable(workdir)
  keys_lib.check_not_forgotten(workdir)
  if jax.process_index() == 0:
    atomic.make_private_dir(workdir)  # everything but model/ is as private as the data
  with contextlib.ExitStack() as cleanup:
    if jax.process_index() == 0:
      lock = checkpoint_lib.WorkdirLock(workdir)
      lock.acquire()
      cleanup.callback(lock.release)
    # A full disk is one line (exit 2): every output is atomic and checkpoints are renamed
    # into place, so what was complete before stays complete.
    with atomic.disk_full_is_user_error(f"the workdir {workdir}", _KEPT):
      trainer = setup(rc, workdir, cleanup)
      train(trainer)
      summary = finalize(trainer)
      if inspect is not None:
        inspect(trainer, summary)
      return summary
