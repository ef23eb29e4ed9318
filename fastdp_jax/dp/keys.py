"""The run's secret keys: drawn, kept in ``WORKDIR/keys.json``, and forgotten.

A run has two secret keys: the Poisson sampling key (uint64[2], :mod:`fastdp_jax.dp.sampling`)
and the noise key (uint32[4], :mod:`fastdp_jax.dp.noise`). Each is 128 bits of the OS's
entropy, drawn on process 0 and broadcast, unless ``dp.sampling_seed`` or ``dp.noise_seed``
fixes it from a public integer (a reproducibility run, which is not private).

The keys are written to one owner-only file, ``WORKDIR/keys.json``, apart from the
checkpoints (whose arrays hold the noise key zeroed): a resumed run reads them back, and
:func:`forget` deletes that one file so that nobody, the operator included, can recompute the
run's batches or noise. It leaves a ``KEYS_DELETED`` marker, because training again in that
workdir would spend the privacy budget again on the same data.

A run that reads materialised batches takes their sampling key from the batch directory
(:func:`with_batches_key`). That directory's key file belongs to the batch format
(:mod:`fastdp_jax.data.batch_format` says why), so only its reading is called from here.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import batch_format
from fastdp_jax import distributed
from fastdp_jax import errors
from fastdp_jax.dp import noise
from fastdp_jax.dp import sampling

KEYS_FILE = "keys.json"  # the secret keys, owner-only, apart from the checkpoints' arrays
KEYS_DELETED = "KEYS_DELETED"  # left by forget(): the run is over and cannot be resumed


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunKeys:
  """The run's secret randomness.

  Attributes:
    sampling: uint64[2], the Poisson sampling key.
    noise: uint32[4], the noise key.
    sampling_fixed: the sampling key came from ``dp.sampling_seed`` (public).
    noise_fixed: the noise key came from ``dp.noise_seed`` (public).
    sampling_from_batches: the run streams materialised batches: ``sampling`` is their key
      (or zeros), never drawn for the run and never written to ``keys.json`` (the batch
      directory keeps it; a copy in the workdir would be one more leftover to delete).
  """

  sampling: np.ndarray
  noise: np.ndarray
  sampling_fixed: bool
  noise_fixed: bool
  sampling_from_batches: bool = False

  def __repr__(self) -> str:  # never prints a key
    return f"RunKeys(sampling_fixed={self.sampling_fixed}, noise_fixed={self.noise_fixed})"

  def to_json(self) -> str:
    sampling = None if self.sampling_from_batches else [int(w) for w in self.sampling]
    return json.dumps(dict(sampling=sampling,
                           noise=[int(w) for w in self.noise],
                           sampling_fixed=self.sampling_fixed, noise_fixed=self.noise_fixed))

  @classmethod
  def from_json(cls, text: str) -> RunKeys:
    d = json.loads(text)
    streamed = d["sampling"] is None  # a streamed run's: its batches hold the key
    return cls(sampling=np.zeros(2, np.uint64) if streamed else
               np.asarray(d["sampling"], np.uint64),
               noise=np.asarray(d["noise"], np.uint32),
               sampling_fixed=bool(d["sampling_fixed"]), noise_fixed=bool(d["noise_fixed"]),
               sampling_from_batches=streamed)


# ------------------------------------------------------------------ generation

def draw(sampling_seed: int | None, noise_seed: int | None, *,
         streamed: bool = False) -> RunKeys:
  """The run's sampling and noise keys: OS entropy on process 0, broadcast to every process.

  Args:
    sampling_seed: ``dp.sampling_seed``: None for a secret key, an integer for a public one.
    noise_seed: ``dp.noise_seed``, likewise.
    streamed: the run streams materialised batches: no sampling key is drawn (zeros until
      :func:`with_batches_key` sets the batches' own).

  Returns:
    The same keys on every process.
  """
  if streamed:
    skey, sfixed = np.zeros(2, np.uint64), False
  else:
    skey, sfixed = sampling.sampling_key(sampling_seed)
  nkey, nfixed = noise.noise_key(noise_seed)
  # uint32 words: JAX without x64 would truncate uint64 in the broadcast.
  words = distributed.broadcast_from_process_0(np.concatenate([skey.view(np.uint32), nkey]))
  words = np.asarray(words, np.uint32)
  return RunKeys(sampling=words[:4].copy().view(np.uint64), noise=words[4:].copy(),
                 sampling_fixed=sfixed, noise_fixed=nfixed, sampling_from_batches=streamed)


def fresh_noise(keys: RunKeys) -> RunKeys:
  """The same keys with a new noise key (entropy unless the noise seed is fixed)."""
  if keys.noise_fixed:
    # Reproducibility run: a deterministic but different key for the redone updates.
    seq = np.random.SeedSequence([int(w) for w in keys.noise] + [1])
    nkey = seq.generate_state(noise.KEY_WORDS, np.uint32)
  else:
    nkey = noise.noise_key(None)[0]
  nkey = np.asarray(distributed.broadcast_from_process_0(nkey), np.uint32)
  return dataclasses.replace(keys, noise=nkey)


def fresh_segment(keys: RunKeys, *, streamed: bool) -> RunKeys:
  """The keys of a new segment: a resume that changed the run's settings draws both keys
  afresh (entropy unless a seed fixes them), so that the rest of the run's batches and noise
  are independent of the earlier segment's, as the accountant's composition of the segments
  assumes. A streamed run keeps its batches' sampling key: its batches were drawn when they
  were written, and a changed sampling rate is refused against them.
  """
  keys = fresh_noise(keys)
  if streamed:
    return keys
  if keys.sampling_fixed:
    seq = np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in keys.sampling.view(np.uint32)]
                                 + [1])
    skey = seq.generate_state(2, np.uint64)
  else:
    skey = sampling.sampling_key(None)[0]
  words = np.asarray(distributed.broadcast_from_process_0(skey.view(np.uint32)), np.uint32)
  return dataclasses.replace(keys, sampling=words.copy().view(np.uint64))


def with_batches_key(keys: RunKeys, batches: str, sampling_fixed: bool) -> RunKeys:
  """``keys`` with the sampling key of the materialised batches in ``batches``.

  A run that streams materialised batches never samples: its batches were drawn when they
  were written. The batch directory's key file may therefore have been deleted since; the key
  is then zeros, and nothing is drawn with it.

  Args:
    keys: the run's keys.
    batches: the batch directory (``data.batches``).
    sampling_fixed: its run manifest's ``sampling_fixed``; the batches are public if either
      it or the key file says so.

  Returns:
    ``keys`` with the batches' sampling key and whether it is fixed.
  """
  try:
    key, fixed = batch_format.read_key(batches)
  except (errors.UserError, OSError):
    key, fixed = np.zeros(2, np.uint64), sampling_fixed
  return dataclasses.replace(keys, sampling=np.asarray(key, np.uint64),
                             sampling_fixed=bool(fixed or sampling_fixed),
                             sampling_from_batches=True)


# ------------------------------------------------------------------ storage

def save(workdir: str, keys: RunKeys) -> None:
  """Writes the keys to ``WORKDIR/keys.json`` (owner-only, atomic)."""
  atomic.write_private_file(os.path.join(workdir, KEYS_FILE), keys.to_json())


def load(workdir: str) -> RunKeys | None:
  """The keys saved in ``workdir``, or None."""
  path = os.path.join(workdir, KEYS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return RunKeys.from_json(f.read())


def resolve(workdir: str, *, resuming: bool, checkpointing: bool, sampling_seed: int | None,
            noise_seed: int | None, streamed: bool = False) -> RunKeys:
  """The keys of the run being resumed, or new ones (saved before the first update).

  Args:
    workdir: the run's directory.
    resuming: the workdir holds a checkpoint that the run resumes from.
    checkpointing: the run writes checkpoints, so its keys must be saved for a resume.
    sampling_seed: ``dp.sampling_seed``, for new keys (:func:`draw`).
    noise_seed: ``dp.noise_seed``, likewise.
    streamed: the run streams materialised batches: no sampling key is drawn or saved.

  Returns:
    The saved keys when resuming, else new ones (saved by process 0 when checkpointing).

  Raises:
    errors.ResumeMismatchError: resuming, but the workdir has no keys.json.
  """
  if resuming:
    keys = load(workdir)
    if keys is None:
      raise errors.ResumeMismatchError(
          f"workdir {workdir} holds checkpoints but no {KEYS_FILE}: the run "
          "cannot be resumed without its keys; use another --workdir")
    return keys
  keys = draw(sampling_seed, noise_seed, streamed=streamed)
  if jax.process_index() == 0 and checkpointing:
    save(workdir, keys)
  return keys


# ------------------------------------------------------------------ forgetting

def forget(workdir: str) -> None:
  """Deletes ``keys.json`` and leaves the ``KEYS_DELETED`` marker that refuses a resume.

  :func:`fastdp_jax.checkpoint.forget` calls this after deleting the checkpoints: the marker
  says that neither is left.
  """
  path = os.path.join(workdir, KEYS_FILE)
  if os.path.exists(path):
    os.remove(path)
  atomic.write_text(os.path.join(workdir, KEYS_DELETED),
                    "the keys and checkpoints of this run were deleted; it cannot be resumed\n")


def check_not_forgotten(workdir: str) -> None:
  """Refuses to train in a workdir whose keys were deleted (it would restart from scratch)."""
  if os.path.exists(os.path.join(workdir, KEYS_DELETED)):
    raise errors.ResumeMismatchError(
        f"workdir {workdir} holds a finished run whose keys and checkpoints were deleted; "
        "use another --workdir (training again on the same data spends privacy budget again)")
