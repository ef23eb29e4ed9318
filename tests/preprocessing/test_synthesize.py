"""The generator: determinism, the CaPUMS export, CSV format, streaming, realism, direct writer."""

import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib
from preprocessing import synthesize as S
from tests import preprocessing_helpers as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# shared/data/README.md: means of the real Fulton file and its logistic-regression accuracies.
README_MEANS = {"sex": .527, "married": .452, "black": .423, "asian": .032,
                "collegedegree": .375, "militaryservice": .128, "uscitizen": .926,
                "disability": .215, "englishability": .964, "employed": .628}
README_LR_BINARY = 0.667
README_LR_RAW = 0.826


@pytest.fixture(scope="module")
def raw200k():
  return S.synthesize_raw(200_000, seed=0)


def test_same_seed_same_rows_and_prefix_property():
  a = S.synthesize_raw(BLOCK := S.BLOCK_ROWS + 1000, seed=3)
  b = S.synthesize_raw(BLOCK, seed=3)
  c = S.synthesize_raw(5000, seed=3)
  d = S.synthesize_raw(5000, seed=4)
  for col in S.RAW_COLUMNS:
    np.testing.assert_array_equal(a[col], b[col])
    np.testing.assert_array_equal(a[col][:5000], c[col])
  assert any(not np.array_equal(c[k], d[k]) for k in ("age", "income", "employed"))


def test_raw_schema_domains(raw200k):
  r = raw200k
  assert tuple(r) == S.RAW_COLUMNS
  assert r["age"].min() >= 18 and r["age"].max() <= 93
  assert set(np.unique(r["age"][r["age"] >= 90])) == {93}  # top code
  assert set(np.unique(r["educ"])) == set(range(1, 17))
  assert set(np.unique(r["state"])) == {13} and set(np.unique(r["fips"])) == {13121}
  for col in ("sex", "latino", "black", "asian", "married", "divorced", "uscitizen", "children",
              "disability", "militaryservice", "employed", "englishability"):
    assert set(np.unique(r[col])) == {0, 1}, col
  assert not np.any((r["married"] == 1) & (r["divorced"] == 1))
  assert r["income"].min() >= -10_000 and (r["income"] < 0).any() and (r["income"] == 0).any()
  # Employed people nearly all have income; the median is higher for them.
  emp = r["employed"] == 1
  assert (r["income"][emp] > 0).mean() > 0.95
  assert np.median(r["income"][emp]) > 2 * np.median(r["income"][~emp])


def test_means_match_the_real_file(raw200k):
  cap = S.raw_to_capums(raw200k)
  for col, mean in README_MEANS.items():
    assert abs(cap[col].mean() - mean) < 0.015, (col, cap[col].mean(), mean)


def test_capums_export_derivations(raw200k):
  cap = S.raw_to_capums(raw200k)
  assert tuple(cap) == split_lib.CAPUMS_COLUMNS
  np.testing.assert_array_equal(cap["collegedegree"], raw200k["educ"] >= 13)
  np.testing.assert_array_equal(cap["blackfemale"], raw200k["black"] * raw200k["sex"])
  np.testing.assert_array_equal(cap["targetted"], raw200k["employed"])
  direct = S.synthesize_capums(200_000, seed=0, na_fraction=0.0)
  for col in split_lib.CAPUMS_COLUMNS:
    np.testing.assert_array_equal(direct[col], cap[col])


def test_na_fraction_is_respected_per_cell():
  cols = S.synthesize_capums(100_000, seed=1, na_fraction=0.01)
  cells = np.stack(list(cols.values()))
  frac = np.isnan(cells).mean()
  # 1.2 M cells: the binomial standard deviation is about 1e-4.
  assert abs(frac - 0.01) < 6e-4
  assert not np.isnan(np.stack(list(S.synthesize_capums(1000, seed=1).values()))).any()


def test_realism_logistic_regression_on_9_binary_features(raw200k):
  cap = S.raw_to_capums(raw200k)
  x = np.stack([cap[c] for c in split_lib.CAPUMS_FEATURES], 1)
  acc = T.holdout_accuracy(x, cap["employed"])
  assert abs(acc - README_LR_BINARY) <= 0.03, acc


def test_realism_logistic_regression_on_raw_features(raw200k):
  acc = T.holdout_accuracy(T.raw_lr_features(raw200k), raw200k["employed"])
  assert abs(acc - README_LR_RAW) <= 0.04, acc


