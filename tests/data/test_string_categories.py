"""String categories and labels in feature specs: the same rule on every path.

A string value matches a cell exactly after trimming (spaces, one pair of double quotes); an
unlisted string follows the column's rule for unknown values. The line cleaner (Spark job's
CSV pass, streaming mapper, predictor's CSV path), the column cleaner (Parquet pass,
predictor's dict/DataFrame path) and the exported predictor must agree, and the spec's
canonical form (hence its digest) must carry the strings.
"""

import csv

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax import models
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import shards as data_lib
from fastdp_jax.export import model_dir
from tests import preprocessing_helpers as T

REGIONS = ("northeast", "south", "west")
SPEC = {
    "name": "strings", "label": "outcome",
    "features": ("region", "smoker", "age", "city", "band"),
    "columns": {
        "region": {"kind": "categorical", "categories": REGIONS},
        "smoker": {"kind": "binary", "values": ("no", "yes")},
        "age": {"kind": "numeric", "bounds": (0, 100)},
        "city": {"kind": "embedding", "codes": ("oslo", "rome"), "unknown": "extra_id"},
        "band": {"kind": "categorical", "categories": (1, 2, 3)},
    },
    "task": {"kind": "binary", "positive": "yes", "negative": ("no",)},
}
HEADER = ("outcome", "age", "region", "smoker", "city", "band")


def _spec(**changes):
  cfg = {**SPEC, **changes}
  return features_lib.spec_from_config(cfg)


# Lines, and what each must become: the kept values in used-column order (region, smoker,
# age, city, band, then the label; a string's value is its position in the spec's list, an
# unlisted string -1), or a reject reason, or "na".
CASES = [
    ("yes,30,south,no,oslo,2", [1, 0, 30, 0, 2, 1]),   # plain
    (' no , 40 ,"west", yes ,"rome",1', [2, 1, 40, 1, 1, 0]),  # spaces and quotes trimmed
    ("no,50,northeast,yes,paris,3", [0, 1, 50, -1, 3, 0]),   # unknown city: the extra id
    ("yes,20,South,no,oslo,2", "out_of_domain"),    # matching is exact: no case folding
    ("yes,20,south,maybe,oslo,2", "out_of_domain"),  # a binary's third value
    ("maybe,20,south,no,oslo,2", "out_of_domain"),  # the label lists its negative values
    ("yes,20,south,no,oslo,7", "out_of_domain"),    # a number category still a number rule
    ("yes,abc,south,no,oslo,2", "non_numeric"),     # a numeric column keeps its rule
    ("yes,NA,south,no,oslo,2", "na"),
    ("yes,20,NA,no,oslo,2", "na"),                  # NA in a string column: missing
]


def _expected_features(values):
  """region one-hot, smoker, age / 100, city id (2: the extra id), band one-hot."""
  region, smoker, age, city, band, _ = values
  out = np.zeros(3 + 1 + 1 + 1 + 3, np.float32)
  out[int(region)] = 1
  out[3], out[4], out[5] = smoker, age / 100, city if city >= 0 else 2
  out[6 + int(band) - 1] = 1
  return out


def test_line_cleaner_matches_strings_exactly_after_trimming():
  spec = _spec()
  cleaner = cleaning.LineCleaner(spec, HEADER)
  # Twice: the second pass takes the line cache and token caches (the fast path).
  for _ in range(2):
    result = cleaner.clean([line for line, _ in CASES])
    kept = {int(i): v for i, v in zip(result.kept, result.values)}
    rejects = {i: reason for i, reason, _ in result.rejects}
    for i, (line, want) in enumerate(CASES):
      if want == "na":
        assert i in result.dropped_na, line
      elif isinstance(want, str):
        assert rejects.get(i) == want, (line, rejects.get(i))
      else:
        np.testing.assert_array_equal(kept[i], want, err_msg=line)
  detail = dict((i, d) for i, _, d in result.rejects)[3]
  assert "'region'" in detail and "'northeast','south','west'" in detail


