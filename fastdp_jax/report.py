"""Plots and a Markdown table of one or more training runs.

Usage::

  python -m fastdp_jax.report WORKDIR [WORKDIR ...] [--output DIR]

Reads each workdir's ``summary.json`` and ``metrics.jsonl`` (its ``eval`` records: every
``log_every_steps`` updates and every epoch end; its ``epoch`` records) and writes into ``DIR``
(default: ``WORKDIR/report`` for one run, ``<common parent>/report`` for several):

* ``loss.png``: training loss (solid) and test loss (dashed) against updates;
* ``accuracy.png``: test accuracy against updates, with the majority-class rate;
* ``epsilon.png``: the accountant's epsilon against updates;
* ``accuracy_vs_epsilon.png``: test accuracy against epsilon along each run (the privacy /
  utility trade-off), non-private runs as horizontal lines;
* for regression runs, ``rmse.png`` and ``rmse_vs_epsilon.png``: test RMSE against updates and
  against epsilon, with the baseline of predicting the test rows' mean (multi-class runs'
  macro-F1 is in the table);
* ``report.md``: one table row per run (privacy parameters, epsilon, accuracy with its exact
  95 % interval, the attacks); with ``--data DATASET_OR_CSV``, every test metric of each run's
  model recomputed there with its 95 % interval (:func:`fastdp_jax.evaluate`).

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from fastdp_jax import atomic
from fastdp_jax import errors
from fastdp_jax import evaluation
from fastdp_jax import records as records_lib
from fastdp_jax import sinks
from fastdp_jax import summary as summary_lib
from fastdp_jax.dp import release

PLOTS = ("loss.png", "accuracy.png", "epsilon.png", "accuracy_vs_epsilon.png")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
  """What the report reads of one workdir.

  Attributes:
    name: the label in legends and the table.
    workdir: its path.
    summary: its ``summary.json`` (None if the run did not finish).
    epochs: ``metrics.jsonl``'s ``epoch`` records.
    evals: its ``eval`` records (a superset of the epoch ends' steps).
  """

  name: str
  workdir: str
  summary: summary_lib.RunSummary | None
  epochs: list[dict[str, Any]]
  evals: list[dict[str, Any]]

  def series(self, key: str) -> tuple[list[int], list[float]]:
    """(steps, finite values) of ``key``: from the eval records, from the epoch records for a
    key only those have (the model-inversion accuracy, the epoch time)."""
    pairs = [(r["step"], r[key]) for r in self.evals if _finite(r.get(key))]
    if not pairs:
      pairs = [(r["step"], r[key]) for r in self.epochs if _finite(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def load_run(workdir: str, name: str | None = None) -> Run:
  """Reads a workdir; raises ``FileNotFoundError`` if it has no ``metrics.jsonl``."""
  metrics_path = os.path.join(workdir, sinks.METRICS_FILE)
  if not os.path.isfile(metrics_path):
    if os.path.isfile(os.path.join(workdir, "steps.jsonl")):  # written before metrics.jsonl
      raise FileNotFoundError(
          f"{workdir}: written by an older fastdp-jax (steps.jsonl, no "
          f"{sinks.METRICS_FILE}); the report reads {sinks.METRICS_FILE}: train "
          "again into a new workdir")
    raise FileNotFoundError(f"{workdir}: no {sinks.METRICS_FILE} (not a training run's "
                            "workdir?)")
  summary = summary_lib.read_summary(workdir)
  records = sinks.read_jsonl(metrics_path)
  return Run(name=name or os.path.basename(os.path.normpath(workdir)), workdir=workdir,
             summary=summary,
             epochs=[r for r in records if r.get("kind") == records_lib.EPOCH],
             evals=[r for r in records if r.get("kind") == records_lib.EVAL])


def _names(workdirs: Sequence[str]) -> list[str]:
  """Short unique labels: the basename, or more of the path where basenames collide."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  depth = 1
  while depth < max(len(p) for p in parts):
    names = ["/".join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
    depth += 1
  return [os.path.normpath(w) for w in workdirs]


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    if math.isinf(value):
      return "inf"
    return f"{value:.{digits}g}"
  return str(value)


def _either(value: Any, fallback: Any) -> Any:
  """``value`` from a finished run's summary, else ``fallback`` from its last epoch record."""
  return fallback if value is None else value


def markdown_table(runs: Sequence[Run]) -> str:
  """One row per run: privacy parameters, epsilon, accuracy, attacks, time."""
  header = ("| run | task | DP | privacy unit | sigma | C | q | updates | epsilon | delta | "
            "test acc | "
            "test acc 95% CI | majority | "
            "macro-F1 | test RMSE | baseline RMSE | model inversion | MIA AUC | MIA TPR@1%FPR | "
            "empirical eps >= | f-DP eps >= | wall s |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for r in runs:
    s, last = r.summary, r.epochs[-1] if r.epochs else {}
    pe = (s.privacy_eval if s else None) or {}
    mia = pe.get("membership_inference") or {}
    audit = pe.get("canary_audit") or {}
    dp = s.dp_enabled if s else None
    lines.append("| " + " | ".join([
        r.name, s.task if s else "binary", _fmt(dp), _unit_cell(s),
        _fmt(s.noise_multiplier) if dp else "-",
        _fmt(s.l2_norm_clip) if dp else "-",
        _fmt(s.sampling_rate if s else None, 3),
        _fmt(s.steps if s else last.get("step")),
        _fmt(s.epsilon if s else last.get("epsilon")),
        _fmt(s.delta if s else None),
        _fmt(_either(s and s.test_accuracy, last.get("test_accuracy"))),
        _accuracy_interval(s),
        _fmt(s.majority_class_rate if s else None),
        _fmt(_either(s and s.test_macro_f1, last.get("test_macro_f1"))),
        _fmt(_either(s and s.test_rmse, last.get("test_rmse"))),
        _fmt(s.baseline_rmse if s else None),
        _fmt(_either(s and s.nonprivate_attack_accuracy, last.get(release.ATTACK_ACCURACY))),
        _fmt(mia.get("auc")), _fmt(mia.get("tpr_at_low_fpr")),
        _fmt(audit.get("epsilon_lower_bound")),
        _fmt(audit.get("epsilon_lower_bound_fdp")),  # a bound only if the run is Gaussian-DP
        _fmt(s.wall_time_s if s else None, 3),
    ]) + " |")
  return "\n".join(lines) + "\n"


def _unit_cell(s: summary_lib.RunSummary | None) -> str:
  """The unit a run's epsilon is about: ``row``, or ``household (SERIALNO), k = 8``."""
  if s is None:
    return "-"
  name = summary_lib.unit_name(s.privacy_unit)
  return name if s.privacy_unit is None else f"{name}, k = {s.max_rows_per_unit}"


def unit_lines(runs: Sequence[Run]) -> list[str]:
  """Each finished run's unit statement: what its (epsilon, delta) hold for."""
  done = [r for r in runs if r.summary is not None and r.summary.dp_enabled]
  return [f"- {r.name}: {summary_lib.unit_statement(s.privacy_unit, s.max_rows_per_unit)}."
          for r, s in ((r, r.summary) for r in done if r.summary is not None)]


def _accuracy_interval(s: summary_lib.RunSummary | None) -> str:
  """The exact (Clopper-Pearson) 95 % interval of the test accuracy, from the run's counts."""
  if s is None or s.test_accuracy is None or not s.test_examples:
    return "-"
  low, high = evaluation.clopper_pearson(round(s.test_accuracy * s.test_examples),
                                         s.test_examples)
  return f"[{low:.4g}, {high:.4g}]"


def intervals_section(runs: Sequence[Run], data: str) -> list[str]:
  """Markdown lines: each finished run's test metrics on ``data`` with their 95 % intervals."""
  lines = [f"## Test metrics with 95 % intervals, on `{data}`", "",
           "Accuracy: exact (Clopper-Pearson) interval; the others: percentile bootstrap, "
           f"{evaluation.BOOTSTRAP_RESAMPLES} resamples of the test rows (seed "
           f"{evaluation.BOOTSTRAP_SEED}). Recomputed with `fastdp_jax.evaluate`.", "",
           "| run | metric | value | 95% interval | method |", "|---|---|---|---|---|"]
  for r in runs:
    if r.summary is None:
      continue
    result = evaluation.evaluate(r.workdir, data)
    lines += [f"| {r.name} | {name} | {iv.value:.4g} | [{iv.low:.4g}, {iv.high:.4g}] | "
              f"{iv.method} |" for name, iv in result.metrics.items()]
  return lines + [""]


def plot_runs(runs: Sequence[Run], output_dir: str, include_nonprivate: bool = False
              ) -> list[str]:
  """Writes the four PNG plots into ``output_dir`` (and, for regression runs, the RMSE plots;
  for classifiers with calibration bins, ``reliability.png``); returns their paths.

  ``include_nonprivate`` adds the training loss (a training-row statistic without noise) to
  the loss plot; by default only test-set curves and epsilon are drawn.
  """
  import matplotlib
  import numpy as np
  matplotlib.use("Agg")  # files only; no display on servers and CI
  from matplotlib import pyplot as plt

  os.makedirs(output_dir, exist_ok=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  color = {r.name: colors[i % len(colors)] for i, r in enumerate(runs)}
  paths = []

  def finish(fig, ax, name, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(output_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in runs:
    x, y = r.series(release.TRAIN_LOSS)
    if x and include_nonprivate:
      ax.plot(x, y, "-", color=color[r.name], label=f"{r.name} train")
    x, y = r.series("test_loss")
    if x:
      ax.plot(x, y, "--", marker=".", color=color[r.name], label=f"{r.name} test")
  finish(fig, ax, "loss.png", "optimizer updates", "loss (the task's)", "Loss")

  fig, ax = plt.subplots(figsize=(7, 4.5))
  majority = set()
  for r in runs:
    x, y = r.series("test_accuracy")
    if x:
      ax.plot(x, y, "-", marker=".", color=color[r.name], label=r.name)
    if r.summary is not None and _finite(r.summary.majority_class_rate):
      majority.add(round(r.summary.majority_class_rate, 4))
  for i, m in enumerate(sorted(majority)):
    ax.axhline(m, color="gray", ls=":", label="majority class" if i == 0 else None)
  finish(fig, ax, "accuracy.png", "optimizer updates", "test accuracy", "Test accuracy")

  _plot_epsilon(runs, color, plt, finish)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  log_x = True
  for r in runs:
    pairs = [(p.get("epsilon"), p.get("test_accuracy")) for p in r.evals]
    pairs = [(e, a) for e, a in pairs if _finite(e) and _finite(a)]
    if pairs:
      xs, ys = zip(*pairs)
      log_x &= min(xs) > 0
      ax.plot(xs, ys, "-", color=color[r.name], alpha=0.6)
      ax.plot(xs[-1:], ys[-1:], "o", color=color[r.name], label=r.name)
    elif r.summary is not None and _finite(r.summary.test_accuracy):
      ax.axhline(r.summary.test_accuracy, color=color[r.name], ls="--",
                 label=f"{r.name} (non-private)")
  if log_x and any(np.size(line.get_xdata()) for line in ax.get_lines()):
    ax.set_xscale("log")
  finish(fig, ax, "accuracy_vs_epsilon.png", "epsilon", "test accuracy",
         "Accuracy against privacy (dot: end of run)")

  _plot_regression([r for r in runs if r.summary is not None and r.summary.task == "regression"],
                   color, plt, finish)
  _plot_reliability([r for r in runs if r.summary is not None and r.summary.test_reliability],
                    color, plt, finish)
  return paths


def _plot_reliability(runs: Sequence[Run], color: dict[str, Any], plt: Any, finish: Any) -> None:
  """The reliability diagram of the classifiers' test probabilities (``reliability.png``):
  each bin's observed frequency against its mean predicted probability, the diagonal being
  perfect calibration."""
  if not runs:
    return
  fig, ax = plt.subplots(figsize=(5.5, 5.5))
  ax.plot([0, 1], [0, 1], ":", color="gray", label="calibrated")
  for r in runs:
    mean, freq, _ = zip(*r.summary.test_reliability)
    ece = r.summary.test_ece
    ax.plot(mean, freq, "-o", color=color[r.name],
            label=f"{r.name} (ECE {ece:.3f})" if _finite(ece) else r.name)
  finish(fig, ax, "reliability.png", "mean predicted probability (top class if multiclass)",
         "observed frequency", "Reliability of the test probabilities")


def _plot_epsilon(runs: Sequence[Run], color: dict[str, Any], plt: Any, finish: Any) -> None:
  """The accountant's epsilon against updates (non-private runs named in the legend)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in runs:
    x, y = r.series("epsilon")
    if x:
      ax.plot(x, y, "-", marker=".", color=color[r.name], label=r.name)
    elif r.summary is not None and r.summary.dp_enabled is False:
      ax.plot([], [], color=color[r.name], label=f"{r.name} (non-private: inf)")
  finish(fig, ax, "epsilon.png", "optimizer updates",
         "epsilon (delta as in the table)", "Privacy spent")


def _plot_regression(regression: Sequence[Run], color: dict[str, Any], plt: Any,
                     finish: Any) -> None:
  """Regression runs have no accuracy: their test RMSE (label units) against updates and
  against epsilon, with the constant baseline (predicting the test rows' mean)."""
  if not regression:
    return
  fig, ax = plt.subplots(figsize=(7, 4.5))
  fig2, ax2 = plt.subplots(figsize=(7, 4.5))
  for r in regression:
    x, y = r.series("test_rmse")
    if x:
      ax.plot(x, y, "-", marker=".", color=color[r.name], label=r.name)
    pairs = [(p.get("epsilon"), p.get("test_rmse")) for p in r.evals]
    pairs = [(e, v) for e, v in pairs if _finite(e) and _finite(v)]
    if pairs:
      xs, ys = zip(*pairs)
      ax2.plot(xs, ys, "-", color=color[r.name], alpha=0.6)
      ax2.plot(xs[-1:], ys[-1:], "o", color=color[r.name], label=r.name)
    if r.summary is not None and _finite(r.summary.baseline_rmse):
      for a in (ax, ax2):
        a.axhline(r.summary.baseline_rmse, color=color[r.name], ls=":",
                  label=f"{r.name}: predicting the test mean")
  finish(fig, ax, "rmse.png", "optimizer updates", "test RMSE", "Test RMSE (regression)")
  finish(fig2, ax2, "rmse_vs_epsilon.png", "epsilon", "test RMSE",
         "RMSE against privacy (dot: end of run)")


def write_report(workdirs: Sequence[str], output_dir: str | None = None,
                 include_nonprivate: bool = False, data: str | None = None) -> str:
  """Writes the plots and ``report.md`` for ``workdirs``; returns the ``report.md`` path.

  ``data``: a dataset directory or raw CSV to recompute every test metric on, with its 95 %
  interval (:func:`intervals_section`; loads each run's model, so JAX).
  """
  if not workdirs:
    raise ValueError("give at least one workdir")
  runs = [load_run(w, n) for w, n in zip(workdirs, _names(workdirs))]
  if output_dir is None:
    base = (workdirs[0] if len(workdirs) == 1
            else os.path.commonpath([os.path.abspath(w) for w in workdirs]))
    output_dir = os.path.join(base, "report")
  paths = plot_runs(runs, output_dir, include_nonprivate)
  lines = ["# Training report", "",
           "Runs: " + ", ".join(f"`{r.workdir}`" for r in runs) + ".", "",
           markdown_table(runs), "",
           "epsilon: the accountant's upper bound at the run's delta (inf: non-private). "
           "MIA: loss-threshold membership inference, train vs held-out rows (AUC 0.5 = "
           "chance). Empirical eps: the one-run canary audit's lower bound (when canaries "
           "were used). Model inversion and MIA use training rows: they are not private "
           "(nonprivate_*), like the whole report.", ""]
  if unit_lines(runs):
    lines += ["What each private run's (epsilon, delta) hold for (with a unit, its rows "
              "beyond the public bound k were left out of training):", "",
              *unit_lines(runs), ""]
  if data is not None:
    lines += intervals_section(runs, data)
  lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})"
            for p in paths]
  path = os.path.join(output_dir, "report.md")
  atomic.write_text(path, "\n".join(lines) + "\n", mode=0o600)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fastdp_jax.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="training runs' workdirs")
  parser.add_argument("--output", default=None,
                      help="output directory (default: WORKDIR/report or <parent>/report)")
  parser.add_argument("--include-nonprivate", action="store_true",
                      help="also plot the training loss (computed on training rows, no noise)")
  parser.add_argument("--data", default=None,
                      help="dataset directory or raw CSV: add every test metric of each run's "
                      "model recomputed there, with its 95%% interval (fastdp_jax.evaluate)")
  args = parser.parse_args(argv)
  try:
    path = write_report(args.workdirs, args.output, args.include_nonprivate, args.data)
  except (FileNotFoundError, ValueError, json.JSONDecodeError, errors.UserError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with open(path) as f:
    plots = sum(1 for line in f if line.startswith("!["))
  print(f"wrote {path} and {plots} plots in {os.path.dirname(path)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
