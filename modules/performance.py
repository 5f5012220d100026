"""The speed settings every trainer shares: ``torch.compile``, channels_last, TF32.

- ``compile`` (``training_args.compile``, stage 0's ``--compile``): :func:`compile_modules` compiles
  the networks of a step, trained and frozen, in place (``nn.Module.compile``: the module, its
  parameters and its state-dict keys stay the same, so checkpoints, EMA and exports do not see it).
  Shapes are static (``dynamic=False``): the images of a run have one size, and captions come in
  at most five length buckets (:mod:`modules.batching`), one compile each. (Dynamic shapes would
  compile once, but torch 2.14's inductor miscompiles the backward of the UNet's cross-attention
  when the caption length varies.) :func:`check_compile_supported` says in one line why compiling
  cannot work here, before any slow work.
- ``channels_last``: the convolutional networks and their input images in NHWC memory layout,
  what cuDNN's fastest bf16/fp16 convolution kernels use (measure: ``benchmarks/bench_stage1.py
  --channels_last``).
- TF32 (``allow_tf32``): float32 matmuls and convolutions on NVIDIA GPUs (Ampere and newer) run
  on tensor cores with a 10-bit mantissa, as PyTorch's cuDNN convolutions already do by default;
  it matters for whatever runs in float32 (``mixed_precision: no``, the parts autocast keeps in
  float32). Set in :func:`modules.accelerator.build_accelerator`.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional, Union

import torch

from modules.errors import UserError

logger = logging.getLogger("ldm")

# Recompiles allowed per compiled function: 5 caption-length buckets x train/eval, with room to spare.
RECOMPILE_LIMIT = 32


@dataclass
class SpeedArgs:
    """The speed keys of a YAML trainer's ``training_args`` (stages 1 and 2), one meaning everywhere.

    compile: torch.compile the step's networks (:func:`compile_modules`). compile_mode: its mode.
    channels_last: convolutional networks and their inputs in NHWC layout.
    allow_tf32: TF32 tensor cores for float32 matmuls/convolutions on GPUs.
    peak_tflops: one device's peak TFLOP/s for the logged MFU; null: the device's known dense bf16
    peak (:func:`modules.metrics.device_peak_tflops`), none on a CPU (MFU then is not logged).
    """

    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: bool = False
    allow_tf32: bool = True
    peak_tflops: Optional[float] = None

    def check_speed_keys(self) -> None:
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0 or null (the device's known peak), got {self.peak_tflops}")

    def resolved_peak_tflops(self, device: torch.device) -> Optional[float]:
        from modules.metrics import device_peak_tflops

        return self.peak_tflops if self.peak_tflops is not None else device_peak_tflops(device)


def check_compile_supported(device: torch.device) -> None:
    """Raise a one-line :class:`UserError` when ``torch.compile`` cannot work on ``device`` here."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"compile is true, but torch.compile does not support Python "
                        f"{sys.version_info.major}.{sys.version_info.minor} with torch {torch.__version__}: "
                        "set training_args.compile to false")
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if compiler is None or shutil.which(compiler) is None:
            raise UserError("compile is true, but torch.compile on a CPU needs a C++ compiler (g++ or clang++) "
                            "on the PATH, or CXX set to one: install one, or set training_args.compile to false")
    elif device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            raise UserError(f"compile is true, but torch.compile's GPU code generator (Triton) needs compute "
                            f"capability 7.0 or newer; {torch.cuda.get_device_name(device)} has {major}.{minor}: "
                            "set training_args.compile to false")
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserError("compile is true, but torch.compile on a GPU needs the triton package "
                            "(pip install triton, the version your torch names): or set training_args.compile "
                            "to false") from None


def compile_modules(modules: Iterable[Optional[torch.nn.Module]], device: torch.device, mode: str = "default",
                    backend: Union[str, Callable] = "inductor") -> None:
    """Compile each module's forward in place (None entries are skipped); see the module docstring.

    ``backend``: torch.compile's; ``aot_eager`` traces and runs the same graphs (forward and
    backward) without generating kernels: for finding whether a problem is in the tracing or in
    inductor's code, and for tests that cannot afford inductor's C++ compile times on a CPU."""
    import torch._dynamo

    import torch._inductor.config

    check_compile_supported(device)
    # Random ops inside compiled graphs (the VAE's posterior sample, dropout) draw from torch's own
    # generator, as in eager mode: the same numbers for the same seed, so a compiled run resumes
    # exactly and matches an eager one (inductor's own generator would draw other numbers).
    torch._inductor.config.fallback_random = True
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed between torch releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    compiled = []
    for module in modules:
        if module is not None:
            module.compile(dynamic=False, backend=backend, **({"mode": mode} if backend == "inductor" else {}))
            compiled.append(type(module).__name__)
    logger.info("torch.compile (mode %s) of %s: the first steps compile (minutes for large models)",
                mode, ", ".join(compiled))


def to_channels_last(modules: Iterable[Optional[torch.nn.Module]]) -> None:
    """Put the 4-d weights of each module in channels_last layout (in place; None entries skipped)."""
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions (no effect without a GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
