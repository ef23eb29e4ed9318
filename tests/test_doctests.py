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


def test_every_public_name_resolves():
  for name in fastdp_jax.__all__:
    assert getattr(fastdp_jax, name) is not None
  assert fastdp_jax.load_model.__module__ == "fastdp_jax.export"


def test_import_does_not_start_jax():
  import subprocess
  import sys
  code = "import sys, fastdp_jax; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
