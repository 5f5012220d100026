"""Stage 2: train the latent diffusion UNet with DDPM on the frozen VAE's scaled latents.

Latent Diffusion (Rombach et al. 2022, sec. 3.3): images are encoded once more by the frozen
stage-1 autoencoder, the latents are scaled to unit variance (``scaling_constants[<dataset>]``
of the model config, else the VAE export's factor for ``<dataset>`` from compute_vae_scaling.py,
else a diffusers VAE folder's own ``scaling_factor``, else an error naming the command that
computes it; never another dataset's factor), and a UNet
learns to predict the noise (or v, or x0) of ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``
(DDPM, Ho et al. 2020, eq. 14). What it is conditioned on follows the dataset:

- text (``conceptual_captions``, ``shapes``): the last hidden states of a frozen (or trainable)
  CLIP text encoder, through cross-attention with the padding masked; captions pre-encoded by
  ``prep_cc.py`` (column ``text_embeddings``) are used when present;
- class (``imagenet``): a class embedding added to the time embedding;
- none (``celebahq``, ``ffhq``, ``celeba``).

A fraction ``cfg_dropout_prob`` of the captions becomes ``""`` (of the class labels, the null
class), so one network learns the conditional and the unconditional model and sampling can
use classifier-free guidance (Ho & Salimans 2022). An EMA of the UNet is kept for the sample
grids and the export. ``training_args.init_unet_from`` starts from existing weights instead of a
random init (fine-tuning Stable Diffusion 1.x: a diffusers UNet2DConditionModel folder, or one of
our exports; see configs/stage2_finetune_sd15.yaml). Optionally the dataset is encoded once
(``cache_latents``), which makes every later epoch skip the VAE (see ``modules/latent_cache.py``).

Usage (the tutorial's command):

    accelerate launch stage2_diffusion_trainer.py --experiment_name "DiffusionTrainer" \\
      --wandb_run_name "diffusion_cc" --working_directory "work_dir/diffusion_cc" \\
      --training_config "configs/stage2_diffusion_train.yaml" --model_config "configs/ldm.yaml" \\
      --path_to_vae_backbone "<VAE.safetensors>" --dataset conceptual_captions \\
      --path_to_dataset "<DATA>" --path_to_save_gens "src/diffusion_cc"

Reads the VAE (a stage-1 ``model.safetensors`` or a diffusers AutoencoderKL folder) and the
dataset. Writes ``<working_directory>/<experiment_name>/`` (``config.yaml``, ``metrics.jsonl``,
``loss_curve.png``, ``checkpoint_<step>/``, ``latent_cache/``), the sample grids
``<path_to_save_gens>/step_<step>.png`` and, at the end, ``<working_directory>/model.safetensors``:
the EMA UNet, the VAE, the text encoder, the scale, the schedule and all configs, which is all
``inference_ldm.py`` needs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from modules.accelerator import build_accelerator, seed_per_process, weight_dtype
from modules.batching import Collate
from modules.checkpoints import CheckpointManager, check_shared_folder, write_resolved_config
from modules.cli import add_common_training_args, add_run_folder_args, run_main
from modules.config import find_config_file, load_config, to_dict
from modules.data_loading import build_dataloader
from modules.diffusion import NoiseSchedule, diffusion_loss, sample_noise, sample_timesteps
from modules.ema import EMA
from modules.errors import OneLineArgumentParser, UserError
from modules.export import check_export_kind, describe_run, read_export, read_export_metadata
from modules.image_datasets import build_dataset, dataset_conditioning, images_to_model
from modules.latent_cache import (
    CachedLatentDataset,
    FlipAugmented,
    build_latent_cache,
    sample_latents,
    vae_fingerprint,
    vae_moments,
)
from modules.generation_record import read_prompts
from modules.ldm_io import LDM_EXPORT_KIND, LatentDiffusion, save_ldm_export, text_encoder_export
from modules.loop import Backward, LoopConfig, Update, check_at_least, check_loop_keys, train_loop
from modules.metrics import MetricsLogger
from modules.performance import SpeedArgs, compile_modules, to_channels_last
from modules.model_config import ldm_config_from_dict, load_ldm_config, scale_factor_for, split_overrides
from modules.optim import build_adamw, build_lr_scheduler
from modules.paths import check_writable_folder
from modules.text_encoder import encoder_source
from modules.unet import UNet, UNetConfig

logger = logging.getLogger("ldm")
REPO_ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

@dataclass
class Stage2TrainingArgs(SpeedArgs):
    """``training_args:`` of ``configs/stage2_diffusion_train.yaml`` (the comments there explain each key)."""

    learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    lr_warmup_steps: int = 1000
    total_training_iterations: int = 200000
    per_gpu_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    max_consecutive_nonfinite: int = 10  # skipped non-finite steps in a row that stop the run (modules/nonfinite.py)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    # YAML 1.1 reads a bare `no` as false: false means "no", true means "auto".
    mixed_precision: Union[Literal["no", "fp16", "bf16", "auto", "half"], bool] = "auto"
    seed: int = 0
    loss_type: Literal["mse", "l1", "huber"] = "mse"
    huber_c: float = 0.1
    snr_gamma: Optional[float] = None
    offset_noise: float = 0.0
    cfg_dropout_prob: float = 0.1
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    ema_update_after_step: int = 0
    ema_update_every: int = 1
    img_size: Optional[int] = None
    random_flip: bool = True
    num_workers: int = 8
    shapes_num_images: int = 10000
    shapes_seed: int = 0
    cache_latents: bool = False
    latent_cache_dir: Optional[str] = None
    latent_cache_dtype: Literal["auto", "float32", "float16"] = "auto"
    train_text_encoder: bool = False
    text_encoder_learning_rate: Optional[float] = None  # the trained text encoder's peak LR; None: learning_rate
    hf_cache_dir: Optional[str] = None
    init_unet_from: Optional[str] = None
    checkpoint_iterations: int = 5000
    checkpoints_total_limit: Optional[int] = 3
    logging_steps: int = 50
    log_wandb: bool = False
    val_generation_freq: int = 2500
    sample_prompts_file: str = "configs/sample_text_cond_prompts.txt"
    sample_class_labels: Optional[List[int]] = None
    num_samples_per_condition: int = 2
    num_unconditional_samples: int = 16
    sampler: Literal["ddim", "ddpm", "dpmpp_2m", "euler", "euler_a", "lms"] = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    ddim_eta: float = 0.0
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    karras_sigmas: bool = False
    sample_seed: int = 0

    def __post_init__(self) -> None:
        check_loop_keys(self)
        check_at_least(self, ("num_samples_per_condition", "num_unconditional_samples", "num_inference_steps",
                              "ema_update_every", "shapes_num_images"), 1)
        check_at_least(self, ("ema_update_after_step",), 0)
        if not 0.0 <= self.cfg_dropout_prob <= 1.0:
            raise ValueError(f"cfg_dropout_prob must be in [0, 1], got {self.cfg_dropout_prob}")
        if self.karras_sigmas and self.sampler in ("ddim", "ddpm"):
            raise ValueError(f"karras_sigmas needs sampler dpmpp_2m, euler, euler_a or lms, not {self.sampler}")
        if self.offset_noise < 0 or self.ddim_eta < 0 or self.huber_c <= 0:
            raise ValueError("offset_noise and ddim_eta must be >= 0 and huber_c > 0")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 or null, got {self.snr_gamma}")
        if self.text_encoder_learning_rate is not None and self.text_encoder_learning_rate <= 0:
            raise ValueError(f"text_encoder_learning_rate must be > 0 or null, got {self.text_encoder_learning_rate}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"img_size must be >= 1 or null, got {self.img_size}")


@dataclass
class Stage2Config:
    """The stage-2 training YAML: one ``training_args:`` section."""

    training_args: Stage2TrainingArgs = field(default_factory=Stage2TrainingArgs)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_folder_args(parser, "DiffusionTrainer", "configs/stage2_diffusion_train.yaml",
                        "YAML with unet:, diffusion:, scaling_constants: (and vae:)", "sample")
    parser.add_argument("--path_to_vae_backbone", required=True,
                        help="the frozen VAE: a stage-1 model.safetensors or a diffusers AutoencoderKL folder")
    add_common_training_args(parser)
    return parser.parse_args(argv)


def resolve_shipped_path(path: str, what: str) -> Path:
    """``path`` as given, else relative to the repository (so the shipped ``configs/...`` names work
    from any directory); missing in both: a clear error naming ``what``."""
    found = find_config_file(Path(path).expanduser(), REPO_ROOT)
    if not found.exists():
        raise UserError(f"{what} {path} not found (looked in {Path.cwd()} and {REPO_ROOT})")
    return found


def load_configs(args: argparse.Namespace):
    """(training_args, model config, model config path) with the ``--set`` overrides applied."""
    model_overrides, training_overrides = split_overrides(args.overrides,
                                                          [f.name for f in dataclasses.fields(Stage2Config)])
    training_config_path = resolve_shipped_path(args.training_config, "--training_config")
    model_config_path = resolve_shipped_path(args.model_config, "--model_config")
    train_cfg = load_config(Stage2Config, training_config_path, training_overrides).training_args
    return train_cfg, load_ldm_config(model_config_path, model_overrides), model_config_path


def build_emas(trained: Sequence[torch.nn.Module], train_cfg: "Stage2TrainingArgs", device: torch.device) -> List[EMA]:
    """An EMA of every trained network (the UNet, and the text encoder when it is trained), or none:
    the sample grids and the export use the averaged weights of both, never an averaged UNet with a
    raw last-step encoder."""
    if not train_cfg.use_ema:
        return []
    return [EMA(m, decay=train_cfg.ema_decay, warmup=train_cfg.ema_warmup, start_step=train_cfg.ema_update_after_step,
                update_every=train_cfg.ema_update_every).to(device) for m in trained]


# ----------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------

def cfg_dropout_mask(batch_size: int, prob: float, device: torch.device) -> torch.Tensor:
    """Which samples lose their condition for classifier-free guidance: (B,) bool, each True with
    probability ``prob`` independently (Ho & Salimans 2022, algorithm 1). Drawn on ``device`` and
    applied with ``torch.where``: no host sync."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {prob}")
    return torch.rand(batch_size, device=device) < prob


