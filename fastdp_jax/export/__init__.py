"""Exported models: ``WORKDIR/model/``, written after training and loaded as a callable predictor.

The directory holds everything needed to use the model without the training code's state::

    model/
      params.npz            # parameters by path ('layers/0/kernel', ...), float32
      model.json            # architecture ("model": task, embeddings), the feature spec (the
                            # public encoding of raw rows), label, threshold, privacy, metrics
      MODEL_CARD.md         # for people: what it is, how private, how good, how to load it
      MANIFEST.sha256       # the sha256 of each file above (``sha256sum -c`` reads it)
      MANIFEST.sha256.hmac  # optional: HMAC-SHA256 of the manifest with a user's secret key

Only public values go into it, and a model is checked whole before it is used: one digest over
every file, ``model.json`` against itself, the architecture against the arrays the file really
holds. Its modules:

* :mod:`~fastdp_jax.export.layout`: the names of the directory and its files;
* :mod:`~fastdp_jax.export.model_dir`: writing the directory
  (:func:`~fastdp_jax.export.model_dir.export_model`), the manifest, the model digest and the
  signature, and every integrity and consistency check;
* :mod:`~fastdp_jax.export.card`: the model card's text;
* :mod:`~fastdp_jax.export.predictor`: :func:`~fastdp_jax.export.predictor.load_model` and
  the :class:`~fastdp_jax.export.predictor.Predictor` it returns, which also encodes raw
  rows (dicts, columns, a DataFrame, a CSV file) with the dataset's feature spec and reports
  each bad row;
* ``python -m fastdp_jax.export verify|sign`` (``__main__``): checks or signs a directory::

    python -m fastdp_jax.export verify runs/demo/model [--key-file KEY] [--digest HEX]
    python -m fastdp_jax.export sign runs/demo/model --key-file KEY
"""
