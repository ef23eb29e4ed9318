"""The records a run writes to its sinks: their kinds, and the progress record of one call.

The trainer writes each record (a kind, the update count, its values) to the one
:class:`fastdp_jax.sinks.MultiSink`; each sink takes the kinds it shows and ignores the others:

============ ====================================== ==========================================
kind         written                                shown by
============ ====================================== ==========================================
``progress`` after every compiled call              the console (bar or plain lines)
``eval``     every ``log_every_steps`` updates and   ``metrics.jsonl``, TensorBoard
             every epoch end                        (per-update curves)
``epoch``    every epoch end                        all three (the console's epoch line)
``config``   once, at set-up                        TensorBoard (text, hparams)
``summary``  once, at the end                       ``metrics.jsonl``, TensorBoard
============ ====================================== ==========================================

The kinds live apart from the sinks (:mod:`fastdp_jax.sinks`) and the console
(:mod:`fastdp_jax.console`) because both read them and the sinks build on the console.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PROGRESS, EVAL, EPOCH, CONFIG, SUMMARY = "progress", "eval", "epoch", "config", "summary"
KINDS = (PROGRESS, EVAL, EPOCH, CONFIG, SUMMARY)


def call_totals(metrics: Mapping[str, np.ndarray], num_steps: int) -> dict[str, float]:
  """A ``progress`` record: the sums over one compiled call's first ``num_steps`` updates.

  Args:
    metrics: per-update arrays ``loss_sum``, ``count``, ``clipped`` of length >= num_steps
      (sums over each update's Poisson batch).
    num_steps: updates the call ran.
  """
  return {name: float(np.sum(np.asarray(metrics[name])[:num_steps]))
          for name in ("loss_sum", "count", "clipped")}


def is_number(value: Any) -> bool:
  """A finite int or float (inf epsilon of non-private runs stays out of the curves)."""
  return (isinstance(value, (int, float, np.floating, np.integer))
          and not isinstance(value, bool) and math.isfinite(value))
