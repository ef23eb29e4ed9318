"""What one update of the training loop must be, computed apart from the loop, in float64.

For plain SGD (no momentum) with learning rate ``lr``, update ``t`` of the loop is

    params_t+1 = params_t - lr * (S_t + sigma C z_t) / B,

where ``S_t`` is the sum over update t's batch of per-example gradients, each clipped to norm
C, ``z_t`` the standard normal noise of update t and ``B`` the expected batch size. With the
noise key known (a reproducibility run), ``z_t`` is re-derived here from ``jax.random`` by the
key schedule that :mod:`fastdp_jax.dp.noise` documents (not by its code), so

    S_loop = -(params_t+1 - params_t) * B / lr - sigma C z_t

is what the loop summed, and must equal ``S_t`` computed here in float64 with NumPy: the
per-example gradients of a linear model (``model.hidden_sizes = ()``: logistic, softmax or
linear regression, embedding tables included) by their closed forms, each clipped, summed.

:func:`tolerance` bounds, coordinate by coordinate, what float32 arithmetic in the loop may
contribute (a running error bound with the unit roundoff u = 2^-24, see there). Here it is a
few 1e-4 of the clipped sum's coordinates at the median (most of it where the examples'
gradients cancel), and the loop's actual deviation stays under a fifth of it (measured on the
multiclass case): a 1 % change of C, a pair of examples clipped together, sigma / 2 or a
repeated noise draw is hundreds to thousands of tolerances away.

Used by ``tests/dp/test_update_precision.py`` (in memory, 1 and 8 devices, before and after a
resume) and ``tests/test_streamed_training.py`` (materialised batches).
"""

from __future__ import annotations

import dataclasses
import json
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

U = 2.0 ** -24  # float32 unit roundoff
# XLA's float32 erf_inv is a polynomial approximation (Giles 2010) accurate to about 1e-5
# relative in the tails (6e-6 measured at |z| = 3.8 over 4e6 draws, i.e. 97 u): the loop's
# normal deviates are within ERF_INV_ULPS * u * |z| of the exact quantile computed here.
ERF_INV_ULPS = 256


def noise_key_of_seed(seed: int) -> np.ndarray:
  """The uint32[4] noise key of ``dp.noise_seed = seed`` (as documented in dp/noise.py)."""
  return np.random.SeedSequence([seed & (2**64 - 1), 0x4E4F4953]).generate_state(4, np.uint32)


def noise(key: np.ndarray, count: int, like: list[np.ndarray]) -> list[np.ndarray]:
  """The standard normal noise of update ``count`` for the leaves ``like``, in float64.

  The documented schedule: the 128-bit key is two Threefry keys (words 0-1 and 2-3); each is
  folded with the update number and split into one key per leaf (tree-flatten order); a
  leaf's uint32 bits are the XOR of the two keys' ``jax.random.bits``; their top 23 bits give
  u = m / 2^22 - 1 in [-1, 1) (clamped at the float32 just above -1), and z = sqrt(2)
  erfinv(u).
  """
  halves = [jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(key[i:i + 2], jnp.uint32),
                                                        impl="threefry2x32"), count)
            for i in (0, 2)]
  keys = [jax.random.split(h, len(like)) for h in halves]
  out = []
  for j, leaf in enumerate(like):
    bits = (np.asarray(jax.random.bits(keys[0][j], leaf.shape, jnp.uint32))
            ^ np.asarray(jax.random.bits(keys[1][j], leaf.shape, jnp.uint32)))
    u = np.maximum((bits >> 9).astype(np.float64) * 2.0 ** -22 - 1.0, -1.0 + 2.0 ** -24)
    out.append(np.sqrt(2.0) * special.erfinv(u))
  return out


@dataclasses.dataclass(frozen=True)
class Linear:
  """A linear model's layout: dense columns, one optional embedding column, the task."""

  kind: str  # binary, multiclass, regression
  dense: tuple[int, ...]  # dense feature columns, in the model's order
  id_column: int | None = None  # the embedded column (one table), or None
  bounds: tuple[float, float] | None = None  # regression's public label bounds


