"""The public API's examples (doctests) run as tests."""

import doctest
import importlib

import pytest

import fastdp_jax

PUBLIC_MODULES = sorted({"fastdp_jax"} | set(fastdp_jax._EXPORTS.values()))


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


# What users call (issue 12, item 7): each is public and used in the package's examples.
REQUIRED = ("train_and_evaluate", "base_config", "load_model", "make_clipped_sum",
            "PoissonSampler", "compute_epsilon", "calibrate_noise_multiplier", "PrivacyLedger",
            "setup", "train", "finalize")


def test_every_public_name_resolves():
  for name in fastdp_jax.__all__:
    assert getattr(fastdp_jax, name) is not None
  assert fastdp_jax.load_model.__module__ == "fastdp_jax.export.predictor"
  assert set(REQUIRED) <= set(fastdp_jax.__all__)


def test_every_required_name_has_an_example():
  examples = doctest.DocTestParser().get_examples(fastdp_jax.__doc__)
  source = "".join(e.source for e in examples)
  for name in REQUIRED:
    call = "train.train(" if name == "train" else f"fastdp_jax.{name}("  # the module's loop
    assert call in source, f"no example calls {call} in fastdp_jax's docstring"


def test_train_is_the_trainer_module_whatever_the_import_order():
  # ``fastdp_jax.train`` is a submodule: its import binds the name to the module, so the name
  # must mean the module from the start (the README's ``from fastdp_jax import train``).
  import subprocess
  import sys
  code = ("import fastdp_jax\n"
          "a = fastdp_jax.train\n"
          "from fastdp_jax import train\n"
          "print(a is train, a.__name__, fastdp_jax.setup is train.setup,"
          " callable(train.train), fastdp_jax.finalize is train.finalize)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["True", "fastdp_jax.train", "True", "True", "True"]


def test_import_does_not_start_jax():
  import subprocess
  import sys
  code = "import sys, fastdp_jax; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
