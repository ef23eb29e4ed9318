"""The data contract: what a dataset directory, a row, a feature spec and the split are.

Imported by the trainer, the exported predictor and every producer alike (the Spark job, the
Poisson-batch job, the Hadoop-streaming path, the synthesizer), so both sides read and write
one format:

* :mod:`~fastdp_jax.data.manifest`: the manifest (its typed values and the one value check);
* :mod:`~fastdp_jax.data.shards`: the HDF5 shard files, their writer and the reader;
* :mod:`~fastdp_jax.data.features`: feature specs (columns -> model features, public bounds);
* :mod:`~fastdp_jax.data.cleaning`: the rules that turn a raw row into features or a reason;
* :mod:`~fastdp_jax.data.split`: the deterministic train/test split;
* :mod:`~fastdp_jax.data.batch_format`: the materialised Poisson-batch format (manifests,
  shards, the sampling key's file) and :mod:`~fastdp_jax.data.batch_stream`, its reader;
* :mod:`~fastdp_jax.data.spark` and :mod:`~fastdp_jax.data.java`: the Spark session (and its
  Java) that every Spark job of the project starts;
* ``specs/``: the built-in feature specs (``--spec capums``, ``--spec pums_raw``, ...).
"""