def test_column_cleaner_agrees_with_the_line_cleaner():
  spec = _spec()
  lines = [line for line, _ in CASES]
  by_line = cleaning.LineCleaner(spec, HEADER).clean(lines)
  rows = [next(csv.reader([line], skipinitialspace=False)) for line in lines]
  columns = {name: np.array([r[j] for r in rows], object) for j, name in enumerate(HEADER)}
  by_column = cleaning.clean_columns(spec, columns)
  np.testing.assert_array_equal(by_column.kept, by_line.kept)
  np.testing.assert_array_equal(by_column.values, by_line.values)
  np.testing.assert_array_equal(by_column.dropped_na, by_line.dropped_na)
  assert [r[:2] for r in by_column.rejects] == [r[:2] for r in by_line.rejects]
  # A numeric column type (Parquet int, a DataFrame) matches by its shortest text.
  typed = cleaning.clean_columns(_spec(columns={**SPEC["columns"], "band": {
      "kind": "categorical", "categories": ("1", "2", "3")}}), {
          **{k: v[:3] for k, v in columns.items()}, "band": np.array([2.0, 1, 3])})
  np.testing.assert_array_equal(typed.values[:, 4], [1, 0, 2])


def test_encoding_of_string_columns():
  spec = _spec()
  assert spec.feature_names == ("region=northeast", "region=south", "region=west", "smoker",
                                "age", "city", "band=1", "band=2", "band=3")
  result = cleaning.LineCleaner(spec, HEADER).clean([line for line, _ in CASES[:3]])
  x, y = spec.encode(result.values)
  want = np.stack([_expected_features(v) for _, v in CASES[:3]])
  np.testing.assert_allclose(x, want, rtol=1e-6)
  np.testing.assert_array_equal(y, [1, 0, 0])
  assert spec.embeddings == (manifest_lib.Embedding("city", 3),)


def test_label_positive_alone_makes_every_other_value_negative():
  spec = _spec(task={"kind": "binary", "positive": "yes"})
  result = cleaning.LineCleaner(spec, HEADER).clean(
      ["maybe,20,south,no,oslo,2", "yes,20,south,no,oslo,2", "NA,20,south,no,oslo,2"])
  np.testing.assert_array_equal(result.kept, [0, 1])
  np.testing.assert_array_equal(spec.encode(result.values)[1], [0, 1])
  np.testing.assert_array_equal(result.dropped_na, [2])


def test_multiclass_string_classes():
  spec = _spec(task={"kind": "multiclass", "classes": (("low", ("a", "b")), ("high", ("c",)))})
  assert spec.task.classes == ("low", "high")
  result = cleaning.LineCleaner(spec, HEADER).clean(
      ["a,1,south,no,oslo,2", "c,1,south,no,oslo,2", "b,1,south,no,oslo,2",
       "d,1,south,no,oslo,2"])
  np.testing.assert_array_equal(spec.encode(result.values)[1], [0, 1, 0])
  assert [r[:2] for r in result.rejects] == [(3, "out_of_domain")]


def test_spec_round_trip_and_digest_carry_the_strings():
  spec = _spec()
  body = spec.to_dict()
  assert body["features"][0]["categories"] == list(REGIONS)
  assert body["features"][1]["values"] == ["no", "yes"]
  assert body["features"][3]["codes"] == ["oslo", "rome"]
  assert body["task"] == {"kind": "binary", "positive": "yes", "negative": ["no"]}
  again = features_lib.spec_from_dict(body)
  assert again == spec and again.digest == spec.digest
  renamed = _spec(columns={**SPEC["columns"], "region": {
      "kind": "categorical", "categories": ("northeast", "south", "east")}})
  assert renamed.digest != spec.digest
  other_positive = _spec(task={"kind": "binary", "positive": "no", "negative": ("yes",)})
  assert other_positive.digest != spec.digest


