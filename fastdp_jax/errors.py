"""The user-error base class: errors that are the user's to fix.

Every error that a user can cause and fix (a bad config, a missing or corrupt dataset, a busy
workdir, a resumed run that differs from its checkpoint, an exhausted budget, a preprocessing
input that does not parse) derives from :class:`UserError`. The command-line tools print such
an error once, as one line, and exit with status 2; any other exception is a bug (ours or a
library's) and keeps its traceback.

``UserError`` derives from ``ValueError`` so that code written against the earlier
``ValueError`` contract keeps working.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
  """An error the user can fix; shown as one line, exit status 2."""


class ConfigError(UserError):
  """A config key is unknown, of the wrong type or out of range (names the key)."""


class PipelineError(UserError):
  """A data job's input or arguments are bad; the message says what is wrong and where."""


# Here rather than in fastdp_jax.checkpoint: fastdp_jax.dp.keys raises it too (a workdir without
# its keys, or whose keys were deleted), and the checkpoint module imports the keys module.
class ResumeMismatchError(UserError):
  """A resumed run differs from its checkpoint in something that must not change silently."""
