"""Resumable checkpoints of a run folder: ``<run>/checkpoint_<step>/``, written atomically, rotated.

Conventions
- A run folder is ``<working_directory>/<experiment_name>/``; it holds ``config.yaml`` (the
  resolved config), ``metrics.jsonl``, ``loss_curve.png`` and ``checkpoint_<step>/`` folders.
- Every process calls ``save``/``resume`` (each one saves and restores its own RNG states);
  only the main process creates, renames and deletes folders.
- A checkpoint is written to ``checkpoint_<step>.tmp/`` and renamed when complete, so a kill
  during a save never leaves a broken checkpoint that ``latest`` would pick.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from modules.errors import UserError

logger = logging.getLogger("ldm")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Counters saved beside ``accelerator.save_state``: where the loop was."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    skipped_steps: int = 0   # optimizer steps skipped for non-finite fp16 gradients (loss scaling)
    num_processes: int = 0   # the run's shape, for a resume on another one (0: not recorded)
    per_gpu_batch_size: int = 0
    flops_per_step: int = 0  # one process's model FLOPs per optimizer step, counted in the run's first (0: not yet)
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient (modules/nonfinite.py)

    def to_json(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class CheckpointManager:
    """Resumable ``checkpoint_<step>/`` folders in a run folder, written atomically, rotated.

    ``save`` must be called on every process (each one stores its RNG state); ``resume`` too.
    """

    def __init__(self, accelerator, run_dir: Union[str, Path], total_limit: Optional[int] = None):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.total_limit = total_limit

    # -- discovery -------------------------------------------------------------------
    def checkpoints(self) -> List[Tuple[int, Path]]:
        """Complete checkpoints of this run, oldest first."""
        found = []
        if self.run_dir.is_dir():
            for child in self.run_dir.iterdir():
                match = CHECKPOINT_PATTERN.match(child.name)
                if match and child.is_dir() and (child / TRAINER_STATE_FILE).is_file():
                    found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def check_shared_filesystem(self) -> None:
        """With several processes, stop unless every rank sees the run folder rank 0 writes to
        (:func:`check_shared_folder`); call it before any slow work."""
        check_shared_folder(self.accelerator, self.run_dir, "the run folder (--working_directory/--experiment_name)")

    def check_fresh_start(self) -> None:
        """Refuse to start a new run over an old one's checkpoints (nothing is overwritten)."""
        existing = self.checkpoints()
        if existing:
            raise UserError(
                f"{self.run_dir} already holds {len(existing)} checkpoint(s) (latest {existing[-1][1].name}); "
                "pass --resume_from_checkpoint latest to continue it, or choose another --experiment_name/--working_directory"
            )

    # -- save ------------------------------------------------------------------------
    def save(self, state: TrainerState) -> Path:
        """Write ``checkpoint_<step>`` atomically and keep the newest ``total_limit``."""
        acc = self.accelerator
        final = self.run_dir / f"checkpoint_{state.step}"
        tmp = self.run_dir / f"checkpoint_{state.step}.tmp"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state.to_json(), indent=2))
        except OSError as err:  # a full disk, a quota, a vanished mount: the older checkpoints stay complete
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            raise UserError(f"{final}: the checkpoint could not be written ({err.strerror or err}); it was removed, "
                            f"and the last complete one, {last.name if last else 'none'}, is untouched: free space "
                            "(or fix the folder) and continue with --resume_from_checkpoint latest") from None
        if acc.is_main_process:
            if final.exists():  # same step saved twice (e.g. a stop right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        if not self.total_limit or self.total_limit < 1:
            return
        found = self.checkpoints()
        for _, path in found[: max(0, len(found) - self.total_limit)]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", path.name, self.total_limit)

    # -- resume ----------------------------------------------------------------------
    def resolve(self, resume_from: Optional[str]) -> Optional[Path]:
        """The checkpoint folder ``--resume_from_checkpoint`` names, or None for a fresh start."""
        if resume_from is None:
            return None
        if resume_from == "latest":
            latest = self.latest()
            if latest is None:
                logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", self.run_dir)
            return latest
        path = Path(resume_from)
        if not path.is_absolute() and not path.exists():
            path = self.run_dir / resume_from
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder")
        if not (path / TRAINER_STATE_FILE).is_file():
            raise UserError(f"--resume_from_checkpoint {resume_from}: {path} is not a complete checkpoint "
                            f"(no {TRAINER_STATE_FILE}; an interrupted save leaves a .tmp folder)")
        return path

    def resume(self, resume_from: Optional[str]) -> TrainerState:
        """Load everything registered with the accelerator from the named checkpoint."""
        path = self.resolve(resume_from)
        if path is None:
            return TrainerState()
        try:
            self.accelerator.load_state(str(path))
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"{path}: checkpoint does not fit this model/config ({str(err).splitlines()[0]})") from None
        data = json.loads((path / TRAINER_STATE_FILE).read_text())
        state = TrainerState(**{k: int(v) for k, v in data.items() if k in TrainerState.__annotations__})
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch,
                    state.batch_in_epoch)
        return state




def check_shared_folder(accelerator, folder: Union[str, Path], what: str) -> None:
    """Every rank must see the files rank 0 writes in ``folder`` (a multi-node run on node-local
    disks would silently save and restore only some ranks' RNG states and cache parts).

    Rank 0 writes a marker with a fresh random token; each rank reads it back; the ranks that cannot
    are gathered and named in one :class:`UserError`, raised on every rank. Nothing to do with one
    process.
    """
    acc = accelerator
    if acc.num_processes == 1:
        return
    import socket
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    folder = Path(folder)
    marker = folder / ".shared_filesystem_check"
    token = [uuid.uuid4().hex if acc.is_main_process else None]
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token[0])
    broadcast_object_list(token, from_process=0)
    acc.wait_for_everyone()
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    blind = [f"rank {rank} on {host}" for rank, host, ok in
             gather_object([(acc.process_index, socket.gethostname(), seen)]) if not ok]
    acc.wait_for_everyone()
    if acc.is_main_process:
        marker.unlink(missing_ok=True)
    if blind:
        raise UserError(f"{folder}: {what} must be on a filesystem every process sees, but {', '.join(blind)} cannot "
                        f"see the file rank 0 wrote there; put it on a shared filesystem (NFS, Lustre, ...)")


def write_resolved_config(accelerator, run_dir: Union[str, Path], config: Mapping[str, Any],
                          filename: str = "config.yaml") -> None:
    """Save the config actually used (after --set) into the run folder (main process)."""
    from modules.config import dump_yaml

    if accelerator.is_main_process:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        dump_yaml(config, Path(run_dir) / filename)


