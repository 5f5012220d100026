"""Interrupting real training runs from a test, as a cluster or a user would.

- :func:`start` launches a command with stdout and stderr in files; :func:`signal_launcher` sends
  a signal to the launcher alone (as a scheduler does) and waits for all it started to end;
  :func:`kill_everything` SIGKILLs the launcher and all below it at once;
- :func:`wait_for_step` polls a run folder's ``metrics.jsonl`` until a step is logged;
- :func:`kill_during_save_command` runs a trainer in a Python that SIGKILLs itself in the middle of
  writing one checkpoint (after the files are written to ``checkpoint_<N>.tmp``, before the rename
  that completes it): the worst moment for a hard kill.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence


@dataclass
class Started:
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


def start(cmd: Sequence[str], cwd: Path, env: Dict[str, str], logs: Path) -> Started:
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    process = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out.open("w"), stderr=err.open("w"),
                               start_new_session=True)
    return Started(process, out, err)


def logged_steps(run_dir: Path) -> List[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return steps


def wait_for_step(run: Started, run_dir: Path, step: int, timeout: float = 240) -> None:
    """Until ``metrics.jsonl`` of ``run_dir`` logs ``step`` or later; fails if the run ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(s >= step for s in logged_steps(run_dir)):
            return
        if run.process.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.process.returncode}) before step {step}:\n"
                                 f"{run.output()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run_dir}/metrics.jsonl after {timeout} s:\n{run.output()[-3000:]}")


def family(run: Started) -> List["psutil.Process"]:
    """The launcher and every process below it (trainers, DataLoader workers), found now: torch's
    elastic agent starts each rank in a session of its own, so a process group is not enough."""
    import psutil

    launcher = psutil.Process(run.process.pid)
    return [launcher] + launcher.children(recursive=True)


def wait_all_gone(processes: Sequence["psutil.Process"], timeout: float = 240) -> None:
    """Until every one of ``processes`` has ended (the launcher is reaped by its Popen)."""
    import psutil

    end = time.monotonic() + timeout
    for process in processes:
        while time.monotonic() < end:
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process {process.pid} still runs {timeout} s after the signal")


def signal_launcher(run: Started, signum: int, timeout: float = 240) -> int:
    """``signum`` to the launcher alone, as a scheduler does; waits until it and everything it
    started have ended. Returns the launcher's exit code."""
    processes = family(run)
    os.kill(run.process.pid, signum)
    code = run.wait(timeout)
    wait_all_gone(processes[1:], timeout)
    return code


def kill_everything(run: Started, timeout: float = 60) -> None:
    """SIGKILL to the launcher and every process below it at once (a machine taken away)."""
    processes = family(run)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except Exception:  # already gone
            pass
    run.wait(timeout)
    wait_all_gone(processes[1:], timeout)


_KILL_DURING_SAVE = """
import os, signal, sys
import modules.checkpoints as checkpoints

class _Os:
    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def replace(src, dst):
        if os.path.basename(str(dst)) == "checkpoint_{step}":
            os.kill(os.getpid(), signal.SIGKILL)  # the files are in checkpoint_{step}.tmp, not renamed yet
        return os.replace(src, dst)

checkpoints.os = _Os()
sys.argv = [{script!r}] + {argv!r}
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def kill_during_save_command(script: str, argv: Sequence[str], step: int, python: Optional[str] = None) -> List[str]:
    """``python <script> argv...`` that SIGKILLs itself while saving ``checkpoint_<step>``."""
    code = _KILL_DURING_SAVE.format(step=step, script=script, argv=list(argv))
    return [python or sys.executable, "-c", code]


def was_killed(returncode: int, signum: int) -> bool:
    return returncode in (-signum, 128 + signum)


__all__ = ["Started", "start", "logged_steps", "wait_for_step", "signal_launcher", "kill_everything",
           "kill_during_save_command", "was_killed"]
