"""The original system's distributed DP-SGD run, on any number of devices and hosts.

The same model, privacy and sampling as ``configs/seq.py`` (C = 3, sigma = 0.9, expected batch
256 over ALL devices, 10 epochs, the 9-50-1 MLP): the global Poisson batch, the noise and
the privacy guarantee do not depend on the topology; more devices only split each update's
batch. The gradient all-reduce is chosen by ``parallel.strategy``: 'auto' (XLA inserts it,
the counterpart of the original's DistributedDataParallel version) or 'shard_map' (an
explicit ``psum``, the counterpart of its hand-written all-reduce).

One host, all its devices (one process; a single GPU or CPU is a mesh of size 1)::

  python -m fastdp_jax --config=configs/dist.py --config.data.path=data/generated/capums

Several local processes (development; 2 processes x 2 fake CPU devices, over loopback)::

  python -m fastdp_jax.launch --num_processes=2 --devices_per_process=2 -- \\
      --config=configs/dist.py --config.data.path=data/generated/capums --workdir=runs/dist

A cluster: one process per host, each using all of its GPUs. On every host, with the same
config and data (each process reads only its share of the shards)::

  python main.py --config=configs/dist.py --config.data.path=/shared/capums \\
      --workdir=/shared/runs/dist --coordinator_address=HOST0:12345 \\
      --num_processes=N --process_id=I          # I = 0 on HOST0, 1..N-1 elsewhere

Under SLURM (``srun --ntasks-per-node=1 python main.py --config=configs/dist.py ...``) or
Open MPI (``mpirun -npernode 1 ...``) leave the three flags out: JAX reads them from the job.
A process that dies stops the others within ``--heartbeat_timeout_s`` (default 60 s); a
coordinator that never answers fails the others after ``--init_timeout_s`` (default 90 s).
Only process 0 writes ``summary.json``, ``metrics.jsonl`` and ``final_params.npz``.

On the full-scale generated data (``make data``: 969,359 training rows, 37,870 updates) it
trains the same model with the same privacy as ``configs/seq.py`` (epsilon 0.370 at the
default delta 1.01e-7, PLD): q, sigma and the number of updates do not depend on the
topology. Its wall time and accuracy, on one host and on two local processes, have not been
re-measured since per-example Poisson sampling and the default delta came in; with two local
processes on one machine every update waits for an all-reduce between them (a few ms over
loopback; see BENCHMARKS.md, Scaling).
"""

from configs import seq


def get_config():
  config = seq.get_config()
  config.parallel.strategy = "auto"  # 'auto' (XLA's all-reduce) | 'shard_map' (explicit psum).
  return config
