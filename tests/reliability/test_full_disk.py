"""Every output through one atomic helper; a full disk is one line (exit 2) and loses nothing.

Full disks are real where this process may mount a tiny tmpfs (root), and otherwise simulated
in-process by an ``fsync`` that fails with ENOSPC. Preprocessing on a full disk is in
``test_preprocess_faults.py`` (it shares that module's SparkSession).
"""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax import atomic
from fastdp_jax import errors
from fastdp_jax.export import model_dir
from fastdp_jax import models
from fastdp_jax import summary as summary_lib
from fastdp_jax import train
from tests.conftest import ROOT, make_config, make_dataset
from tests.reliability import tmpfs

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

_NO_TMPFS = tmpfs.why_not()
needs_tmpfs = pytest.mark.skipif(_NO_TMPFS is not None, reason=str(_NO_TMPFS))


def _enospc_when_writing(monkeypatch, fragment: str) -> None:
  """Makes ``fsync`` of any file whose name contains ``fragment`` fail as on a full disk."""
  real = os.fsync

  def fsync(fd):
    if fragment in os.readlink(f"/proc/self/fd/{fd}"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)

  monkeypatch.setattr(atomic.os, "fsync", fsync)


def _leftovers(directory) -> list[str]:
  return [n for _, _, names in os.walk(directory) for n in names if ".tmp" in n]


def _one_error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


def test_a_full_disk_keeps_the_previous_file_and_says_which(tmp_path, monkeypatch):
  path = tmp_path / "summary.json"
  atomic.write_json(path, {"steps": 1})
  _enospc_when_writing(monkeypatch, "summary.json")
  with pytest.raises(atomic.DiskFullError, match=r"no space left on device writing .*summary"
                     r"\.json; the previous summary\.json \(if any\) is intact") as e:
    atomic.write_json(path, {"steps": 2})
  assert isinstance(e.value, errors.UserError)
  assert json.loads(path.read_text()) == {"steps": 1}
  assert _leftovers(tmp_path) == []


def test_private_outputs_are_owner_only_whatever_the_umask(tmp_path):
  old = os.umask(0)
  try:
    atomic.write_text(tmp_path / "private", "secret", mode=0o600)
    atomic.write_npz(tmp_path / "public.npz", {"a": np.arange(3)})
  finally:
    os.umask(old)
  assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
  assert (tmp_path / "public.npz").stat().st_mode & 0o777 == 0o644
  np.testing.assert_array_equal(np.load(tmp_path / "public.npz")["a"], np.arange(3))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  stale = tmp_path / f".keys.json.tmp-{int(dead.stdout)}-0badc0de"
  stale.write_text("private half-written keys")
  live = tmp_path / f".keys.json.tmp-{os.getppid()}-0badc0de"  # a live writer's: kept
  live.write_text("being written")
  atomic.write_text(tmp_path / "keys.json", "{}", mode=0o600)
  assert not stale.exists() and live.exists()


@needs_tmpfs
def test_a_real_full_disk_leaves_the_previous_npz_whole(tmp_path):
  with tmpfs.mounted(tmp_path / "disk", "64k") as disk:
    path = os.path.join(disk, "final_params.npz")
    atomic.write_npz(path, {"w": np.ones(100, np.float32)})
    with pytest.raises(atomic.DiskFullError, match="final_params.npz"):
      atomic.write_npz(path, {"w": np.ones(100_000, np.float32)})  # 400 kB > 64 kB
    np.testing.assert_array_equal(np.load(path)["w"], np.ones(100, np.float32))
    assert os.listdir(disk) == ["final_params.npz"]  # no temporary file left


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=3000, seed=1)


