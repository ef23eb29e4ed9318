"""Materialised Poisson batches: the Spark job writes, for every update, exactly the rows the
in-memory sampler draws; the reader streams them in bounded memory; bad input is named.

The test dataset carries each training row's global row id in feature 0 (declared bounds
[0, N]), so the rows of every materialised update can be read back and compared with
``PoissonSampler.global_indices`` for the same key, and their other values with the
dataset's rows. One SparkSession (local[2]) serves the whole module.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from fastdp_jax.data import batch_format as bf
from fastdp_jax.data import batch_stream as bs
from fastdp_jax.data import shards as data_lib
from fastdp_jax.data import manifest as manifest_lib
from fastdp_jax.dp import release
from fastdp_jax.dp import sampling
from fastdp_jax.data import split as split_lib
from tests import preprocessing_helpers as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WHY_NOT = T.spark_available()
# A Spark session: `make test-fast` leaves these out.
pytestmark = [pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT)), pytest.mark.slow]

ROWS, SHARD_ROWS = 3000, 700  # 2400-odd train rows in 4 train shards
B, E, SEED, K = 48, 3, 7, 7  # q = 0.02, 50 updates per epoch, 150 updates; K does not divide


def _rowid_dataset(path, rows=ROWS, seed=0):
  """Feature 0 = the row's global train row id; features 1..4 random 0/1; a 0/1 label."""
  rng = np.random.default_rng(seed)
  test = split_lib.is_test_row(np.arange(rows))
  n = int((~test).sum())
  x = (rng.random((rows, 5)) < 0.4).astype(np.float32)
  x[~test, 0] = np.arange(n)
  x[test, 0] = 0
  y = (rng.random(rows) < 0.6).astype(np.uint8)
  with data_lib.DatasetWriter(path, feature_names=["row_id", "a", "b", "c", "d"],
                              label_name="employed", max_rows_per_shard=SHARD_ROWS,
                              feature_bounds=[(0, n)] + [(0, 1)] * 4) as w:
    w.add("train", x[~test], y[~test])
    w.add("test", x[test], y[test])
  return {"path": str(path), "n": n, "x": x[~test], "y": y[~test].astype(np.float32)}


@pytest.fixture(scope="module")
def spark():
  yield from T.spark_session("test_poisson_batches")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return _rowid_dataset(tmp_path_factory.mktemp("rowid") / "data")


def _job(spark, dataset_path, output, **kw):
  from preprocessing import poisson_batches as pb  # pylint: disable=g-import-not-at-top
  kw.setdefault("batch_size", B)
  kw.setdefault("epochs", E)
  plan = pb.plan_job(dataset_path, str(output), **kw)
  return pb.run_job(spark, plan)


@pytest.fixture(scope="module")
def seeded(spark, dataset, tmp_path_factory):
  """The seeded run: K=7 updates per shard, pieces of 500 rows (several per train shard)."""
  out = tmp_path_factory.mktemp("seeded") / "batches"
  _job(spark, dataset["path"], out, sampling_seed=SEED, updates_per_shard=K, rows_per_task=500)
  return str(out)


def _all(path):
  s = bs.open_batches(path)
  return s.read(0, s.total_updates)


