"""The mutation harness itself: every mutant still applies, exactly once, to the sources.

A refactoring that moves a mutant's text makes ``make mutation`` a harness error; this test
says so in the ordinary suite, naming the mutant to update (tests/mutation/mutants.py).
"""

import ast
import os

import pytest

from tests.conftest import ROOT
from tests.mutation import mutants as mutants_lib
from tests.mutation import run


@pytest.mark.parametrize("mutant", mutants_lib.MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_exactly_once_and_leaves_valid_python(tmp_path, mutant):
  os.makedirs(tmp_path / os.path.dirname(mutant.file))
  with open(os.path.join(ROOT, mutant.file)) as f:
    original = f.read()
  (tmp_path / mutant.file).write_text(original)
  run.apply_mutant(str(tmp_path), mutant)
  mutated = (tmp_path / mutant.file).read_text()
  assert mutated != original and mutant.new in mutated
  ast.parse(mutated)  # a mutant that does not even parse would be "caught" for nothing


def test_a_mutant_that_does_not_match_exactly_once_is_a_harness_error(tmp_path):
  m = mutants_lib.MUTANTS[0]
  os.makedirs(tmp_path / os.path.dirname(m.file))
  for text in ("nothing to mutate\n", m.old + m.old):
    (tmp_path / m.file).write_text(text)
    with pytest.raises(run.HarnessError, match="exactly once"):
      run.apply_mutant(str(tmp_path), m)


def test_mutant_names_are_unique_and_the_privacy_tests_exist():
  names = [m.name for m in mutants_lib.MUTANTS]
  assert len(set(names)) == len(names)
  own = tuple(t for m in mutants_lib.MUTANTS for t in m.tests)
  for target in run.PRIVACY_TESTS + run.MULTIDEVICE_TESTS + own:
    path, _, test = target.partition("::")
    source = open(os.path.join(ROOT, path)).read()
    assert not test or f"def {test}(" in source, target


def test_the_table_goes_between_the_markers_and_keeps_the_rest(tmp_path):
  os.makedirs(tmp_path / "docs")
  doc = tmp_path / run.DOC
  run.write_doc(str(tmp_path), "| a |", "first")  # no file yet: the section is created
  assert run.SECTION in doc.read_text() and "| a |" in doc.read_text()
  doc.write_text("# Privacy\n\nintro\n\n" + doc.read_text().split("# Privacy\n\n", 1)[1]
                 + "\n## After\n\ntext\n")
  run.write_doc(str(tmp_path), "| b |", "second")
  text = doc.read_text()
  assert "| b |" in text and "| a |" not in text and "first" not in text
  assert text.startswith("# Privacy\n\nintro\n") and text.endswith("## After\n\ntext\n")
  assert text.count(run.BEGIN) == text.count(run.END) == 1
