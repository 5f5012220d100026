"""What the speed benchmarks share: the device, timing syncs, torch.compile of both sides, model
FLOPs and MFU, and tables printed as markdown (and optionally written as JSON for
``benchmarks/report.py``). torch.compile and TF32 are the trainers' own (``modules/performance.py``:
``compile_modules`` compiles in place with static shapes; both sides of a comparison get the same call).

MFU (model FLOPs utilisation) = FLOPs of one training step / seconds per step / the device's
peak. The FLOPs are counted once, on one eager step, with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and fused attention, forward and backward; elementwise work is not
counted, as in every MFU figure). The peak is ``--peak_tflops`` when given, else the device's known
dense bf16 rate from ``modules.metrics.device_peak_tflops`` (no peak is known for a CPU: no MFU).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """``--compile``, ``--compile_mode``, ``--peak_tflops``, ``--tf32`` and ``--json``."""
    group = parser.add_argument_group("compile, MFU, output")
    group.add_argument("--compile", action="store_true", help="torch.compile both sides (same mode) before timing")
    group.add_argument("--compile_mode", choices=COMPILE_MODES, default="default")
    group.add_argument("--peak_tflops", type=float, default=None,
                       help="peak TFLOP/s for MFU (default: the device's known dense bf16 rate; none on a CPU)")
    group.add_argument("--tf32", action="store_true", help="TF32 for float32 matmuls and convolutions (CUDA)")
    group.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")


def peak_tflops(device: torch.device, given: Optional[float] = None) -> Optional[float]:
    """``given``, else the trainers' ``modules.metrics.device_peak_tflops(device)`` (imported lazily:
    None where that helper or a known rate for the device is missing)."""
    if given:
        return given
    try:
        from modules.metrics import device_peak_tflops
    except ImportError:
        return None
    return device_peak_tflops(device)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (run eagerly once under FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops: int, seconds: float, peak: Optional[float]) -> Optional[float]:
    """Achieved / peak FLOP rate, or None without a peak."""
    if not peak or not flops or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)


def fmt(value: Optional[float], spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded so that it also reads as plain text."""
    cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    """Write ``payload`` (the benchmark's results) to ``path`` when given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