# UNet keys that change neither the weights nor what they compute in eval mode: an init may differ in them.
_NON_ARCHITECTURE_KEYS = ("text_conditioning_hf_model", "pre_encoded_text", "dropout", "gradient_checkpointing")


def initial_unet_state(source: str, ldm, model_config_path: Path) -> Dict[str, torch.Tensor]:
    """``training_args.init_unet_from``: the UNet weights to start from (fine-tuning), after checking
    that they describe the network of ``ldm.unet`` (else one line naming the key that differs).

    ``source`` is a diffusers ``UNet2DConditionModel`` folder (e.g. Stable Diffusion 1.x's ``unet/``,
    or the pipeline folder holding it, whose ``scheduler/`` must then match ``ldm.diffusion``;
    :mod:`modules.diffusers_interop` maps the names) or one of our stage-2 exports (its ``unet.*``
    tensors, the ``unet`` and ``diffusion`` sections of its metadata).
    """
    from modules.diffusers_interop import load_diffusers_unet_state

    path = Path(source).expanduser()
    where = f"training_args.init_unet_from {source}"
    if not path.exists():
        raise UserError(f"{where}: not found (a diffusers UNet2DConditionModel folder or a stage-2 model.safetensors)")
    try:
        if path.is_dir():
            return load_diffusers_unet_state(path, ldm.unet, ldm.diffusion)
        tensors, meta = read_export(path, expected_kind=LDM_EXPORT_KIND)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    if "model_config" not in meta:
        raise UserError(f"{where}: not a stage-2 export (no model_config in its metadata)")
    theirs = ldm_config_from_dict(meta["model_config"], f"{path} (metadata model_config)")
    for section, skip in (("unet", _NON_ARCHITECTURE_KEYS), ("diffusion", ())):
        mine, other = getattr(ldm, section), getattr(theirs, section)
        for f in dataclasses.fields(mine):
            if f.name not in skip and getattr(other, f.name) != getattr(mine, f.name):
                raise UserError(f"{where}: its {section}.{f.name} is {json.dumps(getattr(other, f.name))} but "
                                f"{model_config_path} has {json.dumps(getattr(mine, f.name))}")
    return {name[len("unet."):]: value for name, value in tensors.items() if name.startswith("unet.")}


