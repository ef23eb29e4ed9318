"""fastdp_jax's internal modules: no stability promise, they may change at any time.

The public API is :mod:`fastdp_jax` (its ``__init__``) and the commands ``python -m fastdp_jax``
and ``python -m fastdp_jax.{checkpoint,export,launch,predict,privacy_eval,report}``.
"""
