"""What the trainer benchmarks train on, built offline from our configs with random weights:
a captioned ``shapes`` folder, a VAE export, a CLIP text model with a real tokenizer, an LPIPS
export, a diffusers-format pipeline folder of the same model, and the launcher of a trainer.

Random weights cost what trained ones cost, so speed figures carry over; nothing is downloaded.
Used by bench_trainer.py, bench_diffusers_t2i.py, bench_loader.py and bench_sampling.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The offline environment of every launched run.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
               "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Model sizes: the tutorial's (configs/ldm.yaml, 256 px, a CLIP-L-shaped text encoder) and the demo's
# (configs/demo/ldm_shapes.yaml, 32 px, a 2-layer CLIP) for a CPU.
MODEL_CONFIGS = {"tutorial": "configs/ldm.yaml", "quick": "configs/demo/ldm_shapes.yaml"}
CLIP_LAYERS = {"tutorial": 12, "quick": 2}


def load_model_config(path: str, overrides: Sequence[str] = ()):
    """configs/ldm.yaml-style model config (modules.model_config.LDMConfig), ``--set``-style overrides applied."""
    from modules.model_config import load_ldm_config

    return load_ldm_config(REPO / path if not Path(path).is_absolute() else path, overrides)


def shapes_folder(root: Path, num_images: int, img_size: int) -> Path:
    """``num_images`` captioned shapes as ``<i>.png`` + ``<i>.txt`` (what our trainers read), made once."""
    from modules.shapes import write_shapes_folder

    folder = root / f"shapes_{num_images}_{img_size}px"
    if not (folder / "done").exists():
        write_shapes_folder(folder, num_images, img_size, seed=0, overwrite=True)
        (folder / "done").write_text("")
    return folder


def imagefolder_dataset(root: Path, shapes: Path) -> Path:
    """The same images in the layout of Hugging Face ``imagefolder`` (what diffusers' example
    scripts read with ``--train_data_dir``): links to the images plus ``metadata.jsonl`` of
    ``{"file_name", "text"}`` rows."""
    folder = root / f"{shapes.name}_imagefolder"
    if (folder / "metadata.jsonl").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for image in sorted(shapes.glob("*.png")):
        link = folder / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
        rows.append(json.dumps({"file_name": image.name, "text": image.with_suffix(".txt").read_text()}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def clip_folder(root: Path, hidden_size: int, layers: int) -> Path:
    """A random-init CLIP text model of width ``hidden_size`` (CLIP-L: 768, 12 layers, 12 heads) with a
    real CLIPTokenizer over the shapes words (modules.text_encoder.build_tiny_clip)."""
    from modules.shapes import COLOR_NAMES, SHAPE_NAMES
    from modules.text_encoder import build_tiny_clip

    folder = root / f"clip_{hidden_size}x{layers}"
    if not (folder / "config.json").exists():
        words = " ".join(list(COLOR_NAMES) + list(SHAPE_NAMES) + ["a", "on", "background"])
        heads = max(1, hidden_size // 64)
        build_tiny_clip(folder, [words], hidden_size=hidden_size, layers=layers, heads=heads)
    return folder


def vae_export(root: Path, vae_config, scaling_factor: float = 0.18215) -> Path:
    """A random-init KL-VAE of ``vae_config`` as a stage-1 export (what stage 2 loads), with
    ``scaling_factor`` as its latent scale on every dataset (compute_vae_scaling.py's per-dataset
    ``scaling_factors``)."""
    import torch

    from modules.autoencoder import build_autoencoder
    from modules.image_datasets import DATASET_NAMES
    from modules.vae_io import SCALING_FACTORS_KEY, save_vae_export

    path = root / f"vae_{'x'.join(map(str, vae_config.vae_channels_per_block))}_{vae_config.img_size}px_s{scaling_factor}.safetensors"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_autoencoder(vae_config)
        save_vae_export(model, vae_config, path, {SCALING_FACTORS_KEY: {name: scaling_factor for name in DATASET_NAMES}})
    return path


def lpips_export(root: Path, backbone: str) -> Path:
    """A random-init LPIPS of ``backbone`` as a stage-0 export (what stage 1's lpips_checkpoint names)."""
    from modules.lpips import LPIPS, save_lpips_export

    path = root / f"lpips_{backbone}.pt"
    if not path.with_suffix(".safetensors").exists():
        save_lpips_export(LPIPS(backbone, pretrained_backbone=False), path)
    return path.with_suffix(".safetensors")


# ----------------------------------------------------------------------------------------
# The same model as diffusers classes
# ----------------------------------------------------------------------------------------

_DOWN = {"AttnDown": "CrossAttnDownBlock2D", "Down": "DownBlock2D"}
_UP = {"AttnUp": "CrossAttnUpBlock2D", "Up": "UpBlock2D"}
_MID = {"AttnMid": "UNetMidBlock2DCrossAttn", "Mid": "UNetMidBlock2D"}
_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def diffusers_unet_kwargs(unet) -> Dict[str, object]:
    """Keyword arguments of diffusers' UNet2DConditionModel with the architecture of our
    ``unet:`` config (modules.unet.UNetConfig; ours is that model with linear projections)."""
    if unet.unet_up_down_factor != 2 or unet.unet_up_down_kernel_size != 3 or unet.class_conditioning:
        raise SystemExit("diffusers' UNet2DConditionModel has factor-2 / kernel-3 resampling and no class embedding "
                         "here: use a config with unet_up_down_factor 2, unet_up_down_kernel_size 3, text conditioning")
    channels = list(unet.unet_channels_per_block)
    return dict(
        in_channels=unet.in_channels, out_channels=unet.out_channels,
        down_block_types=tuple(_DOWN[b] for b in unet.down_block_types),
        mid_block_type=_MID[unet.mid_block_type],
        up_block_types=tuple(_UP[b] for b in unet.up_block_types),
        block_out_channels=tuple(channels), layers_per_block=unet.unet_residual_layers_per_block,
        transformer_layers_per_block=unet.transformer_blocks_per_layer,
        cross_attention_dim=unet.text_embed_dim,
        attention_head_dim=unet.num_attention_heads,  # diffusers' SD naming: this is the number of heads
        norm_num_groups=unet.groupnorm_groups, norm_eps=unet.norm_eps,
        flip_sin_to_cos=unet.flip_sin_to_cos, freq_shift=int(unet.freq_shift),
        time_embedding_dim=unet.time_embed_proj_dim, use_linear_projection=True,
    )


def diffusers_pipeline_folder(root: Path, ldm, clip: Path, img_size: int, scaling_factor: float = 0.18215) -> Path:
    """A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) of our model config ``ldm`` with random weights: the VAE is ours exported
    (modules.autoencoder.export_diffusers_vae, so ``vae/`` also serves our stage 2), the text
    encoder and tokenizer are ``clip``'s."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from modules.autoencoder import AutoencoderKL, export_diffusers_vae

    folder = root / f"diffusers_{ldm.unet.unet_channels_per_block[0]}_{img_size}px"
    if not (folder / "model_index.json").exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ours_vae = AutoencoderKL(ldm.vae)
            unet = UNet2DConditionModel(sample_size=img_size // 2 ** (len(ldm.vae.vae_channels_per_block) - 1),
                                        **diffusers_unet_kwargs(ldm.unet))
        export_diffusers_vae(ours_vae, root / "vae_tmp", scaling_factor)
        d = ldm.diffusion
        scheduler = DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=_BETAS[d.beta_schedule],
                                  beta_start=d.beta_start, beta_end=d.beta_end, prediction_type=d.prediction_type,
                                  clip_sample=False)
        pipeline = StableDiffusionPipeline(
            vae=DiffusersAutoencoderKL.from_pretrained(root / "vae_tmp"), text_encoder=CLIPTextModel.from_pretrained(clip),
            tokenizer=CLIPTokenizer.from_pretrained(clip), unet=unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipeline.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------
# Launching runs
# ----------------------------------------------------------------------------------------

def run_env(device: str, threads: int = 0) -> Dict[str, str]:
    """The environment of a launched run: offline; ``cpu`` hides the GPUs."""
    env = {**os.environ, **OFFLINE_ENV}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def accelerate_launch(script: Path, args: Sequence[str], launcher: str = "accelerate") -> List[str]:
    """The command a user types: ``accelerate launch <script> ...`` on one process (or plain python)."""
    if launcher == "python":
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no", str(script), *args]


def set_flags(sets: Mapping[str, object], extra: Sequence[str] = ()) -> List[str]:
    """``--set key=value`` flags of a trainer (``extra``: more ``key=value`` strings)."""
    flags: List[str] = []
    for item in [f"{key}={value}" for key, value in sets.items()] + list(extra):
        flags += ["--set", item]
    return flags


def timing_only_sets(root: Path, stage: int = 2) -> Dict[str, object]:
    """Overrides that keep a timed trainer run to training: no periodic checkpoints or validation, and
    (stage 2) the final sample grid as small as it gets (one prompt, one image, two steps)."""
    sets: Dict[str, object] = {"training_args.checkpoint_iterations": 10 ** 6,
                               "training_args.val_generation_freq": 10 ** 6}
    if stage == 2:
        prompts = root / "prompt.txt"
        prompts.write_text("a red circle on a blue background\n")
        sets.update({"training_args.sample_prompts_file": str(prompts), "training_args.num_samples_per_condition": 1,
                     "training_args.num_inference_steps": 2})
    return sets


def run_with_progress(argv: Sequence[str], log: Path, env: Mapping[str, str], bar: str, cwd: Optional[Path] = None,
                      timeout: Optional[float] = None) -> Tuple[float, List[Tuple[float, int]]]:
    """Run ``argv`` with its output in ``log``, reading its progress bar (tqdm, description ``bar``) as
    it is drawn: returns (wall seconds, [(seconds since start, step)] for the first time each step is
    shown), timed by this process's clock whatever the script reports. A failure or a timeout exits
    with the log's tail."""
    pattern = re.compile(re.escape(bar) + r":\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
    log.parent.mkdir(parents=True, exist_ok=True)
    seen: Dict[int, float] = {}
    started = time.perf_counter()
    with log.open("wb") as handle:
        handle.write((" ".join(argv) + "\n\n").encode())
        process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        watchdog = threading.Timer(timeout, process.kill) if timeout else None
        if watchdog is not None:
            watchdog.start()
        pending = b""
        try:
            for chunk in iter(lambda: process.stdout.read1(65536), b""):
                now = time.perf_counter() - started
                handle.write(chunk)
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)
                for line in lines:
                    match = pattern.search(line.decode(errors="replace"))
                    if match:
                        seen.setdefault(int(match.group(1)), now)
        finally:
            if process.poll() is None:
                process.kill()
            code = process.wait()
            if watchdog is not None:
                watchdog.cancel()
    if timeout and time.perf_counter() - started >= timeout:
        raise SystemExit(f"run killed after {timeout:.0f}s (timeout), log {log}")
    wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"run failed (exit {code}), log {log}:\n{tail}")
    return wall, sorted((t, n) for n, t in seen.items())


def steady_rate(progress: List[Tuple[float, int]], skip_steps: int, images_per_step: int) -> Optional[float]:
    """Images/s between the first step shown at or after ``skip_steps`` and the last step shown."""
    after = [(t, n) for t, n in progress if n >= skip_steps]
    if len(after) < 2 or after[-1][1] <= after[0][1]:
        return None
    (t0, n0), (t1, n1) = after[0], after[-1]
    return (n1 - n0) * images_per_step / max(t1 - t0, 1e-9)


def metrics_windows(metrics_file: Path) -> List[Dict[str, float]]:
    """The logging windows of a run's metrics.jsonl that carry a speed, the first (warm-up, compile) dropped
    (kept when it is the only one)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    records = [r for r in records if "images_per_second" in r]
    return records[1:] or records
