"""The services around the loop: the persistent compilation cache is private and is hit;
``checkpoint.min_interval_s`` skips epoch-end saves, never the last, and a crash still
resumes to the uninterrupted model.

The cache holds compiled programs whose shapes give the number of training, test and
validation rows (secret under the threat model), and anyone who can write to it can make a
run execute their code: ``use_compilation_cache`` must leave it owner-only or refuse it.
"""

import json
import os
import re
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax._src import compilation_cache  # JAX's own reader of its cache entries

from conftest import make_config, make_dataset
from fastdp_jax import checkpoint as checkpoint_lib
from fastdp_jax import config as config_lib
from fastdp_jax import errors
from fastdp_jax import services
from fastdp_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def jax_updates(monkeypatch):
  """The JAX options ``use_compilation_cache`` sets, recorded instead of applied (a cache
  turned on here would stay on for every later test of this process)."""
  updates = {}
  monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
  return updates


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_new_cache_directory_is_owner_only(tmp_path, jax_updates):
  cache = tmp_path / "home" / ".cache" / "fastdp-jax" / "jax"
  assert services.use_compilation_cache(str(cache)) == str(cache)
  assert _mode(cache) == 0o700
  assert jax_updates["jax_compilation_cache_dir"] == str(cache)
  assert jax_updates["jax_persistent_cache_min_compile_time_secs"] == 0.0


def test_tilde_is_the_users_home(tmp_path, monkeypatch, jax_updates):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv("XDG_CACHE_HOME")  # tests/conftest.py sets one for the session
  used = services.use_compilation_cache(config_lib.DEFAULT_COMPILATION_CACHE)
  assert used == os.path.join(str(tmp_path), ".cache", "fastdp-jax", "jax")
  assert _mode(used) == 0o700
  assert jax_updates["jax_compilation_cache_dir"] == used


def test_xdg_cache_home_replaces_the_default_cache_root(tmp_path, monkeypatch, jax_updates):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  used = services.use_compilation_cache(config_lib.DEFAULT_COMPILATION_CACHE)
  assert used == os.path.join(str(tmp_path), "xdg", "fastdp-jax", "jax")
  assert _mode(used) == 0o700


def test_existing_open_directory_is_closed_before_use(tmp_path, jax_updates):
  cache = tmp_path / "cache"
  cache.mkdir(mode=0o755)
  os.chmod(cache, 0o755)  # whatever the umask
  services.use_compilation_cache(str(cache))
  assert _mode(cache) == 0o700
  assert "jax_compilation_cache_dir" in jax_updates


def test_directory_that_cannot_be_closed_is_refused(tmp_path, monkeypatch, jax_updates):
  cache = tmp_path / "shared"
  cache.mkdir()
  os.chmod(cache, 0o775)

  def refuse(path, mode):
    raise PermissionError(1, "Operation not permitted", str(path))

  monkeypatch.setattr(os, "chmod", refuse)
  with pytest.raises(errors.UserError, match=r"is not private .*mode 775"):
    services.use_compilation_cache(str(cache))
  assert not jax_updates  # the cache was not turned on


def test_another_users_directory_is_refused(tmp_path, monkeypatch, jax_updates):
  cache = tmp_path / "theirs"
  cache.mkdir(mode=0o700)
  monkeypatch.setattr(os, "getuid", lambda: os.stat(cache).st_uid + 1)
  with pytest.raises(errors.UserError, match=r"is not private \(owner uid"):
    services.use_compilation_cache(str(cache))
  assert not jax_updates


@pytest.mark.parametrize("off", ["", None, "None"])
def test_empty_or_none_turns_the_cache_off(off, jax_updates):
  assert services.use_compilation_cache(off) is None
  assert not jax_updates


def test_config_key_defaults_to_the_per_user_cache_and_may_be_none():
  cfg = config_lib.base_config()
  cfg.dp.noise_multiplier = 1.0
  assert config_lib.settings(cfg).compilation_cache_dir == config_lib.DEFAULT_COMPILATION_CACHE
  cfg.compilation_cache_dir = None
  assert config_lib.settings(cfg).compilation_cache_dir is None


def _train_logging_compiles(data, cache, workdir):
  """The command on the test config with JAX's compilation log; its stderr."""
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax", "--config=configs/test.py",
       f"--config.data.path={data}", f"--config.compilation_cache_dir={cache}",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False, env=dict(os.environ, JAX_LOG_COMPILES="1"))
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stderr


