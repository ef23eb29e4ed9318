"""Bad input, through the Spark job and the streaming path: a clear message, nothing lost.

One SparkSession (local[2]) serves the whole module.
"""

import os

import numpy as np
import pytest

from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import features as features_lib
from preprocessing import synthesize as S
from tests import preprocessing_helpers as T
from preprocessing.mapreduce import local
from preprocessing.mapreduce import to_shards
from preprocessing.output import PipelineError

_WHY_NOT = T.spark_available()
# A Spark session: `make test-fast` leaves these out.
pytestmark = [pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT)), pytest.mark.slow]

HEADER = ",".join(f'"{c}"' for c in split_lib.CAPUMS_COLUMNS)
GOOD = ["1,0,1,0,1,1,0,1,0,1,1,1", "0,1,0,0,0,0,0,1,1,1,0,0", "1,1,0,1,1,1,1,1,0,1,0,1",
        "0,0,0,0,0,1,0,0,0,1,0,1"]


@pytest.fixture(scope="module")
def spark():
  yield from T.spark_session("test_preprocess_bad_input")


def write(tmp_path, name, lines, ending="\n", final=True):
  path = str(tmp_path / name)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write(ending.join(lines) + (ending if final and lines else ""))
  return path


def run_spark(spark, path, out, spec="capums", **kw):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  return spark_job.run_job(spark, path, out, spec, **kw)


def run_both(spark, path, tmp_path, spec="capums"):
  """Runs both paths; returns their manifests, or raises what the first one raised."""
  a = run_spark(spark, path, str(tmp_path / "spark"), spec)
  b = local.run_local(path, str(tmp_path / "streaming"), spec)
  return a, b


def assert_both_raise(spark, path, tmp_path, exc, match, spec="capums"):
  with pytest.raises(exc, match=match):
    run_spark(spark, path, str(tmp_path / "spark"), spec)
  with pytest.raises(exc, match=match):
    local.run_local(path, str(tmp_path / "streaming"), spec)
  # Neither left an output or a staging directory behind.
  assert not os.path.exists(tmp_path / "spark") and not os.path.exists(tmp_path / "streaming")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_empty_file(spark, tmp_path):
  path = write(tmp_path, "empty.csv", [])
  assert os.path.getsize(path) == 0
  assert_both_raise(spark, path, tmp_path, PipelineError, "empty")


def test_header_only(spark, tmp_path):
  path = write(tmp_path, "header.csv", [HEADER])
  assert_both_raise(spark, path, tmp_path, PipelineError, "no data rows")


def test_wrong_header_columns(spark, tmp_path):
  path = write(tmp_path, "renamed.csv", [HEADER.replace('"sex"', '"gender"')] + GOOD)
  assert_both_raise(spark, path, tmp_path, PipelineError,
                    r"missing \['sex'\]; unexpected \['gender'\]")


def test_missing_header_columns(spark, tmp_path):
  # A used column missing is refused; an unused one ('targetted') may be missing (by name).
  header = ",".join(f'"{c}"' for c in split_lib.CAPUMS_COLUMNS[1:])
  path = write(tmp_path, "short.csv", [header] + [g[2:] for g in GOOD])
  assert_both_raise(spark, path, tmp_path, PipelineError, r"missing \['sex'\]")


def test_no_header_line(spark, tmp_path):
  path = write(tmp_path, "noheader.csv", GOOD)
  assert_both_raise(spark, path, tmp_path, PipelineError, "first line is taken as the header")


def test_na_everywhere(spark, tmp_path):
  rows = [",".join("NA" if j == i % 10 else "1" for j in range(12)) for i in range(30)]
  rows += [",".join(["NA"] * 12)] * 10  # and every cell NA
  path = write(tmp_path, "na.csv", [HEADER] + rows)
  assert_both_raise(spark, path, tmp_path, PipelineError,
                    r"no usable rows: 40 rows read, 40 dropped for NA")


def test_na_outside_the_used_columns_keeps_the_row(spark, tmp_path):
  path = write(tmp_path, "na_unused.csv", [HEADER, "1,0,1,0,1,1,0,1,0,1,NA,NA"] + GOOD)
  a, b = run_both(spark, path, tmp_path)
  assert a.provenance == b.provenance == manifest_lib.Provenance(rows_read=5, kept=5)


