"""model/ and its card publish no figure from which a count of private rows can be read back.

The threat model (docs/privacy.md, "What model/ publishes"): N (the training rows), the test
size, the validation size and every other exact count of private rows are secret unless a
``dp_accounting``-accounted mechanism covers them. A default run publishes figures that depend
on the rows only through the DP estimate of N (a Laplace count), so:

* two runs on datasets of different sizes whose DP estimates agree publish the same privacy
  figures and the same card text
  (:func:`test_published_figures_depend_on_n_only_through_its_dp_estimate`);
* a scan of every number in ``model.json`` and the card finds none that equals a private count,
  no ratio or product of two that does, no test metric that is an exact fraction over a
  private count, and inverting the accountant for q from the published sigma, updates and
  epsilon gives back the estimate, never N
  (:func:`test_the_export_holds_no_figure_that_gives_back_a_private_count`).

The scan has power: the export of the code before the DP estimate (q, T and epsilon from the
exact N, test metrics at full precision) fails it
(:func:`test_the_scan_finds_n_in_figures_computed_from_it`).
The count's noise is pinned in these tests (an estimate OFFSET rows above N, or one figure for
both datasets) so that the check is exact; the noise itself is tested in tests/dp/test_count.py.
"""

import dataclasses
import itertools
import json
import math
import os
import re

import pytest

from configs import test as test_config
from fastdp_jax import train
from fastdp_jax.dp import accounting
from fastdp_jax.dp import count as count_lib
from fastdp_jax.dp import release
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir
from fastdp_jax import summary as summary_lib
from tests.conftest import make_dataset

BATCH = 64
OFFSET = 37  # the pinned count noise: far above the 0.5 % that q's 3 digits leave of N
# Parts of model.json that are not computed from the data: when and with what it was made,
# and the config's file paths, whose digits are the test's temporary directory's (pytest
# numbers them: a run in /tmp/pytest-of-root/pytest-804 once gave 804 / 3 = a validation
# size of 268 by chance).
NOT_FROM_DATA = ("created", "versions", "params_sha256", "path")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?!\w|\.\d)")


def _config(path, validation=0.1):
  """configs/test.py as a default private run: secret keys and a DP estimate of N."""
  cfg = test_config.get_config()
  cfg.data.path = path
  cfg.data.num_examples_public = False
  cfg.dp.noise_seed = cfg.dp.sampling_seed = None
  cfg.data.validation_fraction = validation
  cfg.batch_size, cfg.num_epochs = BATCH, 2
  cfg.checkpoint.enabled = False
  cfg.privacy_eval.membership_rows = 0
  return cfg


def _run(tmp_path, name, rows, seed, estimate):
  """Trains on ``rows`` generated rows with the count's output pinned by ``estimate(n)``."""
  data = make_dataset(str(tmp_path / f"data-{name}"), rows=rows, seed=seed)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(count_lib, "noisy_count", lambda n, epsilon, rng: estimate(n))
    summary = train.train_and_evaluate(_config(data), str(tmp_path / name))
  with open(os.path.join(summary.model_dir, layout.SPEC_FILE)) as f:
    spec = json.load(f)
  with open(os.path.join(summary.model_dir, layout.CARD_FILE)) as f:
    card = f.read()
  return summary, spec, card


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("scan")
  one = _run(tmp, "one", 2917, 7, lambda n: n + OFFSET)
  # Another dataset, every private count different, the same estimate as the first run's.
  same = one[0].planned_num_examples
  two = _run(tmp, "two", 3389, 8, lambda n: same)
  return one, two


def _private_counts(s: summary_lib.RunSummary) -> dict[str, int]:
  n, val, test = s.train_examples, s.validation_examples or 0, s.test_examples
  return {"N": n, "test size": test, "validation size": val, "N + validation": n + val,
          "all rows": n + val + test}


def _numbers_in(value, path=""):
  """(where, number) for every number in a model.json value, strings' numbers included."""
  if isinstance(value, dict):
    for k, v in value.items():
      if k not in NOT_FROM_DATA:
        yield from _numbers_in(v, f"{path}.{k}")
  elif isinstance(value, list):
    for i, v in enumerate(value):
      yield from _numbers_in(v, f"{path}[{i}]")
  elif isinstance(value, bool) or value is None:
    return
  elif isinstance(value, (int, float)):
    if math.isfinite(value):
      yield path, float(value)
  elif isinstance(value, str):
    for m in _NUMBER.finditer(value):
      yield path, float(m.group(1))


def _card_numbers(card: str):
  for i, line in enumerate(card.splitlines()):
    if line.startswith("Exported "):  # the creation time and the library versions
      continue
    line = re.sub(r"sha256 `[0-9a-f]+\.*`", "", line)
    for m in _NUMBER.finditer(line):
      yield f"card line {i + 1}", float(m.group(1))


def _implied_n(priv: dict, batch: int) -> float:
  """B / q with q recovered from the published sigma, updates and training epsilon by
  inverting the accountant (bisection on q: epsilon grows with q)."""
  sigma, steps, target = priv["noise_multiplier"], priv["steps"], priv["training_epsilon"]
  delta, acc = priv["accountant_delta"], priv["accountant"]
  lo, hi = 1e-6, 1.0
  for _ in range(40):
    mid = math.sqrt(lo * hi)
    if accounting.compute_epsilon(sigma, mid, steps, delta, acc) < target:
      lo = mid
    else:
      hi = mid
  return batch / math.sqrt(lo * hi)


