"""Training plumbing shared by every stage script: Accelerate set-up, resumable checkpoints,
safetensors export, metric logging, LR schedules.

Nothing here runs a training loop; the stage scripts own their loops (they really differ) and
call these helpers in the same order: parse args -> load config -> :func:`build_accelerator`
-> models / optimizers -> data -> ``accelerator.prepare`` -> :meth:`CheckpointManager.resume`
-> loop (:meth:`CheckpointManager.save`, :class:`MetricsLogger`) -> :func:`export_safetensors`.

Conventions
- A run folder is ``<working_directory>/<experiment_name>/``; it holds ``config.yaml`` (the
  resolved config), ``metrics.jsonl``, ``loss_curve.png`` and ``checkpoint_<step>/`` folders.
- Only the main process writes files; every process calls ``save_state`` (each saves its RNG).
- A checkpoint is written to ``checkpoint_<step>.tmp/`` and renamed when complete, so a kill
  during a save never leaves a broken checkpoint that ``latest`` would pick.
- The LR scheduler is *not* passed to ``accelerator.prepare`` (which would step it once per
  process); scripts step it once per optimizer step, so the schedule is the same for any number
  of processes, and register it for checkpointing.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from modules.errors import UserError

logger = logging.getLogger("ldm")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
EXPORT_FORMAT = "ldm-toolkit/1"
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16", "auto")


# ----------------------------------------------------------------------------------------
# Logging and command line
# ----------------------------------------------------------------------------------------

def setup_logging(is_main_process: bool = True) -> None:
    """One logger for the toolkit: INFO on the main process, warnings only elsewhere."""
    level = logging.INFO if is_main_process else logging.WARNING
    root = logging.getLogger("ldm")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.propagate = False
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_training_args(parser: argparse.ArgumentParser, with_overrides: bool = True) -> None:
    """Flags every trainer takes beyond the tutorial's own (DESIGN: 'Beyond the tutorial').

    ``with_overrides=False`` for a trainer configured by flags alone (stage 0), where ``--set``
    would have no YAML to override.
    """
    group = parser.add_argument_group("run control (all trainers)")
    group.add_argument("--resume_from_checkpoint", default=None, metavar="latest|DIR",
                       help="continue from the newest checkpoint of this run ('latest') or from a checkpoint folder")
    group.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, else 0)")
    group.add_argument("--log_wandb", action=argparse.BooleanOptionalAction, default=None,
                       help="log to Weights & Biases (works offline with WANDB_MODE=offline)")
    if with_overrides:
        group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config key, e.g. --set training_args.learning_rate=1e-4 (repeatable)")
    group.add_argument("--stop_after_steps", type=int, default=None, metavar="N",
                       help="save a checkpoint and stop after N optimizer steps in this invocation "
                            "(for wall-time-limited jobs; continue with --resume_from_checkpoint latest)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value



# ----------------------------------------------------------------------------------------
# Accelerator
# ----------------------------------------------------------------------------------------

def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """Map a requested precision to what the device can do, saying so when it differs.

    ``auto`` means bf16 where supported, else fp16 on CUDA. On a CPU, fp16 autocast is not
    supported, so any mixed precision runs as bf16 autocast (logged).
    """
    if requested not in MIXED_PRECISION_CHOICES:
        raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {requested!r}")
    if requested == "no":
        return "no"
    if cpu:
        if requested != "bf16":
            logger.warning("mixed precision %s on a CPU: running bf16 autocast instead (fp16 autocast needs a GPU)",
                           requested)
        return "bf16"
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    return requested


def build_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    log_wandb: bool = False,
    project_dir: Optional[Union[str, Path]] = None,
):
    """An :class:`accelerate.Accelerator` set up the same way for every stage.

    Seeds every RNG with ``seed`` (same on all processes, so models start identical); the data
    order comes from a seedable sampler (``data_seed=seed``) that ``set_epoch`` advances, so a
    resumed run sees the same batches.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    precision = resolve_mixed_precision(mixed_precision, cpu)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with="wandb" if log_wandb else None,
        project_dir=str(project_dir) if project_dir is not None else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        step_scheduler_with_optimizer=False,
    )
    setup_logging(accelerator.is_main_process)
    set_seed(seed)
    if accelerator.is_main_process:
        logger.info(
            "device %s, %d process(es), mixed precision %s%s, gradient accumulation %d",
            accelerator.device, accelerator.num_processes, precision,
            " (fp32 weights, bf16 autocast)" if precision == "bf16" else "",
            gradient_accumulation_steps,
        )
    return accelerator


