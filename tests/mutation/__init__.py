"""``make mutation``: deliberately broken copies of the training path, each of which the
privacy tests must catch (see :mod:`tests.mutation.run` and docs/privacy.md)."""
