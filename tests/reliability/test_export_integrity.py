"""An exported model is checked whole before use: one digest over every file, the architecture
against the arrays the file really holds (before any allocation), and model.json against itself.
"""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax.dp import accounting
from fastdp_jax import errors
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir as model_dir_lib
from fastdp_jax import models
from fastdp_jax import summary as summary_lib
from tests.conftest import ROOT

NAMES = ("sex", "married", "age", "income")
SIGMA, Q, STEPS, DELTA = 1.1, 0.0123, 200, 1e-5


def _summary():
  eps = accounting.compute_epsilon(SIGMA, Q, STEPS, DELTA)
  return summary_lib.RunSummary(
      private=True, dp_enabled=True, epsilon=eps, delta=DELTA + 1e-12,
      accountant_delta=DELTA, overflow_delta=1e-12, accountant="pld",
      noise_multiplier=SIGMA, l2_norm_clip=1.0, sampling_rate=Q, steps=STEPS,
      noise="os entropy", sampling="os entropy", test_accuracy=0.7)


@pytest.fixture()
def model_dir(tmp_path):
  _, params = models.functional(models.create_model(len(NAMES), (6,), seed=1))
  return model_dir_lib.export_model(str(tmp_path / "model"), params=params,
                                    feature_names=NAMES, label_name="employed",
                                    hidden_sizes=(6,), summary=_summary())


def _edit_spec(model_dir, fn, reseal=False):
  """Edits model.json; ``reseal`` also rewrites the manifest (as a careful forger would)."""
  path = os.path.join(model_dir, layout.SPEC_FILE)
  with open(path) as f:
    spec = json.load(f)
  fn(spec)
  with open(path, "w") as f:
    json.dump(spec, f)
  if reseal:
    _reseal(model_dir)


def _reseal(model_dir):
  lines = []
  for name in layout.COVERED_FILES:
    with open(os.path.join(model_dir, name), "rb") as f:
      lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {name}\n")
  with open(os.path.join(model_dir, layout.MANIFEST_FILE), "w") as f:
    f.write("".join(lines))


def _reseal_params(model_dir):
  """After editing params.npz: its digest in model.json and the manifest, as a forger would."""
  with open(os.path.join(model_dir, layout.PARAMS_FILE), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  _edit_spec(model_dir, lambda s: s.update(params_sha256=digest), reseal=True)


def test_the_manifest_covers_every_file_and_sha256sum_reads_it(model_dir):
  assert sorted(os.listdir(model_dir)) == sorted(
      [layout.PARAMS_FILE, layout.SPEC_FILE, layout.CARD_FILE, layout.MANIFEST_FILE])
  r = subprocess.run(["sha256sum", "-c", layout.MANIFEST_FILE], cwd=model_dir,
                     capture_output=True, text=True, check=False)
  assert r.returncode == 0 and r.stdout.count(": OK") == 3, r.stdout + r.stderr
  predictor = fastdp_jax.load_model(model_dir)
  with open(os.path.join(model_dir, layout.MANIFEST_FILE), "rb") as f:
    assert predictor.digest == hashlib.sha256(f.read()).hexdigest()
  assert fastdp_jax.load_model(model_dir, expected_digest=predictor.digest).digest
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="is not the expected"):
    fastdp_jax.load_model(model_dir, expected_digest="0" * 64)


@pytest.mark.parametrize("edit", [
    lambda s: s.update(threshold=float("nan")),
    lambda s: s["features"][0].update(name="age") or s["features"][2].update(name="sex"),
    lambda s: s["privacy"].update(epsilon=s["privacy"]["epsilon"] / 2),
    lambda s: s["label"].update(name="unemployed"),
], ids=["nan_threshold", "swapped_features", "edited_epsilon", "edited_label"])
def test_an_edited_model_json_is_refused(model_dir, edit):
  _edit_spec(model_dir, edit)
  with pytest.raises(model_dir_lib.ModelIntegrityError,
                     match=r"model.json: sha256 .* does not match MANIFEST.sha256's") as e:
    fastdp_jax.load_model(model_dir)
  assert isinstance(e.value, errors.UserError)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(threshold=float("nan")), r"threshold=nan must be a number in \[0, 1\]"),
    (lambda s: s.update(threshold=1.5), r"threshold=1.5 must be"),
    (lambda s: s["privacy"].update(epsilon=s["privacy"]["epsilon"] / 2),
     r"privacy.epsilon=.* but sigma 1.1, q 0.0123 and 200 updates give"),
    (lambda s: s["privacy"].update(noise="fixed by dp.noise_seed"), "privacy.private is true"),
    (lambda s: s["features"][1].update(name="sex"), "features repeat a name"),
    (lambda s: s.update(num_params=10), "num_params=10 but the architecture has"),
    (lambda s: s["architecture"].update(hidden_sizes=[6, 0]), "hidden_sizes=.* positive"),
], ids=["nan_threshold", "threshold_above_1", "epsilon", "private_with_seed",
        "repeated_feature", "num_params", "zero_width"])
