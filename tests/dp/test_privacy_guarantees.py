"""The guarantee, checked through the real training loop (``train.train_and_evaluate``).

Each test runs the trainer for one or two plain-SGD updates with learning rate 1 and
recomputes, independently of the trainer's clipping code, the sum S of per-example gradients
clipped to C over the update's batch. What remains of the update,

    r = -(params_after - params_before) * expected_batch_size / learning_rate - S,

must be the noise alone: i.i.d. N(0, (sigma C)^2) per coordinate, fresh at every update. A loop
that noised with sigma/2, clipped at 10 C or not at all, divided by the realised batch size,
reused a noise key, or added the noise on every device fails one of these tests (see
``make mutation`` and docs/privacy.md).

Tolerances: with d parameters, the mean of d standard normals has standard error 1/sqrt(d)
and their sample standard deviation about 1/sqrt(2 d); d is about 2,800 here, so the 5 % band
on the standard deviation is about 3.7 standard errors, and means and correlations are
checked at 5 standard errors. Every run is seeded, so each check is deterministic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax import models
from fastdp_jax.dp import sampling
from fastdp_jax import train
from tests.conftest import make_config

HIDDEN = (64, 32)  # 9-64-32-1: 2,817 parameters
NUM_FEATURES = 9
CLIP = 0.05  # below every per-example gradient norm here (checked): every example is clipped
LR = 1.0


def _dataset(path, rows, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.random((rows, NUM_FEATURES)) < 0.5).astype(np.float32)
  # Mostly one label: the clipped gradients point the same way, so |S| is large against the
  # noise (the regression test below needs that).
  y = (rng.random(rows) < 0.95).astype(np.float32)
  names = tuple(f"f{i}" for i in range(NUM_FEATURES))
  with data_lib.DatasetWriter(path, feature_names=names, label_name="y",
                              feature_bounds=(0, 1)) as w:
    w.add("train", x, y)
    w.add("test", x[:32], y[:32])
  return x, y


def _config(path, *, batch_size, sigma, epochs=1, **overrides):
  cfg = make_config(path, **overrides)
  cfg.num_epochs = epochs
  cfg.batch_size = batch_size
  cfg.model.hidden_sizes = HIDDEN
  cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.momentum = "sgd", LR, 0.0
  cfg.dp.noise_multiplier, cfg.dp.l2_norm_clip = sigma, CLIP
  cfg.dp.target_epsilon = None
  cfg.steps_per_call = 1  # every update is its own compiled call
  cfg.checkpoint.enabled = False
  cfg.export_model = False
  cfg.data.attack_column = ""
  cfg.privacy_eval.membership_rows = 0
  return cfg


def _flat(params):
  return np.concatenate([np.asarray(v, np.float64).ravel()
                         for _, v in sorted(models.flatten_params(params).items())])


def _initial_params(cfg):
  model = models.create_model(NUM_FEATURES, HIDDEN, cfg.seed)
  apply_fn, params = models.functional(model)
  return apply_fn, params


def _final_params(workdir):
  saved = np.load(f"{workdir}/final_params.npz")
  return np.concatenate([np.asarray(saved[k], np.float64).ravel() for k in sorted(saved.files)])


def _clipped_sum(apply_fn, params, x, y):
  """S = sum_i g_i * min(1, C / |g_i|), written here apart from fastdp_jax.dp.clipping/ghost."""
  def loss(p, xi, yi):
    z = apply_fn(p, xi[None])[0]
    return -(yi * jax.nn.log_sigmoid(z) + (1 - yi) * jax.nn.log_sigmoid(-z))

  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, jnp.asarray(x),
                                                         jnp.asarray(y))
  flat = np.concatenate([np.asarray(v, np.float64).reshape(len(x), -1)
                         for _, v in sorted(models.flatten_params(grads).items())], axis=1)
  norms = np.linalg.norm(flat, axis=1)
  assert norms.min() > CLIP, "precondition: every example is clipped"
  return (flat * np.minimum(1.0, CLIP / norms)[:, None]).sum(axis=0)


def _noise_residual(before, after, s, expected_batch):
  return -(after - before) * expected_batch / LR - s


def _check_gaussian(r, std):
  z = r / std
  d = z.size
  assert abs(z.mean()) < 5 / np.sqrt(d), f"noise mean {z.mean():.4f} (in units of sigma C)"
  assert abs(z.std() - 1) < 0.05, (f"noise std is {z.std():.4f} sigma C, not 1 (within 5 %):"
                                   " the loop does not add the noise it reports")


def _one_update_residual(tmp_path, clipping):
  n, sigma = 64, 2.0
  path = str(tmp_path / "data")
  x, y = _dataset(path, n)
  cfg = _config(path, batch_size=n, sigma=sigma, **{"dp.clipping": clipping})  # q = 1
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert summary.steps == 1 and summary.sampling_rate == 1.0
  assert summary.noise_multiplier == sigma and summary.l2_norm_clip == CLIP
  apply_fn, p0 = _initial_params(cfg)
  s = _clipped_sum(apply_fn, p0, x, y)
  return _noise_residual(_flat(p0), _final_params(tmp_path / "w"), s, n), sigma * CLIP


@pytest.mark.parametrize("clipping", ["ghost", "vmap"])
def test_update_noise_has_the_reported_std_and_clipping_bound(tmp_path, clipping):
  r, std = _one_update_residual(tmp_path, clipping)
  _check_gaussian(r, std)


@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["shard_map", "auto"])
def test_noise_is_added_once_across_eight_devices(tmp_path, strategy):
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  n, sigma = 64, 2.0
  path = str(tmp_path / "data")
  x, y = _dataset(path, n)
  cfg = _config(path, batch_size=n, sigma=sigma, **{"parallel.strategy": strategy})
  train.train_and_evaluate(cfg, str(tmp_path / "w"))
  apply_fn, p0 = _initial_params(cfg)
  r = _noise_residual(_flat(p0), _final_params(tmp_path / "w"),
                      _clipped_sum(apply_fn, p0, x, y), n)
  _check_gaussian(r, sigma * CLIP)


def test_noise_is_fresh_at_every_update(tmp_path):
  # T = 1 and T = 2 runs with the same seeds share their first update exactly; the second
  # update's noise must be independent of the first (a reused key gives correlation 1).
  n, sigma = 64, 2.0
  path = str(tmp_path / "data")
  x, y = _dataset(path, n)
  one = _config(path, batch_size=n, sigma=sigma, epochs=1)
  two = _config(path, batch_size=n, sigma=sigma, epochs=2)
  train.train_and_evaluate(one, str(tmp_path / "one"))
  assert train.train_and_evaluate(two, str(tmp_path / "two")).steps == 2
  apply_fn, p0 = _initial_params(one)
  p0_flat, p1, p2 = _flat(p0), _final_params(tmp_path / "one"), _final_params(tmp_path / "two")
  r1 = _noise_residual(p0_flat, p1, _clipped_sum(apply_fn, p0, x, y), n)
  # The parameters after update 1, as a pytree, for the second clipped sum.
  saved = np.load(tmp_path / "one" / "final_params.npz")
  p1_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(p0),
                                         [np.asarray(saved[k]) for k in _leaf_names(p0)])
  r2 = _noise_residual(p1, p2, _clipped_sum(apply_fn, p1_tree, x, y), n)
  _check_gaussian(r1, sigma * CLIP)
  _check_gaussian(r2, sigma * CLIP)
  corr = np.corrcoef(r1, r2)[0, 1]
  assert abs(corr) < 5 / np.sqrt(r1.size), f"updates 1 and 2 share noise (correlation {corr})"


def _leaf_names(params):
  """Leaf names of ``params`` in tree-flatten order (as in final_params.npz)."""
  paths, _ = jax.tree_util.tree_flatten_with_path(params)
  return ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in paths]


def test_update_divides_by_the_expected_not_the_realised_batch_size(tmp_path):
  # q < 1: the batch is reconstructed from the (fixed, test-only) sampling seed. A seed whose
  # realised batch differs from the expected one by at least 3 % is taken, so that dividing by
  # the realised size would scale S by a factor 3 % off 1: many standard errors of the
  # regression coefficient of r on S, which is N(0, (sigma C / |S|)^2) for the right loop.
  n, batch, sigma = 400, 300, 0.5
  path = str(tmp_path / "data")
  x, y = _dataset(path, n)
  for seed in range(200):
    idx = sampling.PoissonSampler(n, batch, seed).global_indices(0)
    if abs(len(idx) / batch - 1) >= 0.03:
      break
  else:
    raise AssertionError("no seed with a batch 3 % off its expectation among 200")
  cfg = _config(path, batch_size=batch, sigma=sigma, **{"dp.sampling_seed": seed})
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert summary.steps == 1 and summary.sampling_rate == pytest.approx(batch / n)
  apply_fn, p0 = _initial_params(cfg)
  s = _clipped_sum(apply_fn, p0, x[idx], y[idx])
  r = _noise_residual(_flat(p0), _final_params(tmp_path / "w"), s, batch)
  coef = r @ s / (s @ s)
  bound = 5 * sigma * CLIP / np.linalg.norm(s)
  assert bound < 0.5 * abs(len(idx) / batch - 1)  # the check can see a 3 % scaling
  assert abs(coef) < bound, f"the update is scaled by {1 + coef:.4f} (realised batch size?)"
  _check_gaussian(r, sigma * CLIP)


def test_default_runs_draw_secret_batches(tmp_path):
  # The batches of a default run come from a secret key, not from anything in the config:
  # two runs of the same config (noise fixed, dp.sampling_seed unset) train on different
  # batches, hence end with different parameters; a key derived from the config (e.g. from
  # cfg.seed) would give the same batches twice and no amplification by subsampling.
  n, batch = 400, 300
  path = str(tmp_path / "data")
  _dataset(path, n)
  cfg = _config(path, batch_size=batch, sigma=0.5, **{"dp.sampling_seed": None})
  out = [train.train_and_evaluate(cfg, str(tmp_path / w)) for w in ("a", "b")]
  assert all(s.sampling == "os entropy" for s in out)
  a, b = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
  assert not np.array_equal(a, b), "two default runs drew the same batches"
