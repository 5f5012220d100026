"""Stage 1: train the first-stage autoencoder of a latent diffusion model (KL-VAE or VQ-VAE).

The autoencoder learns to reconstruct images through a latent map f times smaller per side,
with the loss of taming-transformers / latent diffusion (Esser et al. 2021, eq. 7; Rombach et
al. 2022, App. G; see modules/vae_loss.py): L1 (or L2) + lpips_weight x LPIPS + kl_weight x KL
(or codebook_weight x the VQ loss), and from optimizer step ``disc_start`` on the adaptively
weighted PatchGAN generator loss, while the discriminator is trained with the hinge (or vanilla)
loss on real images and detached reconstructions. Both networks are updated on every batch,
each with its own AdamW and LR schedule; before ``disc_start`` the discriminator is neither run
nor stepped.

Usage (the tutorial's command):

    accelerate launch stage1_vae_trainer.py --experiment_name "VAETrainer" --wandb_run_name "vae_celeba" \\
      --working_directory "work_dir/vae_celeba" --training_config "configs/stage1_vae_train.yaml" \\
      --model_config "configs/ldm.yaml" --dataset celebahq --path_to_dataset "<CELEBAHQ>" \\
      --path_to_save_gens "src/celebahq_vae_gen"

  the same with --training_config configs/stage1_vae_train_cc.yaml --dataset conceptual_captions
  (--model_config defaults to configs/ldm.yaml), and configs/stage1_vqvae_train.yaml for the VQ-VAE.
  Shrink anything for a quick run with --set, e.g. --set training_args.total_training_iterations=100
  --set vae.vae_channels_per_block=[32,64] (vae.* goes to the model config).

Configs
  --model_config (configs/ldm.yaml): the ``vae:`` section builds the network.
  --training_config: ``training_args:`` (loss weights, optimizers, schedule, data, logging; see
  Stage1TrainingArgs), ``discriminator:`` (the PatchGAN, modules.discriminator.DiscriminatorConfig)
  and, optionally, ``vae:``: overrides of the model config's ``vae:`` keys. That is how
  configs/stage1_vqvae_train.yaml selects the VQ-VAE (``vae: {quantize: true, ...}``) while the
  command keeps --model_config configs/ldm.yaml. Precedence: model config < training YAML ``vae:``
  < ``--set vae.<key>=...``. The resolved network config is what the export records.

Batch size: ``per_gpu_batch_size`` is the batch of one process in one forward pass (a
micro-batch), the same meaning in every trainer; an optimizer step sees
per_gpu_batch_size x gradient_accumulation_steps x number of processes images. The LR schedule
counts optimizer steps.

Validation: ``num_val_images`` images are held out of the training data (same ones on every run
and process, seeded by ``seed``) and, every ``val_generation_freq`` optimizer steps, reconstructed
from the posterior mode (the EMA weights when ``use_ema``): a grid of inputs beside
reconstructions is written to ``--path_to_save_gens/step_<N>.png`` (and wandb), and PSNR, SSIM
and LPIPS over all held-out images (gathered over processes) go to metrics.jsonl.

Writes
  <working_directory>/<experiment_name>/checkpoint_<step>/   resumable state (both models and
      optimizers, LR schedules, EMA, step, data position, RNG), every ``checkpoint_iterations``
      optimizer steps, at the end and at --stop_after_steps; the newest ``checkpoints_total_limit`` kept
  <working_directory>/<experiment_name>/config.yaml, model_config.yaml   the resolved configs
  <working_directory>/<experiment_name>/metrics.jsonl, loss_curve.png
  <working_directory>/model.safetensors   the trained VAE (EMA weights when use_ema) with its
      resolved vae: config in the metadata (modules.vae_io.load_vae rebuilds it)
  <path_to_save_gens>/step_<N>.png       reconstruction grids
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import torch
from torch import nn

from modules.accelerator import build_accelerator, seed_per_process
from modules.autoencoder import VQModel, build_autoencoder
from modules.checkpoints import CheckpointManager, write_resolved_config
from modules.cli import add_common_training_args, add_run_folder_args, run_main
from modules.config import find_config_file, load_config, load_yaml, to_dict
from modules.data_loading import EpochSeeded, build_dataloader
from modules.discriminator import DiscriminatorConfig, NLayerDiscriminator, convert_to_sync_batchnorm
from modules.ema import EMA
from modules.errors import OneLineArgumentParser, UserError
from modules.export import describe_run
from modules.image_datasets import build_dataset, dataset_conditioning, images_to_model, split_holdout
from modules.image_metrics import psnr, ssim
from modules.loop import Backward, LoopConfig, Update, check_at_least, check_clip_norm, check_loop_keys, train_loop
from modules.metrics import MetricsLogger
from modules.performance import SpeedArgs, compile_modules, to_channels_last
from modules.model_config import LDMConfig, ldm_config_from_dict, split_overrides
from modules.optim import build_adamw, build_lr_scheduler
from modules.paths import check_writable_folder
from modules.vae_io import save_vae_export
from modules.vae_loss import VAELoss, VAELossConfig

logger = logging.getLogger("ldm")

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_CONFIG = "configs/ldm.yaml"
DEFAULT_TRAINING_CONFIG = "configs/stage1_vae_train.yaml"
# Images are in [-1, 1], so the PSNR/SSIM data range is 2.
IMAGE_RANGE = 2.0


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

@dataclass
class Stage1TrainingArgs(SpeedArgs, VAELossConfig):
    """``training_args:`` of a stage-1 training YAML.

    The loss keys (reconstruction_loss, lpips_weight, kl_weight, codebook_weight, disc_start,
    disc_weight, disc_loss, use_adaptive_weight, adaptive_weight_max, adaptive_weight_eps) are
    :class:`modules.vae_loss.VAELossConfig`'s and are documented there; the speed keys (compile,
    compile_mode, channels_last, allow_tf32, peak_tflops) are :class:`modules.performance.SpeedArgs`'s
    (compile and channels_last apply to the autoencoder, the discriminator and the LPIPS); the rest:

    learning_rate / disc_learning_rate: peak LR of the autoencoder's / discriminator's AdamW.
    lr_scheduler / disc_lr_scheduler: "constant", "linear" or "cosine" after a linear warm-up of
        lr_warmup_steps / disc_lr_warmup_steps optimizer steps. The discriminator's schedule
        starts at disc_start and spans total_training_iterations - disc_start steps.
    optimizer_beta1, optimizer_beta2, optimizer_weight_decay: AdamW settings of both optimizers.
    total_training_iterations: optimizer steps to train.
    per_gpu_batch_size: images per process per forward pass (micro-batch).
    gradient_accumulation_steps: micro-batches per optimizer step (global batch: per_gpu_batch_size x
        gradient_accumulation_steps x processes).
    max_grad_norm / disc_max_grad_norm: clip the autoencoder's / the discriminator's gradient norm to
        this (null: no clipping, as LDM and taming). The autoencoder's loss is summed per image under
        loss_reduction ldm (its gradient ~C*H*W times a per-pixel mean's), the discriminator's is a mean,
        hence two thresholds (the shipped YAMLs: 2e5 and 1.0 at 256 px).
    checkpoint_iterations / checkpoints_total_limit: save every N optimizer steps / keep the newest N (null: all).
    val_generation_freq / num_val_images: validate every N optimizer steps / on this many held-out images (0: no validation).
    logging_steps: write gathered training-loss means every N optimizer steps.
    lpips_checkpoint: a stage-0 LPIPS export (stage0_lpips_trainer.py writes <work_dir>/<name>.safetensors);
        not read when lpips_weight is 0 (validation then reports no LPIPS).
    use_lpips_package: use the ``lpips`` package's pretrained metric instead (needs torchvision's
        ImageNet weights of lpips_backbone in the torch hub cache, or a network).
    lpips_backbone: "vgg", "alex" or "squeeze": the package's trunk; a lpips_checkpoint must hold this backbone.
    use_ema / ema_decay: keep an EMA of the autoencoder's weights (used for validation and the export).
    mixed_precision: "no", "fp16", "bf16", "auto" (bf16 on GPUs that have it, fp16 on older ones, none on a CPU)
        or "half" (as auto on a GPU; bf16 on a CPU that oneDNN has bf16 kernels for, else float32).
    log_wandb: log to Weights & Biases (--log_wandb / --no-log_wandb override it).
    num_workers: data-loader workers per process.
    crop / random_resized_crop_scale / random_flip: training augmentation (validation images are
        always resized by the short side and center-cropped, unflipped).
    shapes_num_images / shapes_seed: size and seed of the on-the-fly ``shapes`` dataset (used only
        with --dataset shapes and no --path_to_dataset).
    seed: seed of the weights, the data order and the held-out split (--seed overrides it).
    """

    learning_rate: float = 1e-4
    disc_learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    disc_lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    disc_lr_warmup_steps: int = 0
    optimizer_beta1: float = 0.5
    optimizer_beta2: float = 0.9
    optimizer_weight_decay: float = 0.0
    total_training_iterations: int = 150000
    per_gpu_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = None
    disc_max_grad_norm: Optional[float] = None
    max_consecutive_nonfinite: int = 10  # skipped non-finite steps in a row that stop the run (modules/nonfinite.py)
    checkpoint_iterations: int = 5000
    checkpoints_total_limit: Optional[int] = 3
    val_generation_freq: int = 1000
    num_val_images: int = 16
    logging_steps: int = 50
    lpips_checkpoint: Optional[str] = "work_dir/lpips/lpips_64x64_vgg.safetensors"
    use_lpips_package: bool = False
    lpips_backbone: Literal["vgg", "alex", "squeeze"] = "vgg"
    use_ema: bool = False
    ema_decay: float = 0.9999
    # YAML 1.1 reads a bare `no` as false: false means "no", true means "auto".
    mixed_precision: Union[Literal["no", "fp16", "bf16", "auto", "half"], bool] = "auto"
    log_wandb: bool = False
    num_workers: int = 4
    crop: Literal["center", "random_resized"] = "center"
    random_resized_crop_scale: List[float] = field(default_factory=lambda: [0.8, 1.0])
    random_flip: bool = True
    shapes_num_images: int = 10000
    shapes_seed: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loop_keys(self)
        check_at_least(self, ("shapes_num_images",), 1)
        check_at_least(self, ("disc_lr_warmup_steps", "num_val_images"), 0)
        check_clip_norm(self, "disc_max_grad_norm")
        if not self.disc_learning_rate > 0:
            raise UserError(f"disc_learning_rate must be > 0, got {self.disc_learning_rate}")
        if not (0.0 <= self.optimizer_beta1 < 1.0 and 0.0 <= self.optimizer_beta2 < 1.0):
            raise UserError(f"optimizer betas must be in [0, 1), got {self.optimizer_beta1}, {self.optimizer_beta2}")
        if self.optimizer_weight_decay < 0:
            raise UserError(f"optimizer_weight_decay must be >= 0, got {self.optimizer_weight_decay}")

    def loss_config(self) -> VAELossConfig:
        """The loss keys as the loss module's own config."""
        return VAELossConfig(**{f.name: getattr(self, f.name) for f in fields(VAELossConfig)})