def test_second_identical_run_reads_every_program_from_the_cache(tmp_path):
  data = make_dataset(str(tmp_path / "data"), rows=1500)
  cache = tmp_path / "cache"
  first = _train_logging_compiles(data, cache, tmp_path / "w1")
  entries = sorted(os.listdir(cache))
  # JAX logs "Compiling NAME ..." for every program it needs, from the cache or not.
  programs = len(re.findall(r"Compiling ", first))
  assert programs > 0 and len(entries) > 0
  assert "Persistent compilation cache hit" not in first  # an empty cache
  assert _mode(cache) == 0o700
  # The keys are arguments of the compiled programs, never constants baked into them: the
  # cache outlives the workdir (and `checkpoint forget`), so a key in it would be a leak.
  keys = json.loads((tmp_path / "w1" / "keys.json").read_text())
  secrets = [np.array(keys["noise"], np.uint32).tobytes(),
             np.array(keys["sampling"], np.uint64).tobytes()]
  for name in entries:
    program = compilation_cache.decompress_executable((cache / name).read_bytes())
    assert not any(secret in program for secret in secrets), name

  second = _train_logging_compiles(data, cache, tmp_path / "w2")
  hits = len(re.findall(r"Persistent compilation cache hit", second))
  # Every program the second run needed came from the cache; none was compiled or written.
  assert hits == len(re.findall(r"Compiling ", second)) > 0, second[-3000:]
  assert sorted(os.listdir(cache)) == entries, second[-3000:]