def _output_gradient(m: Linear, z: np.ndarray, y: np.ndarray) -> np.ndarray:
  """d loss_i / d z_i [n, K] of the outputs z [n, K] (closed forms of the task's loss)."""
  if m.kind == "binary":
    return special.expit(z) - y[:, None]
  if m.kind == "multiclass":
    p = special.softmax(z, axis=1)
    p[np.arange(len(y)), y.astype(int)] -= 1.0
    return p
  lo, hi = m.bounds
  return z - ((y - (lo + hi) / 2) / ((hi - lo) / 2))[:, None]  # 0.5 (z - target)^2


@dataclasses.dataclass
class Reference:
  """The float64 clipped sum of one update and what bounds the loop's float32 error."""

  clipped_sum: np.ndarray  # S, flat in tree-flatten order
  magnitude: np.ndarray  # sum_i |c_i g_i| (componentwise)
  forward_error: np.ndarray  # the per-example float32 error bound, propagated and summed
  clipped_fraction: float


def clipped_sum(m: Linear, params: dict, x: np.ndarray, y: np.ndarray, clip: float
                ) -> Reference:
  """The sum over rows ``x, y`` of per-example gradients clipped to ``clip``, in float64.

  Args:
    m: the model's layout.
    params: the parameter pytree (``layers/0/{bias,kernel}``, ``tables/0/embedding``).
    x: [n, d] the batch's real rows (no padding); y: [n] their labels.
    clip: C.
  """
  w = np.asarray(params["layers"][0]["kernel"], np.float64)  # [width, K]
  b = np.asarray(params["layers"][0]["bias"], np.float64)
  x = np.asarray(x, np.float64)
  parts = [x[:, list(m.dense)]]
  table = None
  if m.id_column is not None:
    table = np.asarray(params["tables"][0]["embedding"], np.float64)
    ids = x[:, m.id_column].astype(int)
    parts.append(table[ids])
  a = np.concatenate(parts, axis=1)  # [n, width]
  z = a @ w + b
  g = _output_gradient(m, z, np.asarray(y, np.float64))  # [n, K]
  nd = len(m.dense)
  gk = a[:, :, None] * g[:, None, :]  # [n, width, K]
  grads = {"bias": g, "kernel": gk}
  sq = np.sum(g ** 2, axis=1) * (1 + np.sum(a ** 2, axis=1))
  if table is not None:
    ge = g @ w[nd:].T  # [n, dim]: the looked-up row's gradient
    sq = sq + np.sum(ge ** 2, axis=1)
  norms = np.sqrt(sq)
  c = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
  # Float32 error of each example's output gradient: the dot product z has error at most
  # gamma_{width+1} sum |a w| + |b|, and every loss derivative here is 1-Lipschitz in z (plus
  # a few roundings of the derivative itself).
  width = a.shape[1]
  dz = (width + 1) * U * (np.abs(a) @ np.abs(w) + np.abs(b)) + 4 * U * (1 + np.abs(g))
  errs = {"bias": dz, "kernel": np.abs(a)[:, :, None] * dz[:, None, :]}
  if table is not None:
    errs_e = dz @ np.abs(w[nd:]).T
  flat_err_norm = np.sqrt(np.sum(dz ** 2, axis=1) * (1 + np.sum(a ** 2, axis=1))
                          + (np.sum(errs_e ** 2, axis=1) if table is not None else 0.0))
  # A relative error e_i / |g_i| of the gradient moves the clipping factor by as much.
  rel = c * (1 + flat_err_norm / np.where(norms > 0, norms, 1.0))
  leaves, mags, fwd = [], [], []
  for name in ("bias", "kernel"):  # tree-flatten order of layers/0
    leaves.append(np.einsum("i,i...->...", c, grads[name]).ravel())
    mags.append(np.einsum("i,i...->...", c, np.abs(grads[name])).ravel())
    fwd.append(np.einsum("i,i...->...", rel, errs[name]).ravel())
  if table is not None:
    dense = np.zeros((len(x),) + table.shape)
    dense[np.arange(len(x)), ids] = ge
    err_rows = np.zeros_like(dense)
    err_rows[np.arange(len(x)), ids] = errs_e
    leaves.append(np.einsum("i,i...->...", c, dense).ravel())
    mags.append(np.einsum("i,i...->...", c, np.abs(dense)).ravel())
    fwd.append(np.einsum("i,i...->...", rel, err_rows).ravel())
  return Reference(np.concatenate(leaves), np.concatenate(mags), np.concatenate(fwd),
                   float(np.mean(norms > clip)))


