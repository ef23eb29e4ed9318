"""The optimizer after the noise: learning-rate decay over the planned updates."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastdp_jax import config as config_lib
from fastdp_jax import step as step_lib

BASE = config_lib.OptimizerSettings(name="sgd", learning_rate=0.1, momentum=0.0,
                                    weight_decay=0.0)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_the_rate_starts_at_the_setting_and_reaches_zero_at_the_planned_updates(decay):
  o = dataclasses.replace(BASE, decay=decay)
  lr = step_lib.learning_rate(o, total_steps=200)
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(200)) == pytest.approx(0.0, abs=1e-12)
  half = 0.1 * (0.5 * (1 + math.cos(math.pi / 2)) if decay == "cosine" else 0.5)
  assert float(lr(100)) == pytest.approx(half)


def test_a_constant_rate_is_the_plain_optimizer():
  assert step_lib.learning_rate(BASE, total_steps=200) == 0.1


def _updates(tx, grads, steps):
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  out = []
  for _ in range(steps):
    u, state = tx.update(grads, state, params)
    out.append(np.asarray(u["w"]))
  return out, state


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_each_update_follows_the_schedule_and_the_state_carries_the_count(name):
  # SGD's update is -lr(t) * g; Adam's, for a constant gradient, -lr(t) * g / (|g| + eps):
  # either way update_t / update_0 = lr(t) / lr(0), which is what a resume must continue.
  o = dataclasses.replace(BASE, name=name, decay="linear")
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  steps, total = 6, 10
  ups, state = _updates(step_lib.make_optimizer(o, total), grads, steps)
  for t, u in enumerate(ups):
    np.testing.assert_allclose(u, ups[0] * (1 - t / total), rtol=1e-5)
  # A resume restores this state: the next update continues the decay, not restarts it.
  tx = step_lib.make_optimizer(o, total)
  u, _ = tx.update(grads, state, {"w": jnp.zeros(3)})
  np.testing.assert_allclose(np.asarray(u["w"]), ups[0] * (1 - steps / total), rtol=1e-5)


def test_an_unknown_decay_is_refused_in_one_line():
  cfg = config_lib.base_config()
  cfg.optimizer.decay = "exponential"
  with pytest.raises(config_lib.ConfigError, match="optimizer.decay"):
    config_lib.validate(cfg)
  assert isinstance(step_lib.make_optimizer(BASE, 10), optax.GradientTransformation)
