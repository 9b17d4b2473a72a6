"""The error type for mistakes a user can fix (config, paths, data, checkpoints).

`remem_jax.main` turns these into a one-line message and a non-zero exit
instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the run stops without saving that state."""
