"""``fastdp-spec init``: a skeleton from the header alone, or private estimates with
``--epsilon`` whose mechanisms are the documented ones and whose cost the spec states."""

import collections
import math

import numpy as np
import pytest

from fastdp_jax.data import features as features_lib
from fastdp_jax.data import spec_init

HEADER = '"",age,region,smoker,outcome\n'


def _table(path, rows, seed=0):
  rng = np.random.default_rng(seed)
  regions = np.array(["north", "south", "west"])
  with open(path, "w") as f:
    f.write(HEADER)
    for i in range(rows):
      f.write(f'"{i + 1}",{rng.integers(20, 80)},{regions[rng.integers(0, 3)]},'
              f'{"yes" if rng.random() < 0.3 else "no"},{"yes" if rng.random() < 0.4 else "no"}\n')
  return str(path)


def test_header_only_reads_no_row_and_refuses_to_load(tmp_path):
  a = _table(tmp_path / "a.csv", 50, seed=1)
  b = tmp_path / "b.csv"
  b.write_text(HEADER + "garbage\n" * 3)
  text_a = spec_init.init(a, "outcome")
  # A function of the header alone: another table with the same header gives the same text.
  assert spec_init.init(str(b), "outcome").replace("b.csv", "a.csv").replace(
      "'b'", "'a'") == text_a
  spec_file = tmp_path / "a_spec.py"
  spec_file.write_text(text_a)
  with pytest.raises(features_lib.SpecError, match=r"a_spec.py:\d+: columns.age.kind is "
                     "still a TODO placeholder"):
    features_lib.load_spec(str(spec_file))
  assert "INPUT_COLUMNS = ('unnamed_0', 'age', 'region', 'smoker', 'outcome')" in text_a
  assert "config.features = ('age', 'region', 'smoker')" in text_a
  assert "private_estimates" not in text_a


def test_header_only_with_a_known_task(tmp_path):
  text = spec_init.init(_table(tmp_path / "t.csv", 5), "outcome", task="binary",
                        positive="yes")
  assert "config.task = ConfigDict({'kind': 'binary', 'positive': 'yes'})" in text
  cfg = {}
  exec(compile(text, "spec", "exec"), cfg)  # pylint: disable=exec-used
  config = cfg["get_config"]()
  for name in ("age", "region", "smoker"):  # filled in by hand, the spec loads
    config.columns[name] = {"kind": "categorical", "categories": ("a",)}
  assert features_lib.spec_from_config(config).target.positive == "yes"


def test_main_refuses_bad_inputs_with_one_line(tmp_path, capsys):
  table = _table(tmp_path / "t.csv", 5)
  assert spec_init.main(["init", table, "--label", "nope"]) == 2
  assert "--label 'nope' is not a column" in capsys.readouterr().err
  out = tmp_path / "spec.py"
  assert spec_init.main(["init", table, "--label", "outcome", "--output", str(out)]) == 0
  assert spec_init.main(["init", table, "--label", "outcome", "--output", str(out)]) == 2
  assert "exists" in capsys.readouterr().err
  assert spec_init.main(["init", table, "--label", "outcome", "--epsilon", "-1"]) == 2


def test_thresholded_histogram_releases_no_rare_value():
  counts = collections.Counter({"common": 1000, "rare": 1})
  eps, delta, draws = 1.0, 1e-6, 2000
  rng = np.random.default_rng(0)
  outs = [spec_init.thresholded_histogram(counts, eps, delta, rng) for _ in range(draws)]
  # P[release of a count-1 value] = delta / 1 ... at most 1e-6 per draw: never seen here.
  assert not any("rare" in o for o in outs)
  noisy = np.array([o["common"] for o in outs])
  # Laplace(1 / eps): mean 1000, variance 2 / eps^2; 5 standard errors of the mean.
  assert abs(noisy.mean() - 1000) < 5 * math.sqrt(2 / draws) / eps
  assert abs(noisy.var() - 2 / eps**2) < 0.5 * 2 / eps**2


def test_private_quantile_is_the_exponential_mechanism_on_the_public_grid():
  numbers = np.sort(np.random.default_rng(1).uniform(20, 80, 3000))
  rng = np.random.default_rng(2)
  # A large epsilon picks a best-scored candidate; among those the data cannot tell apart
  # (all below 20: rank 0; all from 100 up: rank n), the public base measure favours small
  # magnitudes.
  rank = np.searchsorted(numbers, spec_init.GRID, side="right")
  for q in spec_init.QUANTILES:
    score = -np.abs(rank - q * len(numbers))
    picks = [spec_init.private_quantile(numbers, q, 100.0, rng) for _ in range(50)]
    best = set(spec_init.GRID[score == score.max()])
    assert set(picks) <= best
    assert np.median(np.abs(picks)) <= np.median(np.abs(list(best)))
  # A small one: the frequencies follow (1 + |c|)^-2 exp(eps * score / 2) (two candidates).
  grid, eps, draws = np.array([20.0, 50.0]), 0.004, 4000
  rank = np.searchsorted(numbers, grid, side="right")
  score = -np.abs(rank - 0.05 * len(numbers))
  logits = eps * score / 2 - 2 * np.log1p(grid)
  np.testing.assert_allclose(spec_init.quantile_logits(numbers, 0.05, eps, grid), logits)
  p = np.exp(logits - np.logaddexp.reduce(logits))
  picks = np.array([spec_init.private_quantile(numbers, 0.05, eps, rng, grid)
                    for _ in range(draws)])
  freq = (picks == 20.0).mean()
  assert abs(freq - p[0]) < 5 * math.sqrt(p[0] * (1 - p[0]) / draws)