def test_every_update_holds_exactly_the_in_memory_samplers_rows(dataset, seeded):
  stream = bs.open_batches(seeded)
  n = dataset["n"]
  q = B / n
  spe = max(1, round(n / B))
  p = sampling.automatic_overflow_probability(release.default_delta(n), E * spe, 1)
  assert stream.q == q and stream.total_updates == E * spe and stream.batch_size == B
  assert stream.capacity == sampling.capacity_for(n, q, p)
  assert stream.overflow_probability == p and stream.run.expected_batch_size == pytest.approx(B)
  assert stream.sampling_fixed
  assert stream.dataset_digest == manifest_lib.read_manifest(dataset["path"]).digest()
  key = sampling.sampling_key(SEED)[0]
  assert stream.key_commitment == bf.key_commitment(key)
  sampler = sampling.PoissonSampler(n, B, key)
  f, lab, m = stream.read(0, stream.total_updates)
  assert f.shape == (E * spe, stream.capacity, 5)
  sizes = []
  for t in range(stream.total_updates):
    want = sampler.global_indices(t)
    k = len(want)
    sizes.append(k)
    # The real rows first, in increasing global row id; then padding (mask False, zeros).
    assert m[t, :k].all() and not m[t, k:].any()
    np.testing.assert_array_equal(f[t, :k, 0].astype(np.int64), want)
    np.testing.assert_array_equal(f[t, :k], dataset["x"][want])
    np.testing.assert_array_equal(lab[t, :k], dataset["y"][want])
    assert not f[t, k:].any() and not lab[t, k:].any()
  assert max(sizes) <= stream.capacity and sum(sizes) > 0.9 * B * len(sizes)


def test_shards_do_not_depend_on_partitioning(spark, dataset, seeded, tmp_path):
  """Same seed, other Spark tasks: byte-identical shard files (reproducible batches)."""
  out = tmp_path / "other"
  run, block = _job(spark, dataset["path"], out, sampling_seed=SEED, updates_per_shard=K,
                    rows_per_task=2000)
  assert block.extra["spark"]["tasks"] == 4  # one per train shard; the seeded run had 7
  mine = bf.read_block(seeded, block.name, bf.read_run(seeded))
  assert [s.sha256 for s in block.shards] == [s.sha256 for s in mine.shards]
  assert run.digest == mine.run_digest


def test_default_key_is_secret_and_owner_only(spark, dataset, tmp_path):
  out = tmp_path / "secret"
  run, _ = _job(spark, dataset["path"], out, epochs=1)
  assert not run.sampling_fixed
  key, fixed = bf.read_key(out)
  assert not fixed and bf.key_commitment(key) == run.key_commitment
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
  assert stat.S_IMODE(os.stat(out / bf.PRIVATE_DIR).st_mode) == 0o700
  assert stat.S_IMODE(os.stat(out / bf.PRIVATE_DIR / bf.KEY_FILE).st_mode) == 0o600
  # The key (in hex or as bytes) is in no other file of the directory.
  secrets = [f"{int(w):016x}".encode() for w in key] + [key.astype("<u8").tobytes()]
  for root, _, files in os.walk(out):
    for name in files:
      if name == bf.KEY_FILE:
        continue
      with open(os.path.join(root, name), "rb") as fh:
        body = fh.read()
      assert not any(s in body for s in secrets), name
  # Same inclusion function with an entropy key.
  stream = bs.open_batches(out)
  sampler = sampling.PoissonSampler(dataset["n"], B, key)
  f, _, m = stream.read(0, stream.total_updates)
  for t in range(stream.total_updates):
    np.testing.assert_array_equal(f[t, m[t], 0].astype(np.int64), sampler.global_indices(t))