def seed_per_process(accelerator, seed: int) -> None:
    """Give each process its own random stream for noise/augmentations (after models are built)."""
    from accelerate.utils import set_seed

    set_seed(seed + accelerator.process_index)


def build_dataloader(dataset, batch_size: int, shuffle: bool, num_workers: int, drop_last: bool,
                     seed: int, collate_fn=None) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling and worker seeds come from its own generator, not the
    global RNG, so that creating an iterator never shifts the training randomness (exact resume)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,  # no re-spawn of many workers every epoch
        generator=generator,
        collate_fn=collate_fn,
    )


def gather_mean(accelerator, values: Mapping[str, Union[float, torch.Tensor]]) -> Dict[str, float]:
    """Mean of each scalar over all processes (what every process would log alone is not enough)."""
    if not values:
        return {}
    keys = list(values)
    local = torch.tensor([float(values[k]) for k in keys], device=accelerator.device, dtype=torch.float64)
    gathered = accelerator.gather(local.unsqueeze(0)).reshape(-1, len(keys))
    means = gathered.mean(dim=0).tolist()
    return dict(zip(keys, means))


# ----------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------

# Devices with torch's fused (multi-tensor, one kernel) Adam/AdamW.
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def build_adamw(parameters: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(parameters, **kwargs)`` with torch's fused implementation where it exists.

    The update rule is AdamW's either way; the fused kernel updates all parameters at once instead
    of torch's per-parameter Python loop (the CPU default), which is ~20% of a small UNet's CPU
    training step (``benchmarks/bench_unet.py --optimizer default|fused``). Parameters on any other
    device type keep the default implementation.
    """
    parameters = list(parameters)
    fused = bool(parameters) and all(
        p.device.type in FUSED_OPTIMIZER_DEVICES and p.is_floating_point() for p in parameters
    )
    return torch.optim.AdamW(parameters, fused=True if fused else None, **kwargs)


# ----------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int,
                  hold_steps: int = 0, min_ratio: float = 0.0) -> float:
    """LR factor at optimizer step ``step``: linear warm-up, an optional hold at full LR, then
    ``constant``, ``linear`` or ``cosine`` decay to ``min_ratio`` at ``total_steps``."""
    if schedule not in LR_SCHEDULES:
        raise UserError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = max(warmup_steps, hold_steps)
    if schedule == "constant" or step < decay_start:
        return 1.0
    span = max(1, total_steps - decay_start)
    progress = min(1.0, (step - decay_start) / span)
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                       hold_steps: int = 0, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_multiplier`; step it once per optimizer step (not per process)."""
    lr_multiplier(0, schedule, warmup_steps, total_steps)  # validates the name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, schedule, warmup_steps, total_steps, hold_steps, min_ratio)
    )


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

