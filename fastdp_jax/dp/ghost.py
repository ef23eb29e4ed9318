"""Ghost-norm clipping: exact per-example clipping of dense and embedding layers at
non-private cost.

For a dense layer ``z = a @ W + b`` the gradient of example i's loss is
``dW_i = outer(a_i, g_i)`` and ``db_i = g_i``, where ``a_i`` [in] is the layer's input and
``g_i = d loss_i / d z_i`` [out] its output gradient. Hence

  ||dW_i||^2 + ||db_i||^2 = (||a_i||^2 + 1) * ||g_i||^2,

for any output width (one logit, K class logits), so every example's full gradient norm
comes from activations and output gradients alone,
without materialising a per-example gradient (Goodfellow 2015; Li et al. 2022 "ghost
clipping"). The output gradients of all layers come from ONE backward pass: a zero "tap" is
added to every pre-activation and the summed loss is differentiated with respect to the taps;
row i of a tap's gradient is ``g_i`` because example i's loss depends on its own row only.

An embedding table ``E [vocab, dim]`` looked up once per example (``e_i = E[id_i]``, one
lookup per embedding column; two columns use two tables) has the per-example gradient
``dE_i = onehot(id_i) outer g_i`` with ``g_i = d loss_i / d e_i`` [dim], hence
``||dE_i||^2 = ||g_i||^2``; a tap added to the looked-up rows gives ``g_i`` in the same
backward pass, and the clipped sum is the scatter-add ``sum_i c_i g_i`` into row ``id_i``.

The clipped sum then needs no second backward pass: with ``c_i = min(1, C / norm_i)``,

  sum_i c_i dW_i = a^T @ (c * g),   sum_i c_i db_i = sum_i c_i g_i,

the very matrix products a non-private backward pass computes, reweighted ("book-keeping",
Bu et al. 2023). This equals the gradient of ``sum_i stop_gradient(c_i) * loss_i``, computed
from the quantities of the first pass. A DP step therefore costs one forward and one backward
pass, like a non-private step, and its memory is the activations' [batch, width], not the
per-example gradients' [batch, params].

With privacy units (``unit_size=k``, a packed batch: each unit's 1..k rows contiguous, its
first row marked 2 in an int8 mask, :func:`fastdp_jax.dp.clip_types.unit_rows`) the clipped
thing is a unit P's summed gradient ``sum_{j in P} a_j g_j^T``, whose squared norm is
``sum_{j,l in P} (a_j.a_l + 1)(g_j.g_l)`` (for a table ``sum_{j,l} [id_j = id_l](g_j.g_l)``),
the sequence case of ghost clipping (Li et al. 2022). Two rows of one unit are fewer than k
slots apart, so the pairs are a BAND of width k: the products of rows r and r + d for
d = 0 .. k - 1 (counted twice for d > 0) where both rows are in the same unit, summed into
units with a segment sum. Computed blockwise as small matrix products, that costs about 2k
row-wise dot products per layer (about k times a row's ghost norm), whatever the units'
sizes. A layer with one output (the logit of a binary or regression head) is cheaper still:
its unit gradient ``sum_{j in P} g_j (a_j, 1)`` is no wider than its input, so it is summed
into units directly and squared, with no band. The book-keeping pass is unchanged, each row
weighted by its unit's factor ``c_P``.

Rows with ``mask == 0`` (padding) and rows whose norm is not finite get ``c_i = 0`` and their
activations and output gradients are zeroed with ``where`` before the products, so they
contribute exactly zero (a NaN row times 0 would still be NaN). An example whose gradient norm
is 0 gets ``c_i = 1`` (its gradient is zero anyway).

The ``dp.clipping`` choice between this method and per-example gradients by ``jax.vmap`` is
:func:`fastdp_jax.dp.clipping.make_clipped_sum`, which imports this module (never the
reverse); :func:`unsupported_layers` tells it which models this method handles.

References:
  Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799, 2015.
  Li, Tramer, Liang, Hashimoto, "Large language models can be strong differentially private
  learners", ICLR 2022 (ghost clipping).
  Bu, Wang, Zha, Karypis, "Differentially private optimization on large model at small cost",
  ICML 2023 (book-keeping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fastdp_jax.dp import clip_types
from fastdp_jax import models

# (outputs [batch] or [batch, K], labels [batch]) -> [batch] per-example losses.
ElementwiseLoss = Callable[[jax.Array, jax.Array], jax.Array]


def unsupported_layers(model: nnx.Module) -> list[str]:
  """Why ghost clipping cannot handle ``model``; an empty list when it can.

  Ghost clipping here knows the forward pass of :class:`fastdp_jax.models.MLP` (embedding
  lookups, dense layers with ReLU in between), and the per-example norm identities of dense
  and embedding layers only; any other parametrised layer (a convolution, a normalisation
  with a scale) is reported by its path.

  Args:
    model: an NNX module.

  Returns:
    One line per obstacle, naming the layer.
  """
  problems = []
  # Exactly MLP: a subclass could change the forward pass that ghost norms assume.
  if type(model) is not models.MLP:  # pylint: disable=unidiomatic-typecheck
    problems.append(f"model {type(model).__name__} is not fastdp_jax.models.MLP, the"
                    " architecture whose forward pass ghost clipping replicates")
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module) or isinstance(node, (nnx.Linear, nnx.Embed)):
      continue
    own = [name for name, value in vars(node).items() if isinstance(value, nnx.Param)]
    if own:
      where = ".".join(map(str, path)) or "<root>"
      problems.append(f"layer {where} ({type(node).__name__}) has parameters {own} and is not"
                      " a dense layer (nnx.Linear) or an embedding (nnx.Embed)")
  return problems


def _dense_layers(params: models.Params) -> list[dict[str, jax.Array]]:
  """The MLP's layers in order, from the NNX layout ``{'layers': {0: {...}, 1: {...}}}``."""
  layers = params["layers"]
  return [layers[k] for k in sorted(layers, key=int)]