def test_epoch_blocks_in_one_directory_equal_the_full_run(spark, dataset, seeded, tmp_path):
  from preprocessing import poisson_batches as pb  # pylint: disable=g-import-not-at-top
  out = tmp_path / "blocks"
  # Another K than the seeded run's: the batches of every update are the same.
  _job(spark, dataset["path"], out, first_epoch=0, num_epochs_block=1, sampling_seed=SEED,
       updates_per_shard=10)
  stream = bs.open_batches(out)
  spe = stream.steps_per_epoch
  assert stream.available == ((0, spe),)
  with pytest.raises(bf.MissingUpdatesError, match=r"update 60 \(epoch 1\) is in no block"):
    stream.read(60, 1)
  # The second block reuses the directory's key (no seed needed) and appears atomically.
  _job(spark, dataset["path"], out, first_epoch=1, num_epochs_block=2, updates_per_shard=10)
  assert sorted(os.listdir(out)) == ["batches.json", "epochs-0000-0001", "epochs-0001-0003",
                                     "private"]
  full = _all(seeded)
  with stream.reader(0) as r:  # the stream opened before the append finds the new block
    for a, b in zip(r.take(stream.total_updates), full):
      np.testing.assert_array_equal(a, b)
  # Refused before any work: the same block again, an overlapping one, another run.
  with pytest.raises(FileExistsError, match="epochs-0001-0003 exists"):
    pb.plan_job(dataset["path"], str(out), batch_size=B, epochs=E, first_epoch=1)
  with pytest.raises(pb.PipelineError, match="overlap block epochs-0000-0001"):
    pb.plan_job(dataset["path"], str(out), batch_size=B, epochs=E, first_epoch=0,
                num_epochs_block=2)
  with pytest.raises(bf.BatchMismatchError, match="batch_size=48 .asked 64"):
    pb.plan_job(dataset["path"], str(out), batch_size=64, epochs=E, first_epoch=1)
  with pytest.raises(bf.BatchMismatchError, match="sampling-seed 8 is not the seed"):
    pb.plan_job(dataset["path"], str(out), batch_size=B, epochs=E, first_epoch=1,
                sampling_seed=8)
  # A consumed block may be deleted to free disk; reading it then names it.
  shutil.rmtree(out / "epochs-0000-0001")
  with pytest.raises(bf.BatchError, match="epochs-0000-0001/updates-000000000.h5: file missing"):
    stream.read(0, 1)
  np.testing.assert_array_equal(stream.read(spe, 3)[0], full[0][spe:spe + 3])


def test_reader_prefetch_equals_direct_read_and_seeks_anywhere(seeded):
  stream = bs.open_batches(seeded)
  f, lab, m = stream.read(0, stream.total_updates)
  for first, num, per in [(0, stream.total_updates, 4), (23, 40, 7), (149, 1, 1), (6, 9, 3)]:
    got = list(stream.chunks(first, num, updates_per_chunk=per, prefetch=2))
    assert [len(c[2]) for c in got] == [min(per, num - i) for i in range(0, num, per)]
    for a, b in zip((np.concatenate([c[i] for c in got]) for i in range(3)), (f, lab, m)):
      np.testing.assert_array_equal(a, b[first:first + num])
  # Variable lengths from a resumed position, small pieces so that takes span pieces.
  with stream.reader(37, read_bytes=1) as r:
    assert r.read_updates == 1
    at = 37
    for k in (1, 5, 13, 2):
      got = r.take(k)
      np.testing.assert_array_equal(got[0], f[at:at + k])
      np.testing.assert_array_equal(got[2], m[at:at + k])
      at += k
    assert r.position == at
    with pytest.raises(ValueError, match="ends at 150"):
      r.take(200)
  # A process's slot range, padding past the capacity.
  cap = stream.capacity
  lo, hi = cap - 3, cap + 2
  got = list(stream.chunks(10, 5, updates_per_chunk=5, device_slice=(lo, hi)))[0]
  np.testing.assert_array_equal(got[0][:, :3], f[10:15, lo:])
  assert not got[0][:, 3:].any() and not got[2][:, 3:].any()


def test_prefetch_holds_a_fixed_number_of_buffers(seeded):
  """Host memory: prefetch + 1 buffers of read_updates updates, whatever the run's length."""
  stream = bs.open_batches(seeded)
  per_update = stream.capacity * (4 * stream.num_features + 5)
  # Pieces stop at shard ends: 7 updates per piece = one shard of K = 7 per buffer.
  with stream.reader(0, prefetch=2, read_bytes=K * per_update) as r:
    assert (r.read_updates, r.num_buffers) == (K, 3)
    for _ in range(600):  # wait until the reader has filled every buffer
      if r.buffered_updates() >= 3 * K:
        break
      time.sleep(0.05)
    assert r.buffered_updates() == 3 * K  # 3 buffers of 7 updates; the run has 150
    first = r.take(1)
    assert r.buffered_updates() == 3 * K - 1  # no buffer free: nothing more is read
    r.take(K - 1)  # frees the first buffer, which the reader refills
    for _ in range(600):
      if r.buffered_updates() >= 3 * K:
        break
      time.sleep(0.05)
    assert r.buffered_updates() == 3 * K
    again = r.take(3)
  # Chunks are copies: the reused buffers do not change what was taken.
  np.testing.assert_array_equal(first[0], stream.read(0, 1)[0])
  np.testing.assert_array_equal(again[0], stream.read(K, 3)[0])
  with pytest.raises(ValueError, match="closed reader"):
    r.take(1)


