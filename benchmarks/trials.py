"""K trials of fastdp-tune side by side against one trial, and against K trials in sequence.

One JSON line per tuning run: its wall and CPU seconds (the process's, all threads), the
trials K and how they ran. K is fixed by choosing the seed of the (otherwise secret) trial
generator whose Poisson draw is K, so the runs are reproducible and say ``private: false``
(a timing benchmark, not a private tuning). Data: ``data/fulton_binned`` (the Spark command
in ``configs/fulton_binned.py``). Run each measurement in its own process (the first
compilation is part of a trial's cost)::

  .venv/bin/python benchmarks/trials.py --trials=1
  .venv/bin/python benchmarks/trials.py --trials=10
  .venv/bin/python benchmarks/trials.py --trials=10 --sequential
  .venv/bin/python benchmarks/trials.py --trials=10 --space=default  # 3 widths: 3 groups
  .venv/bin/python benchmarks/trials.py --trials=10 --epoch_metrics  # evaluate every epoch
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _jsonl  # noqa: E402  pylint: disable=g-import-not-at-top


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--trials", type=int, default=10, help="K, the trials drawn")
  p.add_argument("--sequential", action="store_true", help="one trial after another")
  p.add_argument("--space", choices=("one_shape", "default"), default="one_shape",
                 help="one_shape: the default space less the width (every trial one shape)")
  p.add_argument("--config", default="configs/fulton_binned.py", help="a config module's path")
  p.add_argument("--target_epsilon", type=float, default=4.0,
                 help="the total (1 cannot hold a mean of 10 trials with the config's "
                      "temperature and count)")
  p.add_argument("--epoch_metrics", action="store_true",
                 help="search.trials.epoch_metrics=True: evaluate side-by-side trials at "
                      "every epoch end (default: at their last update only)")
  p.add_argument("--out", default=None, help="also append the JSON line here")
  a = p.parse_args()
  from fastdp_jax import tune  # pylint: disable=g-import-not-at-top
  from fastdp_jax.dp import tuning  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(a.config.removesuffix(".py").replace("/", ".")).get_config()
  cfg.dp.target_epsilon, cfg.dp.max_epsilon = a.target_epsilon, None
  search = tune.default_search()
  search.trials.sequential = a.sequential
  search.trials.epoch_metrics = a.epoch_metrics
  if a.space == "one_shape":
    search.space = tuple(d for d in search.space if d[0] != "model.hidden_sizes")
  count = tune.trial_count(search)
  seed = next(s for s in range(100_000) if count.draw(np.random.default_rng(s)) == a.trials)
  tuning.secret_rng = lambda: np.random.default_rng(seed)  # K = a.trials, reproducibly
  workdir = tempfile.mkdtemp(prefix="fastdp-trials-")
  try:
    t0, c0 = time.time(), time.process_time()
    summary = tune.tune(cfg, search, os.path.join(workdir, "w"))
    wall, cpu = time.time() - t0, time.process_time() - c0
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  _jsonl.emit(dict(benchmark="trials", config=a.config, trials=a.trials, space=a.space,
                   mode="sequential" if a.sequential else "side_by_side",
                   epoch_metrics=a.epoch_metrics,
                   wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                   test_accuracy=summary.test_accuracy, **_jsonl.env()), a.out)


if __name__ == "__main__":
  main()
