"""The original system's JSON configs (seq_train.json, dist_train.json), mapped to ours.

Command (examples with the original values in ``configs/original/``)::

  python main.py --config=configs/from_json.py:configs/original/seq_train.json

Each key of the original file is mapped as below, and every mapping is printed when the
config is built, so a user of the original sees what their file now means:

=================  ==========================  ============================================
original key       here                        note
=================  ==========================  ============================================
num_epoch          num_epochs                  an epoch is round(N / batch_size) updates
path               data.path                   a shard directory or the original .h5 file
l2_norm_clip       dp.l2_norm_clip             now per EXAMPLE (the original clipped groups
                                               of minibatch_size rows)
noise_multiplier   dp.noise_multiplier         sigma: noise std sigma * C on the clipped sum
batch_size         batch_size                  now the EXPECTED size of a Poisson batch
minibatch_size     (not mapped)                per-example clipping is the minibatch of 1;
                                               the original's groups of 3 had sensitivity
                                               above C, which no accountant covers
lr                 optimizer.learning_rate     plain SGD, as in the original
world_size         (not mapped)                JAX uses every device of every process
master_ip/port     (not mapped)                the coordinator address of
                                               ``jax.distributed.initialize``
dist_backend       (not mapped)                XLA picks the collectives (NCCL on GPUs,
                                               gloo on CPUs)
=================  ==========================  ============================================

Added, since the original had none: a delta below 1/N (the default: the largest power of ten
at most 1/(10 N)) and the PLD accountant (the original computed no epsilon), sampling and noise
keys from the OS's entropy (the original seeded every process with the public constant 1234). An unknown key fails, naming the known ones.

``configs/original/*.json`` carry the original values of SEED.md (10 epochs, C = 3,
sigma = 0.9, batch 256, minibatches of 3, lr 0.01); the path points at ``make data``'s
output and the distributed values (4 processes on 127.0.0.1:23456, NCCL) are examples.

Expected on the full-scale generated data (``make data``; 969k training rows, 37,870 updates):
test accuracy about 0.677 (majority class 0.623) at epsilon about 0.37 (delta 1e-7).
"""

from __future__ import annotations

import json
import os

import ml_collections

from fastdp_jax import base_config

# original key -> our key (dotted); None: understood but not mapped (see NOTES).
KEY_MAP = {
    "num_epoch": "num_epochs",
    "path": "data.path",
    "l2_norm_clip": "dp.l2_norm_clip",
    "noise_multiplier": "dp.noise_multiplier",
    "batch_size": "batch_size",
    "minibatch_size": None,
    "lr": "optimizer.learning_rate",
    "world_size": None,
    "master_ip": None,
    "master_port": None,
    "dist_backend": None,
}
NOTES = {
    "num_epochs": "an epoch is round(N / batch_size) updates",
    "data.path": "a shard directory, or the original dataset.h5 / dataset_package.h5",
    "dp.l2_norm_clip": "per-example clipping norm C (the original clipped groups of rows)",
    "dp.noise_multiplier": "noise std sigma * C, added once to each update's clipped sum",
    "batch_size": "expected size of a Poisson-sampled batch (the original drew exactly this "
                  "many rows with replacement)",
    "optimizer.learning_rate": "plain SGD",
    "minibatch_size": "not mapped: gradients are clipped per example (a minibatch of 1); "
                      "the original's groups of this many rows gave a per-example "
                      "sensitivity above C that no accountant covers",
    "world_size": "not mapped: JAX trains on every device of every process (one mesh); on "
                  "several hosts start one process per host with jax.distributed",
    "master_ip": "not mapped: with master_port it is the coordinator address of "
                 "jax.distributed.initialize",
    "master_port": "not mapped: see master_ip",
    "dist_backend": "not mapped: XLA chooses the collectives (NCCL on GPUs, gloo on CPUs)",
}
_TYPES = {"num_epochs": int, "batch_size": int, "dp.l2_norm_clip": float,
          "dp.noise_multiplier": float, "optimizer.learning_rate": float, "data.path": str}


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  *groups, leaf = dotted.split(".")
  node = config
  for g in groups:
    node = node[g]
  node[leaf] = value


def map_original(original: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Builds our config from an original JSON config's keys.

  Args:
    original: the parsed JSON object.

  Returns:
    ``(config, lines)``: the config and one human-readable line per key saying how it was
    mapped.

  Raises:
    ValueError: an unknown key, or a value of the wrong type.
  """
  if not isinstance(original, dict):
    raise ValueError(f"the original config must be a JSON object, got {type(original).__name__}")
  unknown = sorted(set(original) - set(KEY_MAP))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in the original config; known keys: "
                     f"{sorted(KEY_MAP)}")
  config = base_config()
  lines = []
  for key, value in original.items():
    target = KEY_MAP[key]
    if target is None:
      lines.append(f"  {key} = {value!r}: {NOTES[key]}")
      continue
    kind = _TYPES[target]
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise ValueError(f"original key {key!r}: {value!r} is not a number")
    if kind is int and float(value) != int(value):
      raise ValueError(f"original key {key!r}: {value!r} is not an integer")
    if kind is str and not isinstance(value, str):
      raise ValueError(f"original key {key!r}: {value!r} is not a string")
    _set(config, target, kind(value))
    lines.append(f"  {key} = {value!r} -> {target} = {kind(value)!r}: {NOTES[target]}")
  if "master_ip" in original or "master_port" in original:
    address = f"{original.get('master_ip', '127.0.0.1')}:{original.get('master_port', '?')}"
    lines.append(f"  (coordinator address for a multi-host launch: {address})")
  delta = "1/(10 N) rounded down to a power of ten" if config.dp.delta is None else (
      f"{config.dp.delta:g}")
  lines.append(f"  added: dp.delta = {delta}, dp.accountant = "
               f"{config.dp.accountant!r} (the original computed no epsilon); the sampling "
               "and noise keys come from OS entropy (the original used the public seed 1234)")
  return config, lines


def get_config(path: str = "") -> ml_collections.ConfigDict:
  """``--config=configs/from_json.py:PATH.json``."""
  if not path:
    raise ValueError("give the JSON file: --config=configs/from_json.py:PATH.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"original config {path} not found (relative paths are from the "
                            f"working directory {os.getcwd()})")
  with open(path) as f:
    try:
      original = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  config, lines = map_original(original)
  print(f"original config {path}:", *lines, sep="\n", flush=True)
  return config