def _tables(params: models.Params) -> list[dict[str, jax.Array]]:
  """The MLP's embedding tables in order (``{'tables': {0: {'embedding': ...}}}``)."""
  tables = params.get("tables") or {}
  return [tables[k] for k in sorted(tables, key=int)]


def _id_columns(params: models.Params, x: jax.Array, graphdef: Any) -> list[jax.Array]:
  """Each table's ids [batch] int32, from the model's own id columns."""
  if graphdef is None:
    raise ValueError("ghost clipping of a model with embeddings needs its graphdef")
  model = nnx.merge(graphdef, nnx.State(params))
  return [x[:, j].astype(jnp.int32) for j in model.id_columns]


def _rows(keep: jax.Array, v: jax.Array) -> jax.Array:
  """``v`` with the rows where ``keep`` is False set to exactly 0 (also NaN/inf rows)."""
  return jnp.where(keep[:, None], v, jnp.zeros((), v.dtype))


def _output_grads(params: models.Params, batch: tuple[jax.Array, jax.Array],
                  loss: ElementwiseLoss, graphdef: Any) -> tuple[list, list, list, jax.Array]:
  """One forward and one backward pass, to zero taps: ``(inputs, out_grads, row_grads,
  losses)``.

  ``inputs[l]`` [batch, in_l] is dense layer l's input, ``out_grads[l]`` [batch, out_l] each
  example's gradient with respect to its pre-activation, ``row_grads[k]`` [batch, dim_k] with
  respect to table k's looked-up row, ``losses`` [batch] the per-example losses.
  """
  x, y = batch
  taps = [jnp.zeros((x.shape[0], layer["kernel"].shape[1]), layer["kernel"].dtype)
          for layer in _dense_layers(params)]
  table_taps = [jnp.zeros((x.shape[0], t["embedding"].shape[1]), t["embedding"].dtype)
                for t in _tables(params)]

  def summed_loss(all_taps):
    taps, table_taps = all_taps
    outputs, inputs = models.mlp_forward(  # the model's own forward pass
        params, x, taps, graphdef=graphdef, table_taps=table_taps or None)
    losses = loss(outputs, y)
    return jnp.sum(losses), (inputs, losses)

  (out_grads, row_grads), (inputs, losses) = jax.grad(summed_loss, has_aux=True)(
      (taps, table_taps))
  return inputs, out_grads, row_grads, losses


