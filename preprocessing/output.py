"""Writing a dataset directory the same way from every producer: shards, rejects, manifest.

Layout of an output directory (the shard format of :mod:`fastdp_jax.data.shards`, plus rejects)::

  OUT/
    manifest.json                 # written last; provenance counts reconcile
    train-000000000001.h5         # shards, named by the row id of their first row
    test-000000000000.h5
    rejects/part-000000004711.jsonl  # one JSON object per malformed line, with its reason

Producers write into a hidden staging directory beside ``OUT`` (``.OUT.staging-*``) and
:func:`publish` renames it into place after the manifest is written, so a crashed producer
never leaves a directory that looks complete. A staging directory holds private rows: its name
carries its job's host and process id, and the next job on the same output removes those of
dead jobs on its host and names the others with the command that removes them
(:func:`fastdp_jax.atomic.clean_stale`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import IO, Any

import numpy as np

from fastdp_jax import atomic
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax import errors
from fastdp_jax.data import split as split_lib
from fastdp_jax.data import units as units_lib
from fastdp_jax.data import cleaning
from fastdp_jax.data import features as features_lib

REJECTS = "rejects"


PipelineError = errors.PipelineError


def is_local(path: str) -> bool:
  return "://" not in path or path.startswith("file:")


def local_path(path: str) -> str:
  if path.startswith("file://"):
    return path[len("file://"):]
  if path.startswith("file:"):
    return path[len("file:"):]
  return path


def check_output(output: str, overwrite: bool) -> str:
  """Refuses an existing output unless ``overwrite`` (and then only a dataset directory).

  Returns:
    The absolute output path.
  """
  if not is_local(output):
    raise PipelineError(f"--output {output}: shards are written with h5py, so the output must "
                        "be a path on a (shared) POSIX file system, not a URI")
  out = os.path.abspath(local_path(output))
  if os.path.lexists(out):
    if not overwrite:
      raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")
    if not os.path.isdir(out) or (os.listdir(out) and
                                  not os.path.isfile(os.path.join(out, manifest_lib.MANIFEST))):
      raise PipelineError(f"refusing to replace {out}: it is not a dataset directory (no "
                          f"{manifest_lib.MANIFEST}); remove it yourself or choose another "
                          "--output")
  return out


def make_staging(out: str, subdirs: tuple[str, ...] = (REJECTS,)) -> str:
  """:func:`fastdp_jax.atomic.make_staging` with a dataset's ``rejects/`` (by default): the
  hidden ``.NAME.staging-HOST-PID-*`` directory beside ``out``, after cleaning what killed
  jobs left there (said on stderr)."""
  return atomic.make_staging(out, subdirs)


# Moves the finished staging directory into place (replacing an old dataset if asked).
publish = atomic.publish


# Run start row id -> (content keys [k] uint64, rows of each before the run [k] int64): the
# Spark job's occurrence offsets, only the non-zero ones.
Offsets = dict[int, tuple[np.ndarray, np.ndarray]]
_NO_OFFSETS = (np.zeros(0, np.uint64), np.zeros(0, np.int64))


class _Runs:
  """Cuts the rows a sink is given into runs: maximal ranges of consecutive row ids of one
  input split (``key``), given one after the other.

  A Spark task gives its sink whole runs (an input split, or a Parquet file's row groups), so
  runs are the same in every pass over the same partitions; a run is named by its first row
  id. ``lines`` (a dict the caller owns) counts the rows of each run.
  """

  def __init__(self, lines: dict[str, int]):
    self.lines = lines
    self._key: Any = None
    self._next = -1
    self._start = -1

  def cut(self, key: Any, row_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """``(run start, lo, hi)``: a block's rows ``lo:hi`` belong to the run starting at row id
    ``run start`` (one triple per run the block touches)."""
    row_ids = np.asarray(row_ids, np.int64)
    if not len(row_ids):
      return []
    breaks = np.flatnonzero(np.diff(row_ids) != 1) + 1
    out = []
    for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(row_ids)].tolist()):
      first = int(row_ids[lo])
      if key != self._key or first != self._next:
        self._key, self._start = key, first
        if str(first) in self.lines:
          raise PipelineError(f"internal error: row {first} given to a sink twice")
        self.lines[str(first)] = 0
      self.lines[str(self._start)] += hi - lo
      self._next = int(row_ids[hi - 1]) + 1
      out.append((self._start, lo, hi))
    return out


class ShardSink:
  """Collects cleaned rows of consecutive input splits; writes their shards and rejects.

  One sink per Spark task (or one for the streaming converter). Rows of one input split
  (``key``) arrive in row-id order; shards never mix splits and hold at most ``max_rows``
  rows, so shard files sorted by name list the rows in input order.

  A row's split is decided here: by its row key
  (:func:`fastdp_jax.data.split.is_test_row` of :func:`fastdp_jax.data.split.row_keys`: the
  cleaned row's content key, :func:`fastdp_jax.data.split.value_keys`, and its occurrence
  among the identical kept rows before it in row-id order, over the whole input), written into the shards beside it; or, when the spec
  names a ``privacy_unit``, by its unit key (:func:`fastdp_jax.data.units.is_test_unit`), so
  that each unit lies wholly in one split whatever other rows the input holds.

  Occurrences are counted as rows are added (a partial shard's rows are written later, but
  keep the keys they got). With ``offsets`` None one counter runs over every row the sink
  sees: the streaming converter's single sink, which sees the whole input in row-id order.
  A Spark task sees only some runs (:class:`_Runs`) of the input; ``offsets`` then gives,
  for each run start, how many rows of each content key came before the run (the Spark
  job's pre-pass, :class:`ContentCounter` and :func:`offsets_query`), and each run counts
  on from there. The sink also refuses two unit ids sharing a key among
  the rows it sees (all of them for the streaming converter; a task's for Spark, whose driver
  checks across tasks). It does not bound rows per unit: the trainer's loader does, for every
  producer alike (:func:`fastdp_jax.data.units.group`).
  """

  def __init__(self, *, spec: features_lib.FeatureSpec, staging: str, split_seed: int,
               test_fraction: float, max_rows: int, offsets: Offsets | None = None):
    self.spec = spec
    self.staging = staging
    self.split_seed = split_seed
    self.test_fraction = test_fraction
    self.max_rows = max_rows
    self.shards: list[dict[str, Any]] = []
    self.stats: dict[str, Any] = {
        "rows_read": 0, "kept": 0, "dropped_na": 0, "rejected": 0, "header_lines": 0,
        "na_by_column": [0] * len(spec.used_columns), "rejects_by_reason": {},
        "lines_by_split": {}, "adjusted": {}, "runs": {}}
    self._key: Any = None
    self._ids: list[np.ndarray] = []
    self._x: list[np.ndarray] = []  # the buffered rows, encoded
    self._y: list[np.ndarray] = []
    self._row_keys: list[np.ndarray] = []  # their row keys (a row-level spec)
    self._runs = _Runs(self.stats["runs"])
    self._offsets = offsets
    self._seen: dict[int, int] = {}  # rows of each content key before (the current run's)
    self._seen_run: int | None = None  # the run self._seen counts for (with offsets)
    self._buffered = 0
    self._rejects_file: IO[str] | None = None
    self._units: list[list[str]] = []  # canonical unit ids of the buffered rows
    self._unit_seen: dict[int, str] = {}  # key -> id, for the collision check

  def _begin(self, key: Any) -> None:
    if key != self._key:
      self.flush()
      self._key = key

  def _count_lines(self, key: Any, lines: int) -> None:
    s = self.stats["lines_by_split"]
    s[str(key)] = s.get(str(key), 0) + lines

  def add(self, key: Any, lines: int, row_ids: np.ndarray, result: cleaning.CleanResult,
          reject_records: Iterable[dict[str, Any]]) -> None:
    """Adds a block of cleaned rows.

    Args:
      key: the input split the block comes from.
      lines: how many input lines (records) the block covers.
      row_ids: [lines] row id of each record of the block (indices of ``result`` point here).
      result: the block's cleaning outcome.
      reject_records: the JSON objects to write for ``result.rejects``, in the same order.
    """
    self._begin(key)
    self._count_lines(key, int(lines))
    runs = self._runs.cut(key, row_ids)
    s = self.stats
    s["rows_read"] += len(row_ids)
    s["kept"] += len(result.kept)
    s["dropped_na"] += len(result.dropped_na)
    s["rejected"] += len(result.rejects)
    s["na_by_column"] = [a + int(b) for a, b in zip(s["na_by_column"], result.na_by_column)]
    for _, reason, _ in result.rejects:
      s["rejects_by_reason"][reason] = s["rejects_by_reason"].get(reason, 0) + 1
    for k, v in self.spec.adjustments(result.values).items():  # clipped / mapped, counted
      s["adjusted"][k] = s["adjusted"].get(k, 0) + v
    if len(result.kept):
      self._ids.append(np.asarray(row_ids)[result.kept])
      x, y = self.spec.encode(result.values)
      self._x.append(x)
      self._y.append(y)
      if not self.spec.privacy_unit:
        self._row_keys.append(self._keys_of(runs, np.asarray(result.kept), result.values))
      self._buffered += len(result.kept)
      if self.spec.privacy_unit:
        if result.units is None or len(result.units) != len(result.kept):
          raise ValueError("a unit spec's cleaner must give the unit id of every kept row")
        self._units.append(list(result.units))
    if result.rejects:
      if self._rejects_file is None:
        first = int(row_ids[result.rejects[0][0]])
        path = os.path.join(self.staging, REJECTS, f"part-{first:012d}.jsonl")
        self._rejects_file = open(  # pylint: disable=consider-using-with
            path, "w", encoding="utf-8")
      for rec in reject_records:
        self._rejects_file.write(json.dumps(rec) + "\n")
    if self._buffered >= 4 * self.max_rows:  # bound memory on huge splits
      self._write_shards(final=False)

  def _keys_of(self, runs: list[tuple[int, int, int]], kept: np.ndarray,
               values: np.ndarray) -> np.ndarray:
    """The row keys of a block's kept rows (``kept``: their increasing line indices)."""
    content = split_lib.value_keys(values)
    occurrence = np.zeros(len(kept), np.int64)
    for start, lo, hi in runs:
      a, b = np.searchsorted(kept, [lo, hi])
      if a == b:
        continue
      if self._offsets is not None and start != self._seen_run:
        ckeys, counts = self._offsets.get(start, _NO_OFFSETS)
        self._seen = dict(zip(ckeys.tolist(), counts.tolist()))
        self._seen_run = start
      occurrence[a:b] = split_lib.occurrences(content[a:b], self._seen)
    return split_lib.row_keys(content, occurrence)

  def header(self, key: Any) -> None:
    """Counts a header line of the input split ``key``."""
    self._begin(key)
    self.stats["header_lines"] += 1
    self._count_lines(key, 1)

  def _write_shards(self, final: bool) -> None:
    if not self._ids:
      return
    ids = np.concatenate(self._ids)
    x, y = np.concatenate(self._x), np.concatenate(self._y)
    rkeys = None if self.spec.privacy_unit else np.concatenate(self._row_keys)
    uids = np.array([u for block in self._units for u in block] if self.spec.privacy_unit
                    else [], dtype=object)
    if self.spec.privacy_unit:
      keys, test = units_lib.key_and_split(uids.tolist(), self.split_seed, self.test_fraction,
                                           self._unit_seen)
    else:
      keys = None
      test = split_lib.is_test_row(rkeys, seed=self.split_seed, test_fraction=self.test_fraction)
    keep_ids, keep_x, keep_y, keep_rkeys, keep_units = [], [], [], [], []
    for split, mask in (("train", ~test), ("test", test)):
      sid, sx, sy = ids[mask], x[mask], y[mask]
      skeys = None if keys is None else keys[mask]
      srkeys = None if rkeys is None else rkeys[mask]
      n = len(sid)
      full = n if final else (n // self.max_rows) * self.max_rows
      for lo in range(0, full, self.max_rows):
        name = f"{split}-{int(sid[lo]):012d}.h5"
        info = data_lib.write_shard(self.staging, name, split, sx[lo:lo + self.max_rows],
                                    sy[lo:lo + self.max_rows],
                                    feature_bounds=self.spec.feature_bounds,
                                    feature_names=self.spec.feature_names,
                                    task=self.spec.task, embeddings=self.spec.embeddings,
                                    unit_keys=None if skeys is None else
                                    skeys[lo:lo + self.max_rows],
                                    row_keys=None if srkeys is None else
                                    srkeys[lo:lo + self.max_rows])
        self.shards.append(dataclasses.asdict(info))
      if full < n:  # keep the partial shard's rows (and the keys they got) for later
        keep_ids.append(sid[full:])
        keep_x.append(sx[full:])
        keep_y.append(sy[full:])
        if srkeys is not None:
          keep_rkeys.append(srkeys[full:])
        if keys is not None:
          keep_units.append(uids[mask][full:].tolist())
    self._ids, self._x, self._y, self._units = keep_ids, keep_x, keep_y, keep_units
    self._row_keys = keep_rkeys
    self._buffered = sum(len(i) for i in keep_ids)

  def flush(self) -> None:
    """Writes the current input split's remaining rows as shards; closes its rejects file."""
    if self._rejects_file is not None:
      self._rejects_file.close()
      self._rejects_file = None
    self._write_shards(final=True)
    self._ids, self._x, self._y, self._units, self._buffered = [], [], [], [], 0
    self._row_keys = []

  def close(self) -> list[tuple[str, str]]:
    """Flushes; returns ``(kind, json)`` records: one per shard, then the counts."""
    self.flush()
    return [("shard", json.dumps(s)) for s in self.shards] + [("stats", json.dumps(self.stats))]


class ContentCounter:
  """The Spark job's pre-pass sink: counts each run's kept rows by content key, writes nothing.

  Given the same blocks as a :class:`ShardSink` (same methods), so that its runs are the
  sink's; :meth:`frame` gives one ``(run, ckey, n, is_run=False)`` row per content key of
  each run and one ``(run, 0, lines, is_run=True)`` row per run (:data:`COUNT_SCHEMA`).
  """

  def __init__(self, spec: features_lib.FeatureSpec):
    self.spec = spec
    self.lines: dict[str, int] = {}
    self._runs = _Runs(self.lines)
    self._counts: dict[int, dict[int, int]] = {}

  def header(self, key: Any) -> None:
    del key  # a header line is no row

  def add(self, key: Any, lines: int, row_ids: np.ndarray, result: cleaning.CleanResult,
          reject_records: Iterable[dict[str, Any]]) -> None:
    """Counts a block's kept rows (the arguments of :meth:`ShardSink.add`)."""
    del lines, reject_records
    runs = self._runs.cut(key, row_ids)
    if not len(result.kept):
      return
    kept = np.asarray(result.kept)
    content = split_lib.value_keys(result.values)
    for start, lo, hi in runs:
      a, b = np.searchsorted(kept, [lo, hi])
      if a < b:
        counts = self._counts.setdefault(start, {})
        keys, n = np.unique(content[a:b], return_counts=True)
        for k, c in zip(keys.tolist(), n.tolist()):
          counts[k] = counts.get(k, 0) + c

  def frame(self):
    """The counts as a pandas DataFrame of :data:`COUNT_SCHEMA` (keys as signed 64 bits)."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    runs = [int(r) for r in self.lines]
    pairs = [(r, k, c) for r, counts in self._counts.items() for k, c in counts.items()]
    return pd.DataFrame({
        "run": np.array(runs + [p[0] for p in pairs], np.int64),
        "ckey": np.r_[np.zeros(len(runs), np.uint64),
                      np.array([p[1] for p in pairs], np.uint64)].view(np.int64),
        "n": np.array(list(self.lines.values()) + [p[2] for p in pairs], np.int64),
        "is_run": np.r_[np.ones(len(runs), bool), np.zeros(len(pairs), bool)]})


COUNT_SCHEMA = "run long, ckey long, n long, is_run boolean"


def task_frame(sink: ShardSink | ContentCounter):
  """What a Spark task returns: its sink's records (``kind, body``) or its counts."""
  if isinstance(sink, ContentCounter):
    return sink.frame()
  import pandas as pd  # pylint: disable=g-import-not-at-top
  return pd.DataFrame(sink.close(), columns=["kind", "body"])


def offsets_query(counts):
  """The Spark query from the pre-pass's counts to the rows :func:`offsets_of` reads.

  Each run's offset for a content key is the rows of that key in the runs before it (a
  window over the key, ordered by run start: runs are ranges of row ids, so this is row-id
  order over the whole input). Only non-zero offsets, and the runs themselves, are kept.

  Args:
    counts: a Spark DataFrame of :data:`COUNT_SCHEMA` (:class:`ContentCounter`'s rows).
  """
  from pyspark.sql import Window  # pylint: disable=g-import-not-at-top
  from pyspark.sql import functions as F  # pylint: disable=g-import-not-at-top
  before = (Window.partitionBy("is_run", "ckey").orderBy("run")
            .rowsBetween(Window.unboundedPreceding, -1))
  return (counts.withColumn("offset", F.sum("n").over(before))
          .filter(F.col("is_run") | (F.col("offset") > 0)))


def offsets_of(rows) -> tuple[Offsets, dict[str, int]]:
  """``(offsets for the sinks, rows of each run)`` from :func:`offsets_query`'s rows."""
  runs: dict[str, int] = {}
  found: dict[int, list[tuple[int, int]]] = {}
  for r in rows:
    if r["is_run"]:
      runs[str(r["run"])] = int(r["n"])
    else:
      found.setdefault(int(r["run"]), []).append((int(r["ckey"]), int(r["offset"])))
  offsets = {run: (np.array([k for k, _ in pairs], np.int64).view(np.uint64),
                   np.array([o for _, o in pairs], np.int64))
             for run, pairs in found.items()}
  return offsets, runs


def check_runs(results: Iterable[tuple[str, str]], planned: dict[str, int]) -> None:
  """The runs the sinks cut must be the pre-pass's: its offsets are named by run start.

  Raises:
    PipelineError: an internal error, if a run differs (Spark partitioned the two passes
      differently).
  """
  seen: dict[str, int] = {}
  for kind, body in results:
    if kind == "stats":
      seen.update(json.loads(body)["runs"])
  if seen != planned:
    diff = sorted(set(seen.items()) ^ set(planned.items()), key=lambda kv: int(kv[0]))[:3]
    raise PipelineError("internal error: the writing pass cut the input into other runs than "
                        f"the counting pass (first differences, start: rows: {diff}); the "
                        "occurrences of identical rows would be wrong")


def summarize(spec: features_lib.FeatureSpec, results: Iterable[tuple[str, str]],
              staging: str, split_seed: int, test_fraction: float, max_rows: int,
              extra: dict[str, Any]) -> dict[str, Any]:
  """Sums the sinks' records, checks them, and returns :func:`write_manifest`'s arguments.

  The manifest declares the spec's public feature bounds (the shards were checked against
  them as they were written). The returned dict also carries ``'_lines_by_split'`` (pop it
  before writing).

  Raises:
    PipelineError: if no row is usable (with counts by reason and the first reject), or if
      the shards do not hold exactly the kept rows.
  """
  results = list(results)
  shards = [manifest_lib.ShardInfo(**json.loads(body)) for kind, body in results if kind == "shard"]
  stats = [json.loads(body) for kind, body in results if kind == "stats"]
  total = {k: sum(s[k] for s in stats) for k in ("rows_read", "kept", "dropped_na", "rejected",
                                                  "header_lines")}
  na_by_column = [int(v) for v in np.sum([s["na_by_column"] for s in stats] or
                                         [[0] * len(spec.used_columns)], axis=0)]
  by_reason: dict[str, int] = {}
  lines_by_split: dict[str, int] = {}
  adjusted: dict[str, int] = {}
  for s in stats:
    for k, v in s["rejects_by_reason"].items():
      by_reason[k] = by_reason.get(k, 0) + v
    for k, v in s.get("adjusted", {}).items():
      adjusted[k] = adjusted.get(k, 0) + v
    for k, v in s["lines_by_split"].items():
      lines_by_split[k] = lines_by_split.get(k, 0) + v
  provenance = manifest_lib.Provenance(rows_read=total["rows_read"], kept=total["kept"],
                                       dropped_na=total["dropped_na"], rejected=total["rejected"])
  in_shards = sum(s.rows for s in shards)
  if in_shards != provenance.kept:
    raise PipelineError(f"internal error: shards hold {in_shards} rows, {provenance.kept} kept")
  if provenance.kept == 0:
    first = None
    parts = sorted(os.listdir(os.path.join(staging, REJECTS)))
    if parts:
      with open(os.path.join(staging, REJECTS, parts[0]), encoding="utf-8") as f:
        first = json.loads(f.readline())
    if provenance.rows_read == 0:
      raise PipelineError("no data rows: the input holds a header line and nothing else")
    raise PipelineError(
        f"no usable rows: {provenance.rows_read} rows read, {provenance.dropped_na} dropped for "
        f"NA (by column: {dict(zip(spec.used_columns, na_by_column))}), "
        f"{provenance.rejected} rejected (by reason: {by_reason})"
        + (f"; first reject: line {first['line']} of {first['file']}: {first['reason']}: "
           f"{first['detail']}" if first else ""))
  extra.update({
      "spec": spec.to_dict(), "spec_source": spec.source,
      "split": {"seed": split_seed, "test_fraction": test_fraction,
                "row_key": "fastdp_jax.data.split.row_keys of the cleaned row's content key "
                           "and its occurrence among identical kept rows in row-id order "
                           "(0-based index of the data row over the input files in path "
                           "order); in each shard's row_keys"}
      if not spec.privacy_unit else
      {"seed": split_seed, "test_fraction": test_fraction,
       "unit": "fastdp_jax.data.units.is_test_unit of the unit key: each unit in one split"},
      "max_rows_per_shard": max_rows,
      "header_lines": total["header_lines"],
      "dropped_na_by_column": dict(zip(spec.used_columns, na_by_column)),
      "rejected_by_reason": dict(sorted(by_reason.items())),
      "rejects_dir": REJECTS,
      # Kept rows that encoding changed, as the spec declares (clipped, mapped to unknown).
      "adjusted_by_column": dict(sorted(adjusted.items())),
  })
  if spec.privacy_unit:  # what the trainer's bound k will keep, per split (private counts)
    extra["units"] = {
        split: units_lib.bound_counts(np.concatenate([np.zeros(0, np.uint64)] + [
            data_lib.read_unit_keys(staging, s) for s in shards if s.split == split]),
            spec.max_rows_per_unit)
        for split in ("train", "test")}
  return {"feature_names": spec.feature_names, "label_name": spec.label, "shards": shards,
          "provenance": provenance, "feature_bounds": spec.feature_bounds, "extra": extra,
          "task": spec.task, "embeddings": spec.embeddings, "_lines_by_split": lines_by_split,
          "privacy_unit": spec.privacy_unit, "max_rows_per_unit": spec.max_rows_per_unit}


def describe(output: str, manifest: manifest_lib.Manifest) -> str:
  """The one-line account of a producer's run: what was read, kept, dropped and rejected."""
  pv = manifest.provenance
  return (f"{output}: {pv.rows_read} rows read, {pv.kept} kept ({manifest.rows('train')} train"
          f" / {manifest.rows('test')} test, {len(manifest.shards)} shards, "
          f"{manifest.num_features} features), {pv.dropped_na} dropped for NA, "
          f"{pv.rejected} rejected")


def check_columns(spec: features_lib.FeatureSpec, header: tuple[str, ...]) -> None:
  """The spec's used columns and its privacy-unit columns must be in an input's header.

  Raises:
    SpecError: naming the missing (or repeated) columns.
  """
  spec.column_indices(header)
  if spec.privacy_unit:
    try:
      units_lib.unit_column_indices(spec.privacy_unit, header)
    except errors.PipelineError as e:
      raise features_lib.SpecError(str(e)) from e


# The unit-collision check of the Spark job: (key, canonical id) of each row, grouped by key.
UNIT_ID_SCHEMA = "ukey long, uid string"


def unit_id_task(spec: features_lib.FeatureSpec, header: tuple[str, ...] | None):
  """The mapInPandas function of the Spark job's unit-collision check.

  Batches of CSV lines (column ``value``, bytes; ``header`` given) or of the unit columns
  (Parquet; ``header`` None) -> ``(ukey, uid)``: the signed 64-bit unit key and the canonical
  id of every row that has one. Lines the cleaner would reject for their shape (the header
  again, a wrong field count) are skipped; a row rejected for a bad value is kept here, which
  can only refuse more, never miss a collision.
  """
  idx = None if header is None else units_lib.unit_column_indices(spec.privacy_unit, header)

  def run(batches):
    import pandas as pd  # pylint: disable=g-import-not-at-top
    for pdf in batches:
      if idx is None:
        cells = zip(*(pdf[c].tolist() for c in spec.privacy_unit))
      else:
        text = b"\n".join(pdf["value"].tolist()).decode("utf-8", "replace").split("\n")
        parts = (line.split(",") for line in text)
        cells = ([p[j] for j in idx] for p in parts
                 if len(p) == len(header)
                 and tuple(cleaning.normalize_token(c) for c in p) != header)
      ids = [u for u in (units_lib.canonical_id(c, spec.na_tokens) for c in cells)
             if u is not None]
      yield pd.DataFrame({"ukey": units_lib.keys_of_ids(ids).view(np.int64), "uid": ids})

  return run


def check_unit_collisions(pairs) -> None:
  """Refuses distinct unit ids sharing a key, over all rows (a Spark aggregation).

  Args:
    pairs: a Spark DataFrame of :data:`UNIT_ID_SCHEMA` (:func:`unit_id_task`'s output).

  Raises:
    PipelineError: naming two ids that share a key (as
      :func:`fastdp_jax.data.units.check_no_collision`).
  """
  from pyspark.sql import functions as F  # pylint: disable=g-import-not-at-top
  # min and max aggregate map-side, so only one (key, min, max) row per unit is shuffled.
  bad = (pairs.groupBy("ukey").agg(F.min("uid").alias("a"), F.max("uid").alias("b"))
         .filter(F.col("a") != F.col("b")).limit(1).collect())
  if bad:
    a, b = bad[0]["a"], bad[0]["b"]
    units_lib.check_no_collision([a, b], np.array([bad[0]["ukey"]] * 2).astype(np.uint64))
