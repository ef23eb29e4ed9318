"""Every update of the real loop, at float precision: update minus its exact noise equals the
float64 clipped sum, for each task, embeddings, ghost and vmap clipping, 1 and 8 devices,
before and after a resume.

The loop is the trainer's own (:func:`fastdp_jax.train.setup` and
:meth:`fastdp_jax.train.Trainer.train_call`, one update per call, plain SGD), with the noise
and sampling fixed by seeds. Before and after each update the parameters are read; the noise
of that update is re-derived from ``jax.random`` by the documented key schedule, taken out,
and what remains is compared with a NumPy float64 clipped sum over the update's batch
(``tests/dp/update_reference.py``) to a derived float32 tolerance, coordinate by coordinate.
Where ``test_privacy_guarantees.py`` checks the residual's statistics (its std within 5 %),
these checks leave no room: noise of std sigma / 2, a clipping norm of 1.01 C, two examples
clipped together, a noise draw used twice or the noise counter reset by a resume all fail
them (``make mutation``). The streamed (materialised batches) case is in
``tests/test_streamed_training.py``, which has the batches.
"""

from __future__ import annotations

import contextlib

import jax
import pytest

from fastdp_jax import atomic
from fastdp_jax import train
from fastdp_jax.dp import sampling
from tests.conftest import make_config, make_dataset
from tests.dp import update_reference as ref_lib
from tests.test_tasks import _write as write_task_data

SEED = 0  # configs/test.py's dp.noise_seed and dp.sampling_seed
LR = 0.5
CLIP = 0.1  # below most per-example gradient norms (checked): clipping is exercised
SIGMA = 1.5
BATCH = 24
ROWS = 400  # of which about 300 train rows: q about 0.08


def _config(path, *, clipping, **overrides):
  return make_config(path, **{
      "batch_size": BATCH, "num_epochs": 1, "model.hidden_sizes": (),
      "model.embedding_dim": 3, "optimizer.name": "sgd", "optimizer.learning_rate": LR,
      "optimizer.momentum": 0.0, "dp.l2_norm_clip": CLIP, "dp.noise_multiplier": SIGMA,
      "dp.target_epsilon": None, "dp.clipping": clipping, "steps_per_call": 1,
      "checkpoint.enabled": True, "export_model": False, "data.attack_column": "",
      "privacy_eval.membership_rows": 0, **overrides})


def _layout(t: train.Trainer) -> ref_lib.Linear:
  """The linear model's layout, from the trainer's data (task, embedding column)."""
  emb = t.data.embeddings
  d = t.data.train.features.shape[1]
  idx = emb[0].index if emb else None
  return ref_lib.Linear(kind=t.data.head.kind, dense=tuple(j for j in range(d) if j != idx),
                        id_column=idx, bounds=t.data.head.bounds)


def check_updates(t: train.Trainer, count: int, batch_of, what: str, *,
                  batch_size: int = BATCH) -> None:
  """Runs ``count`` updates of ``t`` one call at a time; checks each against the reference.

  Args:
    t: the trainer.
    count: updates to run and check.
    batch_of: ``update -> (features, labels)`` of its batch's real rows.
    what: names the case in a failure.
    batch_size: the run's expected batch size B.
  """
  layout = _layout(t)
  key = ref_lib.noise_key_of_seed(SEED)
  for _ in range(count):
    step = t.step
    before = jax.device_get(t.progress.state.params)
    x, y = batch_of(step)
    assert len(x) > 0, "an empty batch checks nothing"
    ref = ref_lib.clipped_sum(layout, before, x, y, CLIP)
    assert ref.clipped_fraction >= 0.5, f"premise: clipping is exercised ({ref.clipped_fraction})"
    t.train_call(1)
    after = jax.device_get(t.progress.state.params)
    ref_lib.check_update(ref, before, after, key, step, batch_size=batch_size, lr=LR,
                         stddev=SIGMA * CLIP, rows=len(x), what=what)


def in_memory_batches(t: train.Trainer):
  """``update -> rows`` of an in-memory run: an own sampler with the run's public seed."""
  sampler = sampling.PoissonSampler(
      t.data.num_examples, BATCH, sampling.sampling_key(SEED)[0],
      shard_bounds=t.data.dev.bounds, sampling_rate=t.plan.sampling_rate)

  def batch_of(step):
    idx = sampler.global_indices(step)
    return t.data.train.features[idx], t.data.train.labels[idx]

  return batch_of


def run_and_resume(cfg, workdir: str, batches_of, what: str, *, first: int = 2,
                   second: int = 2, batch_size: int = BATCH) -> None:
  """``first`` checked updates, a checkpoint, a new trainer resumed from it in the same
  workdir, ``second`` more checked updates (the noise counter and keys come back)."""
  atomic.make_private_dir(workdir)
  with contextlib.ExitStack() as cleanup:
    t = train.setup(cfg, workdir, cleanup)
    assert t.step == 0
    check_updates(t, first, batches_of(t), f"{what}, before the resume",
                  batch_size=batch_size)
    t.save()
  with contextlib.ExitStack() as cleanup:
    t = train.setup(cfg, workdir, cleanup)
    assert t.step == first, "the second trainer did not resume"
    check_updates(t, second, batches_of(t), f"{what}, after the resume",
                  batch_size=batch_size)


CASES = [  # (task, embeddings)
    ("binary", False), ("binary", True), ("multiclass", True), ("regression", True)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("precision")
  out = {}
  for kind, emb in CASES:
    path = str(root / f"{kind}-{emb}")
    out[kind, emb] = (write_task_data(path, kind, rows=ROWS, seed=3) if emb else
                      make_dataset(path, rows=ROWS, seed=3))
  return out


@pytest.mark.parametrize("clipping", ["ghost", "vmap"])
@pytest.mark.parametrize("kind,embeddings", CASES,
                         ids=[f"{k}{'-embeddings' if e else ''}" for k, e in CASES])
def test_update_minus_noise_equals_float64_clipped_sum_in_memory(datasets, tmp_path, kind,
                                                                 embeddings, clipping):
  cfg = _config(datasets[kind, embeddings], clipping=clipping)
  run_and_resume(cfg, str(tmp_path / "w"), in_memory_batches,
                 f"{kind}{' with embeddings' if embeddings else ''}, {clipping} clipping")


@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["shard_map", "auto"])
@pytest.mark.parametrize("clipping", ["ghost", "vmap"])
def test_update_minus_noise_equals_float64_clipped_sum_on_eight_devices(datasets, tmp_path,
                                                                        clipping, strategy):
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  cfg = _config(datasets["multiclass", True], clipping=clipping,
                **{"parallel.strategy": strategy})
  run_and_resume(cfg, str(tmp_path / "w"), in_memory_batches,
                 f"8 devices, {strategy}, multiclass with embeddings, {clipping} clipping")