def _row_sq_norms(params: models.Params, inputs: list, out_grads: list,
                  row_grads: list) -> jax.Array:
  """[batch] squared norm of each example's gradient: (||a_i||^2 + 1) ||g_i||^2 per dense
  layer, plus ||g_i||^2 per table."""
  sq = jnp.zeros((inputs[0].shape[0],), jnp.float32)
  for layer, a, g in zip(_dense_layers(params), inputs, out_grads):
    a_sq = jnp.sum(jnp.square(a), axis=1)
    g_sq = jnp.sum(jnp.square(g), axis=1)
    sq = sq + (a_sq + (1.0 if "bias" in layer else 0.0)) * g_sq
  for g in row_grads:  # one lookup per example and table: ||onehot outer g||^2 = ||g||^2
    sq = sq + jnp.sum(jnp.square(g), axis=1)
  return sq


# Activations at least this wide get the band as two products per block (own block, next
# block) on a view of the rows; narrower ones as one product against a copied window of 2k - 1
# rows. Measured on a 2-core CPU at k = 4 and 8: at width 1024 the copy costs a quarter of the
# band's time; at widths 9-50 the single larger product is 10-25 % faster, at 128 the two
# forms are within 15 % either way.
WIDE_BAND = 512


def _unit_sq_norms(params: models.Params, inputs: list, out_grads: list, row_grads: list,
                   ids: list[jax.Array], rows: clip_types.UnitRows,
                   unit_size: int) -> jax.Array:
  """[n] squared norm of each unit's gradient (by unit id), the sum of its kept rows'.

  A dense layer's unit gradient is ``sum_j outer(a_j, g_j)`` (and ``sum_j g_j``), whose
  squared norm is ``sum_{j,l} (a_j.a_l + 1)(g_j.g_l)``; a table's is
  ``sum_j onehot(id_j) outer g_j``, with ``sum_{j,l} [id_j = id_l](g_j.g_l)``. Kept rows of
  one unit are fewer than k slots apart (``rows.keep``), so every pair j <= l is a pair
  (r, r + d) with 0 <= d < k: a band of width k. It is computed in blocks of k rows, each
  row against its own block's rows and the next block's ([n / k, k, k] twice per layer, of
  which the band is k entries a row): about 2k dot products per row, at the speed of a
  matrix product, rather than k shifted copies of the activations (several times slower,
  memory-bound) or a Gram matrix per unit slot of k padded rows. A layer with one output
  skips the band: its unit gradient (as wide as its input) is summed into units and squared.
  """
  n, k = rows.keep.shape[0], unit_size
  nb = -(-n // k)

  def blocks(v, extra=1):  # [n, ...] -> [nb + extra, k, ...]; padding rows are never kept
    if (nb + extra) * k != n:
      v = jnp.pad(v, [(0, (nb + extra) * k - n)] + [(0, 0)] * (v.ndim - 1))
    return v.reshape((nb + extra, k) + v.shape[1:])

  def dots(x, y):  # [nb, k, k'] dot products of each row of x with each row of y
    # HIGHEST: full float32 products (no TF32 on a GPU), the accuracy of the row path's
    # elementwise norms; a norm too small by 1e-3 would let the clipped unit exceed C.
    return jnp.einsum("bpw,bqw->bpq", x, y, precision=jax.lax.Precision.HIGHEST)

  def gram(v):  # (own block, next block) dot products, [nb, k, k] each
    if v.shape[1] >= WIDE_BAND:
      b = blocks(v, extra=0)  # a view of the rows where n is whole blocks (the unit capacity)
      nxt = dots(b[:-1], b[1:])  # the last block has no next one
      return dots(b, b), jnp.concatenate([nxt, jnp.zeros((1, k, k), nxt.dtype)])
    b = blocks(v)
    # The next block's last row is never within k - 1 slots of a row of this block.
    w = dots(b[:nb], jnp.concatenate([b[:nb], b[1:, :k - 1]], axis=1))
    return w[:, :, :k], jnp.pad(w[:, :, k:], [(0, 0), (0, 0), (0, 1)])

  def pairs(v, op):  # (own, next) [nb, k, k]: op of each row's v with its block's rows' v
    b = blocks(v)
    return op(b[:nb, :, None], b[:nb, None, :]), op(b[:nb, :, None], b[1:, None, :])

  p, q = jnp.arange(k)[:, None], jnp.arange(k)[None, :]
  # The band from each row's own slot: the diagonal once, each further pair counted twice.
  # In its own block the partner is q >= p; in the next block q < p (fewer than k apart).
  weights = (jnp.where(q == p, 1.0, jnp.where(q > p, 2.0, 0.0)), jnp.where(q < p, 2.0, 0.0))
  summed = jnp.zeros((n,), jnp.float32)  # by unit id: the layers whose unit gradient is summed
  totals = [jnp.zeros((nb, k, k), jnp.float32)] * 2  # own block, next block
  banded = bool(ids)
  for layer, a, g in zip(_dense_layers(params), inputs, out_grads):
    if g.shape[1] == 1:
      # One output: a unit's gradient is sum_j g_j (a_j, 1), no wider than a row's input, so
      # summing it into units costs less than the band's k partners per row (W1's 50-wide
      # and W2's 1024-wide inputs to the logit: a third and an eighth of the band's time).
      summed = summed + _unit_sum_sq(jnp.where(rows.keep[:, None], g * a, 0.0), rows, n)
      if "bias" in layer:
        summed = summed + _unit_sum_sq(jnp.where(rows.keep[:, None], g, 0.0), rows, n)
      continue
    banded = True
    bias = 1.0 if "bias" in layer else 0.0
    totals = [t + (ga + bias) * gg for t, ga, gg in zip(totals, gram(a), gram(g))]
  if not banded:
    return summed
  for col, g in zip(ids, row_grads):
    totals = [t + jnp.where(eq, gg, 0.0)
              for t, eq, gg in zip(totals, pairs(col, jnp.equal), gram(g))]
  per_row = jnp.zeros((nb, k), jnp.float32)
  for total, unit, keep, weight in zip(totals, pairs(rows.unit, jnp.equal),
                                       pairs(rows.keep, jnp.logical_and), weights):
    pair = unit & keep & (weight > 0)
    # where, not a product with the mask: a NaN in a dropped or empty row must not leak.
    per_row = per_row + jnp.sum(jnp.where(pair, total * weight, 0.0), axis=2)
  per_row = per_row.reshape(nb * k)[:n]
  # Rows outside ``keep`` added exact zeros, wherever their unit id points.
  sq = jax.ops.segment_sum(per_row, rows.unit, num_segments=n, indices_are_sorted=True)
  # A squared norm, but rounding can leave a unit whose rows cancel slightly below 0; its
  # square root would be NaN and the unit wrongly counted as non-finite. (NaN stays NaN.)
  return jnp.maximum(sq, 0.0) + summed


def _unit_sum_sq(v: jax.Array, rows: clip_types.UnitRows, n: int) -> jax.Array:
  """[n] by unit id: the squared norm of the sum of each unit's rows of ``v`` [n, w] (rows
  outside ``keep`` already zero)."""
  total = jax.ops.segment_sum(v, rows.unit, num_segments=n, indices_are_sorted=True)
  return jnp.sum(jnp.square(total), axis=1)


def _clip_factor(norms: jax.Array, keep: jax.Array, l2_norm_clip: float) -> jax.Array:
  """``min(1, C / norm)`` where ``keep``, else 0; a zero norm gets factor 1 (its gradient is
  zero anyway)."""
  factor = jnp.minimum(1.0, l2_norm_clip / jnp.where(norms > 0, norms, 1.0))
  return jnp.where(keep, factor, 0.0)


def _bookkeeping(params: models.Params, inputs: list, out_grads: list, row_grads: list,
                 ids: list[jax.Array], keep: jax.Array, factor: jax.Array) -> models.Params:
  """``sum_i factor_i * grad loss_i`` from the first pass's quantities: rows where ``keep``
  is False contribute exact zeros."""
  grads: dict[str, Any] = {"layers": {}}
  for k, layer, a, g in zip(sorted(params["layers"], key=int), _dense_layers(params), inputs,
                            out_grads):
    scaled = _rows(keep, g) * factor[:, None].astype(g.dtype)
    # Contract the batch axis in place (what a non-private backward pass emits): ``a.T @``
    # makes XLA:CPU copy the transposed [batch, in] activations first (3-4 ms of W2's 31).
    entry = {"kernel": jnp.einsum("bi,bo->io", _rows(keep, a), scaled)}
    if "bias" in layer:
      entry["bias"] = jnp.sum(scaled, axis=0)
    grads["layers"][k] = entry
  if ids:
    grads["tables"] = {}
    for k, t, g, col in zip(sorted(params["tables"], key=int), _tables(params), row_grads, ids):
      scaled = _rows(keep, g) * factor[:, None].astype(g.dtype)
      # Padding rows add exact zeros wherever their (arbitrary) id points.
      grads["tables"][k] = {"embedding": jnp.zeros_like(t["embedding"]).at[col].add(scaled)}
  return grads


def ghost_clipped_sum(l2_norm_clip: float,
                      loss: ElementwiseLoss = optax.sigmoid_binary_cross_entropy,
                      graphdef: Any = None, *,
                      unit_size: int | None = None) -> clip_types.ClippedSumFn:
  """Ghost-norm clipping of an MLP as a ``ClippedSumFn(params, (x, y), mask)``.

  Args:
    l2_norm_clip: C > 0; every example's (or unit's) gradient is scaled to norm at most C.
    loss: per-example loss of the outputs, ``loss(outputs [batch] or [batch, K], labels
      [batch]) -> [batch]`` (default BCE with logits; a task's is
      :meth:`fastdp_jax.models.TaskHead.losses`, as :func:`fastdp_jax.models.example_loss`).
      Example i's loss must depend on row i only.
    graphdef: the MLP's graph definition (``nnx.split(model, nnx.Param)[0]``); required for
      a model with embeddings, else read off the parameter shapes.
    unit_size: None: each row is clipped alone (``mask`` bool or 0/1). k: the batch is a
      packed unit block (``mask`` int8: 0 empty, 2 a unit's first row, 1 a further row;
      at most k contiguous rows per unit) and the SUM of each unit's rows' gradients is
      clipped as a whole (band norms, each row weighted by its unit's factor).

  Returns:
    ``fn(params, (x [batch, d], y [batch]), mask [batch]) -> (grad_sum, ClipStats)`` with
    the same results as :func:`fastdp_jax.dp.clipping.clipped_grad_sum_with_stats` (or its
    unit form); the stats also carry the per-row ``losses``; with ``unit_size`` a unit's
    norm and non-finite flag sit at its first row slot.
  """
  if not l2_norm_clip > 0:
    raise ValueError(f"{l2_norm_clip=} must be positive")
  clip_types.check_unit_size(unit_size)

  def fn(params, batch, mask):
    x, _ = batch
    if unit_size is not None:
      return _unit_clipped_sum(params, batch, clip_types.unit_rows(mask, unit_size),
                               loss, graphdef, l2_norm_clip, unit_size)
    mask = jnp.asarray(mask).astype(bool)
    inputs, out_grads, row_grads, losses = _output_grads(params, batch, loss, graphdef)
    ids = _id_columns(params, x, graphdef) if _tables(params) else []
    norms = jnp.sqrt(_row_sq_norms(params, inputs, out_grads, row_grads))
    nonfinite = ~jnp.isfinite(norms)
    keep = mask & ~nonfinite
    grads = _bookkeeping(params, inputs, out_grads, row_grads, ids, keep,
                         _clip_factor(norms, keep, l2_norm_clip))
    # The losses come with the forward pass: the step reports them without another one.
    return grads, clip_types.ClipStats(norms=jnp.where(keep, norms, 0.0),
                                       nonfinite=nonfinite & mask, losses=losses)

  return fn


def _unit_clipped_sum(params: models.Params, batch: tuple[jax.Array, jax.Array],
                      rows: clip_types.UnitRows, loss: ElementwiseLoss, graphdef: Any,
                      l2_norm_clip: float, unit_size: int
                      ) -> tuple[models.Params, clip_types.ClipStats]:
  """The unit form of ghost clipping on one packed block (see :func:`ghost_clipped_sum`)."""
  inputs, out_grads, row_grads, losses = _output_grads(params, batch, loss, graphdef)
  ids = _id_columns(params, batch[0], graphdef) if _tables(params) else []
  norms = jnp.sqrt(_unit_sq_norms(params, inputs, out_grads, row_grads, ids, rows,
                                  unit_size))  # [n], by unit id
  finite = jnp.isfinite(norms)  # a unit with a non-finite gradient is zeroed whole
  row_keep = rows.keep & finite[rows.unit]
  # Each row carries its unit's factor c_P: sum_P c_P sum_{j in P} grad loss_j.
  row_factor = _clip_factor(norms, finite, l2_norm_clip)[rows.unit]
  grads = _bookkeeping(params, inputs, out_grads, row_grads, ids, row_keep,
                       jnp.where(row_keep, row_factor, 0.0))
  return grads, clip_types.ClipStats(
      norms=clip_types.at_first_rows(jnp.where(finite, norms, 0.0), rows),
      nonfinite=clip_types.at_first_rows(~finite, rows), losses=losses)