def check_unet_conditioning(conditioning: str, unet: UNetConfig, dataset: str, config_path: str) -> None:
    """The UNet's conditioning switches must match what the dataset provides."""
    kind = {"text": "text-conditional", "class": "class-conditional", "none": "unconditional"}[conditioning]
    for key, wanted in (("text_conditioning", conditioning == "text"), ("class_conditioning", conditioning == "class")):
        if getattr(unet, key) != wanted:
            value = str(wanted).lower()
            raise UserError(f"dataset {dataset!r} is {kind} but {config_path} has unet.{key}: "
                            f"{str(not wanted).lower()}; set it to {value} (e.g. --set unet.{key}={value})")


def _padded_to(rows: torch.Tensor, length: int) -> torch.Tensor:
    """(1, L, ...) -> (1, length, ...): cut, or padded with zeros (False for a mask)."""
    if rows.shape[1] >= length:
        return rows[:, :length]
    pad = rows.new_zeros((1, length - rows.shape[1], *rows.shape[2:]))
    return torch.cat([rows, pad], dim=1)


class Conditioner:
    """Turns a batch into the UNet's conditioning keywords, applying classifier-free-guidance dropout.

    text: the batch's token ids (tokenized once, in the DataLoader workers, or stored by prep_cc /
    the latent cache) -> text encoder -> ``context`` (B, L, D) + ``context_mask`` (B, L); a dropped
    caption becomes the ids of ``""``. With pre-encoded text (``text_embeddings`` from prep_cc or
    the latent cache) the stored states are used instead and a dropped row takes the states of
    ``""``. class: ``label`` (B,), a dropped label becomes the null class. none: {}.
    """

    def __init__(self, conditioning: str, text_encoder=None, use_pre_encoded: bool = False,
                 null_class: Optional[int] = None) -> None:
        self.conditioning = conditioning
        self.text_encoder = text_encoder
        self.use_pre_encoded = use_pre_encoded
        self.null_class = null_class
        if conditioning == "text":  # the empty prompt, tokenized (and encoded by a frozen encoder) once
            plain = getattr(text_encoder, "module", text_encoder)  # DDP-wrapped when trained
            tokens = plain.caption_tokenizer([""])
            device = plain.model.device  # where the batches go: moved once, not every step
            self.null_ids = (tokens.input_ids.to(device), tokens.attention_mask.bool().to(device))  # (1, L) each
            if use_pre_encoded:
                with torch.no_grad():
                    self.null_text = plain.encode(*self.null_ids)  # ((1, L, D), (1, L))

    def __call__(self, batch: Dict[str, Any], drop: torch.Tensor, device: torch.device) -> Dict[str, torch.Tensor]:
        if self.conditioning == "text":
            if self.use_pre_encoded:
                hidden = batch["text_embeddings"].to(device, non_blocking=True)  # (B, L, D)
                mask = batch["text_embeddings_mask"].to(device, non_blocking=True)  # (B, L)
                null_hidden, null_mask = self.null_text
                length = hidden.shape[1]
                hidden = torch.where(drop[:, None, None], _padded_to(null_hidden, length).to(device, hidden.dtype),
                                     hidden)
                mask = torch.where(drop[:, None], _padded_to(null_mask, length).to(device), mask.bool())
            else:
                null_ids, null_mask = self.null_ids
                length = batch["input_ids"].shape[1]  # the batch's length bucket (modules/batching.py)
                ids = torch.where(drop[:, None], _padded_to(null_ids, length), batch["input_ids"].to(device))
                mask = torch.where(drop[:, None], _padded_to(null_mask, length), batch["attention_mask"].to(device).bool())
                hidden, mask = self.text_encoder(ids, mask)  # through the DDP wrapper when trained
            return {"context": hidden, "context_mask": mask}
        if self.conditioning == "class":
            labels = batch["label"].to(device)
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
            return {"class_labels": labels}
        return {}


