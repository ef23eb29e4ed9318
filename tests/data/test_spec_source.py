"""Specs are plain files: a spec may import a helper beside it, and any error while loading
one is one line naming the file and the line, with exit status 2 from every command that takes
``--spec``."""

import pytest

from fastdp_jax.data import features as features_lib
from fastdp_jax.data import spec_source
from preprocessing import spark_job
from preprocessing.mapreduce import local
from preprocessing.mapreduce import mapper
from preprocessing.mapreduce import to_shards
from preprocessing import synthesize

GOOD = '''\
import ml_collections
import {helper}


def get_config():
  config = ml_collections.ConfigDict()
  config.name = "{name}"
  config.features = ("region",)
  config.columns = ml_collections.ConfigDict()
  config.columns.region = ml_collections.ConfigDict(
      {{"kind": "categorical", "categories": {helper}.REGIONS}})
  config.label = "y"
  return config
'''

BROKEN = {
    # name: (file text, the line the error must name, a word of the message); a field's
    # error names the line of the statement that sets its column
    "syntax": ("def get_config(:\n  pass\n", 1, "SyntaxError"),
    "raises": ("import ml_collections\n\n\ndef get_config():\n  cells = {}\n"
               "  return cells['nope']\n", 6, "KeyError"),
    "no_function": ("CONFIG = 1\n", 1, "defines no get_config"),
    "bad_field": (GOOD.format(helper="helpers_ok", name="x").replace(
        '"kind": "categorical"', '"kind": "categorial"'), 10, "columns.region.kind"),
    "todo": (GOOD.format(helper="helpers_ok", name="x").replace(
        '"categories": helpers_ok.REGIONS', '"categories": "TODO: the public list"'), 10,
             "TODO placeholder"),
}


def _write(directory, name, text):
  path = directory / f"{name}.py"
  path.write_text(text)
  return str(path)


@pytest.fixture
def spec_dir(tmp_path):
  _write(tmp_path, "helpers_ok", 'REGIONS = ("north", "south")\n')
  return tmp_path


def test_a_spec_imports_the_helper_beside_it(spec_dir, tmp_path_factory):
  spec = features_lib.load_spec(_write(spec_dir, "mine", GOOD.format(helper="helpers_ok",
                                                                     name="mine")))
  assert spec.features[0].texts == ("north", "south")
  # A second directory with a helper of the same name gets its own, not the cached first.
  other = tmp_path_factory.mktemp("other")
  _write(other, "helpers_ok", 'REGIONS = ("east", "west")\n')
  spec2 = features_lib.load_spec(_write(other, "mine", GOOD.format(helper="helpers_ok",
                                                                   name="mine")))
  assert spec2.features[0].texts == ("east", "west")


def test_a_helper_that_raises_names_the_helper_and_its_line(spec_dir):
  _write(spec_dir, "helpers_bad", "REGIONS = ('a',)\nraise RuntimeError('broken\\nhelper')\n")
  path = _write(spec_dir, "uses_bad", GOOD.format(helper="helpers_bad", name="x"))
  with pytest.raises(features_lib.SpecError) as info:
    features_lib.load_spec(path)
  message = str(info.value)
  assert "helpers_bad.py:2: RuntimeError: broken helper" in message
  assert "\n" not in message


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_any_error_is_one_line_naming_file_and_line(spec_dir, name):
  text, line, word = BROKEN[name]
  path = _write(spec_dir, name, text)
  with pytest.raises(features_lib.SpecError) as info:
    features_lib.load_spec(path)
  message = str(info.value)
  assert message.startswith(f"{path}:{line}: ") or f"{name}.py:{line}: " in message, message
  assert word in message and "\n" not in message


def test_find_todo_walks_nested_values():
  assert spec_source.find_todo({"a": {"b": ("x", "TODO: y")}}) == "a.b[1]"
  assert spec_source.find_todo({"a": {"b": ("x", "todo")}}) is None


@pytest.mark.parametrize("command", ["spark_job", "local", "mapper", "to_shards",
                                     "synthesize"])
def test_every_command_with_spec_prints_one_line_and_exits_2(spec_dir, tmp_path, capsys,
                                                              command):
  text, line, _ = BROKEN["raises"]
  spec = _write(spec_dir, "raises", text)
  raw = tmp_path / "in.csv"
  raw.write_text("region,y\nnorth,1\n")
  out = str(tmp_path / "out")
  argv = {"spark_job": ["--input", str(raw), "--output", out, "--spec", spec],
          "local": ["--input", str(raw), "--output", out, "--spec", spec],
          "mapper": ["--spec", spec],
          "to_shards": ["--input", str(raw), "--output", out, "--spec", spec],
          "synthesize": ["--rows", "10", "--output-shards", out, "--spec", spec]}[command]
  main = {"spark_job": spark_job.main, "local": local.main, "mapper": mapper.main,
          "to_shards": to_shards.main, "synthesize": synthesize.main}[command]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert f"raises.py:{line}: KeyError" in err
