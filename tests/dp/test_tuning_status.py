"""Settings chosen on the private data without accounting make a run private: false, with the
reason, in the summary, the card and the README's results (``tuning.private_data``)."""

import importlib
import os

import pytest

from fastdp_jax import config as config_lib
from fastdp_jax.dp import release
from fastdp_jax.export import layout
from tests.conftest import ROOT
from tests.conftest import make_config
from tests.conftest import make_dataset

FULTON = ("fulton", "fulton_educ", "fulton_income", "fulton_puma")


def _status(rc):
  return release.privacy_status(dp_enabled=True, noise_fixed=False, sampling_fixed=False,
                                tuning=rc.tuning)


@pytest.mark.parametrize("name", FULTON)
def test_the_fulton_configs_say_their_settings_were_tuned_on_fulton(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  rc = config_lib.settings(cfg)
  assert rc.tuning.private_data == "unaccounted" and "Fulton's own rows" in rc.tuning.note
  private, note = _status(rc)
  assert private is False
  assert note.startswith(release.UNACCOUNTED_TUNING) and rc.tuning.note in note


def test_untuned_settings_stay_private_and_a_reproducibility_run_names_both_reasons():
  rc = config_lib.settings(make_config("unused"))
  assert rc.tuning.private_data == "none" and _status(rc) == (True, None)
  tuned = config_lib.settings(make_config("unused", **{"tuning.private_data": "unaccounted"}))
  private, note = release.privacy_status(dp_enabled=True, noise_fixed=True,
                                         sampling_fixed=False, tuning=tuned.tuning)
  assert private is False and "reproducibility run" in note
  assert release.UNACCOUNTED_TUNING in note


def test_a_tuned_run_says_so_in_its_summary_and_card(tmp_path):
  from fastdp_jax import train
  cfg = make_config(make_dataset(str(tmp_path / "data"), rows=1500, seed=3), **{
      "dp.noise_seed": None, "dp.sampling_seed": None, "num_epochs": 1,
      "checkpoint.enabled": False, "privacy_eval.membership_rows": 0,
      "tuning.private_data": "unaccounted", "tuning.note": "sigma picked on the test rows"})
  summary = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert summary.private is False
  assert summary.privacy_note.startswith(release.UNACCOUNTED_TUNING)
  assert "sigma picked on the test rows" in summary.privacy_note
  with open(os.path.join(summary.model_dir, layout.CARD_FILE)) as f:
    card = f.read()
  assert card.splitlines()[2] == (f"**This model has no privacy guarantee**: "
                                  f"{summary.privacy_note}.")
  assert "Private: **false**" in card


def test_the_readme_results_mark_the_fulton_runs_not_private_with_the_reason():
  with open(os.path.join(ROOT, "README.md")) as f:
    results = f.read().split("\n## Results")[1].split("\n## ")[0]
  lines, header, fulton = results.splitlines(), None, 0
  for line, below in zip(lines, lines[1:] + [""]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if below.startswith("|---"):  # each table's own header
      header = cells
    elif line.startswith("| ") and "`configs/fulton" in line:
      fulton += 1
      private = cells[header.index("private")]
      assert private.startswith("false") and "tuned on" in private, cells
  assert fulton >= len(FULTON)