@pytest.mark.parametrize("values, numeric, other, want", [
    ({"no": 700.0, "yes": 300.0}, 0.0, 1000.0, {"kind": "binary", "values": ("no", "yes")}),
    ({"yes": 700.0, "off": 300.0}, 0.0, 1000.0, {"kind": "binary", "values": ("off", "yes")}),
    ({"0": 700.0, "1": 300.0}, 1000.0, 0.0, {"kind": "binary"}),
    ({"1": 500.0, "3": 200.0, "2": 300.0}, 1000.0, 0.0,
     {"kind": "categorical", "categories": (1, 2, 3)}),
    ({"b": 500.0, "a": 480.0, "c": 20.0}, 0.0, 1000.0,
     {"kind": "categorical", "categories": ("a", "b", "c")}),
    ({"a": 300.0}, 0.0, 1000.0, {"kind": "embedding", "codes": ("a",), "unknown": "extra_id"}),
    ({}, 0.0, 1000.0, None),
])
def test_kind_rule_is_a_function_of_the_dp_outputs(values, numeric, other, want):
  assert spec_init.feature_entry(spec_init.Released(values, numeric, other)) == want


def test_kind_rule_numeric_uses_the_quantiles():
  r = spec_init.Released({}, 1000.0, 3.0, lo=20.0, hi=100.0)
  assert spec_init.needs_bounds(r)
  assert spec_init.feature_entry(r) == {"kind": "numeric", "bounds": (20.0, 100.0),
                                        "transform": "identity"}
  wide = spec_init.Released({}, 1000.0, 3.0, lo=0.0, hi=1e6)
  assert spec_init.feature_entry(wide)["transform"] == "log1p"


def test_task_rule():
  yes_no = spec_init.Released({"no": 600.0, "yes": 400.0}, 0.0, 1000.0)
  assert spec_init.task_entry(yes_no, None, None) == {"kind": "binary", "positive": "yes",
                                                     "negative": ("no",)}
  assert spec_init.task_entry(yes_no, "binary", "no")["positive"] == "no"
  ab = spec_init.Released({"a": 600.0, "b": 400.0}, 0.0, 1000.0)
  with pytest.raises(spec_init.InitError, match="--positive"):
    spec_init.task_entry(ab, None, None)
  three = spec_init.Released({"a": 400.0, "b": 300.0, "c": 300.0}, 0.0, 1000.0)
  assert spec_init.task_entry(three, None, None)["classes"] == (
      ("a", ("a",)), ("b", ("b",)), ("c", ("c",)))
  reg = spec_init.Released({}, 1000.0, 0.0, lo=1.0, hi=50.0)
  assert spec_init.task_entry(reg, None, None) == {
      "kind": "regression", "bounds": (1.0, 50.0), "transform": "identity",
      "out_of_bounds": "clip"}


def test_with_epsilon_the_spec_loads_and_states_its_cost(tmp_path):
  table = _table(tmp_path / "t.csv", 3000)
  text = spec_init.init(table, "outcome", epsilon=20.0, delta=1e-6,
                        rng=np.random.default_rng(3))
  path = tmp_path / "t_spec.py"
  path.write_text(text)
  spec = features_lib.load_spec(str(path))
  assert (spec.estimate_epsilon, spec.estimate_delta) == (20.0, 1e-6)
  assert spec.to_dict()["private_estimates"]["mechanism"] == spec_init.MECHANISM
  cols = {c.name: c for c in spec.features}
  assert cols["region"].kind == "categorical" and cols["region"].texts == (
      "north", "south", "west")
  assert cols["smoker"].kind == "binary" and cols["smoker"].texts == ("no", "yes")
  assert cols["age"].kind == "numeric"
  assert spec.target.positive == "yes" and spec.target.negative == ("no",)


def test_without_a_numeric_column_only_the_first_round_is_spent(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text("a,y\n" + "x,yes\ny,no\n" * 500)
  text = spec_init.init(str(path), "y", epsilon=10.0, rng=np.random.default_rng(0))
  assert "'epsilon': 4.0," in text
