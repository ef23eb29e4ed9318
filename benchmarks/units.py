"""Household-level against row-level DP-SGD on the same synthetic households (issue #23).

What it measures, at one target epsilon (default 1; delta: the trainer's default rule) over
``--seeds`` fresh private runs each (secret OS-entropy keys; the seed index is the model's
initialisation seed, ``config.seed``):

* ``household``: ``configs/households.py`` on the ``pums_households`` dataset (the local
  engine's output: households sampled with probability q = B_u / U, each household's row
  gradients clipped to C as ONE sum, (epsilon, delta) for a whole household);
* ``row``: the same config on a ROW-level dataset of the same rows (every row its own unit,
  sampled with probability B_r / N, clipped per row, (epsilon, delta) for one row), with the
  expected rows per update matched: B_r = B_u x (kept training rows / training households),
  so q, T and hence sigma are (up to the DP estimate of N) the same as the household run's.

The row-level dataset is written from the household dataset's shards (not from the CSV through
a second spec): its train split is the household train split's rows that the household run
trains on (at most k = ``max_rows_per_unit`` rows of each household, the same rank
:func:`fastdp_jax.data.units.group` keeps), its test split the household test split's rows.
So both models are scored on the SAME held-out households, none of whose rows either model
trained on, by the same NumPy functions, from the exported model (``load_model``): accuracy
at 0.5, ROC AUC, log-loss.

For the row-level run it also states what that run guarantees a household of k = 2, 3, 5, 8
rows (:func:`fastdp_jax.dp.accounting.group_epsilon` at the run's own sigma, q, T and delta:
a household with k rows puts Binomial(k, q) clipped rows into an update; plus k times the
temperature's epsilon where the config calibrates, ``configs/households.py`` does).

Prints one JSON line per run and one ``"kind": "summary"`` line (``--out`` appends them)::

  .venv/bin/python benchmarks/units.py --households 40000 --seeds 3 \\
      --out benchmarks/results/units_DATE.jsonl

The exact test metrics are secret under the project's threat model; this benchmark runs on
SYNTHETIC households (``preprocessing.synthesize --households``), which no one needs to hide.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _jsonl import emit, env  # noqa: E402

CONFIG = "configs/households.py"
LEVELS = ("household", "row")
GROUP_SIZES = (2, 3, 5, 8)


# --- the rows ---------------------------------------------------------------------------
def make_datasets(work: str, households: int, seed: int) -> dict:
  """The household dataset (synthesize + the local engine) and its row-level twin.

  Returns:
    ``{"household": dir, "row": dir, "units": U, "kept_rows": rows of the units' training
    rows kept by the bound k, "dropped_rows": rows beyond k, "k": k}`` (U and the row count
    are exact counts of synthetic data, used for the row batch size and stated as such).
  """
  from fastdp_jax import load_split
  from fastdp_jax.data import manifest as manifest_lib
  from fastdp_jax.data import shards as data_lib
  from fastdp_jax.data import units as units_lib
  os.makedirs(work, exist_ok=True)
  csv = os.path.join(work, "households.csv")
  unit_dir, row_dir = os.path.join(work, "households"), os.path.join(work, "households_rows")
  py = sys.executable
  subprocess.run([py, "-m", "preprocessing.synthesize", "--households", str(households),
                  "--seed", str(seed), "--output", csv], cwd=ROOT, check=True,
                 stdout=subprocess.DEVNULL)
  subprocess.run([py, "-m", "preprocessing.spark_job", "--engine", "local", "--spec",
                  "pums_households", "--input", csv, "--output", unit_dir, "--overwrite"],
                 cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  m = manifest_lib.read_manifest(unit_dir)
  k = int(m.max_rows_per_unit)
  train, test = load_split(unit_dir, "train"), load_split(unit_dir, "test")
  grouping = units_lib.group(train.unit_keys,
                             units_lib.row_content_keys(train.features, train.labels), k)
  keep = np.asarray(grouping.order)
  with data_lib.DatasetWriter(row_dir, feature_names=train.feature_names,
                              label_name=train.label_name, feature_bounds=train.feature_bounds,
                              overwrite=True,
                              extra={"derived_from": unit_dir, "rows": "the household "
                                     "dataset's training rows kept by its bound k, and its "
                                     "test rows; every row its own privacy unit"}) as w:
    w.add("train", train.features[keep], train.labels[keep])
    w.add("test", test.features, test.labels)
  return dict(household=unit_dir, row=row_dir, units=len(grouping.offsets) - 1,
              kept_rows=int(len(keep)), dropped_rows=int(grouping.dropped_rows), k=k,
              test_rows=int(len(test)))


# --- generated rows grouped into households (benchmarks/throughput.py --units) -------------
def size_distribution() -> tuple[np.ndarray, np.ndarray]:
  """``(sizes, probabilities)``: the published US household-size distribution that
  ``synthesize --households`` draws from (:mod:`preprocessing.households`)."""
  from preprocessing import households
  p = np.asarray(households.HOUSEHOLD_SIZE_PROBS, np.float64)
  return np.asarray(households.HOUSEHOLD_SIZES), p / p.sum()


def mean_kept_rows(k: int) -> float:
  """E[min(S, k)]: the expected rows a household keeps under the bound k (S: its size)."""
  sizes, p = size_distribution()
  return float(np.sum(np.minimum(sizes, k) * p))


def household_of_rows(n: int, seed: int = 0) -> np.ndarray:
  """[n] household index of each of ``n`` rows: consecutive rows form households whose sizes
  are drawn from :func:`size_distribution` (the last one cut at row n)."""
  sizes, p = size_distribution()
  draws = sizes[np.random.default_rng(seed).choice(len(p), size=n, p=p)]  # >= n rows
  ends = np.cumsum(draws)
  m = int(np.searchsorted(ends, n)) + 1
  draws = draws[:m].copy()
  draws[-1] -= int(ends[m - 1]) - n
  return np.repeat(np.arange(m), draws)


def write_unit_dataset(directory: str, x: np.ndarray, y: np.ndarray,
                       feature_names: tuple[str, ...], label_name: str, k: int,
                       seed: int = 0) -> int:
  """Writes ``x``, ``y`` as a unit dataset (privacy unit ``household``, bound ``k``): rows
  grouped by :func:`household_of_rows`; a test split of 1,024 rows of other units (the
  throughput benchmark never evaluates). Returns the number of households.

  The feature bounds are the generated data's own range rounded outwards: these rows are
  generated, public, so nothing is revealed (a real dataset's bounds come from its spec).
  """
  from fastdp_jax.data import shards as data_lib
  from fastdp_jax.data import units as units_lib
  unit = household_of_rows(len(x), seed)
  m = int(unit[-1]) + 1
  keys = units_lib.unit_keys([[f"h{u}" for u in range(m)]])[unit]
  test_keys = units_lib.unit_keys([[f"t{u}" for u in range(1024)]])
  bounds = [(float(np.floor(lo)), float(np.ceil(hi)))
            for lo, hi in zip(x.min(axis=0), x.max(axis=0))]
  with data_lib.DatasetWriter(directory, feature_names=feature_names, label_name=label_name,
                              feature_bounds=bounds, privacy_unit="household",
                              max_rows_per_unit=k, max_rows_per_shard=1 << 20) as w:
    w.add("train", x, y, unit_keys=keys)
    w.add("test", x[:1024], y[:1024], unit_keys=test_keys)
  return m


# --- one run ----------------------------------------------------------------------------
def score(p: np.ndarray, y: np.ndarray) -> dict:
  """Accuracy at 0.5, ROC AUC and log-loss of probabilities ``p`` on labels ``y``."""
  from fastdp_jax import metrics
  p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
  q = np.clip(p, 1e-12, 1 - 1e-12)
  return dict(accuracy=float(np.mean((p >= 0.5) == (y == 1))),
              auc=float(metrics.binary_auc(p, y)),
              log_loss=float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))))


def run(level: str, seed: int, args, data: dict, batch: int) -> dict:
  """One fresh private CLI run of ``level``; metrics from its exported model."""
  from fastdp_jax import load_model, load_split
  from fastdp_jax.dp import accounting
  from fastdp_jax.summary import read_summary
  workdir = os.path.join(args.work, "runs", f"{args.stamp}_{level}_seed{seed}")
  cmd = [sys.executable, "-m", "fastdp_jax", f"--config={CONFIG}",
         f"--config.data.path={data[level]}", f"--config.batch_size={batch}",
         f"--config.num_epochs={args.epochs}", f"--config.dp.target_epsilon={args.epsilon:g}",
         f"--config.seed={seed}", f"--workdir={workdir}"]
  if args.calibration_epsilon is not None:  # else the config's own temperature
    cmd += [f"--config.data.validation_fraction="
            f"{args.validation_fraction if args.calibration_epsilon else 0:g}",
            f"--config.calibration.epsilon={args.calibration_epsilon:g}"]
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  with open(workdir + ".log", "w", encoding="utf-8") as f:
    f.write(r.stdout + r.stderr)
  command = " ".join(["python", *cmd[1:]])
  if r.returncode:
    return dict(level=level, seed=seed, error=(r.stdout + r.stderr)[-2000:], command=command)
  s = read_summary(workdir)
  test = load_split(data["household"], "test")  # the same held-out households for both
  p = np.asarray(load_model(os.path.join(workdir, "model"))(test.features), np.float64)
  out = dict(kind="run", level=level, seed=seed, private=s.private, epsilon=s.epsilon,
             delta=s.delta, noise_multiplier=s.noise_multiplier, sampling_rate=s.sampling_rate,
             steps=s.steps, batch_size=batch, epochs=args.epochs,
             calibration_epsilon=s.calibration_epsilon, temperature=s.temperature,
             batch_counts="households" if level == "household" else "rows",
             test_rows=int(len(test)), metrics=score(p, test.labels), fit_s=round(s.wall_time_s, 2),
             wall_s=round(wall, 2), command=command)
  if level == "row":
    # Training's group epsilon, plus the temperature's: a pure epsilon_c-DP selection per row
    # is k epsilon_c-DP for k rows (group privacy), added as the run adds them.
    out["group_epsilon"] = {str(k): round(accounting.group_epsilon(
        s.noise_multiplier, s.sampling_rate, s.steps, s.delta, k)
        + k * (s.calibration_epsilon or 0.0), 4) for k in GROUP_SIZES}
  return out


def summarise(records: list[dict], data: dict) -> dict:
  """Mean, min and max of each metric per level, and the row run's group epsilons."""
  out: dict = dict(kind="summary", households=data.get("households"), units=data["units"],
                   kept_train_rows=data["kept_rows"], dropped_rows=data["dropped_rows"],
                   k=data["k"], test_rows=data["test_rows"], levels={})
  for level in LEVELS:
    rs = [r for r in records if r.get("level") == level and "metrics" in r]
    if not rs:
      continue
    level_out: dict[str, object] = {}
    for name in ("accuracy", "auc", "log_loss"):
      v = [r["metrics"][name] for r in rs]
      level_out[name] = dict(mean=round(statistics.fmean(v), 4), min=round(min(v), 4),
                             max=round(max(v), 4))
    level_out.update(runs=len(rs), epsilon=max(r["epsilon"] for r in rs),
                     noise_multiplier=round(statistics.fmean(r["noise_multiplier"] for r in rs), 4))
    if level == "row":
      level_out["group_epsilon_max"] = {str(k): max(r["group_epsilon"][str(k)] for r in rs)
                                        for k in GROUP_SIZES}
    out["levels"][level] = level_out
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--households", type=int, default=40_000)
  p.add_argument("--data-seed", type=int, default=0, help="synthesize's seed")
  p.add_argument("--seeds", type=int, default=3, help="runs per level")
  p.add_argument("--epsilon", type=float, default=1.0)
  p.add_argument("--epochs", type=int, default=20, help="epochs of both runs (households' "
                 "epochs: the row run has the same q, hence the same number of updates)")
  p.add_argument("--household-batch", type=int, default=512,
                 help="expected households per update (the row run's B: this times the "
                      "kept training rows per household)")
  p.add_argument("--calibration-epsilon", type=float, default=None,
                 help="config calibration.epsilon of both runs (default: the config's; 0: no "
                      "temperature, no validation rows); the household run's selection has k "
                      "times a row's sensitivity")
  p.add_argument("--validation-fraction", type=float, default=0.1,
                 help="config data.validation_fraction with --calibration-epsilon")
  p.add_argument("--work", default="/tmp/fastdp-units-bench")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  args.stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
  data = make_datasets(args.work, args.households, args.data_seed)
  data["households"] = args.households
  row_batch = round(args.household_batch * data["kept_rows"] / data["units"])
  head = dict(kind="setup", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              households=args.households, units=data["units"], kept_train_rows=data["kept_rows"],
              dropped_rows=data["dropped_rows"], k=data["k"], test_rows=data["test_rows"],
              household_batch=args.household_batch, row_batch=row_batch,
              row_batch_rule="household batch x kept training rows / training households "
                             "(exact counts of synthetic data)", **env())
  emit(head, args.out)
  records = []
  for seed in range(args.seeds):
    for level in LEVELS:  # interleaved, so that both see the same machine load
      batch = args.household_batch if level == "household" else row_batch
      rec = dict(run(level, seed, args, data, batch), **env())
      records.append(rec)
      emit(rec, args.out)
  emit(dict(summarise(records, data), **env()), args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