def check_text_source(dataset_path: Path, columns: Sequence[str], text_source: str) -> None:
    """Token ids and encoded states stored by ``prep_cc.py`` (``columns``) must come from the text
    encoder (and its tokenizer) that encodes the sampling prompts; prep_cc records which one it used
    in ``prep_cc_summary.json``."""
    what = "pre-encoded" if "text_embeddings" in columns else "tokenized"
    summary_file = dataset_path / "prep_cc_summary.json"
    if not summary_file.is_file():
        raise UserError(f"{dataset_path} holds {what} captions ({', '.join(columns)}) but no prep_cc_summary.json "
                        "saying which text encoder made them; re-run prep_cc.py on the raw shards")
    used = json.loads(summary_file.read_text()).get("hf_clip_model_name")
    if not used or encoder_source(used) != encoder_source(text_source):
        raise UserError(f"{dataset_path} was {what} with {used!r} but unet.text_conditioning_hf_model is "
                        f"{text_source!r}: training captions and sampling prompts would go through different "
                        "models; use the same model, or re-run prep_cc.py with it")


# ----------------------------------------------------------------------------------------
# One training loss
# ----------------------------------------------------------------------------------------

def batch_latents(batch: Dict[str, Any], vae: torch.nn.Module, scaling_factor: float, shift_factor: float,
                  device: torch.device) -> torch.Tensor:
    """Scaled latents (B, C, h, w) float32 of a batch: from cached moments or by encoding its uint8 images."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
    else:
        mean, std = vae_moments(vae, images_to_model(batch["image"], device))
    return sample_latents(mean, std, scaling_factor, shift_factor)


def denoising_loss(unet: torch.nn.Module, latents: torch.Tensor, cond: Dict[str, torch.Tensor],
                   schedule: NoiseSchedule, prediction_type: str, args: Stage2TrainingArgs,
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) on one batch of latents -> (loss, logs).

    t ~ U{0..T-1}, eps ~ N(0, I) (+ offset noise), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,
    and the UNet regresses the target of ``prediction_type`` (eps, v or z_0).
    """
    noise = sample_noise(latents, offset_noise=args.offset_noise)
    t = sample_timesteps(latents.shape[0], schedule.num_train_timesteps, device=latents.device)  # (B,)
    noisy = schedule.add_noise(latents, noise, t)
    target = schedule.training_target(latents, noise, t, prediction_type)
    output = unet(noisy, t, **cond)
    return diffusion_loss(output, target, t, schedule, args.loss_type, args.snr_gamma, prediction_type, args.huber_c)


# ----------------------------------------------------------------------------------------
# Sample grids
# ----------------------------------------------------------------------------------------

def validation_conditions(conditioning: str, args: Stage2TrainingArgs, num_classes: int,
                          ) -> Tuple[Optional[List[str]], Optional[List[int]], int, int]:
    """(prompts, class labels, number of images, images per grid row) of the sample grids."""
    k = args.num_samples_per_condition
    if conditioning == "text":
        prompts = read_prompts(resolve_shipped_path(args.sample_prompts_file, "training_args.sample_prompts_file"),
                               "training_args.sample_prompts_file")
        return [p for p in prompts for _ in range(k)], None, len(prompts) * k, k
    if conditioning == "class":
        labels = args.sample_class_labels if args.sample_class_labels is not None else list(range(min(8, num_classes)))
        bad = [label for label in labels if not 0 <= label < num_classes]
        if bad or not labels:
            raise UserError(f"training_args.sample_class_labels {labels}: need labels in [0, {num_classes - 1}]")
        return None, [label for label in labels for _ in range(k)], len(labels) * k, k
    n = args.num_unconditional_samples
    return None, None, n, max(1, int(math.ceil(math.sqrt(n))))


def save_sample_grid(pipeline: LatentDiffusion, args: Stage2TrainingArgs, conditions, path: Path, autocast) -> Path:
    """Generate the validation images with the configured sampler + guidance from a fixed seed; save one grid PNG."""
    from torchvision.utils import save_image

    prompts, labels, n, per_row = conditions
    generator = torch.Generator().manual_seed(args.sample_seed)  # same noise at every step: comparable grids
    images = pipeline.generate(n, prompts=prompts, class_labels=labels, guidance_scale=args.guidance_scale,
                               sampler=args.sampler, num_inference_steps=args.num_inference_steps, eta=args.ddim_eta,
                               karras_sigmas=args.karras_sigmas,
                               timestep_spacing=args.timestep_spacing, generator=generator, autocast=autocast)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images * 0.5 + 0.5, str(path), nrow=per_row)  # rows = prompts / classes
    return path


