"""The report: PNG plots and a Markdown table from training workdirs."""

import json
import os
import subprocess
import sys

import pytest

from fastdp_jax import report
from tests.conftest import ROOT


def _workdir(path, *, dp, accs, eps, mia_auc=None):
  os.makedirs(path)
  steps = [10 * (i + 1) for i in range(len(accs))]
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:  # as the trainer writes it
    for i, (s, a, e) in enumerate(zip(steps, accs, eps)):
      # A finer eval point between epoch ends, the epoch end's eval record, its epoch record.
      f.write(json.dumps(dict(kind="eval", step=s - 5, nonprivate_train_loss=0.71,
                              test_accuracy=a - 0.01, epsilon=e / 2)) + "\n")
      f.write(json.dumps(dict(kind="eval", step=s, nonprivate_train_loss=0.7,
                              test_accuracy=a, epsilon=e)) + "\n")
      f.write(json.dumps(dict(kind="epoch", epoch=i + 1, step=s,
                              nonprivate_train_loss=0.7 - 0.01 * i, test_loss=0.69,
                              test_accuracy=a, epsilon=e, nonprivate_attack_accuracy=0.6,
                              epoch_time_s=2.0 + i)) + "\n")
    f.write(json.dumps(dict(kind="summary", step=steps[-1], epsilon=eps[-1])) + "\n")
  summary = dict(dp_enabled=dp, noise_multiplier=0.9 if dp else 0.0,
                 l2_norm_clip=3.0 if dp else None, sampling_rate=0.01, steps=steps[-1],
                 epsilon=eps[-1], delta=1e-5 if dp else None, test_accuracy=accs[-1],
                 majority_class_rate=0.6234, attack_accuracy=0.6, wall_time_s=12.5)
  if mia_auc is not None:
    summary["privacy_eval"] = {"membership_inference": dict(auc=mia_auc, tpr_at_low_fpr=0.02)}
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f)
  return path


@pytest.fixture
def runs(tmp_path):
  dp = _workdir(str(tmp_path / "runs" / "dp"), dp=True, accs=[0.65, 0.66, 0.67],
                eps=[0.1, 0.2, 0.3], mia_auc=0.501)
  public = _workdir(str(tmp_path / "runs" / "public"), dp=False, accs=[0.66, 0.68, 0.69],
                    eps=[float("inf")] * 3, mia_auc=0.75)
  return dp, public


def _is_png(path):
  from matplotlib import image
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  pixels = image.imread(path)
  return pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0  # not blank


def test_report_writes_four_plots_and_a_table(runs, tmp_path):
  path = report.write_report(list(runs))
  out = os.path.dirname(path)
  assert out == str(tmp_path / "runs" / "report")  # the common parent
  for name in report.PLOTS:
    assert _is_png(os.path.join(out, name)), name
  text = open(path).read()
  rows = [l for l in text.splitlines() if l.startswith("| dp ") or l.startswith("| public ")]
  assert len(rows) == 2
  dp_cells = [c.strip() for c in rows[0].strip("|").split("|")]
  public_cells = [c.strip() for c in rows[1].strip("|").split("|")]
  header = [c.strip() for c in text.splitlines()[text.splitlines().index(
      next(l for l in text.splitlines() if l.startswith("| run ")))].strip("|").split("|")]
  dp_row, public_row = dict(zip(header, dp_cells)), dict(zip(header, public_cells))
  assert dp_row["epsilon"] == "0.3" and dp_row["sigma"] == "0.9" and dp_row["DP"] == "yes"
  assert public_row["epsilon"] == "inf" and public_row["sigma"] == "-"
  assert dp_row["test acc"] == "0.67" and public_row["MIA AUC"] == "0.75"
  for name in report.PLOTS:
    assert f"({name})" in text


def test_series_come_from_the_records_by_kind(runs):
  run = report.load_run(runs[0])
  assert [r["step"] for r in run.evals] == [5, 10, 15, 20, 25, 30]
  assert [r["epoch"] for r in run.epochs] == [1, 2, 3]
  steps, accs = run.series("test_accuracy")  # the finer eval points
  assert steps == [5, 10, 15, 20, 25, 30] and accs[1] == 0.65
  # A key only the epoch records have comes from them.
  assert run.series("epoch_time_s") == ([10, 20, 30], [2.0, 3.0, 4.0])
  public = report.load_run(runs[1])
  assert public.series("epsilon") == ([], [])  # inf is not plotted


