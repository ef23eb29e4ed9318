"""Trials side by side (fastdp_jax.trials): each trial equals the same trial run alone.

"Alone" is the real trainer (``train.train_and_evaluate``) with the same config: the same
public seeds give both runs the same secret keys (sampling and noise), so the two differ only
by float32 rounding (vmap batches the products; C enters as ``C * clip_1(g / C)``).
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from fastdp_jax import train
from fastdp_jax import trials
from fastdp_jax import tune
from fastdp_jax.dp import tuning
from tests.conftest import make_config, make_dataset

EPOCHS = 2
# Three trials that differ in everything a trial may: learning rate, C, sigma, weight decay
# (one trial only: the group then uses the decayed optimizer with a decay of 0 for the
# others), the model's seed and the secret keys (here from public seeds, to compare runs).
TRIALS = (dict(lr=0.05, clip=1.0, sigma=1.0, decay=0.0),
          dict(lr=0.2, clip=0.3, sigma=2.0, decay=1e-3),
          dict(lr=0.01, clip=3.0, sigma=0.6, decay=0.0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("d") / "data"), rows=3000, seed=5)


def _config(path, i, h, clipping="auto"):
  return make_config(path, **{
      "optimizer.learning_rate": h["lr"], "dp.l2_norm_clip": h["clip"],
      "dp.noise_multiplier": h["sigma"], "optimizer.weight_decay": h["decay"],
      "dp.noise_seed": 100 + i, "dp.sampling_seed": 200 + i, "seed": i,
      "dp.clipping": clipping, "checkpoint.enabled": False, "num_epochs": EPOCHS})


def _params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as f:
    return {k: f[k] for k in f}


def _tolerance(params, steps):
  """How far two float32 runs of the same trial may drift apart by rounding alone.

  Each update rounds every parameter's new value and the terms of its update a few times
  (the clipped sum's order under vmap, the ``C * clip_1(g / C)`` rescaling, the optimizer):
  at most about 4 roundings of relative size u = 2^-24 (float32's unit roundoff) of the
  parameters' magnitude per update. Rounding errors add up over the T updates (they are not
  amplified at these learning rates), so the bound is 4 * T * u * max|theta|. For these
  runs (T = 76) it is ~2e-5 times the largest parameter, three orders of magnitude above
  the rounding actually seen (~1e-8) and far below what a wrong key, C, sigma or learning
  rate changes (checked below: the trials differ from each other by > 100x the bound).
  """
  largest = max(float(np.abs(v).max()) for v in params.values())
  return 4 * steps * 2.0 ** -24 * max(largest, 1.0)


@pytest.mark.parametrize("clipping", ["ghost", "vmap"])
def test_each_trial_side_by_side_equals_the_trial_alone(dataset, tmp_path, clipping):
  cfgs = [_config(dataset, i, h, clipping) for i, h in enumerate(TRIALS)]
  alone = [train.train_and_evaluate(c, str(tmp_path / f"alone{i}")) for i, c in enumerate(cfgs)]
  side = trials.run_trials(cfgs, [str(tmp_path / f"side{i}") for i in range(len(cfgs))])
  finals = []
  for i, (a, s) in enumerate(zip(alone, side)):
    pa, ps = _params(str(tmp_path / f"alone{i}")), _params(str(tmp_path / f"side{i}"))
    tol = _tolerance(pa, a.steps)
    assert sorted(pa) == sorted(ps)
    for k in pa:
      np.testing.assert_allclose(ps[k], pa[k], rtol=0, atol=tol, err_msg=f"trial {i} {k}")
    # The same run on the host side: its plan, its ledger, its updates.
    assert (s.steps, s.noise_multiplier, s.l2_norm_clip, s.sampling_rate) == (
        a.steps, a.noise_multiplier, a.l2_norm_clip, a.sampling_rate)
    assert s.epsilon == a.epsilon and s.training_epsilon == a.training_epsilon
    finals.append(pa)
  # The tolerance separates trials: any two differ by far more than it.
  for i in range(len(finals)):
    for j in range(i + 1, len(finals)):
      gap = max(float(np.abs(finals[i][k] - finals[j][k]).max()) for k in finals[i])
      assert gap > 100 * _tolerance(finals[i], alone[i].steps)


def test_a_trial_is_independent_of_the_others(dataset, tmp_path):
  cfgs = [_config(dataset, i, h) for i, h in enumerate(TRIALS)]
  trials.run_trials(cfgs, [str(tmp_path / f"a{i}") for i in range(3)])
  changed = dict(TRIALS[1], lr=0.02, clip=2.0, sigma=1.5)
  other = [cfgs[0], _config(dataset, 1, changed), cfgs[2]]
  summaries = trials.run_trials(other, [str(tmp_path / f"b{i}") for i in range(3)])
  for i in (0, 2):
    before, after = _params(str(tmp_path / f"a{i}")), _params(str(tmp_path / f"b{i}"))
    tol = _tolerance(before, summaries[i].steps)
    for k in before:
      np.testing.assert_allclose(after[k], before[k], rtol=0, atol=tol)
  # The changed trial itself did change (by far more than rounding).
  before, after = _params(str(tmp_path / "a1")), _params(str(tmp_path / "b1"))
  assert max(float(np.abs(before[k] - after[k]).max()) for k in before) > 100 * _tolerance(
      before, summaries[1].steps)


def _epoch_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "epoch"]


def test_trials_evaluated_at_the_last_update_only_end_with_the_same_metrics(dataset, tmp_path):
  # Three epochs: two epoch ends whose evaluation, epsilon and attack are skipped.
  cfgs = [_config(dataset, i, h) for i, h in enumerate(TRIALS)]
  for c in cfgs:
    c.num_epochs = 3
  every = trials.run_trials(cfgs, [str(tmp_path / f"e{i}") for i in range(3)])
  last = trials.run_trials(cfgs, [str(tmp_path / f"l{i}") for i in range(3)],
                           epoch_metrics=False)
  for i, (a, b) in enumerate(zip(every, last)):
    # The same program on the same inputs: the same bits, not merely close.
    pa, pb = _params(str(tmp_path / f"e{i}")), _params(str(tmp_path / f"l{i}"))
    for k in pa:
      np.testing.assert_array_equal(pb[k], pa[k], err_msg=f"trial {i} {k}")
    # The summary (what the released model's card and score come from) is the same, but
    # for the run's wall time and where its model went.
    same = lambda r: dataclasses.replace(r, wall_time_s=0.0, model_dir="")
    assert same(b) == same(a)
    ra, rb = _epoch_records(str(tmp_path / f"e{i}")), _epoch_records(str(tmp_path / f"l{i}"))
    assert [r["epoch"] for r in ra] == [1, 2, 3] and [r["epoch"] for r in rb] == [3]
    # The last epoch's record, train loss of that epoch alone included, but for its clock.
    drop = lambda r: {k: v for k, v in r.items() if k not in ("epoch_time_s", "time")}
    assert drop(rb[0]) == drop(ra[-1])


def test_trials_of_different_shapes_are_grouped_apart(dataset, tmp_path):
  from fastdp_jax import config as config_lib
  wide = make_config(dataset, **{"model.hidden_sizes": (16,), "checkpoint.enabled": False})
  rcs = [config_lib.settings(c) for c in (_config(dataset, 0, TRIALS[0]), wide,
                                          _config(dataset, 1, TRIALS[1]))]
  assert trials.group_by_shape(rcs) == [[0, 2], [1]]
  with pytest.raises(trials.TrialShapeError, match="group them"):
    trials.run_trials([_config(dataset, 0, TRIALS[0]), wide],
                      [str(tmp_path / "x0"), str(tmp_path / "x1")])
  assert not os.path.exists(tmp_path / "x0")  # refused before any work


def _one_shape_search(k, sequential, monkeypatch):
  """A search over the learning rate and C only (one shape), with exactly ``k`` trials."""
  search = tune.default_search()
  search.trials.mean = float(k)
  search.trials.sequential = sequential
  search.space = (("optimizer.learning_rate", "log_scale", (0.25, 4.0)),
                  ("dp.l2_norm_clip", "log_scale", (0.25, 4.0)))
  count = tuning.TrialCount(distribution="poisson", mean=float(k))
  seed = next(s for s in range(1000) if count.draw(np.random.default_rng(s)) == k)
  monkeypatch.setattr(tuning, "secret_rng", lambda: np.random.default_rng(seed))
  return search


def _tune_config(path):
  return make_config(path, **{"dp.noise_seed": None, "dp.sampling_seed": None,
                              "dp.target_epsilon": 4.0, "data.validation_fraction": 0.25,
                              "calibration.epsilon": 0.1, "num_epochs": 1,
                              "data.attack_column": ""})


def test_tuning_runs_trials_of_one_shape_side_by_side(dataset, tmp_path, monkeypatch):
  search = _one_shape_search(3, False, monkeypatch)
  ran = []
  real = trials.run_trials
  monkeypatch.setattr(trials, "run_trials",
                      lambda cfgs, *a, **kw: ran.append(len(cfgs)) or real(cfgs, *a, **kw))
  workdir = str(tmp_path / "w")
  summary = tune.tune(_tune_config(dataset), search, workdir)
  assert ran == [3]  # the three trials in one compiled step
  with open(os.path.join(workdir, "trials.json")) as f:
    records = json.load(f)
  best = max(records["trials"], key=lambda r: r["noisy_score"])
  assert records["released"] == best["trial"] and len(records["trials"]) == 3
  # The released model is the best trial's parameters, as its own run wrote them.
  released = np.load(os.path.join(workdir, "model", "params.npz"))
  kept = _params(best["workdir"])
  assert sorted(released) == sorted(kept)
  assert all(np.array_equal(released[k], kept[k]) for k in kept)
  # Every trial has the procedure's privacy event; the total is the procedure's.
  assert {r["noise_multiplier"] for r in records["trials"]} == {summary.noise_multiplier}
  assert summary.private and summary.epsilon <= 4.0


def test_a_sequential_search_runs_each_trial_alone(dataset, tmp_path, monkeypatch):
  search = _one_shape_search(2, True, monkeypatch)

  def refuse(*args, **kwargs):
    raise AssertionError("a sequential search ran trials side by side")

  monkeypatch.setattr(trials, "run_trials", refuse)
  tune.tune(_tune_config(dataset), search, str(tmp_path / "w"))
  with open(os.path.join(str(tmp_path / "w"), "trials.json")) as f:
    assert len(json.load(f)["trials"]) == 2