def test_cache_off_writes_nothing(tmp_path):
  data = make_dataset(str(tmp_path / "data"), rows=1500)
  home = tmp_path / "home"
  home.mkdir()
  r = subprocess.run(
      [sys.executable, "-m", "fastdp_jax", "--config=configs/test.py",
       f"--config.data.path={data}", "--config.compilation_cache_dir=",
       f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False, env=dict(os.environ, HOME=str(home), JAX_LOG_COMPILES="1"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(r"Compiling ", r.stderr)  # it did compile
  assert not os.listdir(home)  # and kept no cache under ~ (nor anywhere JAX was told)
  assert "Persistent compilation cache" not in r.stderr


def test_unusable_cache_directory_is_one_error_line_unless_it_is_the_default(tmp_path):
  data = make_dataset(str(tmp_path / "data"), rows=1500)
  common = [sys.executable, "-m", "fastdp_jax", "--config=configs/test.py",
            f"--config.data.path={data}", "--config.num_epochs=1"]
  chosen = subprocess.run(
      [*common, "--config.compilation_cache_dir=/dev/null/cache", f"--workdir={tmp_path / 'a'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert chosen.returncode == errors.USER_ERROR_EXIT_CODE, chosen.stderr[-3000:]
  assert "error: compilation_cache_dir /dev/null/cache: Not a directory" in chosen.stderr
  assert "Traceback" not in chosen.stderr
  # The default under a home where nothing can be made: the run goes on, uncached.
  default = subprocess.run([*common, f"--workdir={tmp_path / 'b'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, check=False,
                           env={**{k: v for k, v in os.environ.items()
                                   if k != "XDG_CACHE_HOME"}, "HOME": "/dev/null"})
  assert default.returncode == 0, default.stderr[-3000:]
  assert "running without a compilation cache" in default.stderr
  assert (tmp_path / "b" / "summary.json").exists()


# --- checkpoint.min_interval_s: epoch-end saves at most that often -----------------------------
EPOCHS = 4


class _Crash(Exception):
  """A crash in the middle of a run (what SIGKILL is to a process, here in-process)."""


@pytest.fixture
def saved_steps(monkeypatch):
  """The update of every checkpoint saved (the directory keeps the last two only)."""
  steps = []
  save = checkpoint_lib.Checkpointer.save

  def recording_save(self, step, state, run_state):
    steps.append(step)
    save(self, step, state, run_state)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", recording_save)
  return steps


def _interval_config(dataset, interval, every_steps=100_000):
  return make_config(dataset, **{"num_epochs": EPOCHS, "checkpoint.min_interval_s": interval,
                                 "checkpoint.every_steps": every_steps})


def _final_params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as f:
    return {k: f[k] for k in f}


def _epochs(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["epoch"] for r in map(json.loads, f) if r["kind"] == "epoch"]


def test_an_interval_skips_the_epoch_end_saves_but_the_last(small_dataset, tmp_path,
                                                            saved_steps):
  each = train.train_and_evaluate(_interval_config(small_dataset, 0.0), str(tmp_path / "each"))
  per_epoch = each.steps // EPOCHS
  assert saved_steps == [per_epoch * e for e in range(1, EPOCHS + 1)]  # the default: each end
  saved_steps.clear()
  # An hour between saves: only the run's last update is saved.
  hour = train.train_and_evaluate(_interval_config(small_dataset, 3600.0),
                                  str(tmp_path / "hour"))
  assert saved_steps == [hour.steps] and hour.steps == each.steps
  a, b = _final_params(str(tmp_path / "each")), _final_params(str(tmp_path / "hour"))
  for k in a:
    np.testing.assert_array_equal(b[k], a[k])  # saving changes no update
  assert _epochs(str(tmp_path / "hour")) == list(range(1, EPOCHS + 1))


def test_a_crash_after_skipped_saves_resumes_to_the_same_model(small_dataset, tmp_path,
                                                               saved_steps, monkeypatch):
  ref = train.train_and_evaluate(_interval_config(small_dataset, 3600.0, every_steps=10),
                                 str(tmp_path / "ref"))
  per_epoch = ref.steps // EPOCHS
  saved_steps.clear()
  # Crash at epoch 3's end, after its save was skipped: the last checkpoint is a periodic
  # one of epoch 3, so the resume redoes updates, an epoch end and its record.
  at_epoch_end = services.Services.save_at_epoch_end

  def crash_at_epoch_3(self, step, save):
    at_epoch_end(self, step, save)
    if step == 3 * per_epoch:
      raise _Crash

  monkeypatch.setattr(services.Services, "save_at_epoch_end", crash_at_epoch_3)
  work = str(tmp_path / "crashed")
  with pytest.raises(_Crash):
    train.train_and_evaluate(_interval_config(small_dataset, 3600.0, every_steps=10), work)
  # Periodic saves only (every_steps' saves are kept even where one falls on an epoch end).
  assert saved_steps and all(s % 10 == 0 for s in saved_steps)
  assert 2 * per_epoch < saved_steps[-1] <= 3 * per_epoch
  monkeypatch.setattr(services.Services, "save_at_epoch_end", at_epoch_end)
  again = train.train_and_evaluate(_interval_config(small_dataset, 3600.0, every_steps=10),
                                   work)
  assert again.steps == ref.steps and again.epsilon == ref.epsilon
  a, b = _final_params(str(tmp_path / "ref")), _final_params(work)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k])  # the same updates, from an exact checkpoint
  assert _epochs(work) == list(range(1, EPOCHS + 1))  # no epoch lost or written twice


def test_a_changed_resume_after_logged_but_unsaved_updates_is_refused(small_dataset, tmp_path,
                                                                      saved_steps, monkeypatch):
  # Epoch records (test metrics, epsilon) went out after the last checkpoint: redone with
  # other settings under fresh keys, those updates would be spent but in no ledger segment.
  per_epoch = None
  at_epoch_end = services.Services.save_at_epoch_end

  def crash_at_epoch_2(self, step, save):
    at_epoch_end(self, step, save)
    if step == 2 * per_epoch:
      raise _Crash

  cfg = _interval_config(small_dataset, 3600.0)
  per_epoch = train.train_and_evaluate(cfg, str(tmp_path / "ref")).steps // EPOCHS
  monkeypatch.setattr(services.Services, "save_at_epoch_end", crash_at_epoch_2)
  work = str(tmp_path / "crashed")
  cfg_every_epoch = _interval_config(small_dataset, 0.0)  # a checkpoint at epoch 1's end
  saved_steps.clear()
  with pytest.raises(_Crash):
    train.train_and_evaluate(_interval_config(small_dataset, 3600.0, every_steps=per_epoch),
                             work)
  assert saved_steps == [per_epoch, 2 * per_epoch]  # every_steps' saves are kept
  # A crash right after the save: nothing past the checkpoint is logged, so a changed resume
  # may go on; one after a SKIPPED save is refused.
  monkeypatch.setattr(services.Services, "save_at_epoch_end", at_epoch_end)
  work2 = str(tmp_path / "skipped")
  saved_steps.clear()

  def crash_after_skip(self, step, save):
    if step == 2 * per_epoch:
      raise _Crash  # epoch 2's records are written, its save not made
    at_epoch_end(self, step, save)

  monkeypatch.setattr(services.Services, "save_at_epoch_end", crash_after_skip)
  with pytest.raises(_Crash):
    train.train_and_evaluate(cfg_every_epoch, work2)
  assert saved_steps == [per_epoch]
  monkeypatch.setattr(services.Services, "save_at_epoch_end", at_epoch_end)
  changed = _interval_config(small_dataset, 0.0)
  changed.optimizer.learning_rate *= 2
  changed.checkpoint.allow_changes = True
  with pytest.raises(errors.ResumeMismatchError, match=rf"logged updates up to "
                     rf"{2 * per_epoch} after its last checkpoint \(update {per_epoch}\)"):
    train.train_and_evaluate(changed, work2)
  # The run's own settings redo them exactly; then a change is accounted as a new segment.
  same = train.train_and_evaluate(cfg_every_epoch, work2)
  assert same.steps == EPOCHS * per_epoch