def flat(params) -> np.ndarray:
  """The parameters in tree-flatten order, as float64."""
  return np.concatenate([np.asarray(v, np.float64).ravel()
                         for v in jax.tree_util.tree_leaves(params)])


def tolerance(ref: Reference, before: np.ndarray, after: np.ndarray, z: np.ndarray, *,
              batch_size: float, lr: float, stddev: float, rows: int) -> np.ndarray:
  """A componentwise bound on |S_loop - S| from the loop's float32 arithmetic.

  Terms, each a standard bound in units of u = 2^-24: the per-example forward errors
  (``ref.forward_error``); summing ``rows`` clipped gradients and the norm over the
  parameters (gamma_rows + gamma_params relative to sum |c_i g_i|); the noise's normal
  deviates (``ERF_INV_ULPS``) and its scaling and addition; and the update's three roundings
  (noise added, divided by B, times lr) and ``after = before + update``, magnified by B / lr
  when S is recovered from the parameters. The sum is doubled for the second-order terms.
  """
  params = before.size
  sum_err = (rows + params + 8) * U * ref.magnitude + ref.forward_error
  noise_err = stddev * np.abs(z) * (ERF_INV_ULPS + 2) * U
  update = np.abs(after - before)
  param_err = (batch_size / lr) * U * (np.abs(before) + np.abs(after) + 4 * update)
  return 2 * (sum_err + noise_err + param_err + U * np.abs(ref.clipped_sum))


def recovered_sum(before: np.ndarray, after: np.ndarray, z: np.ndarray, *, batch_size: float,
                  lr: float, stddev: float) -> np.ndarray:
  """S_loop: the loop's update with its exact noise taken out (see the module docstring)."""
  return -(after - before) * batch_size / lr - stddev * z


def check_update(ref: Reference, before, after, key: np.ndarray, count: int, *,
                 batch_size: float, lr: float, stddev: float, rows: int, what: str) -> None:
  """Asserts that update ``count`` (params ``before`` -> ``after``, pytrees) is ``ref``'s
  clipped sum plus the noise of ``count`` from ``key``, to the float32 tolerance."""
  z = np.concatenate([v.ravel() for v in noise(key, count, jax.tree_util.tree_leaves(before))])
  b, a = flat(before), flat(after)
  got = recovered_sum(b, a, z, batch_size=batch_size, lr=lr, stddev=stddev)
  tol = tolerance(ref, b, a, z, batch_size=batch_size, lr=lr, stddev=stddev, rows=rows)
  # The check can see what it guards: a 1 % change of every clipped gradient (C * 1.01) is
  # above the tolerance in most coordinates.
  big = np.abs(ref.clipped_sum) > 0
  assert np.median(tol[big] / np.abs(ref.clipped_sum[big])) < 1e-3, "tolerance too loose"
  excess = np.abs(got - ref.clipped_sum) / tol
  worst = int(np.argmax(excess))
  assert excess[worst] <= 1.0, (
      f"{what}, update {count}: update minus its noise differs from the float64 clipped sum "
      f"by {excess[worst]:.3g} tolerances at coordinate {worst} (loop {got[worst]:.9g}, "
      f"reference {ref.clipped_sum[worst]:.9g}, tolerance {tol[worst]:.3g}; "
      f"{int(np.sum(excess > 1))} of {excess.size} coordinates off)")


def streamed_batch(batches: str, update: int) -> tuple[np.ndarray, np.ndarray]:
  """The real rows ``(features, labels)`` of ``update`` in a materialised batch directory,
  read from its HDF5 shards with h5py (not through the trainer's reader)."""
  for block in sorted(os.listdir(batches)):
    manifest = os.path.join(batches, block, "block.json")
    if not os.path.isfile(manifest):
      continue
    with open(manifest) as f:
      body = json.load(f)
    for entry in body["shards"]:
      with h5py.File(os.path.join(batches, block, entry["file"]), "r") as h:
        k = h["mask"].shape[0]
        if entry["first_update"] <= update < entry["first_update"] + k:
          i = update - entry["first_update"]
          mask = h["mask"][i].astype(bool)
          return h["features"][i][mask], h["labels"][i][mask]
  raise AssertionError(f"update {update} is in no shard of {batches}")