MALFORMED = [  # (line, reason)
    ("1,0,1,0,1,1,0,1,0,1,1", "wrong_arity"),
    ("1,0,1,0,1,1,0,1,0,1,1,1,1", "wrong_arity"),
    ("1,0,abc,0,1,1,0,1,0,1,1,1", "non_numeric"),
    ("1,0,1,0,1,nan,0,1,0,1,1,1", "non_numeric"),
    ("1,0,1,0,1,1,0,1,0,inf,1,1", "non_numeric"),
    ("1,0,1,0,1,1,0,1_0,0,1,1,1", "non_numeric"),
    ("2,0,1,0,1,1,0,1,0,1,1,1", "out_of_domain"),
    ("1,0,1,0,1,-1,0,1,0,1,1,1", "out_of_domain"),  # the label too
    ("1,0,1,0,0.5,1,0,1,0,1,1,1", "out_of_domain"),
    (HEADER, "repeated_header"),
    ("", "blank_line"),
    ("   ", "blank_line"),
]


def test_malformed_rows_are_rejected_with_their_reason(spark, tmp_path):
  table = MALFORMED
  lines = [HEADER, GOOD[0]]
  for line, _ in table:
    lines += [line, GOOD[1]]
  # NA in a used column with junk in an unused one (unused columns are not checked): dropped
  # for NA. Then quoted and spaced tokens, read as the numbers they spell: kept.
  lines += ["1,0,NA,0,1,1,0,1,0,1,7,1", ' "1" , 0,1.0,0,1,1,0,1,0,1,1,1']
  path = write(tmp_path, "bad.csv", lines)
  a, b = run_both(spark, path, tmp_path)
  for m, out in ((a, "spark"), (b, "streaming")):
    pv = m.provenance
    assert pv.rows_read == T.count_lines(path) - 1
    assert (pv.kept, pv.dropped_na, pv.rejected) == (1 + len(table) + 1, 1, len(table))
    rejects = T.read_rejects(str(tmp_path / out))
    assert [(r["line"], r["reason"], r["text"]) for r in rejects] == [
        (3 + 2 * i, reason, line) for i, (line, reason) in enumerate(table)]
  # The quoted, spaced tokens were read as the numbers they spell.
  x = np.concatenate([data_lib.load_split(str(tmp_path / "spark"), s).features
                      for s in manifest_lib.SPLITS])
  assert (x == np.array([1, 0, 1, 0, 1, 0, 1, 0, 1])).all(axis=1).sum() >= 1
  details = [r["detail"] for r in T.read_rejects(str(tmp_path / "spark"))]
  assert details[:3] == ["11 fields, expected 12", "13 fields, expected 12",
                         "column 'black': 'abc' is not a number"]
  assert details[6:8] == ["column 'sex': 2 is not 0 or 1", "column 'employed': -1 is not 0 or 1"]
  assert details[-3:] == ["the header line again", "empty line", "empty line"]
  assert details == [r["detail"] for r in T.read_rejects(str(tmp_path / "streaming"))]


def test_out_of_domain_values_of_the_raw_spec(spark, tmp_path):
  header = ",".join(f'"{c}"' for c in S.RAW_COLUMNS)
  cols = S.synthesize_raw(5, seed=0)
  rows = [",".join(str(cols[c][i]) for c in S.RAW_COLUMNS) for i in range(5)]

  def with_value(col, value):
    i = S.RAW_COLUMNS.index(col)
    f = rows[0].split(",")
    f[i] = value
    return ",".join(f)

  bad = [with_value("educ", "17"), with_value("educ", "0"), with_value("age", "131"),
         with_value("age", "-1"), with_value("income", "1e999")]
  path = write(tmp_path, "raw.csv", [header] + rows + bad + [with_value("income", "-5e6")])
  a, b = run_both(spark, path, tmp_path, spec="pums_raw")
  assert a.provenance == b.provenance
  assert a.provenance.kept == 6  # a large loss is a valid income (clipped to the bound)
  reasons = [(r["line"], r["reason"]) for r in T.read_rejects(str(tmp_path / "spark"))]
  assert reasons == [(7, "out_of_domain"), (8, "out_of_domain"), (9, "out_of_domain"),
                     (10, "out_of_domain"), (11, "non_numeric")]
  assert "is not one of 1,2,3" in T.read_rejects(str(tmp_path / "spark"))[0]["detail"]


def test_crlf_line_endings_give_the_same_dataset(spark, tmp_path):
  cols = S.synthesize_capums(3000, seed=4, na_fraction=0.01)
  lf = str(tmp_path / "lf.csv")
  crlf = str(tmp_path / "crlf.csv")
  S.write_csv(cols, lf)
  S.write_csv(cols, crlf, line_ending="\r\n")
  run_spark(spark, lf, str(tmp_path / "lf"))
  a, b = run_both(spark, crlf, tmp_path)
  assert a.provenance == b.provenance == manifest_lib.read_manifest(str(tmp_path / "lf")).provenance
  assert a.provenance.rejected == 0
  for out in ("spark", "streaming"):
    for split in manifest_lib.SPLITS:
      np.testing.assert_array_equal(data_lib.load_split(str(tmp_path / out), split).features,
                                    data_lib.load_split(str(tmp_path / "lf"), split).features)