def test_a_full_disk_at_final_params_leaves_no_complete_looking_workdir(dataset, tmp_path,
                                                                       monkeypatch):
  cfg = make_config(dataset, num_epochs=1)
  workdir = str(tmp_path / "w")
  with monkeypatch.context() as m:
    _enospc_when_writing(m, "final_params.npz")
    with pytest.raises(atomic.DiskFullError, match="final_params.npz"):
      train.train_and_evaluate(cfg, workdir)
  # Before: a truncated final_params.npz beside summary.json and model/. Now: no
  # final_params.npz and no summary.json (written last), nothing half-written.
  assert not os.path.exists(os.path.join(workdir, "final_params.npz"))
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  assert _leftovers(workdir) == []
  # The same command again resumes from the last checkpoint and completes.
  summary = train.train_and_evaluate(cfg, workdir)
  final = np.load(os.path.join(workdir, "final_params.npz"))
  assert sorted(final) == sorted(np.load(os.path.join(workdir, "model", "params.npz")))
  assert summary.steps == summary_lib.read_summary(workdir).steps


def _cli(dataset, workdir, *extra):
  return subprocess.run([sys.executable, "main.py", "--config=configs/test.py",
                         f"--config.data.path={dataset}", f"--workdir={workdir}", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


@needs_tmpfs
def test_training_on_a_full_disk_is_one_line_and_keeps_the_last_complete_run(dataset, tmp_path):
  with tmpfs.mounted(tmp_path / "disk", "2m") as disk:
    workdir = os.path.join(disk, "w")
    first = _cli(dataset, workdir, "--config.num_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.load(open(os.path.join(workdir, "summary.json")))
    filler = tmpfs.fill(disk, leave_bytes=16 << 10)  # too little for the next checkpoint
    second = _cli(dataset, workdir, "--config.num_epochs=2")
    assert second.returncode == 2, second.stderr[-3000:]
    line = _one_error_line(second.stderr)
    assert "no space left on device" in line and workdir in line and "intact" in line
    # The first run's outputs and checkpoint are whole.
    assert json.load(open(os.path.join(workdir, "summary.json"))) == before
    assert fastdp_jax.load_model(workdir).spec["privacy"]["steps"] == before["steps"]
    np.load(os.path.join(workdir, "final_params.npz"))["layers/0/kernel"]
    os.remove(filler)
    third = _cli(dataset, workdir, "--config.num_epochs=2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stdout
    after = json.load(open(os.path.join(workdir, "summary.json")))
    assert after["steps"] == 2 * before["steps"]


def _export(directory, hidden):
  _, params = models.functional(models.create_model(4, hidden, seed=0))
  return model_dir.export_model(directory, params=params, feature_names=("a", "b", "c", "d"),
                                label_name="y", hidden_sizes=hidden)


def test_a_full_disk_during_export_keeps_the_previous_model(tmp_path, monkeypatch):
  directory = _export(str(tmp_path / "model"), (3,))
  digest = fastdp_jax.load_model(directory).digest
  with monkeypatch.context() as m:
    _enospc_when_writing(m, "model.json")  # after params.npz: a mix, before
    with pytest.raises(atomic.DiskFullError, match=r"model; the previous model/ \(if any\) "
                       "is intact"):
      _export(directory, (5,))
  assert fastdp_jax.load_model(directory).digest == digest
  assert sorted(os.listdir(tmp_path)) == ["model"]  # no staging directory left


@needs_tmpfs
def test_a_real_full_disk_during_export_keeps_the_previous_model(tmp_path):
  with tmpfs.mounted(tmp_path / "disk", "128k") as disk:
    directory = _export(os.path.join(disk, "model"), (3,))
    digest = fastdp_jax.load_model(directory).digest
    with pytest.raises(atomic.DiskFullError, match="intact"):
      _export(directory, (200, 200))  # 160 kB of parameters
    assert fastdp_jax.load_model(directory).digest == digest
    assert sorted(os.listdir(disk)) == ["model"]


def test_an_append_cut_short_by_a_full_disk_does_not_stop_the_resume(dataset, tmp_path):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(make_config(dataset, num_epochs=1), workdir)
  steps_file = os.path.join(workdir, "metrics.jsonl")
  with open(steps_file, "a") as f:
    f.write('{"kind": "eval", "step": 77, "time_s": 1.')  # the disk filled up mid-line
  summary = train.train_and_evaluate(make_config(dataset, num_epochs=2), workdir)
  with open(steps_file) as f:
    records = [json.loads(line) for line in f]  # every line whole again
  assert records[-1]["step"] == summary.steps
