"""The one exception type for mistakes a user can fix (bad paths, configs, flags, data).

Scripts catch :class:`UserError` at the top (see :func:`modules.cli.run_main`), print its
one-line message and exit with code 2, without a traceback. Programming errors keep
their ordinary exceptions and tracebacks.
"""


class UserError(Exception):
    """A bad input: the message names the file, key or value and what was expected."""