@dataclass
class TrainerState:
    """Counters saved beside ``accelerator.save_state``: where the loop was."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed

    def to_json(self) -> Dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


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
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state.to_json(), indent=2))
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


class StatefulValue:
    """Wraps a dict of plain values so ``accelerator.register_for_checkpointing`` can save it."""

    def __init__(self, **values: Any):
        self.values = dict(values)

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values.update(state)


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

def export_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, Path], kind: str,
                       metadata: Mapping[str, Any]) -> Path:
    """Write final weights to a self-describing safetensors file (atomically).

    Every metadata value is stored JSON-encoded (safetensors metadata is str -> str), plus
    ``format`` and ``kind`` so readers can check what they were given.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": EXPORT_FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update({key: json.dumps(value) for key, value in metadata.items()})
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(contiguous, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_export_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The decoded metadata of a safetensors file written by :func:`export_safetensors`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    decoded: Dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("format", "kind", "created"):
            decoded[key] = value
            continue
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def read_export(path: Union[str, Path], expected_kind: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Tensors and decoded metadata of an export; ``expected_kind`` is checked when given."""
    from safetensors.torch import load_file

    metadata = read_export_metadata(path)
    if expected_kind is not None and metadata.get("kind") not in (None, expected_kind):
        raise UserError(f"{path}: holds a {metadata.get('kind')!r} export, expected {expected_kind!r}")
    return load_file(str(path)), metadata


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------

class MetricsLogger:
    """Appends gathered metrics to ``<run>/metrics.jsonl`` (main process), mirrors them to the
    accelerator's trackers (wandb), and draws ``loss_curve.png`` at the end."""

    def __init__(self, accelerator, run_dir: Union[str, Path], use_wandb: bool = False,
                 project_name: str = "ldm", run_name: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.use_wandb = use_wandb
        if use_wandb:
            init_kwargs = {"wandb": {"dir": str(self.run_dir)}}
            if run_name:
                init_kwargs["wandb"]["name"] = run_name
            accelerator.init_trackers(project_name, config=dict(config or {}), init_kwargs=init_kwargs)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint (they belong to the lost part of the run)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record already-gathered scalar metrics at ``step``."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.use_wandb:
            self.accelerator.log(dict(metrics), step=step)

    def log_images(self, name: str, image_path: Union[str, Path], step: int) -> None:
        """Send an image file written by the main process to wandb (no-op without it)."""
        if not (self.use_wandb and self.accelerator.is_main_process):
            return
        import wandb

        tracker = self.accelerator.get_tracker("wandb", unwrap=True)
        tracker.log({name: wandb.Image(str(image_path))}, step=step)

    def read(self) -> List[Dict[str, float]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, keys: Sequence[str], filename: str = "loss_curve.png") -> Optional[Path]:
        """Plot ``keys`` against step from metrics.jsonl (main process); returns the PNG path."""
        if not self.accelerator.is_main_process:
            return None
        records = self.read()
        series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.4 * len(series)), squeeze=False)
        for ax, (key, points) in zip(axes[:, 0], series.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, linewidth=1.0)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            positive = all(v > 0 for v in values)
            if positive and max(values) / max(min(values), 1e-12) > 50:
                ax.set_yscale("log")
        axes[-1, 0].set_xlabel("optimizer step")
        fig.tight_layout()
        out = self.run_dir / filename
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def finish(self) -> None:
        if self.use_wandb:
            self.accelerator.end_training()


def progress_bar(accelerator, total: int, initial: int = 0, desc: str = "train", iterable=None):
    """A tqdm bar shown on the main process only (wrapping ``iterable`` when given)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True, leave=True)


def describe_run(script: str, argv: Sequence[str]) -> Dict[str, Any]:
    """What produced an export: script, command line and library versions."""
    import accelerate

    return {
        "script": script,
        "argv": list(argv),
        "torch": str(torch.__version__),
        "accelerate": accelerate.__version__,
    }


def write_resolved_config(accelerator, run_dir: Union[str, Path], config: Mapping[str, Any],
                          filename: str = "config.yaml") -> None:
    """Save the config actually used (after --set) into the run folder (main process)."""
    from modules.config import dump_yaml

    if accelerator.is_main_process:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        dump_yaml(config, Path(run_dir) / filename)


def unwrap_state_dict(accelerator, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The plain module's state dict (no DDP/compile prefixes), on the CPU."""
    plain = accelerator.unwrap_model(model)
    return {k: v.detach().cpu() for k, v in plain.state_dict().items()}
