"""The peers' throughput, for ``benchmarks/throughput.py --peers``: PyTorch, Opacus, jax_privacy.

Runs in the peers' virtual environment (``bash benchmarks/peer_venv.sh``: torch 2.13.0+cpu,
opacus 1.6.0, jax_privacy 2.0.0 on the project's JAX pins), never in the project's. The torch
systems are those of ``../shared/bench/peer_torch.py`` (copied here, same models, data and
loops); ``jax-privacy`` is jax_privacy 2.0's DP-SGD on the same MLP: ``clipping.clipped_grad``
(per-example gradients by ``vmap``, clipped, summed) and ``noise_addition.gaussian_privatizer``
chained with SGD in one jitted update, the loop its documentation shows.

Systems (``W1``: MLP 9-50-1, batch 256; ``W2``: MLP 128-1024-1024-1, batch 1024; BCE, SGD lr
0.01, C 3, sigma 0.9; fixed batches of exactly B rows, no Poisson sampling, no padding):

* ``torch-sgd``: non-private PyTorch;
* ``seed-microbatch``: the original system's algorithm (microbatches of 3 clipped in a loop);
* ``opacus-hooks`` / ``opacus-ghost``: Opacus ``make_private`` with per-sample gradients by
  hooks, or ghost clipping;
* ``jax-privacy``: as above.

Worker mode (``--worker``), what throughput.py uses: reads one JSON request per line on stdin,
``{"workload": "W2", "system": "torch-sgd", "seconds": 3}``, builds the system on first use
(``WARMUP`` untimed steps) and times whole steps for at least ``seconds``, replying one JSON
line ``{"examples_per_s": ..., "steps": ..., "seconds": ..., "cores_busy": ...}``
(``cores_busy``: the process's CPU seconds over the wall time). Standalone::

  /work/peer-venv/bin/python benchmarks/peers.py W2 torch-sgd,opacus-ghost --seconds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

WL = {"W1": (9, [50], 256), "W2": (128, [1024, 1024], 1024)}
C, SIGMA, LR = 3.0, 0.9, 0.01
SYSTEMS = ("torch-sgd", "seed-microbatch", "opacus-hooks", "opacus-ghost", "jax-privacy")
JAXP_MICROBATCH = 64
WARMUP = 2  # steps before timing: the first compiles (jax) or sets up the hooks (Opacus)
# torch's intra-op threads: one for W1, whose 256 x 50 products gain nothing from a second
# thread (1.92 M examples/s with 1, 1.91 M with 2, quiet machine) and whose OpenMP barriers
# collapse when the other core is taken by another job (8-13 k examples/s seen); every core
# for W2. PEER_THREADS overrides both.
THREADS = {"W1": 1, "W2": os.cpu_count() or 1}
if os.environ.get("PEER_THREADS"):
  THREADS = dict.fromkeys(THREADS, int(os.environ["PEER_THREADS"]))


def _torch_data(wl):
  import torch
  d, _, b = WL[wl]
  torch.manual_seed(0)
  x = (torch.rand(b * 8, d) < 0.5).float() if wl == "W1" else torch.randn(b * 8, d)
  y = (torch.rand(b * 8, 1) < 0.6).float()
  return x, y


def _mlp(d, hidden):
  from torch import nn
  layers, prev = [], d
  for h in hidden:
    layers += [nn.Linear(prev, h), nn.ReLU()]
    prev = h
  layers.append(nn.Linear(prev, 1))
  return nn.Sequential(*layers)


def build_torch(wl: str, system: str):
  """A ``step()`` closure of one torch system (peer_torch.py's code)."""
  import torch
  from torch import nn
  torch.set_num_threads(THREADS[wl])
  d, hidden, b = WL[wl]
  x, y = _torch_data(wl)
  lossf = nn.BCEWithLogitsLoss()
  it = [0]

  def batch():
    j = it[0] % 8
    it[0] += 1
    return x[j * b:(j + 1) * b], y[j * b:(j + 1) * b]

  m = _mlp(d, hidden)
  if system == "torch-sgd":
    opt = torch.optim.SGD(m.parameters(), lr=LR)

    def step():
      xb, yb = batch()
      opt.zero_grad()
      lossf(m(xb), yb).backward()
      opt.step()
    return step
  if system == "seed-microbatch":
    params, mb = list(m.parameters()), 3

    def step():
      xb, yb = batch()
      acc = [torch.zeros_like(p) for p in params]
      for _ in range(b // mb):
        idx = torch.randint(0, b, (mb,))
        for p in params:
          p.grad = None
        lossf(m(xb[idx]), yb[idx]).backward()
        tn = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        c = torch.clamp(C / (tn + 1e-6), max=1.0)
        for a, p in zip(acc, params):
          a.add_(p.grad * c)
      with torch.no_grad():
        for a, p in zip(acc, params):
          p.add_(-LR * (a + C * SIGMA * torch.randn_like(a)) * mb / b)
    return step
  from opacus import PrivacyEngine
  dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
  opt = torch.optim.SGD(m.parameters(), lr=LR)
  pe = PrivacyEngine(accountant="rdp")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if system == "opacus-ghost":
      m, opt, crit, _ = pe.make_private(module=m, optimizer=opt, data_loader=dl, criterion=lossf,
                                        noise_multiplier=SIGMA, max_grad_norm=C,
                                        grad_sample_mode="ghost", poisson_sampling=False)
    else:
      crit = lossf
      m, opt, _ = pe.make_private(module=m, optimizer=opt, data_loader=dl,
                                  noise_multiplier=SIGMA, max_grad_norm=C,
                                  poisson_sampling=False)

  def step():
    xb, yb = batch()
    opt.zero_grad()
    crit(m(xb), yb).backward()
    opt.step()
  return step


def build_jax_privacy(wl: str):
  """jax_privacy 2.0 DP-SGD on the MLP: clipped_grad (vmap) + gaussian_privatizer + SGD."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax_privacy import clipping
  from jax_privacy import noise_addition
  d, hidden, b = WL[wl]
  rng = np.random.default_rng(0)
  x = ((rng.random((b * 8, d)) < 0.5) if wl == "W1" else rng.standard_normal((b * 8, d)))
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(rng.random(b * 8) < 0.6, jnp.float32)
  sizes, params, key = [d, *hidden, 1], [], jax.random.key(0)
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):  # PyTorch's default initialisation
    key, k1, k2 = jax.random.split(key, 3)
    bound = 1 / np.sqrt(fan_in)
    params.append({"w": jax.random.uniform(k1, (fan_in, fan_out), jnp.float32, -bound, bound),
                   "b": jax.random.uniform(k2, (fan_out,), jnp.float32, -bound, bound)})

  def loss(p, xi, yi):  # ONE example (keep_batch_dim=False)
    h = xi
    for layer in p[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logit = (h @ p[-1]["w"] + p[-1]["b"])[0]
    return optax.sigmoid_binary_cross_entropy(logit, yi)

  # W2's per-example gradients are [1024, 1.2 M] floats (4.8 GB): in microbatches of 64 rows,
  # as jax_privacy's docs advise for memory (its own lax.scan).
  grad = clipping.clipped_grad(loss, l2_clip_norm=C, batch_argnums=(1, 2),
                               keep_batch_dim=False,
                               microbatch_size=JAXP_MICROBATCH if wl == "W2" else None)
  privatizer = noise_addition.gaussian_privatizer(stddev=grad.sensitivity() * SIGMA,
                                                  prng_key=jax.random.key(1))
  sgd = optax.sgd(LR)
  state = [params, privatizer.init(params), sgd.init(params)]

  @jax.jit
  def update(params, noise_state, opt_state, xb, yb):
    g = grad(params, xb, yb)
    noisy, noise_state = privatizer.update(g, noise_state)
    noisy = jax.tree_util.tree_map(lambda v: v / b, noisy)  # the mean over the batch
    updates, opt_state = sgd.update(noisy, opt_state, params)
    return optax.apply_updates(params, updates), noise_state, opt_state

  it = [0]

  def step():
    j = it[0] % 8
    it[0] += 1
    state[:] = update(*state, x[j * b:(j + 1) * b], y[j * b:(j + 1) * b])

  def sync():
    jax.block_until_ready(state[0])
  return step, sync


def cpu_seconds() -> float:
  """CPU seconds (user + system) of all this process's threads (/proc/self/stat)."""
  with open("/proc/self/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peers:
  """Builds each (workload, system) once and times it on request."""

  def __init__(self):
    self.built = {}

  def measure(self, workload: str, system: str, seconds: float) -> dict:
    if system not in SYSTEMS:
      raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")
    if (workload, system) not in self.built:
      if system == "jax-privacy":
        step, sync = build_jax_privacy(workload)
      else:
        step, sync = build_torch(workload, system), (lambda: None)
      for _ in range(WARMUP):  # warm-up (jit compilation, Opacus' hooks)
        step()
      sync()
      self.built[workload, system] = step, sync
    step, sync = self.built[workload, system]
    if system != "jax-privacy":  # the setting is the process's: W1 and W2 alternate
      import torch
      torch.set_num_threads(THREADS[workload])
    b = WL[workload][2]
    n, t0, cpu0 = 0, time.perf_counter(), cpu_seconds()
    while True:
      step()
      sync()  # JAX dispatches ahead: wait for each step, so the window holds finished steps
      n += 1
      if time.perf_counter() - t0 >= seconds:
        break
    elapsed = time.perf_counter() - t0
    return dict(workload=workload, system=system, examples_per_s=round(n * b / elapsed),
                steps=n, seconds=round(elapsed, 3), batch_size=b,
                threads=None if system == "jax-privacy" else THREADS[workload],
                cores_busy=round((cpu_seconds() - cpu0) / elapsed, 2))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workload", nargs="?", default="W2")
  p.add_argument("systems", nargs="?", default=",".join(SYSTEMS))
  p.add_argument("--seconds", type=float, default=3.0)
  p.add_argument("--worker", action="store_true", help="serve JSON requests on stdin")
  args = p.parse_args(argv)
  peers = Peers()
  if args.worker:
    for line in sys.stdin:
      if not line.strip():
        continue
      req = json.loads(line)
      try:
        out = peers.measure(req["workload"], req["system"], float(req["seconds"]))
      except Exception as e:  # reported to the driver, which stops with it
        out = dict(error=f"{type(e).__name__}: {e}", **req)
      print(json.dumps(out), flush=True)
    return 0
  for system in args.systems.split(","):
    print(json.dumps(peers.measure(args.workload, system, args.seconds)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
