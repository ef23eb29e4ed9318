"""Resuming a run: what it must share with its checkpoint, and its progress restored.

A checkpoint carries the parameters, the optimizer state, the update count and the run state
(the privacy ledger, the epoch history); the keys are in ``keys.json``
(:mod:`fastdp_jax.dp.keys`). A resumed run with the same settings continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax import parallel
from fastdp_jax import sinks
from fastdp_jax import step as step_lib
from fastdp_jax.console import say
from fastdp_jax.dp import accounting
from fastdp_jax.dp import keys as keys_lib
from fastdp_jax.dp import noise
from fastdp_jax.dp import plan as plan_lib


@dataclasses.dataclass(kw_only=True, eq=False)
class Progress:
  """What advances with each call, and what a checkpoint saves."""
  state: step_lib.State
  run_state: checkpoint_lib.RunState
  step: int
  keys: keys_lib.RunKeys


def run_identity(rc: config_lib.RunConfig, plan: plan_lib.PrivacyPlan,
                 train: Any) -> dict[str, Any]:
  """What a resumed run must share with its checkpoint (privacy, model, data, sampling)."""
  return dict(dp_enabled=plan.enabled, noise_multiplier=plan.noise_multiplier,
              l2_norm_clip=plan.l2_norm_clip, sampling_rate=plan.sampling_rate,
              batch_size=rc.batch_size, delta=plan.delta, accountant=plan.accountant,
              model_hidden_sizes=list(rc.model.hidden_sizes),
              num_features=int(train.features.shape[1]), data_digest=train.digest,
              seed=rc.seed, sampling_seed=rc.dp.sampling_seed,
              noise_seed=rc.dp.noise_seed, optimizer={k: v for k, v in dataclasses.asdict(rc.optimizer).items()
                         if k != "weight_decay" or v},
              # Only when they matter, so that a binary run's identity stays minimal.
              **({"model_embedding_dim": rc.model.embedding_dim} if train.embeddings else {}),
              **({"model_huber_delta": rc.model.huber_delta}
                 if train.task.kind == "regression" else {}),
              **({"validation_fraction": rc.data.validation_fraction}
                 if rc.data.validation_fraction else {}),
              **({"privacy_unit": [list(plan.privacy_unit), plan.max_rows_per_unit]}
                 if plan.privacy_unit else {}))


def _refuse_unaccounted_updates(workdir: str, checkpoint_step: int) -> None:
  """Refuses a changed resume when the run logged updates after its checkpoint.

  Those updates' outputs (test metrics, epsilon) were seen and may have chosen the changes,
  but the restored ledger ends at the checkpoint: redone with other settings they would be
  in no ledger segment. A resume with the same settings redoes them exactly (same keys, same
  batches, same noise), so it is the way on.

  Raises:
    ResumeMismatchError: records past the checkpoint in ``metrics.jsonl``.
  """
  path = os.path.join(workdir, sinks.METRICS_FILE)
  if not os.path.isfile(path):
    return
  logged = max((int(r.get("step", 0)) for r in sinks.read_jsonl(path)), default=0)
  if logged > checkpoint_step:
    raise errors.ResumeMismatchError(
        f"workdir {workdir} logged updates up to {logged} after its last checkpoint (update "
        f"{checkpoint_step}); resumed with changed settings they would be spent but not "
        "accounted: resume with the run's own settings first (it redoes them exactly), or "
        "use another --workdir")


def restore(allow_changes: bool, workdir: str, ckpt: checkpoint_lib.Checkpointer | None,
             mesh: jax.sharding.Mesh, p: Progress, *, streamed: bool = False) -> Progress:
  """The progress of the workdir's latest checkpoint, if any (else ``p`` as it is).

  A resume that changed the run's settings (``checkpoint.allow_changes``) starts a new
  segment with fresh keys (:func:`fastdp_jax.dp.keys.fresh_segment`).
  """
  if ckpt is None or ckpt.latest_step() is None:
    return p
  saved = ckpt.restore_metadata()
  diffs = checkpoint_lib.compare_identity(saved.identity, p.run_state.identity)
  if diffs and not allow_changes:
    raise errors.ResumeMismatchError(
        f"workdir {workdir} holds a checkpoint of a different run; changed: "
        + "; ".join(diffs) + ". Use another --workdir, or --config.checkpoint.allow_changes"
        "=True to continue anyway (recorded in the summary; epsilon keeps accumulating)")
  if diffs:
    _refuse_unaccounted_updates(workdir, int(ckpt.latest_step()))
  state, saved = ckpt.restore(p.state)
  keys = p.keys
  if diffs:
    # Updates after the checkpoint may have been seen (logged) with the old noise; redone
    # with changed parameters they must not reuse it, nor the old batches: the ledger
    # composes the segments as independent mechanisms.
    keys = keys_lib.fresh_segment(keys, streamed=streamed)
    if jax.process_index() == 0:
      keys_lib.save(workdir, keys)
  state = dataclasses.replace(state, opt_state=noise.with_key(state.opt_state, keys.noise))
  state = parallel.replicate(mesh, jax.device_get(state))
  saved = dataclasses.replace(saved, identity=p.run_state.identity,
                              overrides=saved.overrides + ((tuple(diffs),) if diffs else ()))
  say(f"resumed from {ckpt.directory} at update {int(state.step)} "
      f"(epsilon so far {saved.ledger.epsilon():.4f})")
  return Progress(state=state, run_state=saved, step=int(state.step), keys=keys)


def initial(rc: config_lib.RunConfig, mesh: jax.sharding.Mesh,
            plan: plan_lib.PrivacyPlan, train: Any, params: Any,
            keys: keys_lib.RunKeys) -> tuple[optax.GradientTransformation, Progress]:
  """The noised optimizer and the progress before any update: the replicated parameters and
  optimizer state, an empty ledger."""
  tx = optax.chain(noise.privatize(plan.l2_norm_clip or 1.0, plan.noise_multiplier,
                                   rc.batch_size, keys.noise),
                  step_lib.make_optimizer(rc.optimizer, plan.total_steps))
  state = parallel.replicate(mesh, step_lib.State(params=params, opt_state=tx.init(params),
                                                  step=jnp.zeros((), jnp.int32)))
  run_state = checkpoint_lib.RunState(identity=run_identity(rc, plan, train),
                                      ledger=accounting.PrivacyLedger(plan.delta,
                                                                      plan.accountant))
  return tx, Progress(state=state, run_state=run_state, step=0, keys=keys)