def test_an_inconsistent_model_is_refused_even_with_a_resealed_manifest(model_dir, edit, match):
  _edit_spec(model_dir, edit, reseal=True)
  with pytest.raises(model_dir_lib.ModelIntegrityError, match=match):
    fastdp_jax.load_model(model_dir)


def test_a_huge_architecture_is_refused_before_any_allocation(model_dir, monkeypatch):
  def hidden(spec):
    spec["architecture"]["hidden_sizes"] = [10_000]
    spec["model"]["hidden_sizes"] = [10_000]  # consistent, so only the arrays refuse it
    spec["num_params"] = len(NAMES) * 10_000 + 10_000 + 10_000 + 1
  _edit_spec(model_dir, hidden, reseal=True)
  created = []
  monkeypatch.setattr(models, "create_model", lambda *a, **k: created.append(a))
  # params.npz holds 4 x 6 weights: refused from its headers, before create_model.
  with pytest.raises(model_dir_lib.ModelIntegrityError,
                     match=r"layers/0/kernel has shape \(4, 6\), "
                     r"the architecture in model.json needs \(4, 10000\)"):
    fastdp_jax.load_model(model_dir)
  assert created == []


def test_an_npz_that_claims_more_than_it_holds_is_refused(model_dir):
  path = os.path.join(model_dir, layout.PARAMS_FILE)
  with zipfile.ZipFile(path) as z:
    arrays = {i.filename: z.read(i) for i in z.infolist()}
  # A header declaring (4, 10000) over the bytes of (4, 6): what a bomb would look like.
  raw = arrays["layers/0/kernel.npy"]
  arrays["layers/0/kernel.npy"] = raw.replace(b"(4, 6)", b"(4, 10000)")
  with zipfile.ZipFile(path, "w") as z:
    for name, data in arrays.items():
      z.writestr(name, data)
  _reseal_params(model_dir)
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="declares shape"):
    fastdp_jax.load_model(model_dir)


def test_non_finite_or_pickled_parameters_are_refused(model_dir):
  path = os.path.join(model_dir, layout.PARAMS_FILE)
  saved = dict(np.load(path))
  saved["layers/1/bias"] = np.array([np.inf], np.float32)
  np.savez(path, **saved)
  _reseal_params(model_dir)
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="layers/1/bias holds non-finite"):
    fastdp_jax.load_model(model_dir)
  saved["layers/1/bias"] = np.array([object()], object)
  np.savez(path, **saved)
  _reseal_params(model_dir)
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="not float32"):
    fastdp_jax.load_model(model_dir)


def test_missing_extra_and_unlisted_files_are_refused(model_dir):
  with open(os.path.join(model_dir, "notes.txt"), "w") as f:
    f.write("x")
  with pytest.raises(model_dir_lib.ModelIntegrityError, match=r"\['notes.txt'\] are not files"):
    fastdp_jax.load_model(model_dir)
  os.remove(os.path.join(model_dir, "notes.txt"))
  os.remove(os.path.join(model_dir, layout.MANIFEST_FILE))
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="no MANIFEST.sha256"):
    fastdp_jax.load_model(model_dir)


def test_an_old_directory_is_not_replaced_unless_it_is_an_export(tmp_path):
  precious = tmp_path / "model"
  precious.mkdir()
  (precious / "thesis.tex").write_text("do not lose")
  _, params = models.functional(models.create_model(2, (3,), seed=0))
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="refusing to replace"):
    model_dir_lib.export_model(str(precious), params=params, feature_names=("a", "b"),
                               label_name="y", hidden_sizes=(3,))
  assert (precious / "thesis.tex").read_text() == "do not lose"


def test_a_signed_model_is_checked_with_its_key(model_dir, tmp_path):
  key = tmp_path / "key"
  key.write_bytes(os.urandom(32))
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.export", "sign", model_dir,
                      "--key-file", str(key)], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0 and "signed" in r.stdout, r.stderr
  assert fastdp_jax.load_model(model_dir, key=key.read_bytes()).signed
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="signature does not match"):
    fastdp_jax.load_model(model_dir, key=os.urandom(32))
  # A forger without the key can reseal the manifest, not the signature.
  _edit_spec(model_dir, lambda s: s["features"][0].update(name="forged"), reseal=True)
  assert fastdp_jax.load_model(model_dir).feature_names[0] == "forged"  # no key: not caught
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="signature does not match"):
    fastdp_jax.load_model(model_dir, key=key.read_bytes())
  r = subprocess.run([sys.executable, "-m", "fastdp_jax.export", "verify", model_dir,
                      "--key-file", str(key)], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "signature" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_an_unsigned_model_is_refused_when_a_key_is_given(model_dir):
  with pytest.raises(model_dir_lib.ModelIntegrityError, match="not signed"):
    fastdp_jax.load_model(model_dir, key=b"k" * 32)
  with pytest.raises(errors.UserError, match="at least 16 bytes"):
    model_dir_lib.sign_model(model_dir, b"short")
