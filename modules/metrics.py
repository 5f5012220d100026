"""What a run reports: ``metrics.jsonl`` (gathered means per logging step), the same numbers in
Weights & Biases (one wandb run per run folder, resumed with it), ``loss_curve.png``, and the
progress bar."""
from __future__ import annotations

import json
import secrets
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

logger = logging.getLogger("ldm")

WANDB_ID_FILE = "wandb_run_id.txt"

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets, by a substring
# of torch.cuda.get_device_name(). The first match wins, so longer names come first. For MFU
# (model FLOPs utilisation, Chowdhery et al. 2022): achieved model FLOP/s over this peak. The
# rate a card really sustains is lower (an H100 SXM's large bf16 matmuls reach ~790 of its 989);
# set ``peak_tflops`` to your own measurement to compare against that instead.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A6000", 155.0), ("A40", 150.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)


def device_peak_tflops(device) -> Optional[float]:
    """The known dense bf16 (fp16 on cards without bf16: V100, T4) peak of a CUDA ``device`` in
    TFLOP/s, or None (a CPU, an unknown card)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def wandb_run_id(run_dir: Path, is_main_process: bool, resumed: bool) -> str:
    """The id of this run folder's wandb run: a resumed run reads it from ``<run>/wandb_run_id.txt``
    and continues that wandb run; a fresh start (no checkpoint to continue) makes a new one and
    writes it there."""
    path = run_dir / WANDB_ID_FILE
    if resumed and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)  # wandb run ids: letters and digits
    if is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    """Appends gathered metrics to ``<run>/metrics.jsonl`` (main process), mirrors them to the
    accelerator's trackers (wandb), and draws ``loss_curve.png`` at the end."""

    def __init__(self, accelerator, run_dir: Union[str, Path], use_wandb: bool = False,
                 project_name: str = "ldm", run_name: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, resumed: bool = False):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.use_wandb = use_wandb
        if use_wandb:
            # The same wandb run across resumes: its id lives in the run folder.
            run_id = wandb_run_id(self.run_dir, accelerator.is_main_process, resumed)
            init_kwargs = {"wandb": {"dir": str(self.run_dir), "id": run_id, "resume": "allow"}}
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