# ----------------------------------------------------------------------------------------
# Building blocks of main()
# ----------------------------------------------------------------------------------------

class FrozenVAE(NamedTuple):
    """The frozen first stage, ready for training, and what the export needs of it."""

    model: torch.nn.Module
    config: Any  # VAEConfig
    scaling_factor: float
    shift_factor: float
    img_size: int
    export_state: Dict[str, torch.Tensor]  # float32 weights as loaded (the live copy may be bf16/fp16)


def load_frozen_vae(vae_path: Path, ldm, dataset: str, dataset_path: Optional[str], model_config_path: Path,
                    img_size: Optional[int], device: torch.device, weight_dtype: torch.dtype) -> FrozenVAE:
    """Load ``--path_to_vae_backbone``, check it against the UNet, find the latent scale of
    ``dataset``, freeze it.

    Its architecture comes with its weights (export metadata, diffusers config.json); only a bare
    weights file without a config falls back to the model config's ``vae:`` section.
    """
    from modules.vae_io import VAE_EXPORT_KIND, load_vae, scaling_factors_from_metadata

    fallback = None
    if vae_path.is_file():
        export_metadata = read_export_metadata(vae_path)
        check_export_kind(export_metadata, vae_path, VAE_EXPORT_KIND, "--path_to_vae_backbone")
        fallback = ldm.vae if "config" not in export_metadata else None
    vae, vae_config, metadata = load_vae(vae_path, fallback)
    if vae.latent_channels != ldm.unet.in_channels or vae.latent_channels != ldm.unet.out_channels:
        raise UserError(
            f"{vae_path} has {vae.latent_channels} latent channels but {model_config_path} has unet.in_channels "
            f"{ldm.unet.in_channels} and unet.out_channels {ldm.unet.out_channels}; they must be equal")
    shipped = metadata.get("scaling_factor") if metadata.get("kind") == "diffusers" else None
    scaling_factor = scale_factor_for(ldm, dataset, scaling_factors_from_metadata(metadata, vae_path), shipped,
                                      str(model_config_path), str(vae_path), dataset_path)
    shift_factor = float(metadata.get("shift_factor") or getattr(vae, "shift_factor", None) or 0.0)
    size = img_size or vae_config.img_size
    if size % vae.downsample_factor != 0:
        raise UserError(f"training_args.img_size {size} is not a multiple of the VAE's downsampling factor "
                        f"{vae.downsample_factor}")
    export_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    vae.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
    logger.info("VAE %s: %d latent channels, factor %d; latent scale %.6g (shift %.4g); training at %dpx",
                vae_path, vae.latent_channels, vae.downsample_factor, scaling_factor, shift_factor, size)
    return FrozenVAE(vae, vae_config, scaling_factor, shift_factor, size, export_state)


def load_text_encoder(ldm, train_cfg: Stage2TrainingArgs, model_config_path: Path, device: torch.device,
                      weight_dtype: torch.dtype):
    """The CLIP text encoder named by ``unet.text_conditioning_hf_model``: trainable (float32, prepared
    later) or frozen (eval, no grad, in the mixed-precision dtype). Returns (encoder, float32 weights
    kept for the export when it is frozen from a local folder, else None)."""
    from modules.text_encoder import TextEncoder

    source = ldm.unet.text_conditioning_hf_model
    encoder = TextEncoder(source, cache_dir=train_cfg.hf_cache_dir, trainable=train_cfg.train_text_encoder,
                          gradient_checkpointing=ldm.unet.gradient_checkpointing)  # a trained one: as the UNet
    if encoder.hidden_size != ldm.unet.text_embed_dim:
        raise UserError(f"the text encoder {source!r} has hidden size {encoder.hidden_size} but "
                        f"{model_config_path} has unet.text_embed_dim {ldm.unet.text_embed_dim}; they must be equal")
    export_state = None
    if not train_cfg.train_text_encoder:
        if Path(source).expanduser().is_dir():
            export_state = {k: v.detach().clone() for k, v in encoder.model.state_dict().items()}
        encoder.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
    return encoder, export_state


def use_pre_encoded_text(args: argparse.Namespace, train_cfg: Stage2TrainingArgs, ldm, base_dataset,
                         conditioning: str, model_config_path: Path) -> bool:
    """Whether training reads encoded caption states (prep_cc's ``text_embeddings`` column, or the
    latent cache's) instead of running the text encoder every step: whenever the encoder is frozen
    and such states exist. They must come from the encoder that encodes the sampling prompts."""
    if conditioning != "text":
        return False
    stored = list(getattr(base_dataset, "array_columns", ()))
    if stored:
        check_text_source(Path(args.path_to_dataset), stored, ldm.unet.text_conditioning_hf_model)
    has_column = "text_embeddings" in stored
    if ldm.unet.pre_encoded_text and not has_column:
        raise UserError(f"unet.pre_encoded_text is true in {model_config_path} but {args.path_to_dataset} has no "
                        "text_embeddings column (run prep_cc.py with --pre_encode_text)")
    if train_cfg.train_text_encoder:
        if ldm.unet.pre_encoded_text:
            raise UserError(f"unet.pre_encoded_text is true in {model_config_path} but training_args."
                            "train_text_encoder is true: a trained encoder must encode the captions every step")
        return False
    if has_column:
        logger.info("using the dataset's pre-encoded text (column text_embeddings)")
    elif train_cfg.cache_latents:
        logger.info("the latent cache keeps the captions' encoded states: the text encoder does not run per step")
    return has_column or train_cfg.cache_latents


