"""Models: a Flax NNX multi-layer perceptron for every task, and its pure function form.

The model reads a feature row ``x [d]`` whose columns are dense features and, for each of the
manifest's embedding columns, an integer id 0..vocab-1 (carried as a float). Each id column
is looked up in its own table [vocab, dim]; the looked-up rows are concatenated after the
dense columns and go through Dense -> ReLU -> ... -> Dense(K). The output layer has 1 unit
(binary: a logit; regression: a value in normalised units) or K units (multiclass: logits).
``hidden_sizes = ()`` is logistic regression (binary), softmax regression (multiclass) or
linear regression (regression): one dense layer, the README's baseline.

Regression is learnt in units of the task's PUBLIC bounds: the target is
``(y - mid) / half`` with ``mid, half = (lo + hi) / 2, (hi - lo) / 2``, in [-1, 1], so the
clipping norm C means the same whatever the label's unit; predictions are
``mid + half * output``. Nothing about the data enters this scaling.

Training works on a plain parameter pytree (``nnx.split`` -> pure dict) so that per-example
gradients are ordinary ``jax.grad`` under ``jax.vmap``; the module is merged back inside the
loss. :func:`apply_exported` is the forward pass of an exported model (the same module).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Params = Any  # nested dict of arrays
TASKS = ("binary", "multiclass", "regression")
DEFAULT_EMBEDDING_DIM = 8


@dataclasses.dataclass(frozen=True)
class EmbeddingInput:
  """One embedded input column: feature column ``index`` holds ids 0..vocab_size-1."""

  index: int
  vocab_size: int
  dim: int


@dataclasses.dataclass(frozen=True)
class TaskHead:
  """What the output layer predicts (public: the task as the feature spec declares it).

  Attributes:
    kind: ``'binary'``, ``'multiclass'`` or ``'regression'``.
    num_classes: K for multiclass (else 1 output).
    bounds: a regression task's public label bounds ``(lo, hi)``.
    huber_delta: regression only: the Huber loss's delta in normalised units (None: squared
      loss).
    temperature: classifiers: the probabilities are those of ``logits / temperature``
      (1: as trained; above 1 after a private calibration, :mod:`fastdp_jax.dp.calibration`).
      Training's losses never use it.
  """

  kind: str = "binary"
  num_classes: int = 0
  bounds: tuple[float, float] | None = None
  huber_delta: float | None = None
  temperature: float = 1.0

  def __post_init__(self):
    if self.kind not in TASKS:
      raise ValueError(f"task {self.kind!r} must be one of {TASKS}")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature} must be positive")
    if self.kind == "multiclass" and self.num_classes < 2:
      raise ValueError(f"a multiclass head needs num_classes >= 2, got {self.num_classes}")
    if self.kind == "regression":
      if self.bounds is None or not self.bounds[0] < self.bounds[1]:
        raise ValueError(f"a regression head needs bounds lo < hi, got {self.bounds}")
      if self.huber_delta is not None and not self.huber_delta > 0:
        raise ValueError(f"huber_delta={self.huber_delta} must be positive")

  @property
  def num_outputs(self) -> int:
    return self.num_classes if self.kind == "multiclass" else 1

  @property
  def scale(self) -> tuple[float, float]:
    """``(mid, half)`` of a regression task's bounds: value = mid + half * output."""
    assert self.bounds is not None
    lo, hi = self.bounds
    return (lo + hi) / 2, (hi - lo) / 2

  def losses(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example losses ``[batch]`` of outputs ``[batch]`` or ``[batch, K]``."""
    if self.kind == "binary":
      return optax.sigmoid_binary_cross_entropy(outputs, labels)
    if self.kind == "multiclass":
      return optax.softmax_cross_entropy_with_integer_labels(outputs, labels.astype(jnp.int32))
    mid, half = self.scale
    target = (labels - mid) / half
    if self.huber_delta is None:
      return optax.l2_loss(outputs, target)  # 0.5 * (output - target)^2
    return optax.huber_loss(outputs, target, delta=self.huber_delta)

  def predict(self, outputs: jax.Array) -> jax.Array:
    """Probabilities [batch] (binary), [batch, K] (multiclass) or values [batch]."""
    if self.kind == "binary":
      return jax.nn.sigmoid(outputs / self.temperature)
    if self.kind == "multiclass":
      return jax.nn.softmax(outputs / self.temperature, axis=-1)
    mid, half = self.scale
    return mid + half * outputs


BINARY = TaskHead()


class MLP(nnx.Module):
  """[embeddings ->] Dense -> ReLU -> ... -> Dense(K). The original system's is ``MLP(9, (50,))``.

  Args:
    num_features: input width d (taken from the data manifest), embedding id columns included.
    hidden_sizes: widths of the hidden layers (``()``: a linear model).
    rngs: ``nnx.Rngs`` for initialisation.
    num_outputs: 1 (binary, regression) or K (multiclass).
    embeddings: the embedded id columns (indices into the d columns).
  """

  def __init__(self, num_features: int, hidden_sizes: Sequence[int], *, rngs: nnx.Rngs,
               num_outputs: int = 1, embeddings: Sequence[EmbeddingInput] = ()):
    embedded = {e.index for e in embeddings}
    # Static (Python ints): part of the graph definition, not of the parameters.
    self.id_columns = tuple(e.index for e in embeddings)
    self.dense_columns = tuple(j for j in range(num_features) if j not in embedded)
    self.squeeze = num_outputs == 1
    width = len(self.dense_columns) + sum(e.dim for e in embeddings)
    sizes = [width, *hidden_sizes, num_outputs]
    # The dense layers first: a model without embeddings initialises exactly as before.
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.tables = nnx.List([nnx.Embed(e.vocab_size, e.dim, rngs=rngs) for e in embeddings])

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps features [batch, num_features] to outputs [batch] (one unit) or [batch, K]."""
    return self.forward(x)[0]

  def forward(self, x: jax.Array, taps: Sequence[jax.Array] | None = None,
              table_taps: Sequence[jax.Array] | None = None
              ) -> tuple[jax.Array, list[jax.Array]]:
    """The forward pass, with every dense layer's input and optional taps.

    Args:
      x: [batch, num_features] features (embedding columns hold integer ids).
      taps: optional, one [batch, out_l] array per dense layer added to its pre-activation
        (zeros: ghost clipping differentiates with respect to them).
      table_taps: optional, one [batch, dim_k] array per embedding table added to its
        looked-up row (the same, for the tables).

    Returns:
      ``(outputs, inputs)``: outputs [batch] (one output unit) or [batch, K];
      ``inputs[l]`` [batch, in_l] is dense layer l's input.
    """
    if self.tables:
      parts = [x[:, list(self.dense_columns)]]
      for k, (j, table) in enumerate(zip(self.id_columns, self.tables)):
        row = table(x[:, j].astype(jnp.int32))
        parts.append(row if table_taps is None else row + table_taps[k])
      x = jnp.concatenate(parts, axis=1)
    inputs = []
    for l, layer in enumerate(self.layers):
      inputs.append(x)
      z = layer(x)
      if taps is not None:
        z = z + taps[l]
      x = jax.nn.relu(z) if l < len(self.layers) - 1 else z
    return (x[..., 0] if self.squeeze else x), inputs


def mlp_forward(params: Params, x: jax.Array, taps: Sequence[jax.Array] | None = None,
                *, graphdef: Any = None, table_taps: Sequence[jax.Array] | None = None
                ) -> tuple[jax.Array, list[jax.Array]]:
  """:meth:`MLP.forward` on a plain parameter pytree.

  Args:
    params: the parameter pytree.
    x, taps, table_taps: as :meth:`MLP.forward`.
    graphdef: the model's graph definition (``nnx.split(model)[0]``); without it the
      architecture is read off the shapes, which works for models without embeddings.
  """
  if graphdef is None:
    layers = [params["layers"][k] for k in sorted(params["layers"], key=int)]
    sizes = [layers[0]["kernel"].shape[0]] + [layer["kernel"].shape[1] for layer in layers]
    abstract = nnx.eval_shape(lambda: MLP(sizes[0], tuple(sizes[1:-1]), rngs=nnx.Rngs(0),
                                          num_outputs=sizes[-1]))
    graphdef, _ = nnx.split(abstract, nnx.Param)
  return nnx.merge(graphdef, nnx.State(params)).forward(x, taps, table_taps)


def embedding_inputs(feature_names: Sequence[str], embeddings: Sequence[Any],
                     dim: int) -> tuple[EmbeddingInput, ...]:
  """:class:`EmbeddingInput` per manifest embedding (``data.Embedding``: feature, vocab_size)."""
  names = list(feature_names)
  return tuple(EmbeddingInput(index=names.index(e.feature), vocab_size=int(e.vocab_size),
                              dim=int(dim)) for e in embeddings)


def create_model(num_features: int, hidden_sizes: Sequence[int], seed: int, *,
                 num_outputs: int = 1, embeddings: Sequence[EmbeddingInput] = ()) -> MLP:
  """The MLP for ``num_features`` input columns, initialised from ``seed``.

  Raises:
    ValueError: naming the value, for non-positive sizes or a bad embedding column.
  """
  if num_features <= 0:
    raise ValueError(f"{num_features=} must be positive")
  if any(h <= 0 for h in hidden_sizes):
    raise ValueError(f"hidden sizes {tuple(hidden_sizes)} must be positive")
  if num_outputs <= 0:
    raise ValueError(f"{num_outputs=} must be positive")
  cols = [e.index for e in embeddings]
  if len(set(cols)) != len(cols) or any(not 0 <= j < num_features for j in cols):
    raise ValueError(f"embedding columns {cols} must be distinct columns of {num_features}")
  if any(e.vocab_size <= 0 or e.dim <= 0 for e in embeddings):
    raise ValueError(f"embedding vocab sizes and dims must be positive: {list(embeddings)}")
  return MLP(num_features, tuple(hidden_sizes), rngs=nnx.Rngs(seed), num_outputs=num_outputs,
             embeddings=tuple(embeddings))


def check_dp_compatible(model: nnx.Module) -> None:
  """Refuses layers that mix examples (their per-example gradients are not per-example)."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm):
      raise ValueError(f"layer {'.'.join(map(str, path))} is BatchNorm, which mixes examples of"
                       " a batch and breaks per-example clipping; use LayerNorm or GroupNorm")


def functional(model: nnx.Module) -> tuple[Callable[[Params, jax.Array], jax.Array], Params]:
  """Splits a module into ``(apply_fn(params, features) -> outputs, params)``."""
  graphdef, state = nnx.split(model, nnx.Param)

  def apply_fn(params: Params, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, nnx.State(params))(x)

  return apply_fn, nnx.to_pure_dict(state)


def example_loss(apply_fn: Callable[[Params, jax.Array], jax.Array], head: TaskHead = BINARY):
  """The loss of one example ``(features [d], label [])`` under ``head``'s task."""

  def loss_fn(params: Params, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = example
    if head.kind == "binary":  # as before tasks existed: bit-identical binary training
      return optax.sigmoid_binary_cross_entropy(apply_fn(params, x[None])[0], y)
    return head.losses(apply_fn(params, x[None]), y[None])[0]

  return loss_fn


def flatten_params(params: Params) -> dict[str, jax.Array]:
  """Names each parameter by its path, e.g. ``layers/0/kernel``."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def count_params(params: Params) -> int:
  return int(sum(jnp.size(x) for x in jax.tree_util.tree_leaves(params)))


# --- the exported model ---------------------------------------------------------------------

def model_spec(*, hidden_sizes: Sequence[int], head: TaskHead, classes: Sequence[str] = (),
               feature_names: Sequence[str] = (),
               embeddings: Sequence[EmbeddingInput] = ()) -> dict[str, Any]:
  """The JSON dict an export stores under ``"model"`` (read back by :func:`apply_exported`).

  Keys: ``hidden_sizes``, ``task``, ``classes`` (multiclass), ``bounds`` (regression),
  ``embeddings`` ``[{feature, index, vocab_size, dim}]``, and ``temperature`` when the
  probabilities were calibrated (not 1).
  """
  names = list(feature_names)
  if head.kind == "multiclass" and len(classes) != head.num_classes:
    raise ValueError(f"{len(classes)} class names for a {head.num_classes}-class head")
  spec: dict[str, Any] = {
      "hidden_sizes": [int(h) for h in hidden_sizes],
      "task": head.kind,
      "classes": list(classes),
      "bounds": None if head.bounds is None else [float(b) for b in head.bounds],
      "embeddings": [{"feature": names[e.index] if e.index < len(names) else str(e.index),
                      "index": e.index, "vocab_size": e.vocab_size, "dim": e.dim}
                     for e in embeddings],
  }
  if head.temperature != 1.0:
    spec["temperature"] = float(head.temperature)
  return spec


def _from_spec(num_features: int, spec: Mapping[str, Any]) -> tuple[MLP, TaskHead]:
  kind = spec.get("task", "binary")
  bounds = spec.get("bounds")
  head = TaskHead(kind=kind, num_classes=len(spec.get("classes") or ()),
                  bounds=None if bounds is None else (float(bounds[0]), float(bounds[1])),
                  temperature=float(spec.get("temperature", 1.0)))
  emb = tuple(EmbeddingInput(index=int(e["index"]), vocab_size=int(e["vocab_size"]),
                             dim=int(e["dim"])) for e in spec.get("embeddings") or ())
  model = nnx.eval_shape(lambda: create_model(num_features, tuple(spec["hidden_sizes"]), 0,
                                              num_outputs=head.num_outputs, embeddings=emb))
  return model, head


def param_shapes(num_features: int, spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The parameter names (``layers/0/kernel``, ``tables/0/embedding``) and shapes of a spec."""
  model, _ = _from_spec(num_features, spec)
  _, state = nnx.split(model, nnx.Param)
  return {k: tuple(v.shape) for k, v in flatten_params(nnx.to_pure_dict(state)).items()}


@functools.lru_cache(maxsize=16)
def _exported_fn(num_features: int, spec_json: str) -> tuple[Callable, Any]:
  model, head = _from_spec(num_features, json.loads(spec_json))
  graphdef, state = nnx.split(model, nnx.Param)
  template = nnx.to_pure_dict(state)

  @jax.jit
  def fn(params, x):
    return head.predict(nnx.merge(graphdef, nnx.State(params))(x))

  return fn, template


def apply_exported(params: Params | Mapping[str, Any], x: np.ndarray,
                   spec: Mapping[str, Any]) -> np.ndarray:
  """The forward pass of an exported model: what a prediction is.

  Args:
    params: the parameter pytree, or the flat ``{'layers/0/kernel': array, ...}`` of
      ``params.npz`` (:func:`flatten_params`).
    x: [n, d] float32 encoded feature rows (embedding columns hold integer ids).
    spec: the export's ``"model"`` dict (:func:`model_spec`).

  Returns:
    Probabilities [n] (binary), [n, K] (multiclass) or predicted values [n] (regression).
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"features have shape {x.shape}; expected [rows, features]")
  fn, template = _exported_fn(int(x.shape[1]), json.dumps(dict(spec), sort_keys=True))
  if isinstance(params, Mapping) and all(isinstance(k, str) and "/" in k for k in params):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves]
    missing = sorted(set(names) - set(params))
    if missing:
      raise ValueError(f"parameters {missing} missing for the model {dict(spec)}")
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(params[n]) for n in names])
  return np.asarray(fn(params, x))
