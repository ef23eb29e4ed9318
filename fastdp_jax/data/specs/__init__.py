"""The built-in feature specs (``--spec capums``, ``pums_raw``, ``pums_educ``, ``pums_income``, ``pums_puma``, ``pums_households``), shipped in the package.

Each module is a spec file with ``get_config()`` (see :mod:`fastdp_jax.data.features`); copy one
to write your own and pass its path (``--spec my_spec.py``).
"""
