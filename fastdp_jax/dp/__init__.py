"""The mechanism and its record: everything a privacy guarantee depends on.

* :mod:`~fastdp_jax.dp.sampling`: per-example Poisson sampling (host, NumPy);
* :mod:`~fastdp_jax.dp.keys`: the run's secret sampling and noise keys (drawn, kept in
  ``keys.json``, forgotten);
* :mod:`~fastdp_jax.dp.clipping` and :mod:`~fastdp_jax.dp.ghost`: per-example clipping
  (vmap, or the ghost-norm trick), each example's gradient bounded by C; the choice between
  them (``dp.clipping``) is the clipping module's, their common types
  :mod:`~fastdp_jax.dp.clip_types`;
* :mod:`~fastdp_jax.dp.noise`: the Gaussian noise, as an optax transform;
* :mod:`~fastdp_jax.dp.plan`: the privacy plan of a run (sigma, q, T, delta, the budget);
* :mod:`~fastdp_jax.dp.accounting`: epsilon through ``dp_accounting``, the privacy ledger;
* :mod:`~fastdp_jax.dp.release`: whether a run's outputs may be called private, and why;
* :mod:`~fastdp_jax.dp.privacy_eval` and :mod:`~fastdp_jax.dp.attack`: empirical audits
  (membership inference, canaries).

Host code (sampling, accounting) and device code (clipping, noise) are apart on purpose: the
jitted step never does accounting.
"""
