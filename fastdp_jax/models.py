"""Models: a Flax NNX multi-layer perceptron with one logit output, and its pure function form.

Training works on a plain parameter pytree (``nnx.split`` -> pure dict) so that per-example
gradients are ordinary ``jax.grad`` under ``jax.vmap``; the module is merged back inside the
loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Params = Any  # nested dict of arrays


class MLP(nnx.Module):
  """Dense -> ReLU -> ... -> Dense(1). The original system's model is ``MLP(9, (50,))``.

  Args:
    num_features: input width (taken from the data manifest).
    hidden_sizes: widths of the hidden layers.
    rngs: ``nnx.Rngs`` for initialisation.
  """

  def __init__(self, num_features: int, hidden_sizes: Sequence[int], *, rngs: nnx.Rngs):
    sizes = [num_features, *hidden_sizes, 1]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps features [..., num_features] to logits [...]."""
    return self.forward(x)[0]

  def forward(self, x: jax.Array, taps: Sequence[jax.Array] | None = None
              ) -> tuple[jax.Array, list[jax.Array]]:
    """The forward pass, with every dense layer's input and optional taps.

    Args:
      x: [batch, num_features] features.
      taps: optional, one [batch, out_l] array per layer added to its pre-activation (zeros:
        ghost clipping differentiates with respect to them).

    Returns:
      ``(logits [batch], inputs)``; ``inputs[l]`` [batch, in_l] is layer l's input.
    """
    inputs = []
    for l, layer in enumerate(self.layers):
      inputs.append(x)
      z = layer(x)
      if taps is not None:
        z = z + taps[l]
      x = jax.nn.relu(z) if l < len(self.layers) - 1 else z
    return x[..., 0], inputs


def mlp_forward(params: Params, x: jax.Array, taps: Sequence[jax.Array] | None = None
                ) -> tuple[jax.Array, list[jax.Array]]:
  """:meth:`MLP.forward` on a plain parameter pytree (the architecture read off its shapes)."""
  layers = [params["layers"][k] for k in sorted(params["layers"], key=int)]
  sizes = [layers[0]["kernel"].shape[0]] + [layer["kernel"].shape[1] for layer in layers]
  abstract = nnx.eval_shape(lambda: MLP(sizes[0], tuple(sizes[1:-1]), rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract, nnx.Param)
  return nnx.merge(graphdef, nnx.State(params)).forward(x, taps)


def create_model(num_features: int, hidden_sizes: Sequence[int], seed: int) -> MLP:
  if num_features <= 0:
    raise ValueError(f"{num_features=} must be positive")
  if any(h <= 0 for h in hidden_sizes):
    raise ValueError(f"hidden sizes {tuple(hidden_sizes)} must be positive")
  return MLP(num_features, tuple(hidden_sizes), rngs=nnx.Rngs(seed))


def check_dp_compatible(model: nnx.Module) -> None:
  """Refuses layers that mix examples (their per-example gradients are not per-example)."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm):
      raise ValueError(f"layer {'.'.join(map(str, path))} is BatchNorm, which mixes examples of"
                       " a batch and breaks per-example clipping; use LayerNorm or GroupNorm")


def functional(model: nnx.Module) -> tuple[Callable[[Params, jax.Array], jax.Array], Params]:
  """Splits a module into ``(apply_fn(params, features) -> logits, params)``."""
  graphdef, state = nnx.split(model, nnx.Param)

  def apply_fn(params: Params, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, nnx.State(params))(x)

  return apply_fn, nnx.to_pure_dict(state)


def example_loss(apply_fn: Callable[[Params, jax.Array], jax.Array]):
  """BCE-with-logits loss of one example ``(features [d], label [])``."""

  def loss_fn(params: Params, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = example
    return optax.sigmoid_binary_cross_entropy(apply_fn(params, x[None])[0], y)

  return loss_fn


def flatten_params(params: Params) -> dict[str, jax.Array]:
  """Names each parameter by its path, e.g. ``layers/0/kernel``."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def count_params(params: Params) -> int:
  return int(sum(jnp.size(x) for x in jax.tree_util.tree_leaves(params)))
