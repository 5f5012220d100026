"""The Accelerate set-up every trainer shares: precision, seeding, gathered means.

Everything here works for any number of processes (one CPU, one GPU, DDP over many GPUs and
nodes): the models start identical on every process (same seed), each process then draws its
own noise (:func:`seed_per_process`), and logged numbers are means over all processes
(:func:`gather_mean`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

from modules.cli import setup_logging
from modules.errors import UserError
from modules.performance import set_tf32

logger = logging.getLogger("ldm")

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16", "auto")


def uses_cpu() -> bool:
    """Whether Accelerate will run on the CPU (no CUDA, or ACCELERATE_USE_CPU set)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def resolve_mixed_precision(requested: Union[str, bool], cpu: bool) -> str:
    """Map a requested precision to what the device can do, saying so when it differs.

    ``auto``: bf16 on GPUs that have it, fp16 on older GPUs, ``no`` (float32) on a CPU, where
    autocast is rarely faster. An explicit ``fp16`` on a CPU runs bf16 autocast (CPU autocast
    has no fp16), and says so. YAML 1.1 reads a bare ``no`` as false: false means ``no``.
    """
    if requested is False:
        requested = "no"
    if requested not in MIXED_PRECISION_CHOICES:
        raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {requested!r}")
    if requested == "auto":
        if cpu:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and cpu:
        logger.warning("mixed precision fp16 on a CPU: running bf16 autocast instead (fp16 autocast needs a GPU)")
        return "bf16"
    return requested


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen networks are kept in under a resolved ``mixed_precision``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def build_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    log_wandb: bool = False,
    project_dir: Optional[Union[str, Path]] = None,
    allow_tf32: bool = True,
):
    """An :class:`accelerate.Accelerator` set up the same way for every stage.

    Seeds every RNG with ``seed`` (same on all processes, so models start identical). The data
    order does not come from Accelerate: training loaders use
    :class:`modules.data_loading.EpochSampler`, a pure function of (seed, epoch). ``allow_tf32``:
    float32 matmuls and convolutions on TF32 tensor cores (GPUs only; :mod:`modules.performance`).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    precision = resolve_mixed_precision(mixed_precision, uses_cpu())
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with="wandb" if log_wandb else None,
        project_dir=str(project_dir) if project_dir is not None else None,
        # Prepared loaders copy batches to the device asynchronously (from pinned memory on GPUs).
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        step_scheduler_with_optimizer=False,
    )
    setup_logging(accelerator.is_main_process)
    set_seed(seed)
    gpu = accelerator.device.type == "cuda"
    if gpu:
        set_tf32(allow_tf32)
    if accelerator.is_main_process:
        logger.info(
            "device %s%s, %d process(es), mixed precision %s%s (asked: %s), gradient accumulation %d%s",
            accelerator.device, f" ({torch.cuda.get_device_name(accelerator.device)})" if gpu else "",
            accelerator.num_processes, precision,
            " (fp32 weights, bf16 autocast)" if precision == "bf16" else "", mixed_precision,
            gradient_accumulation_steps, f", TF32 {'on' if allow_tf32 else 'off'}" if gpu else "",
        )
    return accelerator


def seed_per_process(accelerator, seed: int) -> None:
    """Give each process its own random stream for noise/augmentations (after models are built)."""
    from accelerate.utils import set_seed

    set_seed(seed + accelerator.process_index)


def gather_mean(accelerator, values: Mapping[str, Union[float, torch.Tensor]]) -> Dict[str, float]:
    """Mean of each scalar over all processes (what one process saw alone is not enough).

    Tensors stay on their device until here: one stack, one gather, one host sync for all keys.
    """
    if not values:
        return {}
    keys = list(values)
    local = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=accelerator.device).reshape(())
                         for k in keys])
    gathered = accelerator.gather(local.unsqueeze(0)).reshape(-1, len(keys))
    means = gathered.mean(dim=0).tolist()
    return dict(zip(keys, means))
