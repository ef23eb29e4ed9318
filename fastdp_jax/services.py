"""What surrounds the training loop: checkpoints, the schedule of events, the sinks, the
profiler and the preemption watch, built once at set-up and closed when the run ends; and the
process's persistent compilation cache (:func:`use_compilation_cache`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time

from collections.abc import Callable

import jax
import numpy as np

from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax import console
from fastdp_jax import distributed
from fastdp_jax import errors
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
  min_interval_s: float = 0.0  # checkpoint.min_interval_s

  def save_at_epoch_end(self, step: int, save: Callable[[], None]) -> None:
    """Calls ``save`` at the epoch end ``step`` unless ``checkpoint.min_interval_s`` says
    skip it: the last save ended less than that long ago and ``step`` is not the run's last
    update (which always saves). A crash then redoes at most that much work, from a
    checkpoint as exact as any other (the epoch records after it are cut and rewritten).

    Every process takes process 0's decision: clocks differ, and a save is collective.
    """
    if self.ckpt is None:
      return
    if (self.min_interval_s > 0 and step != self.schedule.stop_at
        and not self.schedule.is_checkpoint(step)):  # every_steps' saves are kept
      due = time.monotonic() - self.ckpt.last_save_time >= self.min_interval_s
      if not distributed.broadcast_from_process_0(np.array(due, np.uint8)):
        return
    save()


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
  # The work after the loop books itself into this run's profiler (profiling.booked); its
  # table comes once the outputs are written, when the run's clean-up starts.
  profiling.activate(prof)
  cleanup.callback(_finish_profile, prof)
  return Services(ckpt=ckpt, schedule=schedule, writer=writer, prof=prof, cleanup=cleanup,
                  preemption=preemption.Watch(enabled=ckpt is not None),
                  min_interval_s=float(rc.checkpoint.min_interval_s))


def _finish_profile(prof: profiling.Profiler) -> None:
  profiling.activate(None)
  if table := prof.finish():
    console.say(table)


def use_compilation_cache(directory: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache in ``directory``, made owner-only (0700).

  Call it before the run's first JAX computation (``fastdp-train`` does, with the config key
  ``compilation_cache_dir``; a notebook may call it itself): a program compiled once is then
  read back by every later process that compiles the same program, so a second run of the
  same shapes skips nearly all of its compilation. Every program is cached, however quick to
  compile: a small table's run is mostly small programs.

  The cache is as private as the data (docs/privacy.md): the programs' shapes give the
  number of training, test and validation rows, and anyone who can write to it can make
  the next run execute their code (JAX's warning). So it is refused unless it is a
  directory of this user's that nobody else can read or enter.

  Args:
    directory: the cache's directory (``~`` expanded, and a leading ``~/.cache/`` read as
      ``$XDG_CACHE_HOME/`` when that is set; created with its parents); ``''`` or
      ``None`` (or the string ``'None'``, which is what ``--config.compilation_cache_dir=None``
      gives a string key) turns the cache off.

  Returns:
    The absolute directory used, or ``None`` when off.

  Raises:
    errors.UserError: the directory cannot be made owner-only, or another user owns it.
  """
  if not directory or directory == "None":
    return None
  cache_home = os.environ.get("XDG_CACHE_HOME")
  if cache_home and directory.startswith("~/.cache/"):  # the XDG convention for "~/.cache"
    directory = os.path.join(cache_home, directory[len("~/.cache/"):])
  path = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.getuid():
      with contextlib.suppress(OSError):  # refused below if it stays open
        os.chmod(path, 0o700)  # made earlier, or by someone's umask: close it before any use
      st = os.stat(path)
  except OSError as e:
    raise errors.UserError(
        f"compilation_cache_dir {path}: {e.strerror}; choose a directory of your own "
        "(--config.compilation_cache_dir=DIR) or turn the cache off "
        "(--config.compilation_cache_dir=)") from e
  if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
    raise errors.UserError(
        f"compilation_cache_dir {path} is not private (owner uid {st.st_uid}, mode "
        f"{stat.S_IMODE(st.st_mode):o}): its programs reveal the dataset's row counts and "
        "whoever can write there can run code in this process; choose a directory of your "
        "own (--config.compilation_cache_dir=DIR) or turn the cache off "
        "(--config.compilation_cache_dir=)")
  jax.config.update("jax_compilation_cache_dir", path)
  # JAX caches only programs that took >= 1 s to compile unless told otherwise; here nearly
  # every program takes less, and all of them read back cost far less than compiling them
  # (docs/performance.md, "Small tables").
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