def build_train_set(args: argparse.Namespace, train_cfg: Stage2TrainingArgs, base_dataset, vae: FrozenVAE,
                    text_encoder, accelerator, run_dir: Path, seed: int):
    """What the loader serves: images (flipped by (seed, epoch, index)), or, with ``cache_latents``,
    cached latent moments of both orientations plus the captions' token ids and, for a frozen text
    encoder, their encoded states (so neither the VAE nor the text encoder runs per step)."""
    if not train_cfg.cache_latents:
        return FlipAugmented(base_dataset, seed, enabled=train_cfg.random_flip)
    cache_dir = Path(train_cfg.latent_cache_dir) if train_cfg.latent_cache_dir else run_dir / "latent_cache"
    if train_cfg.latent_cache_dir:  # the run folder is checked at start; every rank writes its part here
        check_shared_folder(accelerator, cache_dir, "training_args.latent_cache_dir")
    model = vae.model
    fingerprint = {  # what changes the cached numbers (build_latent_cache adds its dtype and the text encoder)
        "dataset": args.dataset,
        "path": str(Path(args.path_to_dataset).resolve()) if args.path_to_dataset else None,
        "shapes": [train_cfg.shapes_num_images, train_cfg.shapes_seed] if args.path_to_dataset is None else None,
        "num_samples": len(base_dataset), "img_size": vae.img_size, "flips": train_cfg.random_flip,
        "vae": vae_fingerprint(model), "encode_dtype": str(next(model.parameters()).dtype),
    }
    frozen_text = text_encoder if text_encoder is not None and not train_cfg.train_text_encoder else None
    started = time.perf_counter()
    side = vae.img_size // model.downsample_factor
    build_latent_cache(accelerator, base_dataset, model, cache_dir, fingerprint, (model.latent_channels, side, side),
                       flips=train_cfg.random_flip, cache_dtype=train_cfg.latent_cache_dtype,
                       batch_size=train_cfg.per_gpu_batch_size,
                       num_workers=train_cfg.num_workers, text_encoder=frozen_text,
                       tokenizer=text_encoder.caption_tokenizer if text_encoder is not None else None)
    logger.info("latent cache ready in %.1fs", time.perf_counter() - started)
    return CachedLatentDataset(cache_dir, seed, train_cfg.random_flip)


def sample_pipeline(unet, text_encoder, vae: FrozenVAE, ldm, conditioning: str, class_names) -> LatentDiffusion:
    """The pipeline the sample grids and the export describe (EMA weights when kept)."""
    return LatentDiffusion(unet=unet, vae=vae.model, text_encoder=text_encoder, config=ldm,
                           scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor, conditioning=conditioning,
                           img_size=vae.img_size, class_names=class_names)


def export_model(path: Path, unet: torch.nn.Module, text_encoder, vae: FrozenVAE, ldm, train_cfg: Stage2TrainingArgs,
                 text_encoder_state, conditioning: str, class_names, metadata: Dict[str, Any]) -> None:
    """Write the one-file export ``inference_ldm.py`` needs: the (EMA) UNet, the VAE, the text encoder
    (embedded when trained or read from a local folder, by name for a frozen hub model), the latent
    scale, the schedule and all configs."""
    text_payload = None
    if text_encoder is not None:
        embed = train_cfg.train_text_encoder or text_encoder_state is not None
        text_payload = text_encoder_export(text_encoder, ldm.unet.text_conditioning_hf_model, embed,
                                           None if train_cfg.train_text_encoder else text_encoder_state)
    save_ldm_export(
        path, {k: v.detach().float().cpu() for k, v in unet.state_dict().items()}, vae.export_state,
        dataclasses.replace(ldm, vae=vae.config), vae.scaling_factor, vae.shift_factor, conditioning,
        metadata.pop("dataset"), vae.img_size, text_encoder=text_payload, class_names=class_names,
        metadata={"training_config": to_dict(train_cfg), **metadata})
    logger.info("wrote %s (step %d; %s weights)", path, metadata["step"], "EMA" if metadata["ema"] else "final")


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

