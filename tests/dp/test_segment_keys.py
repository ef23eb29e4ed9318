"""A resume that changes the sampler's settings samples the rest of the run independently."""

import numpy as np

from fastdp_jax import train
from fastdp_jax.data import shards
from fastdp_jax.dp import keys as keys_lib
from fastdp_jax.dp import sampling
from tests.conftest import make_config, make_dataset


def _inclusions(key, n, batch_size, first, count):
  b = sampling.PoissonSampler(n, batch_size, key).batches(first, count)
  out = np.zeros((count, n), bool)
  for t in range(count):
    out[t, b.indices[t, 0][b.mask[t, 0]]] = True
  return out


def test_one_sampling_key_per_segment(tmp_path):
  # Segment 1 at batch 64, then a resume that doubles the batch size.
  data = make_dataset(str(tmp_path / "data"), rows=3000)
  workdir = str(tmp_path / "run")
  cfg = make_config(data, num_epochs=1, **{"dp.sampling_seed": None, "dp.noise_seed": None})
  first = train.train_and_evaluate(cfg, workdir)
  old = keys_lib.load(workdir)
  cfg2 = make_config(data, num_epochs=4, batch_size=128, **{
      "dp.sampling_seed": None, "dp.noise_seed": None, "checkpoint.allow_changes": True})
  second = train.train_and_evaluate(cfg2, workdir)
  new = keys_lib.load(workdir)
  assert not np.array_equal(old.sampling, new.sampling)
  assert [s["sampling_rate"] for s in second.privacy_ledger] == [
      first.sampling_rate, second.sampling_rate]
  n = len(shards.load_split(data, "train"))
  start, count = first.steps, 20
  # The second segment's batches: those of the new key. Had the run kept the first key, they
  # would be exactly the old key's batches at these updates (correlation 1), which the first
  # segment's key already determines; with the fresh key they are independent of it. With
  # about 2400 rows x 20 updates the correlation of independent draws has a standard error
  # near 1/sqrt(48000) = 0.005; 0.05 is ten of them.
  with_new = _inclusions(new.sampling, n, 128, start, count).ravel()
  with_old = _inclusions(old.sampling, n, 128, start, count).ravel()
  assert with_new.any() and with_old.any()
  assert abs(np.corrcoef(with_new, with_old)[0, 1]) < 0.05