@dataclass
class Stage1Config:
    """A stage-1 training YAML: ``training_args:``, ``discriminator:`` and optional ``vae:`` overrides."""

    training_args: Stage1TrainingArgs = field(default_factory=Stage1TrainingArgs)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    # Overrides of the model config's vae: keys (e.g. quantize: true for the VQ-VAE).
    vae: Dict[str, Any] = field(default_factory=dict)



def load_configs(args: argparse.Namespace) -> tuple[Stage1Config, LDMConfig]:
    """The training config and the model config with the training YAML's vae: overrides and --set applied."""
    model_overrides, training_overrides = split_overrides(args.overrides, [f.name for f in fields(Stage1Config)])
    training_path = find_config_file(args.training_config, REPO_ROOT)
    config = load_config(Stage1Config, training_path, training_overrides)
    model_path = find_config_file(args.model_config, REPO_ROOT)
    raw = load_yaml(model_path)
    source = str(model_path)
    if config.vae:
        vae_section = raw.get("vae") or {}
        if not isinstance(vae_section, dict):
            raise UserError(f"{model_path}: vae: must be a mapping of keys")
        raw["vae"] = {**vae_section, **config.vae}
        source += f" (vae: keys {sorted(config.vae)} from {training_path})"
    ldm = ldm_config_from_dict(raw, source, model_overrides)
    if config.discriminator.in_channels != ldm.vae.out_channels:
        raise UserError(f"{training_path}: discriminator.in_channels ({config.discriminator.in_channels}) must equal "
                        f"vae.out_channels ({ldm.vae.out_channels}): it judges the reconstructions")
    return config, ldm


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_folder_args(parser, "VAETrainer", DEFAULT_TRAINING_CONFIG, "model YAML whose vae: section is trained",
                        "reconstruction")
    add_common_training_args(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------

def build_perceptual(train: Stage1TrainingArgs) -> Optional[nn.Module]:
    """The frozen LPIPS of the loss (and of validation): a stage-0 export or the lpips package.

    None when lpips_weight is 0: the loss does not use it, so no checkpoint is demanded (and
    validation reports no LPIPS).
    """
    if train.lpips_weight == 0:
        logger.info("lpips_weight is 0: no LPIPS is loaded (the loss has no perceptual term; validation skips LPIPS)")
        return None
    if train.use_lpips_package:
        try:
            import lpips
        except ImportError:
            raise UserError("training_args.use_lpips_package is true but the lpips package is not installed "
                            "(pip install lpips==0.1.4); or set training_args.lpips_checkpoint to a stage-0 export") from None
        try:
            metric = lpips.LPIPS(net=train.lpips_backbone, pretrained=True, verbose=False)
        except Exception as err:  # no cached torchvision trunk and no network, typically
            reason = " ".join(str(err).split())[:160]
            raise UserError(
                f"training_args.use_lpips_package: the lpips package cannot build its pretrained {train.lpips_backbone} "
                f"metric ({type(err).__name__}: {reason}); put torchvision's ImageNet weights in the torch hub cache, "
                "or set training_args.use_lpips_package=false and training_args.lpips_checkpoint to a stage-0 export"
            ) from None
        return metric.eval().requires_grad_(False)
    if train.lpips_checkpoint is None:
        raise UserError(f"training_args.lpips_weight is {train.lpips_weight} but no LPIPS is configured: set "
                        "training_args.lpips_checkpoint to a stage-0 export (stage0_lpips_trainer.py), or "
                        "training_args.use_lpips_package=true, or lpips_weight=0")
    path = Path(train.lpips_checkpoint)
    if not path.is_file():
        raise UserError(
            f"training_args.lpips_checkpoint: {path} not found; train it with stage0_lpips_trainer.py "
            f"(--work_dir {path.parent} --checkpoint_name {path.stem}.pt writes {path}), point lpips_checkpoint at "
            "another stage-0 export, or set training_args.use_lpips_package=true (needs the pretrained VGG trunk)"
        )
    from modules.export import check_export_kind, read_export_metadata
    from modules.lpips import load_lpips_export

    if path.suffix == ".safetensors":  # a VAE or LDM export here is a common mix-up: say what it is
        check_export_kind(read_export_metadata(path), path, "lpips", "training_args.lpips_checkpoint")
    metric, _ = load_lpips_export(path)
    if metric.backbone != train.lpips_backbone:
        raise UserError(f"training_args.lpips_checkpoint {path} holds a {metric.backbone!r} LPIPS but lpips_backbone is "
                        f"{train.lpips_backbone!r}; set training_args.lpips_backbone={metric.backbone}")
    return metric.eval().requires_grad_(False)


def reconstruct(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction for validation: decode the posterior mode (KL) or the quantized latents (VQ)."""
    if isinstance(model, VQModel):
        return model(images)[0]
    return model.decode(model.encode(images).mode())


def collate_images(samples: List[Dict[str, Any]]) -> torch.Tensor:
    """Stack the uint8 images of a batch, (B, 3, H, W); captions and labels are not needed here."""
    return torch.stack([sample["image"] for sample in samples])


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def validate(accelerator, model: nn.Module, loader, perceptual: Optional[nn.Module], step: int,
             gens_dir: Path, metrics_log: MetricsLogger) -> Dict[str, float]:
    """Reconstruct the held-out images, write the grid (main process) and log gathered PSNR/SSIM/LPIPS."""
    from torchvision.utils import make_grid, save_image

    was_training = model.training
    model.eval()
    inputs, recons, scores = [], [], {"val_psnr": [], "val_ssim": [], "val_lpips": []}
    for batch in loader:
        images = images_to_model(batch, accelerator.device)  # uint8 -> [-1, 1]
        with accelerator.autocast():
            recon = reconstruct(model, images)
        recon = recon.float().clamp(-1.0, 1.0)
        per_image = {"val_psnr": psnr(images, recon, IMAGE_RANGE), "val_ssim": ssim(images, recon, IMAGE_RANGE)}
        if perceptual is not None:
            with accelerator.autocast():
                per_image["val_lpips"] = perceptual(images, recon).float().flatten()
        for key, value in per_image.items():
            scores[key].append(accelerator.gather_for_metrics(value))
        inputs.append(accelerator.gather_for_metrics(images).cpu())
        recons.append(accelerator.gather_for_metrics(recon).cpu())
    model.train(was_training)
    results = {key: torch.cat(values).mean().item() for key, values in scores.items() if values}
    if accelerator.is_main_process:
        gens_dir.mkdir(parents=True, exist_ok=True)
        originals, reconstructions = torch.cat(inputs), torch.cat(recons)
        # Each input directly left of its reconstruction: (2N, 3, H, W) interleaved.
        pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
        pairs_per_row = math.ceil(math.sqrt(len(originals)))
        grid = make_grid((pairs + 1.0) / 2.0, nrow=2 * pairs_per_row, padding=2, pad_value=1.0)
        path = gens_dir / f"step_{step}.png"
        save_image(grid, path)
        metrics_log.log_images("reconstructions", path, step)
    metrics_log.log(results, step)
    logger.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


# ----------------------------------------------------------------------------------------
# Building blocks of main()
# ----------------------------------------------------------------------------------------

def build_discriminator(config: Stage1Config, accelerator) -> nn.Module:
    """The PatchGAN; with several GPU processes its BatchNorm statistics are synchronised."""
    discriminator: nn.Module = NLayerDiscriminator.from_config(config.discriminator)
    if accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            # torch's SyncBatchNorm has no CPU kernel: each process normalises with its own batch.
            logger.warning("%d CPU processes: the discriminator keeps per-process BatchNorm statistics "
                           "(SyncBatchNorm needs GPUs)", accelerator.num_processes)
        else:
            discriminator = convert_to_sync_batchnorm(discriminator)
    return discriminator


def build_loaders(args: argparse.Namespace, train: Stage1TrainingArgs, img_size: int):
    """(training loader, validation loader or None, number of held-out images).

    ``num_val_images`` are held out (the same ones on every run and process); the rest is served
    with the training augmentation, decided by (seed, epoch, index) in whichever worker loads it.
    """
    def dataset(augment: bool):
        return build_dataset(args.dataset, args.path_to_dataset, img_size,
                             crop=train.crop if augment else "center", random_flip=train.random_flip and augment,
                             random_resized_crop_scale=train.random_resized_crop_scale,
                             shapes_num_images=train.shapes_num_images, shapes_seed=train.shapes_seed)

    train_full = dataset(augment=True)
    if train.num_val_images >= len(train_full):
        raise UserError(f"training_args.num_val_images ({train.num_val_images}) must be smaller than the dataset "
                        f"({len(train_full)} images)")
    train_set, _ = split_holdout(train_full, train.num_val_images, train.seed)
    _, val_set = split_holdout(dataset(augment=False), train.num_val_images, train.seed)
    loader = build_dataloader(EpochSeeded(train_set, train.seed), train.per_gpu_batch_size, shuffle=True,
                              num_workers=train.num_workers, drop_last=True, seed=train.seed,
                              collate_fn=collate_images)
    val_loader = build_dataloader(val_set, train.per_gpu_batch_size, shuffle=False, num_workers=train.num_workers,
                                  drop_last=False, seed=train.seed, collate_fn=collate_images) if len(val_set) else None
    return loader, val_loader, len(val_set)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    # -- config -----------------------------------------------------------------------
    dataset_conditioning(args.dataset)  # unknown names fail here, listing the known ones
    config, ldm = load_configs(args)
    train = config.training_args
    train.seed = train.seed if args.seed is None else args.seed
    log_wandb = train.log_wandb if args.log_wandb is None else bool(args.log_wandb)
    vae_config = ldm.vae
    working_dir = Path(args.working_directory)
    run_dir = working_dir / args.experiment_name
    gens_dir = Path(args.path_to_save_gens) if args.path_to_save_gens else run_dir / "gens"
    export_path = working_dir / "model.safetensors"
    check_writable_folder(working_dir, "--working_directory")  # now, not at the first checkpoint
    check_writable_folder(run_dir, "--experiment_name")
    check_writable_folder(gens_dir, "--path_to_save_gens")

    # -- accelerator ------------------------------------------------------------------
    accelerator = build_accelerator(train.mixed_precision, train.gradient_accumulation_steps, train.seed,
                                    log_wandb, run_dir, train.allow_tf32)
    checkpoints = CheckpointManager(accelerator, run_dir, total_limit=train.checkpoints_total_limit)
    checkpoints.check_shared_filesystem()
    if args.resume_from_checkpoint is None:
        checkpoints.check_fresh_start()  # before any slow work

    # -- models -----------------------------------------------------------------------
    vae = build_autoencoder(vae_config)
    discriminator = build_discriminator(config, accelerator)
    perceptual = build_perceptual(train)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    loss_fn = VAELoss(train.loss_config(), perceptual)
    ema = EMA(vae, decay=train.ema_decay).to(accelerator.device) if train.use_ema else None
    if train.channels_last:
        to_channels_last([vae, discriminator, perceptual])
    if train.compile:  # after the EMA copy: the average is plain eager weights
        compile_modules([vae, discriminator, perceptual], accelerator.device, train.compile_mode)
    if vae_config.quantize and accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        # Global code usage (same dead codes everywhere) and rank 0's restart samples.
        vae.quantize.set_distributed_hooks(lambda t: accelerator.reduce(t, reduction="sum"),
                                           lambda t: broadcast(t, from_process=0))
    logger.info("%s with %.2fM parameters, latents (%d, %d, %d); discriminator %.2fM parameters",
                type(vae).__name__, sum(p.numel() for p in vae.parameters()) / 1e6, vae.latent_channels,
                vae_config.latent_size, vae_config.latent_size,
                sum(p.numel() for p in discriminator.parameters()) / 1e6)

    # -- optimizers (the discriminator's schedule counts its own steps, from disc_start) ---------
    betas, decay = (train.optimizer_beta1, train.optimizer_beta2), train.optimizer_weight_decay
    optimizer = build_adamw(vae.parameters(), lr=train.learning_rate, betas=betas, weight_decay=decay)
    disc_optimizer = build_adamw(discriminator.parameters(), lr=train.disc_learning_rate, betas=betas,
                                 weight_decay=decay)
    scheduler = build_lr_scheduler(optimizer, train.lr_scheduler, train.lr_warmup_steps,
                                   train.total_training_iterations)
    disc_scheduler = build_lr_scheduler(disc_optimizer, train.disc_lr_scheduler, train.disc_lr_warmup_steps,
                                        max(1, train.total_training_iterations - train.disc_start))

    # -- data and prepare -----------------------------------------------------------------
    loader, val_loader, num_val = build_loaders(args, train, vae_config.img_size)
    vae, discriminator, optimizer, disc_optimizer, loader = accelerator.prepare(
        vae, discriminator, optimizer, disc_optimizer, loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    accelerator.register_for_checkpointing(scheduler, disc_scheduler, *([ema] if ema is not None else []))
    if len(loader) == 0:
        raise UserError(f"{len(loader.dataset)} training images give no full batch of per_gpu_batch_size "
                        f"{train.per_gpu_batch_size} on {accelerator.num_processes} process(es); lower it")
    plain_vae, plain_disc = accelerator.unwrap_model(vae), accelerator.unwrap_model(discriminator)
    last_layer_weight = plain_vae.last_decoder_layer_weight  # for the adaptive GAN weight
    seed_per_process(accelerator, train.seed)  # posterior noise differs per process; restored on resume

    # -- resume -----------------------------------------------------------------------
    state = checkpoints.resume(args.resume_from_checkpoint)
    resolved = to_dict(config)
    write_resolved_config(accelerator, run_dir, resolved)
    write_resolved_config(accelerator, run_dir, to_dict(ldm), filename="model_config.yaml")
    metrics_log = MetricsLogger(accelerator, run_dir, log_wandb, args.experiment_name, args.wandb_run_name,
                                {"training": resolved, "model": to_dict(ldm)}, resumed=state.step > 0)
    metrics_log.truncate_after(state.step)

    # -- step function: the autoencoder's update, then (from disc_start) the discriminator's ----
    vae_update = Update("", optimizer, list(vae.parameters()), scheduler, train.max_grad_norm,
                        emas=[(ema, plain_vae)] if ema is not None else ())
    disc_update = Update("disc", disc_optimizer, list(discriminator.parameters()), disc_scheduler,
                         train.disc_max_grad_norm)

    def train_step(batch: torch.Tensor, step: int):
        images = images_to_model(batch, accelerator.device)  # uint8 -> [-1, 1] on the device
        if train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            if vae_config.quantize:
                recon, regularizer, vq_logs = vae(images)
            else:
                (recon, regularizer), vq_logs = vae(images), {}
            # The discriminator runs unwrapped and frozen inside the loss: no gradient, no DDP sync.
            loss, logs = loss_fn.generator_loss(images, recon, regularizer, step, plain_disc, last_layer_weight)
        yield Backward(vae_update, loss, {**logs, **vq_logs})
        with accelerator.autocast():  # real images against detached reconstructions
            d_loss, d_logs = loss_fn.discriminator_loss(images, recon.detach(), step, discriminator)
        if d_loss is not None:
            yield Backward(disc_update, d_loss, d_logs)

    def validate_step(step: int) -> None:
        if val_loader is not None:
            validate(accelerator, ema.model if ema is not None else plain_vae, val_loader, perceptual, step,
                     gens_dir, metrics_log)

    def export(state) -> None:
        if accelerator.is_main_process:
            save_vae_export(ema.model if ema is not None else plain_vae, vae_config, export_path, metadata={
                "producer": describe_run("stage1_vae_trainer.py", argv), "step": state.step,
                "dataset": args.dataset, "ema": ema is not None})
            logger.info("wrote %s", export_path)

    # -- loop -------------------------------------------------------------------------
    logger.info("training on %d images (%d held out): %d optimizer steps of %d x %d x %d images, "
                "discriminator from step %d", len(loader.dataset), num_val, train.total_training_iterations,
                train.per_gpu_batch_size, train.gradient_accumulation_steps, accelerator.num_processes,
                train.disc_start)
    loop_config = LoopConfig(
        checkpoint_every_minutes=args.checkpoint_every_minutes, stop_check_steps=args.stop_check_steps,
        max_consecutive_nonfinite=train.max_consecutive_nonfinite,
        peak_tflops=train.resolved_peak_tflops(accelerator.device),
        total_steps=train.total_training_iterations, logging_steps=train.logging_steps,
        checkpoint_every=train.checkpoint_iterations, validate_every=train.val_generation_freq,
        images_per_step=train.per_gpu_batch_size * train.gradient_accumulation_steps * accelerator.num_processes,
        per_gpu_batch_size=train.per_gpu_batch_size,
        stop_after_steps=args.stop_after_steps, desc="stage1",
        plot_keys=("total", "rec", "lpips", "kl", "codebook", "d_loss", "adaptive_weight", "val_psnr", "val_lpips"))
    finished = train_loop(accelerator, loader=loader, models=[vae, discriminator], step_fn=train_step, state=state,
                          config=loop_config, checkpoints=checkpoints, metrics_log=metrics_log,
                          validate=validate_step, export=export)
    return export_path if finished else None


if __name__ == "__main__":
    run_main(main)