def test_lr_helper_reproduces_the_readme_on_the_real_file():
  """The realism method, applied to the real file, gives the README's figures."""
  path = os.path.join(ROOT, "..", "shared", "data", "FultonPUMS5full.csv")
  if not os.path.isfile(path):
    pytest.skip(f"real data file {path} is absent")
  d = pd.read_csv(path)
  d["collegedegree"] = (d["educ"] >= 13).astype(int)
  x9 = d[list(split_lib.CAPUMS_FEATURES)].to_numpy(float)
  assert abs(T.holdout_accuracy(x9, d["employed"].to_numpy()) - README_LR_BINARY) < 0.015
  cols = {c: d[c].to_numpy() for c in d.columns}
  assert abs(T.holdout_accuracy(T.raw_lr_features(cols), d["employed"].to_numpy())
             - README_LR_RAW) < 0.01


def test_csv_format_and_round_trip(tmp_path):
  cols = S.synthesize_capums(3000, seed=2, na_fraction=0.01)
  path = str(tmp_path / "c.csv")
  S.write_csv(cols, path)
  with open(path, "rb") as f:
    text = f.read().decode()
  header = text.split("\n", 1)[0]
  assert header == ",".join(f'"{c}"' for c in split_lib.CAPUMS_COLUMNS)
  assert text.count("\n") == 3001 and "NA" in text and "nan" not in text
  back = pd.read_csv(path)
  for c in split_lib.CAPUMS_COLUMNS:
    np.testing.assert_array_equal(back[c].to_numpy(np.float32), cols[c])


def test_raw_csv_round_trip_including_negative_and_large_numbers(tmp_path):
  cols = S.synthesize_raw(3000, seed=5, na_fraction=0.001)
  path = str(tmp_path / "r.csv")
  S.write_csv(cols, path)
  back = pd.read_csv(path)
  assert tuple(back.columns) == S.RAW_COLUMNS
  for c in S.RAW_COLUMNS:
    np.testing.assert_array_equal(back[c].to_numpy(np.float64), cols[c])


def test_streamed_file_equals_in_memory_file_and_crlf(tmp_path):
  rows = S.BLOCK_ROWS + 10
  a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
  S.write_csv_file(a, rows, seed=7)
  S.write_csv(S.synthesize_capums(rows, seed=7, na_fraction=S.DEFAULT_NA_FRACTION["capums"]), b)
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()
  c = str(tmp_path / "c.csv")
  S.write_csv_file(c, 100, seed=7, line_ending="\r\n")
  with open(c, "rb") as fc, open(a, "rb") as fa:
    crlf = fc.read()
    assert crlf.count(b"\r\n") == 101
    assert crlf.replace(b"\r\n", b"\n") == b"".join(fa.readlines()[:101])


def test_a_file_of_several_blocks_has_every_row_once(tmp_path):
  # Streamed block by block (its speed is measured in BENCHMARKS.md, not asserted here).
  rows = 3 * S.BLOCK_ROWS + 1
  path = str(tmp_path / "big.csv")
  size = S.write_csv_file(path, rows, seed=0)
  assert T.count_lines(path) == rows + 1 and size == os.path.getsize(path)


def test_direct_writer_applies_the_pipeline_rules(tmp_path):
  spec = features_lib.load_spec("capums")
  cols = S.synthesize_capums(20_000, seed=3, na_fraction=0.01)
  m = S.write_shards(cols, str(tmp_path / "d"), spec=spec, max_rows_per_shard=5000)
  expected, dropped = T.expected_splits(spec, cols)
  assert m.provenance.rows_read == 20_000
  assert m.provenance.dropped_na == dropped > 0
  assert m.provenance.kept == 20_000 - dropped
  for split, (x, y) in expected.items():
    got = data_lib.load_split(str(tmp_path / "d"), split)
    np.testing.assert_array_equal(got.features, x)
    np.testing.assert_array_equal(got.labels, y)
  assert max(s.rows for s in m.shards) <= 5000
  with pytest.raises(FileExistsError):
    S.write_shards(cols, str(tmp_path / "d"))


