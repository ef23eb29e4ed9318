"""What surrounds the training loop: checkpoints, the schedule of events, the sinks, the
profiler and the preemption watch, built once at set-up and closed when the run ends."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax

from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax import preemption
from fastdp_jax import profiling
from fastdp_jax import resume
from fastdp_jax import schedule as schedule_lib
from fastdp_jax import sinks
from fastdp_jax.dp import plan as plan_lib


@dataclasses.dataclass(kw_only=True, eq=False)
class Services:
  """Around the loop: checkpoints, the schedule of events, the sinks, the profiler."""
  ckpt: checkpoint_lib.Checkpointer | None
  schedule: schedule_lib.Schedule
  writer: sinks.MultiSink
  prof: profiling.Profiler
  preemption: preemption.Watch | None
  cleanup: contextlib.ExitStack | None
  t_start: float = dataclasses.field(default_factory=time.time)
  epoch_t0: float = dataclasses.field(default_factory=time.time)


def make_services(rc: config_lib.RunConfig, workdir: str, plan: plan_lib.PrivacyPlan,
              ckpt: checkpoint_lib.Checkpointer | None, p: resume.Progress,
              cleanup: contextlib.ExitStack) -> Services:
  """The schedule (stopping within ``dp.max_epsilon``), the profiler and the sinks: console,
  metrics.jsonl (cut back to the checkpoint, so a resumed run has no duplicates) and
  TensorBoard on process 0, nothing on the others; closed by ``cleanup`` (a progress bar is
  cleared even when the run fails)."""
  stop_at = plan_lib.stop_at(rc.dp.max_epsilon, plan, p.run_state.ledger)
  prof = profiling.Profiler(workdir, rc.profile_steps, first_step=p.step, last_step=stop_at,
                            steps_per_call=rc.steps_per_call)
  schedule = schedule_lib.Schedule(
      steps_per_epoch=plan.steps_per_epoch, stop_at=stop_at,
      steps_per_call=rc.steps_per_call, log_every=rc.log_every_steps,
      checkpoint_every=rc.checkpoint.every_steps if ckpt is not None else 0,
      profile_window=(prof.trace_start, prof.trace_end) if prof.enabled else None)
  writer = sinks.make_sinks(workdir, process_index=jax.process_index(), total_steps=stop_at,
                            num_epochs=rc.num_epochs, history=p.run_state.history,
                            start_step=p.step)
  cleanup.callback(writer.close)
  return Services(ckpt=ckpt, schedule=schedule, writer=writer, prof=prof, cleanup=cleanup,
                  preemption=preemption.Watch(enabled=ckpt is not None))