def test_a_header_repeated_mid_file(spark, tmp_path):
  path = write(tmp_path, "rep.csv", [HEADER] + GOOD[:2] + [HEADER] + GOOD[2:])
  a, b = run_both(spark, path, tmp_path)
  assert a.provenance == b.provenance == manifest_lib.Provenance(rows_read=5, kept=4, rejected=1)
  r = T.read_rejects(str(tmp_path / "spark"))
  assert [(x["line"], x["reason"]) for x in r] == [(4, "repeated_header")]


def test_undecodable_bytes_are_rejected_not_dropped(spark, tmp_path):
  path = str(tmp_path / "bytes.csv")
  with open(path, "wb") as f:
    f.write((HEADER + "\n" + GOOD[0] + "\n").encode() + b"1,0,\xff,0,1,1,0,1,0,1,1,1\n"
            + (GOOD[1] + "\n").encode())
  a, b = run_both(spark, path, tmp_path)
  assert a.provenance == b.provenance == manifest_lib.Provenance(rows_read=3, kept=2, rejected=1)
  for out in ("spark", "streaming"):
    (r,) = T.read_rejects(str(tmp_path / out))
    assert (r["line"], r["reason"]) == (3, "non_numeric") and "\ufffd" in r["text"]


def test_missing_input_path(spark, tmp_path, capsys):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  missing = str(tmp_path / "nope.csv")
  assert_both_raise(spark, missing, tmp_path, FileNotFoundError, "nope.csv does not exist")
  assert spark_job.main(["--input", missing, "--output", str(tmp_path / "o"),
                         "--spec", "capums"]) == 2
  assert "nope.csv does not exist" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run_spark(spark, "file://" + missing, str(tmp_path / "o"))


def test_existing_output_directory(spark, tmp_path, capsys):
  from preprocessing import spark_job  # pylint: disable=g-import-not-at-top
  path = write(tmp_path, "ok.csv", [HEADER] + GOOD)
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious.txt").write_text("not a dataset")
  with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
    run_spark(spark, path, str(out))
  with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
    local.run_local(path, str(out), "capums")
  assert spark_job.main(["--input", path, "--output", str(out), "--spec", "capums"]) == 2
  assert "pass --overwrite" in capsys.readouterr().err
  assert to_shards.main(["--input", path, "--output", str(out), "--spec", "capums"]) == 2
  # --overwrite replaces datasets only, never another directory.
  with pytest.raises(PipelineError, match="not a dataset directory"):
    run_spark(spark, path, str(out), overwrite=True)
  assert (out / "precious.txt").read_text() == "not a dataset"


def test_output_inside_the_input_directory_is_refused(spark, tmp_path):
  write(tmp_path / "", "ok.csv", [HEADER] + GOOD)
  with pytest.raises(PipelineError, match="inside the input directory"):
    run_spark(spark, str(tmp_path), str(tmp_path / "out"))


def test_spec_validation():
  base = {"name": "t", "features": ("a",), "columns": {"a": {"kind": "binary"}}, "label": "y"}
  assert features_lib.spec_from_config(base).feature_names == ("a",)
  bad = [
      (dict(base, colour="red"), r"unknown key\(s\) \['colour'\]"),
      (dict(base, columns={"a": {"kind": "binary", "bounds": (0, 1)}}), "unknown key"),
      (dict(base, columns={"a": {"kind": "text"}}), "kind='text' must be one of"),
      (dict(base, columns={"a": {"kind": "numeric"}}), "needs public bounds"),
      (dict(base, columns={"a": {"kind": "numeric", "bounds": (5, 1)}}), "lo < hi"),
      (dict(base, columns={"a": {"kind": "categorical", "categories": ()}}), "public categories"),
      (dict(base, columns={"a": {"kind": "categorical", "categories": (1, 1)}}), "duplicates"),
      (dict(base, features=("a", "b")), r"features \['b'\] have no entry"),
      (dict(base, label="a"), "must not also be a feature"),
      (dict(base, columns={"a": {"kind": "binary"}, "z": {"kind": "binary"}}),
       "neither in features nor the label"),
      (dict(base, input_columns=("a", "q")), r"lacks the used column\(s\) \['y'\]"),
      (dict(base, na_tokens=("0",)), "is a number"),
      ({k: v for k, v in base.items() if k != "label"}, "missing key 'label'"),
  ]
  for cfg, match in bad:
    with pytest.raises(features_lib.SpecError, match=match):
      features_lib.spec_from_config(cfg)
  with pytest.raises(FileNotFoundError, match="built-in specs"):
    features_lib.load_spec("no_such_spec")
  for name in ("capums", "pums_raw"):  # the shipped specs are valid
    assert features_lib.load_spec(name).name == name
