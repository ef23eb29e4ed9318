"""SIGTERM's contract with the trainer (the end-to-end runs are in tests/reliability/:
test_resume.py for one process, test_multihost.py for two)."""

import os
import signal

from jax.experimental import multihost_utils

from fastdp_jax import train
from fastdp_jax import preemption
from tests.conftest import make_config
import pytest

# Spark sessions, extra processes or a wheel build: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow


def test_one_process_notes_sigterm_only_while_armed_and_restores_the_handler():
  watch = preemption.Watch(enabled=True)
  before = signal.getsignal(signal.SIGTERM)
  with watch.armed():
    assert not watch.requested()
    os.kill(os.getpid(), signal.SIGTERM)  # noted, not fatal
    assert watch.requested()
  assert signal.getsignal(signal.SIGTERM) is before


def test_without_a_checkpointer_sigterm_is_left_alone():
  watch = preemption.Watch(enabled=False)
  before = signal.getsignal(signal.SIGTERM)
  with watch.armed():
    assert signal.getsignal(signal.SIGTERM) is before
  assert not watch.requested()


def test_several_processes_ask_jax_once_per_call_with_ids_growing_by_one(monkeypatch):
  # JAX agrees on "the largest id any process reached, plus one": the ids must be 1, 2, 3, ...
  asked = []
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda i: asked.append(i) or i == 3)
  watch = preemption.Watch(enabled=True)
  before = signal.getsignal(signal.SIGTERM)
  with watch.armed():  # JAX's notifier owns SIGTERM here: no handler of ours
    assert signal.getsignal(signal.SIGTERM) is before
    assert [watch.requested() for _ in range(3)] == [False, False, True]
  assert asked == [1, 2, 3]


def test_the_checkpointer_leaves_jaxs_sync_point_to_the_trainer(small_dataset, tmp_path,
                                                                  monkeypatch):
  # Orbax's manager would ask at every save with the update number (8, 16, ..., 75, ...),
  # interleaving a second id sequence with the trainer's (observed: a stop 480 updates late).
  asked = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda i: asked.append(i) or False)
  cfg = make_config(small_dataset, **{"checkpoint.every_steps": 8})
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  saved = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
  assert summary.steps in saved and len(saved) == 2  # it did save, several times
  assert asked == []  # one process: the trainer's own handler, and orbax asked nothing
