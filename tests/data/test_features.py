"""Feature specs: the new label kinds and embedding columns are validated when loaded, and
encode exactly as declared (public codes, bounds and vocabularies only)."""

import re

import numpy as np
import pytest

from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib


def _spec(task=None, **columns):
  columns = columns or {"a": {"kind": "binary"}}
  cfg = {"name": "t", "features": tuple(columns), "columns": columns, "label": "y"}
  if task is not None:
    cfg["task"] = task
  return features_lib.spec_from_config(cfg)


@pytest.mark.parametrize("task, columns, match", [
    ({"kind": "regression", "bounds": (0, 1)}, {}, "task.out_of_bounds=None must be declared"),
    ({"kind": "regression", "bounds": (-2, 1), "transform": "log1p", "out_of_bounds": "clip"},
     {}, "log1p needs lo > -1"),
    ({"kind": "multiclass", "classes": (("a", (1, 2)), ("b", (2, 3)))}, {},
     r"codes \[2.0\] are already in another class"),
    ({"kind": "multiclass", "classes": (("a", (1,)),)}, {}, "2 or more distinct classes"),
    ({"kind": "multiclass", "classes": (("a", (1,)), ("b", (2,))), "bounds": (0, 1)}, {},
     r"unknown key\(s\) \['bounds'\] for a multiclass task"),
    ({"kind": "ordinal"}, {}, "task.kind='ordinal' must be one of"),
    (None, {"c": {"kind": "embedding", "codes": (1, 2), "range": (1, 2)}},
     "exactly one of codes=.* or range="),
    (None, {"c": {"kind": "embedding", "range": (1, 2.5)}}, "must be two integers"),
    (None, {"c": {"kind": "embedding", "codes": (1, 2), "unknown": "zero"}},
     "columns.c.unknown='zero' must be one of"),
    (None, {"c": {"kind": "embedding", "range": (0, 1 << 25)}}, "ids must be exact in float32"),
], ids=["no_policy", "log1p_bounds", "overlap", "one_class", "stray_key", "kind",
        "codes_and_range", "fractional_range", "unknown_policy", "huge_vocabulary"])
def test_malformed_label_kinds_and_embeddings_are_refused(task, columns, match):
  with pytest.raises(features_lib.SpecError, match=match):
    _spec(task, **columns)


def test_encoding_follows_the_declared_codes_bounds_and_vocabulary():
  spec = _spec({"kind": "regression", "bounds": (0, 100), "transform": "log1p",
                "out_of_bounds": "clip"},
               c={"kind": "embedding", "codes": (30, 10, 20), "unknown": "extra_id"},
               r={"kind": "embedding", "range": (5, 9)})
  assert spec.task == manifest_lib.Task("regression", bounds=(0.0, float(np.log1p(100))))
  assert spec.embeddings == (manifest_lib.Embedding("c", 4), manifest_lib.Embedding("r", 5))
  assert spec.feature_bounds == ((0.0, 3.0), (0.0, 4.0))
  values = np.array([[10, 5, -4], [30, 9, 50], [77, 7, 1000]], np.float64)
  x, y = spec.encode(values)
  # Codes are ids in the listed order (30 -> 0, 10 -> 1); 77 is not listed: the extra id 3.
  np.testing.assert_array_equal(x, np.array([[1, 0], [0, 4], [3, 2]], np.float32))
  np.testing.assert_array_equal(y, np.log1p(np.array([0, 50, 100], np.float64)).astype(np.float32))
  assert spec.adjustments(values) == {"unknown_id:c": 1, "label_clipped:y": 2}
  # The canonical form reads back to the same spec (what an export stores).
  assert features_lib.spec_from_dict(spec.to_dict()).to_dict() == spec.to_dict()


def test_cleaning_reports_the_column_of_every_reject():
  spec = _spec({"kind": "multiclass", "classes": (("lo", (1,)), ("hi", (2, 3)))},
               a={"kind": "binary"}, r={"kind": "embedding", "range": (5, 9)})
  header = ("y", "extra", "r", "a")  # another order, an unused column
  result = cleaning.LineCleaner(spec, header).clean(
      ["1,x,5,0", "4,x,5,0", "2,x,10,1", "3,x,7.5,1", "2,x,abc,1", "2,x,NA,1", "1,x,5"])
  assert result.kept.tolist() == [0]
  assert [(i, r) for i, r, _ in result.rejects] == [
      (1, "out_of_domain"), (2, "out_of_domain"), (3, "out_of_domain"), (4, "non_numeric"),
      (6, "wrong_arity")]
  assert result.reject_columns == {1: "y", 2: "r", 3: "r", 4: "r"}
  assert result.dropped_na.tolist() == [5]
  assert re.search(r"'r': 7.5 is not an integer code in \[5, 9\]", result.rejects[2][2])
  # A predictor's cleaning does not read the label.
  features_only = cleaning.LineCleaner(spec, ("r", "a"), with_label=False).clean(["6,1"])
  np.testing.assert_array_equal(spec.encode_features(features_only.values), [[1, 1]])  # a, r=6
