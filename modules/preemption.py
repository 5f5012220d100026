"""Stopping a run cleanly: SIGTERM / SIGINT, a checkpoint every few minutes, and ranks that agree.

Clusters (SLURM) and spot instances send SIGTERM some seconds before they take a machine; Ctrl-C
sends SIGINT. During :func:`modules.loop.train_loop` both only *ask* for a stop
(:class:`StopSignals`): the loop finishes the optimizer step in flight, writes a checkpoint, says
so in one line and ends with :class:`modules.errors.Interrupted`, which the scripts turn into exit
code 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process
killed by that signal. A second SIGINT stops at once (KeyboardInterrupt), for a user who does not
want to wait for the checkpoint.

With several processes every rank must stop after the same step, or the others hang in the next
collective. :class:`StopAgreement` decides it with one small all-reduce every ``check_every``
optimizer steps (the ranks are in lockstep, so they all reach the same step); a single process
checks its own flag after every step at no cost. The same decision carries the time-based
checkpoint (``--checkpoint_every_minutes``): rank 0's clock decides, so every rank saves together.

Signals reach every rank: ``accelerate launch --multi_gpu`` (torch's elastic agent) forwards the
launcher's SIGTERM/SIGINT to each worker's process group; accelerate's one-process launcher does
not forward anything, so :func:`die_with_launcher` asks the kernel to send this process SIGTERM
when the launcher dies (Linux ``PR_SET_PDEATHSIG``). DataLoader workers ignore both signals
(:func:`ignore_stop_signals`, their ``worker_init_fn``): they would otherwise die at once and take
the step in flight with them; they end with the main process as usual.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from typing import Optional

import torch

logger = logging.getLogger("ldm")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Environment variables that accelerate's and torch's launchers set in the processes they start.
LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGINT (see the module docstring).

    The process that starts such workers must call :func:`kill_workers_at_exit`.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


_REAPER_REGISTERED = False


def kill_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the daemonic children (DataLoader workers) still alive.

    multiprocessing ends them at exit with SIGTERM and then waits for them; workers that ignore
    SIGTERM (:func:`ignore_stop_signals`) would make that wait forever. Persistent training workers
    are still alive then. Registered once, as a multiprocessing finalizer with an exit priority:
    multiprocessing's exit handler runs those first, before it terminates and joins its children.
    """
    global _REAPER_REGISTERED
    if _REAPER_REGISTERED:
        return
    import multiprocessing
    import multiprocessing.util

    def reap() -> None:
        workers = [child for child in multiprocessing.active_children() if child.daemon]
        if not workers:
            return
        # torch's SIGCHLD handler would raise "DataLoader worker ... is killed" at the first death
        # and leave the rest alive: these deaths are ours.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in workers:
            child.kill()
        for child in workers:
            child.join(timeout=5)

    multiprocessing.util.Finalize(None, reap, exitpriority=100)
    _REAPER_REGISTERED = True


def die_with_launcher() -> bool:
    """When started by a launcher (accelerate / torchrun), get SIGTERM if it dies (Linux only).

    A plain ``python script.py`` from a shell is left alone: ``nohup`` users expect the run to
    outlive their shell. Returns whether it was set.
    """
    if not sys.platform.startswith("linux") or not any(key in os.environ for key in LAUNCHER_ENV):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True


class StopSignals:
    """Within ``with``: SIGTERM / SIGINT set :attr:`received` (the first signal's number) instead
    of ending the process; a second SIGINT raises KeyboardInterrupt. Handlers can be installed
    from the main thread only; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            logger.info("received %s: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)",
                        signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class StopAgreement:
    """Whether all ranks stop (a signal) or save (the time-based checkpoint) after this step.

    ``check(step)`` is called after every optimizer step on every rank and returns
    ``(signal_number_or_None, checkpoint_due)``, the same on every rank. With one process it reads
    the local flag every step; with several, every ``check_every`` steps (one all-reduce of two
    numbers: which signal, if any rank got one, and whether rank 0's clock says a checkpoint is due).
    """

    def __init__(self, accelerator, signals: StopSignals, check_every: int,
                 checkpoint_every_minutes: Optional[float] = None) -> None:
        self.accelerator = accelerator
        self.signals = signals
        self.check_every = max(1, check_every)
        self.checkpoint_seconds = None if checkpoint_every_minutes is None else 60.0 * checkpoint_every_minutes
        self.last_checkpoint = time.monotonic()

    def saved(self) -> None:
        """A checkpoint was written (for any reason): the time-based one counts from now."""
        self.last_checkpoint = time.monotonic()

    def _due(self) -> bool:
        return self.checkpoint_seconds is not None and time.monotonic() - self.last_checkpoint >= self.checkpoint_seconds

    def check(self, step: int) -> tuple[Optional[int], bool]:
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.signals.received, self._due()
        if step % self.check_every != 0:
            return None, False
        local = torch.tensor([float(self.signals.received or 0), float(acc.is_main_process and self._due())],
                             device=acc.device)
        signum, due = _all_max(local)
        return (int(signum) or None), bool(due)


def _all_max(tensor: torch.Tensor) -> list:
    """Element-wise max of ``tensor`` over all processes, read on the host (one sync)."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