def test_direct_writer_raw_spec_and_rejection_of_bad_values(tmp_path):
  spec = features_lib.load_spec("pums_raw")
  cols = S.synthesize_raw(5000, seed=4)
  m = S.write_shards(cols, str(tmp_path / "raw"), spec=spec)
  assert m.num_features == spec.num_features == 29
  tr = data_lib.load_split(str(tmp_path / "raw"), "train")
  assert tr.features.min() >= 0 and tr.features.max() <= 1
  # One-hot education: exactly one code per row.
  edu = [i for i, n in enumerate(tr.feature_names) if n.startswith("educ=")]
  np.testing.assert_array_equal(tr.features[:, edu].sum(axis=1), 1)
  cols["educ"] = cols["educ"].copy()
  cols["educ"][10] = 17
  with pytest.raises(ValueError, match="row 10: out_of_domain"):
    S.write_shards(cols, str(tmp_path / "bad"), spec=spec)
  assert not os.path.exists(tmp_path / "bad")



@pytest.mark.parametrize("spec_name", ["pums_educ", "pums_income", "pums_puma"])
def test_direct_writer_records_the_specs_task_and_embeddings(tmp_path, spec_name):
  # A multiclass label, a regression label and an embedded id column are written as the spec
  # declares them (the Spark job's manifest fields), not as a binary task of dense features:
  # the trainer reads the task and the embeddings from the manifest.
  spec = features_lib.load_spec(spec_name)
  assert spec.task != manifest_lib.BINARY or spec.embeddings  # the premise: not the default
  cols = S.synthesize_raw(3000, seed=6)
  out = str(tmp_path / spec_name)
  m = S.write_shards(cols, out, spec=spec)
  assert m.task == spec.task
  assert tuple(m.embeddings) == tuple(spec.embeddings)
  expected, _ = T.expected_splits(spec, cols)
  for split, (x, y) in expected.items():
    got = data_lib.load_split(out, split)  # the loader checks labels against the task
    np.testing.assert_array_equal(got.features, x)
    np.testing.assert_array_equal(got.labels, y)
  # The command line gives the same manifest fields.
  cli = str(tmp_path / "cli")
  assert S.main(["--rows", "500", "--schema", "raw", "--spec", spec_name,
                 "--output-shards", cli]) == 0
  cm = manifest_lib.read_manifest(cli)
  assert cm.task == spec.task and tuple(cm.embeddings) == tuple(spec.embeddings)

def test_inject_malformed_lines_are_all_rejected_with_their_reason(tmp_path):
  src, dst = str(tmp_path / "s.csv"), str(tmp_path / "d.csv")
  S.write_csv_file(src, 2000, seed=0)
  injected = S.inject_malformed(src, dst, 60, seed=1)
  assert len(injected) == 60
  assert {i.reason for i in injected} == set(cleaning.REASONS)
  with open(dst, encoding="utf-8") as f:
    lines = f.read().split("\n")[:-1]
  assert len(lines) == 2061
  spec = features_lib.load_spec("capums")
  result = T.clean_reference(lines, spec)
  got = {i + 2: reason for i, reason, _ in result.rejects}  # 1-based lines, after the header
  assert got == {i.line: i.reason for i in injected}
  for i in injected:
    assert lines[i.line - 1] == i.text
  with open(src, encoding="utf-8") as f:
    original = f.read().split("\n")[:-1]
  kept_lines = [l for n, l in enumerate(lines, start=1) if n not in got]
  assert kept_lines == original


def test_cli_writes_csv_and_shards_and_refuses_existing_output(tmp_path):
  csv = str(tmp_path / "x.csv")
  shards = str(tmp_path / "shards")
  assert S.main(["--rows", "500", "--schema", "raw", "--output", csv,
                 "--output-shards", shards]) == 0
  assert T.count_lines(csv) == 501
  assert manifest_lib.read_manifest(shards).num_features == 29
  assert S.main(["--rows", "500", "--output-shards", shards]) == 2
  assert S.main(["--rows", "500", "--output-shards", shards, "--overwrite"]) == 0
  assert manifest_lib.read_manifest(shards).num_features == 9


def test_module_entry_point_used_by_the_makefile(tmp_path):
  out = str(tmp_path / "capums")
  r = subprocess.run([sys.executable, "-m", "preprocessing.synthesize", "--rows", "2000",
                      "--seed", "0", "--output-shards", out, "--overwrite"], cwd=ROOT,
                     capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  m = manifest_lib.read_manifest(out)
  assert m.rows("train") + m.rows("test") == m.provenance.kept
  assert "train" in r.stdout and io.StringIO(r.stdout).read().count("\n") == 1
