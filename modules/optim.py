"""Optimizer and learning-rate schedule shared by the trainers.

The LR scheduler is *not* passed to ``accelerator.prepare`` (which would step it once per
process); the training loop steps it once per optimizer step that really updated the weights,
so the schedule is the same for any number of processes and skips fp16 overflow steps.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from modules.errors import UserError

# Devices with torch's fused (multi-tensor, one kernel) Adam/AdamW.
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")
LR_SCHEDULES = ("constant", "linear", "cosine")


def build_adamw(parameters: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(parameters, **kwargs)`` with torch's fused implementation where it exists
    (``parameters``: tensors or parameter groups, as torch takes them).

    The update rule is AdamW's either way; the fused kernel updates all parameters at once instead
    of torch's per-parameter Python loop (the CPU default), which is ~20% of a small UNet's CPU
    training step (``benchmarks/bench_unet.py --optimizer default|fused``). It also takes a
    ``found_inf`` tensor, so a non-finite step is skipped on the device (:mod:`modules.nonfinite`).
    Parameters on any other device type keep the default implementation.
    """
    return _fused_where_possible(torch.optim.AdamW, parameters, **kwargs)


def build_adam(parameters: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Adam:
    """``torch.optim.Adam`` (no decoupled weight decay: stage 0's optimizer), fused as :func:`build_adamw`."""
    return _fused_where_possible(torch.optim.Adam, parameters, **kwargs)


def _fused_where_possible(optimizer_class, parameters: Iterable[Any], **kwargs: Any):
    """``parameters``: tensors, or parameter groups (dicts with ``params`` and their own options)."""
    parameters = list(parameters)
    tensors = [p for item in parameters for p in (item["params"] if isinstance(item, dict) else [item])]
    fused = bool(tensors) and all(
        p.device.type in FUSED_OPTIMIZER_DEVICES and p.is_floating_point() for p in tensors
    )
    return optimizer_class(parameters, fused=True if fused else None, **kwargs)


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
    optimizer = getattr(optimizer, "optimizer", optimizer)  # an AcceleratedOptimizer's torch optimizer
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, schedule, warmup_steps, total_steps, hold_steps, min_ratio)
    )
