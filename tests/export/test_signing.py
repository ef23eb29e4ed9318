"""Signing is a first-class option: a key given anywhere a model is loaded is checked.

``load_model(path, key=...)`` and ``python -m fastdp_jax.predict --key-file`` refuse an
unsigned or badly signed model; ``python -m fastdp_jax.export verify`` without a key says it
checked integrity only, and fails when the model carries a signature it was not asked to check.
"""

import os

import numpy as np
import pytest

import fastdp_jax
from fastdp_jax import models
from fastdp_jax import predict
from fastdp_jax.data import features as features_lib
from fastdp_jax.export import __main__ as export_cli
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir

SPEC = {"name": "t", "features": ("flag", "size"), "label": "level",
        "columns": {"flag": {"kind": "binary"},
                    "size": {"kind": "numeric", "bounds": (0, 100), "domain": (0, 1000)}}}


@pytest.fixture()
def model(tmp_path):
  spec = features_lib.spec_from_config(SPEC)
  _, params = models.functional(models.create_model(spec.num_features, (3,), seed=0))
  return model_dir.export_model(str(tmp_path / "model"), params=params,
                                feature_names=spec.feature_names, label_name="level",
                                hidden_sizes=(3,), feature_spec=spec.to_dict())


@pytest.fixture()
def keys(tmp_path):
  good, other = tmp_path / "good.key", tmp_path / "other.key"
  good.write_bytes(os.urandom(32))
  other.write_bytes(os.urandom(32))
  return str(good), str(other)


def _sign(model, key_file):
  assert export_cli.main(["sign", model, "--key-file", key_file]) == 0


def test_signing_is_a_first_class_option_in_load_model(model, keys):
  good, other = keys
  with open(good, "rb") as f:
    key = f.read()
  with pytest.raises(model_dir.ModelIntegrityError, match="not signed"):
    fastdp_jax.load_model(model, key=key)
  _sign(model, good)
  assert fastdp_jax.load_model(model, key=key).signed
  assert not fastdp_jax.load_model(model).signed  # no key: nothing claims authenticity
  with open(other, "rb") as f:
    with pytest.raises(model_dir.ModelIntegrityError, match="signature does not match"):
      fastdp_jax.load_model(model, key=f.read())


def test_signing_is_a_first_class_option_in_predict(model, keys, tmp_path, capsys):
  good, other = keys
  data = tmp_path / "in.csv"
  data.write_text("flag,size\n1,5\n0,50\n")
  out = tmp_path / "p.csv"
  args = ["--model", model, "--input", str(data), "--output", str(out)]
  assert predict.main([*args, "--key-file", good]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "not signed" in err
  assert not out.exists()
  _sign(model, good)
  assert predict.main([*args, "--key-file", other]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "signature does not match" in err
  assert not out.exists()
  assert predict.main([*args, "--key-file", good]) == 0
  assert out.read_text().count("\n") == 3
  capsys.readouterr()
  assert predict.predict_csv(model, str(data), str(tmp_path / "q.csv"),
                             key=open(good, "rb").read())[:3] == (2, 2, 0)
  with pytest.raises(model_dir.ModelIntegrityError, match="signature does not match"):
    predict.predict_csv(model, str(data), str(tmp_path / "r.csv"), key=b"k" * 32)


def test_signing_is_a_first_class_option_in_verify(model, keys, capsys):
  good, other = keys
  digest = fastdp_jax.load_model(model).digest
  # Unsigned, no key: the integrity was checked, and the output says that is all.
  assert export_cli.main(["verify", model]) == 0
  said = capsys.readouterr().out
  assert "ok (integrity only: no key given, the signature was not checked" in said
  assert digest in said
  assert export_cli.main(["verify", model, "--key-file", good]) == 2
  assert "not signed" in capsys.readouterr().err
  _sign(model, good)
  capsys.readouterr()
  # Signed, no key: a signature nobody checked is not a pass.
  assert export_cli.main(["verify", model]) != 0
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
  assert layout.SIGNATURE_FILE in captured.err and "--key-file" in captured.err
  assert export_cli.main(["verify", model, "--key-file", good]) == 0
  assert "signature ok" in capsys.readouterr().out
  assert export_cli.main(["verify", model, "--key-file", other]) == 2
  assert "signature does not match" in capsys.readouterr().err
  # A damaged model is refused before anything is said about its signature.
  with open(os.path.join(model, layout.CARD_FILE), "a") as f:
    f.write("edited\n")
  assert export_cli.main(["verify", model]) == 2
  assert "sha256" in capsys.readouterr().err


def test_a_predicted_row_is_the_same_with_or_without_the_key(model, keys, tmp_path):
  good, _ = keys
  _sign(model, good)
  x = np.array([[1, 0.05], [0, 0.5]], np.float32)
  with open(good, "rb") as f:
    np.testing.assert_array_equal(fastdp_jax.load_model(model, key=f.read())(x),
                                  fastdp_jax.load_model(model)(x))
