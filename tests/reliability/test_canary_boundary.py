"""An audit dataset's canary file is inside the dataset's trust boundary, checked up front.

Before: a canary path in the manifest was opened wherever it pointed, without a checksum, and
a missing file failed the run only after its last update.
"""

import json
import os

import numpy as np
import pytest

from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.dp import privacy_eval as pe
from fastdp_jax import train
from tests.conftest import make_config, make_dataset


@pytest.fixture
def audit(tmp_path):
  src = make_dataset(str(tmp_path / "data"), rows=1500, seed=3)
  out = str(tmp_path / "audit")
  pe.make_audit_dataset(src, out, num_canaries=20, seed=0)
  return out


def _edit_extra(path, **changes):
  manifest = os.path.join(path, manifest_lib.MANIFEST)
  body = json.load(open(manifest))
  body["extra"].update(changes)
  with open(manifest, "w") as f:
    json.dump(body, f)


def _refused(audit, tmp_path, match):
  cfg = make_config(audit, num_epochs=1)
  cfg.data.attack_column = ""
  with pytest.raises(manifest_lib.ShardError, match=match):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "metrics.jsonl").exists()  # before the first update


def test_the_intact_audit_dataset_loads(audit):
  canaries = pe.load_canaries(audit)
  assert canaries is not None and len(canaries) == 20


@pytest.mark.parametrize("name", ["../outside.npz", "/etc/passwd", "sub/c.npz"])
def test_a_canary_path_outside_the_directory_is_refused(audit, tmp_path, name):
  _edit_extra(audit, canaries=name)
  _refused(audit, tmp_path, "not a plain file name")


def test_a_symlink_out_of_the_directory_is_refused(audit, tmp_path):
  outside = tmp_path / "elsewhere.npz"
  os.replace(os.path.join(audit, pe.CANARIES_FILE), outside)
  os.symlink(outside, os.path.join(audit, pe.CANARIES_FILE))
  _refused(audit, tmp_path, "outside the dataset directory")


def test_a_missing_canary_file_is_refused_before_the_first_update(audit, tmp_path):
  os.remove(os.path.join(audit, pe.CANARIES_FILE))
  _refused(audit, tmp_path, "missing")


def test_an_altered_canary_file_is_refused(audit, tmp_path):
  path = os.path.join(audit, pe.CANARIES_FILE)
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  arrays["included"] = ~arrays["included"]  # the auditor's secret, swapped
  np.savez(path, **arrays)
  _refused(audit, tmp_path, "sha256")