class TrainResult(NamedTuple):
    """What :func:`main` returns (for tests and notebooks): the final state and the live models."""

    step: int
    export_path: Optional[Path]
    run_dir: Path
    unet: torch.nn.Module
    ema: Optional[EMA]
    vae: torch.nn.Module
    text_encoder: Optional[torch.nn.Module]
    text_encoder_ema: Optional[EMA] = None


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    # -- config -------------------------------------------------------------------------
    train_cfg, ldm, model_config_path = load_configs(args)
    seed = train_cfg.seed if args.seed is None else args.seed
    log_wandb = train_cfg.log_wandb if args.log_wandb is None else bool(args.log_wandb)
    conditioning = dataset_conditioning(args.dataset)
    check_unet_conditioning(conditioning, ldm.unet, args.dataset, str(model_config_path))
    working_dir = Path(args.working_directory)
    run_dir = working_dir / args.experiment_name
    gens_dir = Path(args.path_to_save_gens) if args.path_to_save_gens else run_dir / "samples"
    export_path = working_dir / "model.safetensors"
    check_writable_folder(working_dir, "--working_directory")  # now, not at the first checkpoint
    check_writable_folder(run_dir, "--experiment_name")
    check_writable_folder(gens_dir, "--path_to_save_gens")
    if train_cfg.cache_latents and train_cfg.latent_cache_dir:
        check_writable_folder(Path(train_cfg.latent_cache_dir), "training_args.latent_cache_dir")

    # -- accelerator --------------------------------------------------------------------
    accelerator = build_accelerator(train_cfg.mixed_precision, train_cfg.gradient_accumulation_steps, seed,
                                    log_wandb, run_dir, train_cfg.allow_tf32)
    device, frozen_dtype = accelerator.device, weight_dtype(accelerator.mixed_precision)
    checkpoints = CheckpointManager(accelerator, run_dir, total_limit=train_cfg.checkpoints_total_limit)
    checkpoints.check_shared_filesystem()
    if args.resume_from_checkpoint is None:
        checkpoints.check_fresh_start()  # before any slow work

    # -- models -------------------------------------------------------------------------
    vae = load_frozen_vae(Path(args.path_to_vae_backbone), ldm, args.dataset, args.path_to_dataset, model_config_path,
                          train_cfg.img_size, device, frozen_dtype)
    text_encoder, text_encoder_state = None, None
    if conditioning == "text":
        text_encoder, text_encoder_state = load_text_encoder(ldm, train_cfg, model_config_path, device, frozen_dtype)
    unet = UNet(ldm.unet)
    if train_cfg.init_unet_from:  # fine-tuning: start from these weights (a resume then loads its own)
        init_state = initial_unet_state(train_cfg.init_unet_from, ldm, model_config_path)
        try:
            unet.load_state_dict(init_state, strict=True)
        except RuntimeError as err:
            raise UserError(f"training_args.init_unet_from {train_cfg.init_unet_from}: the weights do not fit "
                            f"the unet config ({str(err).strip().splitlines()[-1].strip()})") from None
        logger.info("UNet initialised from %s", train_cfg.init_unet_from)
    logger.info("UNet: %.2fM parameters, %s conditioning, predicts %s", sum(p.numel() for p in unet.parameters()) / 1e6,
                conditioning, ldm.diffusion.prediction_type)
    trained: List[torch.nn.Module] = [unet] + ([text_encoder] if train_cfg.train_text_encoder else [])
    emas = build_emas(trained, train_cfg, device)
    schedule = NoiseSchedule(ldm.diffusion.num_train_timesteps, ldm.diffusion.beta_schedule,
                             ldm.diffusion.beta_start, ldm.diffusion.beta_end).to(device)

    # -- optimizer ----------------------------------------------------------------------
    # One AdamW, a parameter group per trained network: the text encoder may take its own learning rate.
    groups = [{"params": [p for p in module.parameters() if p.requires_grad]} for module in trained]
    if train_cfg.train_text_encoder and train_cfg.text_encoder_learning_rate is not None:
        groups[1]["lr"] = train_cfg.text_encoder_learning_rate
    parameters = [p for group in groups for p in group["params"]]
    optimizer = build_adamw(groups, lr=train_cfg.learning_rate, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                            weight_decay=train_cfg.adam_weight_decay, eps=train_cfg.adam_epsilon)
    scheduler = build_lr_scheduler(optimizer, train_cfg.lr_scheduler, train_cfg.lr_warmup_steps,
                                   train_cfg.total_training_iterations)

    # -- data ---------------------------------------------------------------------------
    base_dataset = build_dataset(args.dataset, args.path_to_dataset, vae.img_size, crop="center", random_flip=False,
                                 shapes_num_images=train_cfg.shapes_num_images, shapes_seed=train_cfg.shapes_seed)
    class_names = list(base_dataset.classes) if conditioning == "class" else None
    if class_names is not None and len(class_names) > ldm.unet.num_classes:
        raise UserError(f"{args.path_to_dataset} has {len(class_names)} classes but unet.num_classes is "
                        f"{ldm.unet.num_classes} in {model_config_path}")
    use_pre_encoded = use_pre_encoded_text(args, train_cfg, ldm, base_dataset, conditioning, model_config_path)
    train_set = build_train_set(args, train_cfg, base_dataset, vae, text_encoder, accelerator, run_dir, seed)
    collate = Collate(text_encoder.caption_tokenizer if conditioning == "text" and not use_pre_encoded else None,
                      context_length=text_encoder.max_length if conditioning == "text" else None)
    loader = build_dataloader(train_set, train_cfg.per_gpu_batch_size, shuffle=True, num_workers=train_cfg.num_workers,
                              drop_last=True, seed=seed, collate_fn=collate)
    validation = validation_conditions(conditioning, train_cfg, len(class_names) if class_names else 0)

    # -- speed settings (after the latent cache is built, which runs the VAE once, eagerly) ----
    # The networks the step runs: the UNet, the VAE's encoder (images encoded on the fly) and the
    # text transformer (captions encoded in the step, not read from the dataset or the cache).
    step_networks = [unet, None if train_cfg.cache_latents else vae.model.encoder,
                     text_encoder.model if conditioning == "text" and not use_pre_encoded else None]
    if train_cfg.channels_last:
        to_channels_last(step_networks[:2])
    if train_cfg.compile:  # after the EMA copies: the averages are plain eager weights
        compile_modules(step_networks, device, train_cfg.compile_mode)

    # -- prepare ------------------------------------------------------------------------
    *trained, optimizer, loader = accelerator.prepare(*trained, optimizer, loader)
    unet = trained[0]
    if train_cfg.train_text_encoder:
        text_encoder = trained[1]
    accelerator.register_for_checkpointing(scheduler, *emas)
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} training images give no full batch of per_gpu_batch_size "
                        f"{train_cfg.per_gpu_batch_size} on {accelerator.num_processes} process(es); lower it")
    plain = [accelerator.unwrap_model(m) for m in trained]
    conditioner = Conditioner(conditioning, text_encoder, use_pre_encoded,
                              plain[0].null_class_label if conditioning == "class" else None)

    # -- resume -------------------------------------------------------------------------
    seed_per_process(accelerator, seed)  # noise/timesteps differ per rank; a resume restores these RNGs
    state = checkpoints.resume(args.resume_from_checkpoint)
    run_config = {"training_args": to_dict(train_cfg), "model": to_dict(dataclasses.replace(ldm, vae=vae.config)),
                  "args": vars(args)}
    write_resolved_config(accelerator, run_dir, run_config)
    metrics_log = MetricsLogger(accelerator, run_dir, log_wandb, args.experiment_name, args.wandb_run_name, run_config,
                                resumed=state.step > 0)
    metrics_log.truncate_after(state.step)

    # -- step function ------------------------------------------------------------------
    update = Update("", optimizer, parameters, scheduler, train_cfg.max_grad_norm, emas=list(zip(emas, plain)))

    def train_step(batch: Dict[str, Any], step: int):
        with accelerator.autocast():
            latents = batch_latents(batch, vae.model, vae.scaling_factor, vae.shift_factor, device)
            if train_cfg.channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            drop = cfg_dropout_mask(latents.shape[0], train_cfg.cfg_dropout_prob, device)
            cond = conditioner(batch, drop, device)
            loss, logs = denoising_loss(unet, latents, cond, schedule, ldm.diffusion.prediction_type, train_cfg)
        yield Backward(update, loss, logs)

    def final_networks():
        """(UNet, text encoder) as sampled and exported: EMA copies when kept, else the live ones."""
        networks = [ema.model for ema in emas] if emas else plain
        encoder = networks[1] if train_cfg.train_text_encoder else text_encoder
        return networks[0], encoder

    def write_samples(step: int) -> None:
        if accelerator.is_main_process:
            modes = [m.training for m in plain]
            for m in plain:
                m.eval()
            path = save_sample_grid(sample_pipeline(*final_networks(), vae, ldm, conditioning, class_names), train_cfg,
                                    validation, gens_dir / f"step_{step}.png", accelerator.autocast)
            for m, mode in zip(plain, modes):
                m.train(mode)
            metrics_log.log_images("samples", path, step)
            logger.info("wrote %s", path)
        accelerator.wait_for_everyone()

    def export(state) -> None:
        if accelerator.is_main_process:
            export_model(export_path, *final_networks(), vae, ldm, train_cfg, text_encoder_state, conditioning,
                         class_names, {"step": state.step, "ema": bool(emas), "vae_source": args.path_to_vae_backbone,
                                       "dataset": args.dataset,
                                       "producer": describe_run("stage2_diffusion_trainer.py", argv)})

    # -- loop ---------------------------------------------------------------------------
    images_per_step = train_cfg.per_gpu_batch_size * train_cfg.gradient_accumulation_steps * accelerator.num_processes
    logger.info("training on %d %s: %d optimizer steps of %d x %d x %d images, %d batches per epoch",
                len(train_set), "cached latents" if train_cfg.cache_latents else "images",
                train_cfg.total_training_iterations, train_cfg.per_gpu_batch_size,
                train_cfg.gradient_accumulation_steps, accelerator.num_processes, len(loader))
    loop_config = LoopConfig(
        checkpoint_every_minutes=args.checkpoint_every_minutes, stop_check_steps=args.stop_check_steps,
        max_consecutive_nonfinite=train_cfg.max_consecutive_nonfinite,
        peak_tflops=train_cfg.resolved_peak_tflops(device),
        total_steps=train_cfg.total_training_iterations, logging_steps=train_cfg.logging_steps,
        checkpoint_every=train_cfg.checkpoint_iterations, validate_every=train_cfg.val_generation_freq,
        images_per_step=images_per_step, per_gpu_batch_size=train_cfg.per_gpu_batch_size,
        stop_after_steps=args.stop_after_steps, desc="stage2",
        plot_keys=("loss", "lr", "grad_norm"))
    finished = train_loop(accelerator, loader=loader, models=trained, step_fn=train_step, state=state,
                          config=loop_config, checkpoints=checkpoints, metrics_log=metrics_log,
                          validate=write_samples, export=export)
    return TrainResult(state.step, export_path if finished else None, run_dir, unet, emas[0] if emas else None,
                       vae.model, text_encoder, emas[1] if len(emas) > 1 else None)


if __name__ == "__main__":
    run_main(main)