@pytest.mark.parametrize("columns, task, match", [
    ({"region": {"kind": "categorical", "categories": ("a", 1)}}, None, "all finite numbers"),
    ({"region": {"kind": "categorical", "categories": (" a", "b")}}, None, "trimmed"),
    ({"region": {"kind": "categorical", "categories": ("NA", "b")}}, None, "na_tokens"),
    ({"region": {"kind": "categorical", "categories": ("a", "a")}}, None, "duplicates"),
    ({"smoker": {"kind": "binary", "values": ("no", "yes", "maybe")}}, None, "two strings"),
    ({}, {"kind": "binary", "positive": "yes", "negative": ("yes",)}, "holds the positive"),
    ({}, {"kind": "binary", "negative": ("no",)}, "needs task.positive"),
])
def test_bad_string_values_are_refused(columns, task, match):
  with pytest.raises(features_lib.SpecError, match=match):
    _spec(columns={**SPEC["columns"], **columns}, task=task or SPEC["task"])


def test_predictor_takes_raw_string_rows(tmp_path):
  spec = _spec()
  emb = models.embedding_inputs(spec.feature_names, spec.embeddings, 2)
  _, params = models.functional(models.create_model(spec.num_features, (4,), seed=1,
                                                    embeddings=emb))
  path = model_dir.export_model(str(tmp_path / "model"), params=params,
                                feature_names=spec.feature_names, label_name="outcome",
                                hidden_sizes=(4,), feature_spec=spec.to_dict())
  predictor = fastdp_jax.load_model(path)
  lines = [line for line, _ in CASES]
  csv_path = tmp_path / "raw.csv"
  csv_path.write_text(",".join(HEADER) + "\n" + "\n".join(lines) + "\n")
  got = predictor.predict_rows(str(csv_path))
  # The predictor reads the features only: the label's unknown 'maybe' is not its business.
  cleaned = cleaning.LineCleaner(spec, HEADER, with_label=False).clean(lines)
  np.testing.assert_array_equal(got.rows, cleaned.kept)
  want = predictor(spec.encode_features(cleaned.values).astype(np.float32))
  np.testing.assert_allclose(got.outputs, want, rtol=1e-6)
  reasons = {e.row: e.reason for e in got.errors}
  assert reasons == {3: "out_of_domain", 4: "out_of_domain", 6: "out_of_domain",
                     7: "non_numeric", 8: "missing", 9: "missing"}
  # Rows as dicts of strings give the same outputs.
  dicts = [dict(zip(HEADER, next(csv.reader([line])))) for line in lines[:3]]
  np.testing.assert_allclose(predictor.predict_rows(dicts).outputs, want[:3], rtol=1e-6)


@pytest.mark.slow
def test_spark_job_encodes_string_columns_as_the_line_cleaner(tmp_path):
  why_not = T.spark_available()
  if why_not is not None:
    pytest.skip(str(why_not))
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  spec_file = tmp_path / "strings_spec.py"
  spec_file.write_text(f"def get_config():\n  return {SPEC!r}\n")
  rng = np.random.default_rng(0)
  lines = [CASES[i][0] for i in rng.integers(0, len(CASES), 400)]
  raw = tmp_path / "raw.csv"
  raw.write_text(",".join(HEADER) + "\n" + "\n".join(lines) + "\n")
  for spark in T.spark_session("test_string_categories"):
    m = spark_job.run_job(spark, str(raw), str(tmp_path / "data"), str(spec_file))
  spec = _spec()
  result = cleaning.LineCleaner(spec, HEADER).clean(lines)
  x, y = spec.encode(result.values)
  assert m.provenance.kept == len(result.kept)
  assert m.extra["spec"] == spec.to_dict()
  got_x, got_y = [], []
  for split in ("train", "test"):
    part = data_lib.load_split(str(tmp_path / "data"), split)
    got_x.append(part.features)
    got_y.append(part.labels)
  # Rows are split by id; compare as multisets of (features, label) rows.
  got = np.concatenate([np.concatenate(got_x), np.concatenate(got_y)[:, None]], axis=1)
  want = np.concatenate([x, y[:, None].astype(np.float32)], axis=1)
  np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])
