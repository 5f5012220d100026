"""The one exception type for mistakes a user can fix (bad paths, configs, flags, data).

Scripts catch :class:`UserError` at the top (see :func:`modules.cli.run_main`), print its
one-line message and exit with code 2, without a traceback. Programming errors keep
their ordinary exceptions and tracebacks.

A bad flag is caught by argparse before ``main`` runs its checks; :class:`OneLineArgumentParser`
reports it the same way: ``error: <message>`` on one line, exit code 2 (argparse's own code),
instead of argparse's usage block followed by ``<prog>: error: ...``.
"""
import argparse
from typing import NoReturn


class UserError(Exception):
    """A bad input: the message names the file, key or value and what was expected."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line, ``error: <message> (see <prog> --help)``,
    with exit code 2, like every other user error of the toolkit. ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"error: {text} (see {self.prog} --help)\n")


class Interrupted(Exception):
    """A run stopped by SIGTERM / SIGINT after writing its checkpoint (:mod:`modules.preemption`).

    The scripts exit with ``128 + signum`` (143 for SIGTERM, 130 for SIGINT): the run did not
    finish, and schedulers and shells read it as a stop by that signal.
    """

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {checkpoint}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
