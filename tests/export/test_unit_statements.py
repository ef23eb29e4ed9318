"""Every output states the privacy unit: model.json, MODEL_CARD.md, the report
and the console line, for a household-level run and for a row-level run.

A household run says 'privacy unit: household (SERIALNO), at most 8 rows per unit; (epsilon,
delta) hold for adding or removing one whole unit'; a row run says 'row'. A model.json whose
unit entries disagree with each other is refused on load.
"""

import dataclasses
import json

import pytest

from fastdp_jax import models
from fastdp_jax import report
from fastdp_jax import summary as summary_lib
from fastdp_jax.dp import accounting
from fastdp_jax.export import card as card_lib
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir

SIGMA, Q, STEPS, DELTA = 1.5, 0.02, 50, 1e-5
HOUSEHOLD = "privacy unit: household (SERIALNO), at most 8 rows per unit; (epsilon, delta) " \
            "hold for adding or removing one whole unit"
ROW = "privacy unit: row; (epsilon, delta) hold for adding or removing one row"
UNITS = {"household": dict(privacy_unit=("SERIALNO",), max_rows_per_unit=8), "row": {}}
STATEMENTS = {"household": HOUSEHOLD, "row": ROW}


@pytest.fixture(scope="module")
def epsilon():
  return accounting.compute_epsilon(SIGMA, Q, STEPS, DELTA)


def _summary(epsilon, unit):
  """A finished private run's summary, its epsilon the accountant's for (SIGMA, Q, STEPS)."""
  return summary_lib.RunSummary(
      private=True, epsilon=epsilon, delta=DELTA, accountant_delta=DELTA, overflow_delta=0.0,
      noise_multiplier=SIGMA, l2_norm_clip=1.0, sampling_rate=Q, steps=STEPS, accountant="pld",
      noise="os entropy", sampling="os entropy", planned_num_examples=5000,
      num_examples_source="declared public by the user (data.num_examples)",
      test_accuracy=0.8, test_loss=0.45, majority_class_rate=0.6, base_rate_log_loss=0.67,
      test_ece=0.02,
      **UNITS[unit])


def _export(tmp_path, summary):
  net = models.create_model(3, (4,), seed=0)
  _, params = models.functional(net)
  return model_dir.export_model(
      str(tmp_path / "model"), params=params, feature_names=("a", "b", "c"),
      label_name="employed", hidden_sizes=(4,), summary=summary,
      model=models.model_spec(hidden_sizes=(4,), head=models.TaskHead(kind="binary"),
                              classes=(), feature_names=("a", "b", "c")))


@pytest.mark.parametrize("unit", list(UNITS))
def test_model_json_and_the_card_state_the_unit(tmp_path, epsilon, unit):
  path = _export(tmp_path, _summary(epsilon, unit))
  checked = model_dir.read_checked(path)  # the loader's checks, epsilon recomputed, pass
  priv = checked.spec["privacy"]
  assert priv["unit_statement"] == STATEMENTS[unit]
  with open(f"{path}/{layout.CARD_FILE}") as f:
    card = f.read()
  assert f"In short: {STATEMENTS[unit]}." in card
  if unit == "household":
    assert priv["privacy_unit"] == ["SERIALNO"] and priv["max_rows_per_unit"] == 8
    assert "- Privacy unit: one household (SERIALNO): all of its rows, at most 8," in card
    assert "for adding or removing one whole household (SERIALNO) and all of its rows" in card
    assert "Poisson sampling of units" in card and "N = 5000 training units" in card
    assert "the sum of each unit's row gradients" in card and "one training row" not in card
  else:
    assert priv["privacy_unit"] == "row" and "max_rows_per_unit" not in priv
    assert "- Privacy unit: one row of the training table" in card
    assert "for adding or removing one training row" in card
    assert "N = 5000 training rows" in card and "whole unit" not in card
  assert card_lib.privacy_unit(checked.spec) == summary_lib.unit_name(
      UNITS[unit].get("privacy_unit"))


@pytest.mark.parametrize("edit,field", [
    ({"unit_statement": ROW}, "privacy.privacy_unit"),  # a household run claiming rows
    ({"max_rows_per_unit": 0}, "privacy.privacy_unit"),
    ({"privacy_unit": "SERIALNO"}, "privacy.privacy_unit"),  # neither 'row' nor a list
])
def test_a_model_json_whose_unit_entries_disagree_is_refused(tmp_path, epsilon, edit, field):
  path = _export(tmp_path, _summary(epsilon, "household"))
  with open(f"{path}/{layout.SPEC_FILE}") as f:
    spec = json.load(f)
  spec["privacy"].update(edit)
  with pytest.raises(model_dir.ModelIntegrityError, match=field.replace(".", r"\.")):
    model_dir._check_spec(spec, path)


def test_a_model_json_from_before_units_still_loads():
  assert summary_lib.unit_record_problem({"epsilon": 1.0}) is None
  assert card_lib.privacy_unit({"privacy": {}}) == "row"


@pytest.mark.parametrize("unit", list(UNITS))
def test_the_report_and_the_console_state_the_unit(tmp_path, epsilon, unit):
  s = _summary(epsilon, unit)
  run = report.Run(name=unit, workdir=str(tmp_path), summary=s, epochs=[], evals=[])
  table = report.markdown_table([run]).splitlines()
  header = [c.strip() for c in table[0].strip("|").split("|")]
  row = dict(zip(header, [c.strip() for c in table[2].strip("|").split("|")]))
  assert row["privacy unit"] == ("household (SERIALNO), k = 8" if unit == "household"
                                 else "row")
  assert report.unit_lines([run]) == [f"- {unit}: {STATEMENTS[unit]}."]
  line = summary_lib.done_line(s, DELTA, True)
  assert line.startswith(f"done: epsilon {epsilon:.4f} at delta {DELTA:.3g} "
                         f"({STATEMENTS[unit]}), private: true, test accuracy 0.8000")


def test_a_non_private_run_states_no_guarantee():
  s = summary_lib.RunSummary(dp_enabled=False, **UNITS["household"])
  assert "unit_statement" not in s.privacy_record()
  assert report.unit_lines([report.Run(name="x", workdir=".", summary=s, epochs=[],
                                       evals=[])]) == []


@pytest.mark.parametrize("unit", list(UNITS))
def test_the_summary_round_trips_its_unit(epsilon, unit):
  s = _summary(epsilon, unit)
  record = json.loads(json.dumps(s.to_json()))
  assert summary_lib.RunSummary.from_json(record) == s
  # A row-level summary.json is as before units: no unit keys at all.
  assert ("privacy_unit" in record) == (unit == "household")


def test_unit_fields_come_from_the_trainers_unit():
  @dataclasses.dataclass
  class Unit:  # the trainer's fastdp_jax.unit_batches.UnitSpec has these two attributes
    columns: tuple
    max_rows: int

  assert summary_lib.unit_fields(None) == {}
  assert summary_lib.unit_fields(Unit(("SERIALNO",), 8)) == UNITS["household"]
  assert summary_lib.unit_name(("SERIALNO", "SPORDER")) == "person (SERIALNO, SPORDER)"
  assert summary_lib.unit_name(("pid",)) == "pid"
  assert summary_lib.unit_name(("row",)) == "'row'"  # a column named "row" is a unit
  assert summary_lib.unit_statement(("pid",), 1).startswith("privacy unit: pid, at most 1 row ")