def test_split_for_devices_gives_each_device_its_slot_range(seeded):
  stream = bs.open_batches(seeded)
  cap = stream.capacity
  f, lab, m = stream.read(5, 4)
  for d_count in (1, 3, 8):
    pf, pl, pm = bs.split_for_devices(f, lab, m, d_count)
    c = -(-cap // d_count)
    assert pf.shape == (4, d_count, c, 5) and pm.shape == (4, d_count, c)
    assert pm.sum() == m.sum()  # the union of the parts is the batch
    np.testing.assert_array_equal(pm.reshape(4, -1)[:, :cap], m)
    for d in range(d_count):
      lo, hi = bs.device_slots(cap, d_count, (d, d + 1))
      assert (lo, hi) == (d * c, (d + 1) * c)
      df, dl, dm = stream.read(5, 4, device_slice=(lo, hi))
      np.testing.assert_array_equal(df, pf[:, d])
      np.testing.assert_array_equal(dl, pl[:, d])
      np.testing.assert_array_equal(dm, pm[:, d])
  # A process holding devices 2..4 of 8 reads one contiguous range.
  lo, hi = bs.device_slots(cap, 8, (2, 5))
  part = stream.read(5, 4, device_slice=(lo, hi))
  np.testing.assert_array_equal(bs.split_for_devices(*part, 3)[0],
                                bs.split_for_devices(f, lab, m, 8)[0][:, 2:5])


def _copy(seeded, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(seeded, dst)
  return dst


def test_truncated_corrupt_or_missing_shard_is_named(seeded, tmp_path):
  out = _copy(seeded, tmp_path)
  shard = out / "epochs-0000-0003" / "updates-000000014.h5"
  size = os.path.getsize(shard)
  with open(shard, "r+b") as fh:
    fh.truncate(size - 100)
  with pytest.raises(bf.BatchError, match=r"batch shard epochs-0000-0003/updates-000000014.h5: "
                     r"sha256 .* \(\d+ bytes, manifest says \d+: truncated"):
    bs.open_batches(out)
  shutil.copy(os.path.join(seeded, "epochs-0000-0003", "updates-000000014.h5"), shard)
  with open(shard, "r+b") as fh:  # one flipped byte, same size
    fh.seek(size // 2)
    byte = fh.read(1)
    fh.seek(size // 2)
    fh.write(bytes([byte[0] ^ 1]))
  with pytest.raises(bf.BatchError, match="updates-000000014.h5: sha256"):
    bs.open_batches(out)
  os.remove(shard)
  with pytest.raises(bf.BatchError, match="updates-000000014.h5: file missing"):
    bs.open_batches(out)


def test_hand_edited_manifests_and_foreign_keys_are_refused(seeded, tmp_path):
  out = _copy(seeded, tmp_path)
  run_path = out / bf.RUN_MANIFEST
  original = run_path.read_text()
  body = json.loads(original)
  body["sampling_rate"] *= 2
  run_path.write_text(json.dumps(body))
  with pytest.raises(bf.BatchError, match="batches.json: contents do not match the manifest's "
                     "digest"):
    bs.open_batches(out)
  run_path.write_text(original)
  block_path = out / "epochs-0000-0003" / bf.BLOCK_MANIFEST
  body = json.loads(block_path.read_text())
  body["shards"][0]["num_updates"] = 8
  block_path.write_text(json.dumps(body))
  with pytest.raises(bf.BatchError, match="block.json: contents do not match"):
    bs.open_batches(out)
  shutil.copy(os.path.join(seeded, "epochs-0000-0003", bf.BLOCK_MANIFEST), block_path)
  bf.write_key(str(out), sampling.sampling_key(SEED + 1)[0], True)
  with pytest.raises(bf.BatchError, match="does not match the commitment"):
    bs.open_batches(out)


def test_batches_for_another_dataset_batch_size_or_epochs_are_refused(dataset, seeded,
                                                                      tmp_path):
  ident = bs.dataset_identity(dataset["path"])
  stream = bs.open_batches(seeded, expected=dict(ident, batch_size=B, epochs=E))
  assert stream.num_examples == dataset["n"]
  other = bs.dataset_identity(_rowid_dataset(tmp_path / "other", seed=1)["path"])
  with pytest.raises(bf.BatchMismatchError) as e:
    bs.open_batches(seeded, expected=dict(other, batch_size=64, epochs=4))
  msg = str(e.value)
  assert "dataset_digest=" in msg and "batch_size=48 (the run asks 64)" in msg
  assert "epochs=3 (the run asks 4)" in msg and "\n" not in msg
  with pytest.raises(ValueError, match="unknown keys"):
    bs.open_batches(seeded, expected={"batchsize": B})


def test_existing_output_is_refused_before_spark_starts(dataset, seeded, tmp_path, capsys):
  from preprocessing import poisson_batches as pb  # pylint: disable=g-import-not-at-top
  args = ["--dataset", dataset["path"], "--batch-size", str(B), "--epochs", "1"]
  assert pb.main(args + ["--output", seeded]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: output ") and "exists; pass --overwrite" in err
  assert "\n" not in err
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  assert pb.main(args + ["--output", str(other), "--overwrite"]) == 2
  assert "not a batch directory" in capsys.readouterr().err
  assert (other / "keep.txt").read_text() == "mine"
  assert pb.main(args[:3] + ["0", "--epochs", "1", "--output", str(tmp_path / "x")]) == 2
  assert "--batch-size=0 must be a positive integer" in capsys.readouterr().err


def test_overflow_fails_the_job_before_anything_is_published(spark, dataset, tmp_path):
  out = tmp_path / "overflow"
  # Capacity at the median of Binomial(N, q): some update of 150 overflows for certain.
  with pytest.raises(sampling.BatchOverflowError, match=r"examples sampled, capacity \d+; "
                     "lower --overflow-probability"):
    _job(spark, dataset["path"], out, sampling_seed=SEED, overflow_probability=0.5)
  assert os.listdir(tmp_path) == []  # no output, no staging directory


def test_corrupt_dataset_shard_is_named(spark, dataset, tmp_path):
  src = tmp_path / "data"
  shutil.copytree(dataset["path"], src)
  with open(src / "train-00002.h5", "r+b") as fh:
    fh.seek(-16, 2)
    fh.write(b"\xff" * 16)
  with pytest.raises(manifest_lib.ShardError, match="train-00002.h5: sha256"):
    _job(spark, str(src), tmp_path / "out", sampling_seed=SEED)
  assert sorted(os.listdir(tmp_path)) == ["data"]


def test_not_enough_free_disk_is_refused_before_spark_starts(dataset, tmp_path, monkeypatch):
  from preprocessing import poisson_batches as pb  # pylint: disable=g-import-not-at-top
  plan = pb.plan_job(dataset["path"], str(tmp_path / "b"), batch_size=B, epochs=E)
  real = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(pb.shutil, "disk_usage",
                      lambda p: real._replace(free=plan.block_bytes() // 2))
  with pytest.raises(pb.PipelineError, match="the block needs about .* GB free on .*; write "
                     "fewer epochs at a time"):
    pb.plan_job(dataset["path"], str(tmp_path / "b"), batch_size=B, epochs=E)


# A file-size limit stands in for a full disk: writes past it fail with EFBIG (Python and the
# JVM ignore SIGXFSZ). The shuffle files of this small job stay far below it. A fresh
# interpreter sets it and execs the job: a preexec_fn would run Python between fork and exec
# in a copy of this multithreaded (JAX) process, which can deadlock under load.
_LIMITED = ("import os, resource, sys; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def test_disk_filling_during_the_job_fails_cleanly(dataset, tmp_path):
  out = tmp_path / "full"
  # 150 updates x capacity x 25 bytes (5 float32 features, a float32 label, the mask) in one
  # shard: about 300 KB, over the 200 KB limit.
  cmd = [sys.executable, "-c", _LIMITED, "-m", "preprocessing.poisson_batches",
         "--dataset", dataset["path"], "--output", str(out), "--batch-size", str(B),
         "--epochs", str(E), "--updates-per-shard", "150", "--master", "local[1]"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
  assert r.returncode == 2, r.stderr[-3000:]
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith("error: writing batch shard updates-000000000.h5 failed: OSError")
  assert "disk (or a file size limit) is full" in line and "nothing was published" in line
  assert os.listdir(tmp_path) == []


def test_spark_submit_runs_the_script(dataset, tmp_path):
  submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
  if not os.path.exists(submit):
    submit = shutil.which("spark-submit")
  if not submit:
    pytest.skip("spark-submit is not installed")
  out = tmp_path / "submitted"
  env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
  from fastdp_jax.data import java  # pylint: disable=g-import-not-at-top
  home = java.spark_java_home()
  if home:
    env["JAVA_HOME"] = home
  r = subprocess.run([submit, "--master", "local[1]", "preprocessing/poisson_batches.py",
                      "--dataset", dataset["path"], "--output", str(out), "--batch-size",
                      str(B), "--epochs", "1", "--sampling-seed", str(SEED)],
                     cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  stream = bs.open_batches(out)
  assert stream.run.sampling_fixed and stream.total_updates == stream.steps_per_epoch
  block = bf.read_block(out, "epochs-0000-0001", stream.run)
  assert block.extra["spark"]["master"] == "local[1]"


def test_iter_split_streams_the_test_split_in_row_order(dataset):
  whole = data_lib.load_split(dataset["path"], "test")
  parts = list(bs.iter_split(dataset["path"], "test", chunk_rows=100))
  assert max(len(p[1]) for p in parts) == 100
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole.features)
  np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole.labels)
  lo, hi = 150, 420
  part = np.concatenate([p[0] for p in bs.iter_split(dataset["path"], "test", chunk_rows=64,
                                                     rows=(lo, hi))])
  np.testing.assert_array_equal(part, whole.features[lo:hi])


def test_a_shard_that_no_row_falls_in_is_written_empty(spark, tmp_path):
  small = _rowid_dataset(tmp_path / "small", rows=125)
  n, k = small["n"], 4
  # q = 1 / N: an update is empty with probability about 1/e; find a seed for which some
  # shard of 4 updates gets no row at all (no Spark task then writes it: the driver does).
  for seed in range(200):
    sampler = sampling.PoissonSampler(n, 1, sampling.sampling_key(seed)[0])
    sizes = np.array([len(sampler.global_indices(t)) for t in range(n)])
    empty = [j for j in range(0, n // k * k, k) if not sizes[j:j + k].any()]
    if empty:
      break
  out = tmp_path / "b"
  _job(spark, small["path"], out, batch_size=1, epochs=1, sampling_seed=seed,
       updates_per_shard=k)
  stream = bs.open_batches(out)
  f, _, m = stream.read(0, stream.total_updates)
  assert not m[empty[0]:empty[0] + k].any()
  for t in range(stream.total_updates):
    np.testing.assert_array_equal(f[t, m[t], 0].astype(np.int64), sampler.global_indices(t))
