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
# Not a config value: what stage 0's bare ``--mixed_precision`` (the tutorial's) asks for, the
# device's fast 16-bit autocast, whichever that is (:func:`resolve_mixed_precision`).
HALF_PRECISION = "half"


def uses_cpu() -> bool:
    """Whether Accelerate will run on the CPU (no CUDA, or ACCELERATE_USE_CPU set)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (x86: AVX512, or AVX-NE-CONVERT; ARM: BF16).

    Without them, bf16 convolutions and matmuls fall back to reference code: on an AVX2-only AMD
    EPYC, a VGG16 trunk on 25 images of 64 px took 68 s under bf16 autocast against 0.9 s in float32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(requested: Union[str, bool], cpu: bool) -> str:
    """Map a requested precision to what the device can do, saying so when it differs.

    ``auto``: bf16 on GPUs that have it, fp16 on older GPUs, ``no`` (float32) on a CPU, where
    autocast is rarely faster. ``half`` (stage 0's bare flag): the GPU's 16-bit type as for
    ``auto``, and bf16 on a CPU that oneDNN has bf16 kernels for. An explicit ``fp16`` on a CPU
    runs bf16 autocast (CPU autocast has no fp16), and says so. ``half`` and ``fp16`` on a CPU
    without bf16 kernels run float32, with a warning: bf16 falls back to reference code there,
    tens of times slower, the opposite of what was asked for. An explicit ``bf16`` is kept on
    any CPU (it may be wanted for its numerics), with a warning. YAML 1.1 reads a bare ``no`` as
    false: false means ``no``.
    """
    if requested is False:
        requested = "no"
    if requested not in MIXED_PRECISION_CHOICES + (HALF_PRECISION,):
        raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {requested!r}")
    if not cpu:
        if requested in ("auto", HALF_PRECISION):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested in ("auto", "no"):
        return "no"
    if cpu_has_bf16_kernels():
        if requested == "fp16":
            logger.warning("mixed precision fp16 on a CPU: running bf16 autocast instead (fp16 autocast needs a GPU)")
        return "bf16"
    if requested == "bf16":
        logger.warning("mixed precision bf16 on a CPU without bf16 kernels (oneDNN needs AVX512 for them): "
                       "it falls back to reference code and runs many times slower than float32")
        return "bf16"
    logger.warning("mixed precision %s on a CPU without bf16 kernels (oneDNN needs AVX512 for them): running float32, "
                   "since bf16 falls back to reference code there, many times slower (ask for bf16 to have it anyway)",
                   requested)
    return "no"


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

    setup_logging(os.environ.get("RANK", "0") == "0")  # resolve_mixed_precision's warnings, said once
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
