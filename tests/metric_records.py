"""Records as the trainer writes them, for the tests of the sinks and the console."""

import numpy as np

from fastdp_jax import records


def chunk(losses, counts, clipped=None):
  """One compiled call's per-update metrics (the trainer's arrays)."""
  losses = np.asarray(losses, np.float64)
  counts = np.asarray(counts, np.float64)
  return dict(loss_sum=losses * counts, count=counts,
              clipped=np.zeros_like(counts) if clipped is None else np.asarray(clipped, float),
              nonfinite=np.zeros_like(counts))


def write_progress(w, step, metrics, k):
  """What the trainer's progress hook writes after a call of ``k`` updates ending at ``step``."""
  return w.write(records.PROGRESS, step, records.call_totals(metrics, k))


def epoch_record(epoch, step, acc, eps):
  """An epoch record of a binary task."""
  return dict(epoch=epoch, step=step, nonprivate_train_loss=0.5, test_loss=0.6,
              test_accuracy=acc, epsilon=eps, nonprivate_clipped_fraction=0.1,
              nonprivate_nonfinite_examples=0, epoch_time_s=1.0)