def test_training_loss_is_plotted_only_when_asked(runs, tmp_path, monkeypatch):
  # The training loss is a training-row statistic without noise: out of the plots by default.
  from matplotlib import axes
  drawn = []
  real_plot = axes.Axes.plot

  def plot(self, *args, **kwargs):
    drawn.append(kwargs.get("label"))
    return real_plot(self, *args, **kwargs)

  monkeypatch.setattr(axes.Axes, "plot", plot)
  report.write_report([runs[0]], str(tmp_path / "default"))
  assert "dp test" in drawn and "dp train" not in drawn
  drawn.clear()
  report.write_report([runs[0]], str(tmp_path / "all"), include_nonprivate=True)
  assert "dp test" in drawn and "dp train" in drawn


def test_names_stay_unique():
  assert report._names(["x/a/run", "x/b/run"]) == ["a/run", "b/run"]
  assert report._names(["x/a", "x/b"]) == ["a", "b"]


def test_command_line(runs, tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "fastdp_jax.report", *runs, "--output",
                         str(out)], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, MPLBACKEND="", DISPLAY=""))
  assert proc.returncode == 0, proc.stderr
  assert "report.md" in proc.stdout
  assert sorted(os.listdir(out)) == sorted([*report.PLOTS, "report.md"])
  bad = subprocess.run([sys.executable, "-m", "fastdp_jax.report", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr


def test_a_workdir_from_before_metrics_jsonl_is_named_as_such(tmp_path):
  (tmp_path / "steps.jsonl").write_text('{"step": 1}\n')
  with pytest.raises(FileNotFoundError, match="older fastdp-jax .steps.jsonl.*train again"):
    report.load_run(str(tmp_path))


def test_regression_and_multiclass_runs_get_their_metrics(tmp_path):
  # A regression run: RMSE records instead of accuracy, and the mean-prediction baseline.
  reg = str(tmp_path / "runs" / "income")
  os.makedirs(reg)
  with open(os.path.join(reg, "metrics.jsonl"), "w") as f:
    for i, (rmse, e) in enumerate([(3.4, 0.2), (3.3, 0.5), (3.2, 1.0)]):
      f.write(json.dumps(dict(kind="eval", step=10 * (i + 1), test_rmse=rmse, test_loss=1.0,
                              epsilon=e)) + "\n")
  with open(os.path.join(reg, "summary.json"), "w") as f:
    json.dump(dict(task="regression", dp_enabled=True, noise_multiplier=1.0, l2_norm_clip=1.0,
                   sampling_rate=0.05, steps=30, epsilon=1.0, delta=1e-6, test_rmse=3.2,
                   test_mae=1.7, baseline_rmse=3.338), f)
  mc = _workdir(str(tmp_path / "runs" / "educ"), dp=True, accs=[0.4, 0.45, 0.49],
                eps=[0.3, 0.6, 1.0])
  with open(os.path.join(mc, "summary.json")) as f:
    summary = json.load(f)
  summary.update(task="multiclass", test_macro_f1=0.4226)
  with open(os.path.join(mc, "summary.json"), "w") as f:
    json.dump(summary, f)
  path = report.write_report([reg, mc])
  out = os.path.dirname(path)
  for name in ("rmse.png", "rmse_vs_epsilon.png", *report.PLOTS):
    assert _is_png(os.path.join(out, name)), name
  lines = open(path).read().splitlines()
  header = [c.strip() for c in next(l for l in lines if l.startswith("| run ")).strip("|")
            .split("|")]
  rows = {c[0]: dict(zip(header, c)) for c in
          ([x.strip() for x in l.strip("|").split("|")] for l in lines
           if l.startswith("| income ") or l.startswith("| educ "))}
  assert rows["income"]["task"] == "regression" and rows["income"]["test RMSE"] == "3.2"
  assert rows["income"]["baseline RMSE"] == "3.338" and rows["income"]["test acc"] == "-"
  assert rows["educ"]["task"] == "multiclass" and rows["educ"]["macro-F1"] == "0.4226"
