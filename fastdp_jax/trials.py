"""Many trials at once: trials of one shape trained side by side in one compiled step.

``fastdp-tune`` runs K private trials that differ only in hyperparameters. Trials of one
*shape* (the same dataset, model architecture, batch size, schedule, optimizer kind and
clipping method) are run here as ONE program: their parameters and optimizer states are
stacked along a leading trial axis and :func:`build_chunk` ``jax.vmap``-s one trial's
``lax.scan`` of DP-SGD updates over that axis, so K trials cost one compilation and one
device call per chunk of updates instead of K of each. Each trial keeps everything that makes
it a trial of its own:

- its learning rate, weight decay and clipping norm C (runtime values, vmapped, not
  compile-time constants), and the noise standard deviation sigma * C of its own privacy
  plan;
- its own secret keys: the Poisson batches come from its own sampler
  (:mod:`fastdp_jax.dp.sampling`, on the host) and the noise from its own 128-bit key
  (:func:`fastdp_jax.dp.noise.gaussian_noise`, the trainer's noise, bit for bit);
- its own :class:`fastdp_jax.train.Trainer` (set up by :func:`fastdp_jax.train.setup` in its
  own workdir): the same plan, ledger, epoch-end evaluation, calibration, summary and outputs
  as a run of ``train_and_evaluate``; only the loop's compiled call is shared. With
  ``epoch_metrics=False`` (``fastdp-tune``'s default, ``search.trials.epoch_metrics``) the
  evaluation runs at the last update only: the same final metrics, no per-epoch curves.

So a trial here is the trial alone (``tests/test_trials.py``) up to float32 rounding: vmap
batches the matrix products, and C enters through the identity
``clip_C(g) = C * clip_1(g / C)`` (the gradient of ``loss / C`` clipped to norm 1, times C),
because the clipping functions of :mod:`fastdp_jax.dp.clipping` and :mod:`fastdp_jax.dp.ghost`
take C as a Python number. The optimizer is :func:`fastdp_jax.step.make_optimizer`'s, built
with traced hyperparameters (:func:`_optimizer`); a group in which some trial has weight decay
gives every trial the decayed form, with a decay of exactly 0 for those without (adding
``0 * params`` changes no bit of an update).

Limits: one process, one device (the mesh's trial axis is future work), rows in memory (no
``data.batches``), DP on, no privacy units, no checkpoints (trials neither checkpoint nor
resume). :func:`ineligible` says why a config cannot run here; ``fastdp-tune`` then runs it
alone through the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from fastdp_jax import atomic
from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax import inputs
from fastdp_jax import models
from fastdp_jax import step as step_lib
from fastdp_jax import summary as summary_lib
from fastdp_jax import train
from fastdp_jax.dp import clipping
from fastdp_jax.dp import ghost
from fastdp_jax.dp import keys as keys_lib
from fastdp_jax.dp import noise as noise_lib

# Config keys that may differ between the trials of one group: runtime values of the compiled
# step, or of the trial's own keys and initial parameters (the seeds). Every other key fixes
# the shape.
PER_TRIAL_KEYS = ("optimizer.learning_rate", "optimizer.weight_decay", "dp.l2_norm_clip",
                  "dp.noise_multiplier", "dp.noise_seed", "dp.sampling_seed", "seed")


class TrialShapeError(errors.UserError):
  """Trials that cannot share one compiled step (different shapes, or an unsupported run)."""


# --- grouping ---------------------------------------------------------------------------------
def shape_key(rc: config_lib.RunConfig) -> str:
  """What trials must share to run side by side: every setting but :data:`PER_TRIAL_KEYS`,
  as JSON (a group's optimizer has the weight-decay term if any of its trials decays)."""
  d = json.loads(rc.json)
  for key in PER_TRIAL_KEYS:
    *head, last = key.split(".")
    node = d
    for part in head:
      node = node[part]
    node.pop(last, None)
  return json.dumps(d, sort_keys=True, default=str)


def ineligible(rc: config_lib.RunConfig) -> str | None:
  """Why ``rc`` cannot run here (then it runs alone through the trainer), or None."""
  if jax.process_count() > 1 or jax.device_count() > 1:
    return "trials run side by side on one device of one process"
  if not rc.dp.enabled:
    return "trials run side by side with DP on (clipping and noise are vmapped)"
  if rc.data.batches:
    return "trials run side by side on rows in memory (not data.batches)"
  if rc.checkpoint.enabled:
    return "trials run side by side without checkpoints"
  return None


def group_by_shape(rcs: Sequence[config_lib.RunConfig]) -> list[list[int]]:
  """The indices of ``rcs`` in groups of one shape (first appearance order); a config that
  :func:`ineligible` refuses is a group of its own."""
  groups: dict[str, list[int]] = {}
  for i, rc in enumerate(rcs):
    key = shape_key(rc) if ineligible(rc) is None else f"alone {i}"
    groups.setdefault(key, []).append(i)
  return list(groups.values())


# --- the trial axis on the device ---------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hyper:
  """One trial's runtime hyperparameters (float32 scalars; [K] when stacked)."""
  learning_rate: jax.Array
  weight_decay: jax.Array
  l2_norm_clip: jax.Array
  noise_stddev: jax.Array  # sigma * C of the trial's own plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
  """What the trials of a group share: the compiled step's static parts.

  Attributes:
    model: one trial's NNX model (its graph, for the ghost norms; never its values).
    apply_fn: ``apply_fn(params, x)``, the same function for every trial.
    head: the task.
    method: per-example clipping, ``'ghost'`` or ``'vmap'`` (the trainer's choice).
    optimizer: the optimizer settings (their learning rate and decay are per trial).
    decayed: whether the optimizer has the weight-decay term (some trial's decay > 0).
    total_steps: the plan's T (the learning rate's decay runs over it).
    batch_size: the public expected batch size the noised sum is divided by.
    microbatch_size: ``dp.microbatch_size`` (vmap clipping's chunks).
    padding_microbatch: the step's microbatch of padding-skipping (rows), or None.
  """
  model: nnx.Module
  apply_fn: Callable
  head: models.TaskHead
  method: str
  optimizer: config_lib.OptimizerSettings
  decayed: bool
  total_steps: int
  batch_size: int
  microbatch_size: int | None
  padding_microbatch: int | None


def _optimizer(shape: Shape, learning_rate: Any, weight_decay: Any
               ) -> optax.GradientTransformation:
  """:func:`fastdp_jax.step.make_optimizer` with a runtime learning rate and weight decay."""
  o = shape.optimizer
  lr = step_lib.learning_rate(dataclasses.replace(o, learning_rate=learning_rate),
                              shape.total_steps)
  if o.name == "sgd":
    sgd = optax.sgd(lr, momentum=o.momentum or None)
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if shape.decayed else sgd
  return optax.adamw(lr, weight_decay=weight_decay) if shape.decayed else optax.adam(lr)


def _privatize(noise_stddev: Any, expected_batch_size: float,
               key: Any = None) -> optax.GradientTransformation:
  """:func:`fastdp_jax.dp.noise.privatize` with a runtime standard deviation sigma * C: the
  same state, the same noise values, the same division by the public expected batch size."""

  def init_fn(params):
    del params
    return noise_lib.PrivatizeState(key=jnp.asarray(key, jnp.uint32),
                                    count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    z = noise_lib.gaussian_noise(state.key, state.count, updates)
    updates = jax.tree_util.tree_map(lambda g, n: g + noise_stddev * n, updates, z)
    updates = jax.tree_util.tree_map(lambda g: g / expected_batch_size, updates)
    return updates, noise_lib.PrivatizeState(key=state.key, count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def _clipped_sums(shape: Shape, c: jax.Array) -> Callable:
  """``sums(params, x, y, idx, mask) -> (clipped sum at C = c, metric sums)`` for a runtime C.

  ``clip_C(g) = C * clip_1(g / C)``: the per-example gradients of ``loss / C``, clipped to
  norm 1 by the project's own clipping (ghost or vmap, as the trainer chose), summed, times
  C. The counts of clipped examples compare ``||g|| / C`` with 1; the loss sum is scaled back.
  """
  loss_fn = models.example_loss(shape.apply_fn, shape.head)

  def scaled_loss(params, example):
    return loss_fn(params, example) / c

  if shape.method == "ghost":
    graphdef, _ = nnx.split(shape.model, nnx.Param)
    clipped = ghost.ghost_clipped_sum(1.0, lambda out, y: shape.head.losses(out, y) / c,
                                      graphdef=graphdef)
  else:
    clipped = clipping.make_clipped_sum("vmap", shape.model, scaled_loss, 1.0,
                                        microbatch_size=shape.microbatch_size, head=shape.head)
  # The trainer's per-device work (gathering the sampled rows, microbatches that skip
  # padding, the metric sums), here on the one device's rows.
  per_device = step_lib._per_device(  # pylint: disable=protected-access
      scaled_loss, clipped, 1.0, shape.padding_microbatch)

  def sums(params, x, y, idx, mask):
    grads, m = per_device(params, x, y, idx, mask)
    return (jax.tree_util.tree_map(lambda g: g * c, grads),
            dict(m, loss_sum=m["loss_sum"] * c))

  return sums


def build_chunk(shape: Shape) -> Callable:
  """Compiles ``run(states, hyper, x, y, indices, mask, active) -> (states, metrics)``.

  ``states`` (:class:`fastdp_jax.step.State`) and ``hyper`` (:class:`Hyper`) are stacked
  along a leading trial axis [K]; ``x``, ``y`` are the device's training rows (shared);
  ``indices``, ``mask`` [K, steps, capacity] each trial's own sampled rows; ``active``
  [steps] the updates that run (the same for every trial). ``metrics`` are the trainer's
  per-update metrics, [K, steps] each.
  """

  def one_trial(state, hyper, x, y, indices, mask, active):
    tx = optax.chain(_privatize(hyper.noise_stddev, shape.batch_size),
                     _optimizer(shape, hyper.learning_rate, hyper.weight_decay))
    sums = _clipped_sums(shape, hyper.l2_norm_clip)
    update = step_lib._update_fn(tx)  # pylint: disable=protected-access

    def body(state, inputs):
      idx, msk, act = inputs
      return update(state, act, lambda p: sums(p, x, y, idx, msk))

    return jax.lax.scan(body, state, (indices, mask, active))

  return jax.jit(jax.vmap(one_trial, in_axes=(0, 0, None, None, 0, 0, None)))


# --- the trials' trainers -----------------------------------------------------------------------
def _open(rc: config_lib.RunConfig, workdir: str, cleanup: contextlib.ExitStack
          ) -> train.Trainer:
  """A trial's trainer, set up as ``train_and_evaluate`` sets one up (the workdir made
  owner-only and locked; refusals before any work)."""
  inputs.check_enough_rows(rc)
  checkpoint_lib.check_writable(workdir)
  keys_lib.check_not_forgotten(workdir)
  atomic.make_private_dir(workdir)
  lock = checkpoint_lib.WorkdirLock(workdir)
  lock.acquire()
  cleanup.callback(lock.release)
  return train.setup(rc, workdir, cleanup)


def _shape(trainers: Sequence[train.Trainer]) -> Shape:
  """The group's :class:`Shape`, after checking that every trainer has it."""
  first = trainers[0]
  rc, plan = first.config, first.plan
  for t in trainers[1:]:
    same = (t.plan.total_steps == plan.total_steps
            and t.services.schedule == first.services.schedule
            and t.data.train.digest == first.data.train.digest
            and t.compiled.clipping == first.compiled.clipping)
    if not same:
      raise TrialShapeError(f"trial {t.workdir} differs from {first.workdir} in its plan, "
                            "schedule, data or clipping: it cannot share their step")
  if getattr(plan, "privacy_unit", None):
    raise TrialShapeError("trials with privacy units run alone, not side by side: tune "
                          "with --search.trials.sequential=True")
  model = models.create_model(first.data.train.features.shape[1], rc.model.hidden_sizes,
                              rc.seed, num_outputs=first.data.head.num_outputs,
                              embeddings=first.data.embeddings)
  return Shape(
      model=model, apply_fn=first.compiled.apply_fn, head=first.data.head,
      method=first.compiled.clipping, optimizer=rc.optimizer,
      decayed=any(t.config.optimizer.weight_decay for t in trainers),
      total_steps=plan.total_steps, batch_size=rc.batch_size,
      microbatch_size=rc.dp.microbatch_size,
      padding_microbatch=step_lib.padding_microbatch(rc.padding_microbatch,
                                                     first.compiled.clipping,
                                                     rc.dp.microbatch_size))


def _share(trainers: Sequence[train.Trainer]) -> None:
  """What the trainers of one shape can share instead of computing K times: the model's
  functions (one compilation of the evaluation, not K; the graph is the same) and, between
  trials of the same delta and accountant, the privacy ledger's cached epsilon curves
  (trials of the same plan ask for the same epsilon at every epoch end)."""
  first = trainers[0]
  ledger = first.progress.run_state.ledger
  for t in trainers[1:]:
    if t.data.head == first.data.head:
      t.compiled.apply_fn, t.compiled.evaluate = first.compiled.apply_fn, first.compiled.evaluate
    own = t.progress.run_state.ledger
    if (own.delta, own.accountant, own.segments) == (ledger.delta, ledger.accountant, ()):
      # An empty ledger of the same delta and accountant: the same object, whose later
      # versions (PrivacyLedger.add) keep one cache of curves.
      t.progress.run_state = dataclasses.replace(t.progress.run_state, ledger=ledger)


def hyper_of(t: train.Trainer) -> Hyper:
  """A trial's runtime hyperparameters, from its own settings and privacy plan."""
  c = float(t.plan.l2_norm_clip)
  # As noise.privatize computes it: the product in Python (double), used as float32.
  stddev = float(t.plan.noise_multiplier) * c
  return Hyper(learning_rate=jnp.float32(t.config.optimizer.learning_rate),
               weight_decay=jnp.float32(t.config.optimizer.weight_decay),
               l2_norm_clip=jnp.float32(c), noise_stddev=jnp.float32(stddev))


def _initial_state(t: train.Trainer, shape: Shape, hyper: Hyper) -> step_lib.State:
  """A trial's state before its first update: its initial parameters, its noise key."""
  params = jax.device_get(t.progress.state.params)
  tx = optax.chain(_privatize(hyper.noise_stddev, shape.batch_size, t.progress.keys.noise),
                   _optimizer(shape, hyper.learning_rate, hyper.weight_decay))
  return step_lib.State(params=params, opt_state=tx.init(params),
                        step=jnp.zeros((), jnp.int32))


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree_util.tree_map(lambda *a: jnp.stack([jnp.asarray(v) for v in a]), *trees)


def _advance(t: train.Trainer, params: Any, m: dict[str, np.ndarray], k: int) -> None:
  """A trial's trainer after ``k`` updates: what :meth:`fastdp_jax.train.Trainer.train_call`
  records (the finite check, the parameters, the partial sums, the ledger, the count).

  Only the parameters and the update count go back into the trainer's state: its optimizer
  state stays the group's (a trial neither checkpoints nor resumes, and nothing after the
  loop reads it).
  """
  p = t.progress
  step_lib.check_finite(m, p.step, k)
  p.state = dataclasses.replace(p.state, params=params, step=jnp.asarray(p.step + k, jnp.int32))
  rs = p.run_state
  p.run_state = dataclasses.replace(
      rs, partial={name: v + float(m[name][:k].sum()) for name, v in rs.partial.items()},
      ledger=rs.ledger.add(t.plan.noise_multiplier, t.plan.sampling_rate, k))
  p.step += k


def _batches(trainers: Sequence[train.Trainer], k: int, on_mesh: jax.sharding.Sharding
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each trial's next ``k`` Poisson batches from its own sampler (its own secret key), as
  ``(indices, mask)`` [K, steps_per_call, capacity] and ``active`` [steps_per_call], placed
  in one transfer (the host arrays of :meth:`fastdp_jax.feed.Batches.sampled`, stacked).

  A trial's capacity follows from its own overflow probability (its plan's epsilon), so the
  trials' capacities may differ: each is padded with masked slots to the largest, which adds
  exact zeros to its sums.
  """
  chunk = trainers[0].batches.steps_per_call
  sampled = [t.batches.sampler.batches(t.step, k, shards=t.batches.local_shards)
             for t in trainers]
  capacity = max(b.indices.shape[2] for b in sampled)
  indices = np.zeros((len(trainers), chunk, capacity), np.int32)
  mask = np.zeros((len(trainers), chunk, capacity), bool)
  for i, b in enumerate(sampled):  # [k, devices = 1, capacity_i]
    indices[i, :k, :b.indices.shape[2]] = b.indices[:, 0]
    mask[i, :k, :b.mask.shape[2]] = b.mask[:, 0]
  return (jax.device_put(indices, on_mesh), jax.device_put(mask, on_mesh),
          jax.device_put(np.arange(chunk) < k, on_mesh))


def _last_epoch_end(t: train.Trainer, m: dict[str, np.ndarray], k: int) -> None:
  """The trainer's epoch-end hook at the run's last update only.

  At an earlier epoch end only what the last epoch's record depends on is done: the epoch's
  partial sums (train loss, clipped fraction, non-finite count) and its clock start again.
  The evaluations, the epsilon, the model-inversion attack and the epoch record are skipped:
  the final record, and so the summary and the released model's metrics, are the ones the
  full hook writes, bit for bit; the trial's ``metrics.jsonl`` then has one epoch record.
  """
  s = t.services
  if not s.schedule.is_epoch_end(t.step):
    return
  if t.step == s.schedule.stop_at:
    train._epoch_end(t, m, k)  # pylint: disable=protected-access
    return
  t.progress.run_state = dataclasses.replace(t.progress.run_state,
                                             partial=checkpoint_lib.zero_partial())
  s.epoch_t0 = time.time()


def hooks(epoch_metrics: bool) -> tuple[Callable[..., None], ...]:
  """The trainer's hooks (:data:`fastdp_jax.train.HOOKS`); without ``epoch_metrics``, its
  epoch-end hook runs at the last update only (:func:`_last_epoch_end`)."""
  if epoch_metrics:
    return train.HOOKS
  epoch_end = train._epoch_end  # pylint: disable=protected-access
  return tuple(_last_epoch_end if h is epoch_end else h for h in train.HOOKS)


def train_side_by_side(trainers: Sequence[train.Trainer], *, epoch_metrics: bool = True
                       ) -> None:
  """Runs every trainer's updates from 0 to its schedule's stop, all in one compiled call per
  chunk; after each call, each trainer's hooks (progress, epoch-end evaluation, ...) run as
  in :func:`fastdp_jax.train.train`.

  Args:
    trainers: the trials' trainers, of one :class:`Shape`.
    epoch_metrics: False: each trial is evaluated (test and validation metrics, epsilon,
      model-inversion attack) at its last update only, not at every epoch end: the same
      final metrics, without the per-epoch curves (this host work, K times per epoch, is
      most of what K trials cost beyond one).
  """
  shape = _shape(trainers)
  if any(t.step for t in trainers):
    raise TrialShapeError("trials side by side start at update 0 (no resume)")
  _share(trainers)
  run = build_chunk(shape)
  hypers = [hyper_of(t) for t in trainers]
  first = trainers[0]
  # On the mesh as the step's outputs are (replicated over its one device): the same
  # sharding at every call, so the step compiles once, not again at the second call.
  on_mesh = jax.sharding.NamedSharding(first.compiled.mesh, jax.sharding.PartitionSpec())
  states = jax.device_put(
      _stack([_initial_state(t, shape, h) for t, h in zip(trainers, hypers)]), on_mesh)
  hyper = jax.device_put(_stack(hypers), on_mesh)
  schedule, dev = first.services.schedule, first.data.dev
  run_hooks = hooks(epoch_metrics)
  for t in trainers:
    t.services.epoch_t0 = time.time()  # as train.train starts an epoch's clock
  while first.step < schedule.stop_at:
    k = schedule.call_length(first.step)
    indices, mask, active = _batches(trainers, k, on_mesh)
    states, m = run(states, hyper, dev.features, dev.labels, indices, mask, active)
    m = jax.device_get(m)
    params = jax.device_get(states.params)
    for i, t in enumerate(trainers):
      mi = {name: v[i] for name, v in m.items()}
      _advance(t, jax.tree_util.tree_map(lambda a, i=i: a[i], params), mi, k)
      for hook in run_hooks:
        hook(t, mi, k)


Inspect = Callable[[int, train.Trainer, summary_lib.RunSummary], None]


def run_trials(configs: Sequence[ml_collections.ConfigDict | config_lib.RunConfig],
               workdirs: Sequence[str], *, inspect: Inspect | None = None,
               epoch_metrics: bool = True) -> list[summary_lib.RunSummary]:
  """Trains trials of one shape side by side; each finishes as ``train_and_evaluate`` would.

  Args:
    configs: the trials' configs (validated here); they may differ in
      :data:`PER_TRIAL_KEYS` only.
    workdirs: one new directory per trial (its outputs, as a run's).
    inspect: called as ``inspect(i, trainer, summary)`` for trial ``i`` once it is finished
      (``fastdp_jax.tune`` scores each trial with it).
    epoch_metrics: False: evaluate each trial at its last update only
      (:func:`train_side_by_side`): the same summaries, one epoch record per trial.

  Returns:
    Each trial's :class:`~fastdp_jax.summary.RunSummary`, in the order of ``configs``.

  Raises:
    TrialShapeError: configs of different shapes, or a run :func:`ineligible` refuses;
    NonFiniteParametersError: a trial's parameters diverged.
  """
  rcs = [config_lib.settings(c) for c in configs]
  if len(rcs) != len(workdirs) or not rcs:
    raise TrialShapeError(f"{len(rcs)} configs for {len(workdirs)} workdirs")
  for rc in rcs:
    if (why := ineligible(rc)) is not None:
      raise TrialShapeError(why)
  if len({shape_key(rc) for rc in rcs}) > 1:
    raise TrialShapeError("the trials differ in more than "
                          f"{', '.join(PER_TRIAL_KEYS)}: group them with group_by_shape")
  summaries = []
  with contextlib.ExitStack() as cleanup:
    with atomic.disk_full_is_user_error(f"the trials' workdirs {workdirs[0]}, ...",
                                        "every complete output is intact"):
      trainers = [_open(rc, w, cleanup) for rc, w in zip(rcs, workdirs)]
      train_side_by_side(trainers, epoch_metrics=epoch_metrics)
      for i, t in enumerate(trainers):
        summary = train.finalize(t)
        if inspect is not None:
          inspect(i, t, summary)
        summaries.append(summary)
  return summaries