def _leaks(spec: dict, card: str, counts: dict[str, int], batch: int) -> list[str]:
  """Every way the export gives back one of ``counts``, described; empty when none does."""
  found = []
  numbers = list(_numbers_in(spec)) + list(_card_numbers(card))
  for (where, x), (name, c) in itertools.product(numbers, counts.items()):
    if abs(x - c) < 0.5:
      found.append(f"{where} = {x:g} gives the {name} {c}")
    # A metric k / c at full precision: a fraction over the count, not a short decimal.
    if 0 < x < 1 and abs(x * c - round(x * c)) < 1e-9 * c and abs(x * 1e4 - round(x * 1e4)) > 1e-6:
      found.append(f"{where} = {x!r} is {round(x * c)} / {c}, the {name}")
  values = sorted({x for _, x in numbers if x != 0})
  for (x, y), (name, c) in itertools.product(itertools.combinations(values, 2), counts.items()):
    for r in (x * y, x / y, y / x):
      if abs(r - c) <= 1e-9 * c:
        found.append(f"{x:g} and {y:g} give the {name} {c}")
  priv = spec.get("privacy") or {}
  if priv.get("dp_enabled"):
    implied = {"q": batch / priv["sampling_rate"], "the accountant": _implied_n(priv, batch)}
    for (how, n), (name, c) in itertools.product(implied.items(), counts.items()):
      if abs(n - c) < 0.5:
        found.append(f"inverting {how} gives {n:.3f}: the {name} {c}")
  return found


def _section(card: str, title: str) -> str:
  return card.split(f"## {title}")[1].split("\n## ")[0]


def test_the_export_holds_no_figure_that_gives_back_a_private_count(runs):
  (s, spec, card), _ = runs
  counts = _private_counts(s)
  assert s.validation_examples and s.test_examples and s.train_examples
  assert s.planned_num_examples == s.train_examples + OFFSET  # the pinned estimate
  assert spec["privacy"]["num_examples_source"] == count_lib.DP_ESTIMATE
  assert _leaks(spec, card, counts, BATCH) == []
  # The run states the estimate and its epsilon, inside the total.
  priv = spec["privacy"]
  assert priv["planned_num_examples"] == s.train_examples + OFFSET
  assert priv["epsilon"] == pytest.approx(priv["training_epsilon"] + priv["count_epsilon"],
                                          rel=1e-12)
  assert priv["sampling_rate"] == release.public_sampling_rate(BATCH / (s.train_examples
                                                                        + OFFSET))
  assert "a DP estimate (a Laplace count with epsilon 0.01" in card
  # The private summary keeps what model/ leaves out.
  assert s.test_accuracy is not None and "test_accuracy" not in spec["metrics"]
  assert "Test metrics are not part of this export" in card


def test_published_figures_depend_on_n_only_through_its_dp_estimate(runs):
  (s1, spec1, card1), (s2, spec2, card2) = runs
  assert s1.train_examples != s2.train_examples and s1.test_examples != s2.test_examples
  assert s1.validation_examples != s2.validation_examples
  assert spec1["privacy"] == spec2["privacy"] and spec1["metrics"] == spec2["metrics"]
  for title in ("Privacy", "Evaluation (held-out test split)"):
    assert _section(card1, title) == _section(card2, title)


def test_the_scan_finds_n_in_figures_computed_from_it(runs, tmp_path):
  """The export as it was before the DP estimate (q, T and epsilon from the exact N, the test
  metrics at full precision): the scan must name N and the test size."""
  (s, spec, _), _ = runs
  n = s.train_examples
  q, steps = BATCH / n, 2 * round(n / BATCH)
  eps = accounting.compute_epsilon(s.noise_multiplier, q, steps, s.accountant_delta)
  old = dataclasses.replace(
      s, sampling_rate=q, steps=steps, epsilon=eps, training_epsilon=eps, count_epsilon=None,
      planned_num_examples=None, num_examples_source=None,
      test_accuracy=round(s.test_accuracy * s.test_examples) / s.test_examples)
  path = model_dir.export_model(str(tmp_path / "model"), params=_params(spec),
                                feature_names=[f["name"] for f in spec["features"]],
                                label_name="employed", hidden_sizes=(8,), summary=old,
                                include_test_metrics=True)
  with open(os.path.join(path, layout.SPEC_FILE)) as f:
    old_spec = json.load(f)
  # include_test_metrics rounds the metrics today; before, they were exact: put one back.
  old_spec["metrics"]["test_accuracy"] = old.test_accuracy
  leaks = _leaks(old_spec, "", _private_counts(s), BATCH)
  assert any(line.startswith("inverting the accountant") and line.endswith(f": the N {n}")
             for line in leaks), leaks
  assert any(line.endswith(f"/ {s.test_examples}, the test size") for line in leaks), leaks


def _params(spec):
  from fastdp_jax import models
  model = models.create_model(spec["architecture"]["num_features"], (8,), seed=0)
  return models.functional(model)[1]
