"""Scores of a trained model: FID / KID / CLIP score of its images, rFID / PSNR / SSIM / LPIPS of its VAE.

Three things to score, each against ``--reference_dataset`` (+ ``--path_to_reference``: the same
dataset names and folders as the trainers; images the model never trained on, e.g. a held-out split):

- ``--ldm EXPORT`` (a stage-2 export): one image per reference image, conditioned on that image's
  caption (text models; or each line of ``--prompts_file`` in turn) or class (class models), image i
  with seed ``--seed`` + i as ``inference_ldm.py`` draws it. FID and KID against the reference
  images, CLIP score against the prompts.
- ``--images FOLDER``: PNGs already made (e.g. by ``inference_ldm.py``; their ``prompt`` PNG text is
  the prompt of the CLIP score; ``*-grid.png`` files are skipped). Same scores.
- ``--vae EXPORT`` (a stage-1 export or a diffusers AutoencoderKL folder): posterior-mode
  reconstructions of the reference images. rFID and rKID (reconstructions vs originals), PSNR and
  SSIM (:mod:`modules.image_metrics`, checked against scikit-image), and LPIPS with ``--lpips``
  (a stage-0 export, or ``vgg``/``alex``/``squeeze`` for the ``lpips`` package's pretrained metric).

FID/KID/CLIP score come from torchmetrics (:mod:`modules.scores` says why). With a network the
standard weights download once (torch-fidelity's Inception, ``openai/clip-vit-large-patch14``);
offline pass ``--inception_weights FILE`` / ``--clip_model FOLDER``; a missing file is a one-line
error. ``python generate_data.py inception FILE`` writes random Inception weights for offline
runs: their FIDs compare runs scored with the same file, not published numbers.

    python evaluate_ldm.py --ldm work_dir/diffusion_cc/model.safetensors \\
      --reference_dataset conceptual_captions --path_to_reference cc_val --num_images 5000 \\
      --sampler dpmpp_2m --num_inference_steps 20
    python evaluate_ldm.py --vae work_dir/vae/model.safetensors --reference_dataset celebahq \\
      --path_to_reference data/celebahq --reference_split val --lpips vgg

``--reference_features FILE`` caches the reference images' Inception features (keyed by the
weights' digest and the reference), so one reference set scores several models at the cost of one.

Prints a table; ``--json`` writes the numbers (and the settings that produced them).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from modules.cli import positive_int, run_main, setup_logging
from modules.errors import OneLineArgumentParser, UserError
from modules.image_datasets import DATASET_NAMES, ToUint8Tensor, build_dataset, images_to_model, model_to_images
from modules.image_metrics import psnr, ssim
from modules.ldm_io import inference_device
from modules.paths import check_writable_file
from modules.sampling_settings import add_sampling_arguments, check_sampling_arguments, settings_from_args
from modules.generation_record import file_sha256
from modules.scores import (DEFAULT_CLIP_MODEL, InceptionScores, load_clip_scorer, load_reference_features,
                            save_reference_features)

logger = logging.getLogger("ldm")
IMAGE_RANGE = 2.0  # [-1, 1]
GENERATED_METRICS = ("fid", "kid", "clip")
VAE_METRICS = ("rfid", "psnr", "ssim", "lpips")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ldm", default=None, help="a stage-2 export: generate and score its images")
    what.add_argument("--images", default=None, help="a folder of generated PNGs to score")
    what.add_argument("--vae", default=None, help="a stage-1 export or diffusers AutoencoderKL folder: score its reconstructions")
    ref = parser.add_argument_group("reference images")
    ref.add_argument("--reference_dataset", required=True, choices=DATASET_NAMES)
    ref.add_argument("--path_to_reference", default=None,
                     help="its folder (shapes without one: rendered on the fly with --shapes_seed)")
    ref.add_argument("--reference_split", default="train", help="subfolder / split of the reference data")
    ref.add_argument("--num_images", type=positive_int, default=5000, help="at most this many reference images")
    ref.add_argument("--shapes_seed", type=int, default=12345, help="seed of on-the-fly shapes (training uses 0)")
    gen = parser.add_argument_group("generation (--ldm)")
    gen.add_argument("--prompts_file", default=None, help="prompts in turn instead of the reference captions")
    add_sampling_arguments(gen)  # default: inference_ldm.py's for the export (what stage 2's grids used)
    gen.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    scores = parser.add_argument_group("scores")
    scores.add_argument("--metrics", default=None,
                        help=f"comma-separated; default {','.join(GENERATED_METRICS)} (generated) or "
                             f"{','.join(VAE_METRICS)} (--vae; lpips only with --lpips)")
    scores.add_argument("--inception_weights", default=None,
                        help="torch-fidelity Inception-v3 weights (default: the torch hub cache, downloaded once)")
    scores.add_argument("--reference_features", default=None,
                        help="a cache of the reference images' Inception features: read when it was made for the "
                             "same reference and weights, else (re)written; one file serves --ldm and --vae runs")
    scores.add_argument("--kid_subset_size", type=positive_int, default=1000)
    scores.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="hub name or local CLIPModel folder")
    scores.add_argument("--hf_cache_dir", default=None)
    scores.add_argument("--lpips", default=None, help="a stage-0 LPIPS export, or vgg | alex | squeeze (lpips package)")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    allowed = VAE_METRICS if args.vae else GENERATED_METRICS
    if args.metrics is None:
        metrics = [m for m in allowed if m != "lpips" or args.lpips is not None]
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in allowed]
        if unknown or not metrics:
            parser.error(f"--metrics {args.metrics!r}: expected a comma-separated subset of {', '.join(allowed)}"
                         f"{' (with --vae)' if args.vae else ' (with --ldm / --images)'}")
    if "lpips" in metrics and args.lpips is None:
        parser.error("--metrics lpips needs --lpips (a stage-0 export, or vgg | alex | squeeze)")
    args.metrics = metrics
    return args


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------

def reference_images(args: argparse.Namespace, img_size: int):
    """The first ``--num_images`` reference samples ({"image": uint8 (3, S, S), "caption"/"label"?})
    at ``img_size`` (resized by the short side, center-cropped)."""
    dataset = build_dataset(args.reference_dataset, args.path_to_reference, img_size, crop="center",
                            split=args.reference_split, shapes_num_images=args.num_images,
                            shapes_seed=args.shapes_seed)
    count = min(args.num_images, len(dataset))
    if count < 2:
        raise UserError(f"--reference_dataset {args.reference_dataset}: {count} image(s); the scores need at least 2")
    return [dataset[i] for i in range(count)]


def batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generated_from_folder(folder: str) -> tuple:
    """(uint8 images (N, 3, H, W), prompts or None) of the PNGs in ``folder`` (sorted; grids skipped)."""
    from modules.generation_record import read_png_settings
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {folder}: not a folder")
    files = sorted(p for p in root.glob("*.png") if not p.stem.endswith("-grid"))
    if len(files) < 2:
        raise UserError(f"--images {folder}: {len(files)} PNG(s) (grids skipped); the scores need at least 2")
    to_tensor = ToUint8Tensor()
    images, prompts, sizes = [], [], set()
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(to_tensor(img.convert("RGB")))
        except OSError as err:
            raise UserError(f"--images {path}: not a readable PNG ({err})") from None
        sizes.add(tuple(images[-1].shape))
        prompts.append(read_png_settings(path).get("prompt"))
    if len(sizes) > 1:
        raise UserError(f"--images {folder}: images of different sizes {sorted(sizes)}")
    return torch.stack(images), (prompts if all(p is not None for p in prompts) else None)


def _device(args: argparse.Namespace) -> torch.device:
    return inference_device(args.device)[0]


# ----------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------

def add_real(scores: InceptionScores, real: Sequence[dict], args: argparse.Namespace) -> InceptionScores:
    """The reference images into ``scores``: from ``--reference_features`` when it holds them, else
    through Inception (and then into that file)."""
    cache, key = args.reference_features, None
    if cache is not None:
        shape = tuple(real[0]["image"].shape)
        key = {"inception_sha256": file_sha256(scores.weights), "dataset": args.reference_dataset,
               "path": str(Path(args.path_to_reference).resolve()) if args.path_to_reference else None,
               "split": args.reference_split, "images": len(real), "image_shape": list(shape),
               "shapes_seed": args.shapes_seed if args.path_to_reference is None else None}
        features = load_reference_features(cache, key)
        if features is not None:
            scores.add_real_features(features)
            logger.info("reference features of %d images read from %s", len(real), cache)
            return scores
    for chunk in batches(real, args.batch_size):
        scores.update(torch.stack([s["image"] for s in chunk]), real=True)
    if cache is not None:
        save_reference_features(cache, key, scores.real_features())
        logger.info("wrote the reference features of %d images to %s", len(real), cache)
    return scores


@torch.no_grad()
def generated_scores(args: argparse.Namespace) -> Dict[str, object]:
    """FID / KID vs the reference images and CLIP score vs the prompts of --ldm or --images."""
    device = _device(args)
    result: Dict[str, object] = {}
    if args.images is not None:
        fake, prompts = generated_from_folder(args.images)
    # The scorers before any sampling: a missing weight file fails before minutes of work.
    scorer = load_clip_scorer(args.clip_model, args.hf_cache_dir, device) if "clip" in args.metrics else None
    inception = None
    if {"fid", "kid"} & set(args.metrics):
        inception = InceptionScores(args.inception_weights, kid_subset_size=args.kid_subset_size, device=device)
    if args.images is not None:
        real = reference_images(args, fake.shape[-1]) if inception is not None else []
    else:
        from modules.generation_record import read_prompts
        from modules.ldm_io import load_ldm_export

        file_prompts = read_prompts(args.prompts_file, "--prompts_file") if args.prompts_file else None
        model = load_ldm_export(args.ldm, text_encoder_cache_dir=args.hf_cache_dir).to(device)
        if model.conditioning != "text" and file_prompts:
            raise UserError(f"--ldm {args.ldm} is {model.conditioning}-conditional: it takes no --prompts_file")
        real = reference_images(args, model.img_size)
        if scorer is not None and model.conditioning != "text":
            raise UserError(f"--ldm {args.ldm} is {model.conditioning}-conditional: no prompts, so no clip metric")
        sampling = settings_from_args(args, model.metadata)
        prompts = None
        if model.conditioning == "text":
            if file_prompts is None and "caption" not in real[0]:
                raise UserError(f"--reference_dataset {args.reference_dataset} has no captions to prompt the text "
                                "model with; pass --prompts_file")
            prompts = ([file_prompts[i % len(file_prompts)] for i in range(len(real))] if file_prompts
                       else [s["caption"] for s in real])
        if model.conditioning == "class" and "label" not in real[0]:
            raise UserError(f"--reference_dataset {args.reference_dataset} has no class labels for the class model")
        started, out = time.perf_counter(), []
        for start in range(0, len(real), args.batch_size):
            idx = range(start, min(len(real), start + args.batch_size))
            out.append(model_to_images(model.generate(
                len(idx), prompts=[prompts[i] for i in idx] if prompts else None,
                class_labels=[real[i]["label"] for i in idx] if model.conditioning == "class" else None,
                guidance_scale=sampling.guidance_scale, sampler=sampling.sampler,
                num_inference_steps=sampling.num_inference_steps, eta=sampling.eta,
                timestep_spacing=sampling.timestep_spacing, karras_sigmas=sampling.karras,
                generator=[torch.Generator().manual_seed(args.seed + i) for i in idx])))
        fake = torch.cat(out)
        result["generation"] = {"sampler": sampling.sampler + (" karras" if sampling.karras else ""),
                                "num_inference_steps": sampling.num_inference_steps,
                                "guidance_scale": sampling.guidance_scale,
                                "seconds_per_image": (time.perf_counter() - started) / len(real)}
    if inception is not None:
        add_real(inception, real, args)
        for chunk in batches(fake, args.batch_size):
            inception.update(chunk, real=False)
        numbers = inception.compute()
        result.update({k: v for k, v in numbers.items() if k.split("_")[0] in args.metrics or k.endswith("images")})
        result["inception_weights"] = str(inception.weights)
    if scorer is not None:
        if prompts is None:
            raise UserError(f"--images {args.images}: the PNGs carry no 'prompt' text, so no CLIP score "
                            "(--metrics fid,kid)")
        for start in range(0, len(fake), args.batch_size):
            scorer.update(list(fake[start:start + args.batch_size].to(device)), prompts[start:start + args.batch_size])
        result["clip_score"] = float(scorer.compute())
        result["clip_model"] = args.clip_model
    result["images"] = int(fake.shape[0])
    return result


def _lpips_metric(spec: str) -> torch.nn.Module:
    from modules.lpips import BACKBONES, LPIPS, load_lpips_export

    if spec in BACKBONES:  # the lpips package's metric: torchvision's pretrained trunk + the package's heads
        metric = LPIPS(spec, pretrained_backbone=True, use_dropout=False)
        metric.load_lpips_package_linear_weights()
        return metric
    if not Path(spec).is_file():
        raise UserError(f"--lpips {spec}: neither a stage-0 export file nor one of {', '.join(sorted(BACKBONES))}")
    return load_lpips_export(Path(spec))[0]


@torch.no_grad()
def vae_scores(args: argparse.Namespace) -> Dict[str, object]:
    """rFID / rKID, PSNR, SSIM (and LPIPS) of --vae's posterior-mode reconstructions of the reference, and
    the mean / std of the reference's scaled latents (posterior samples, as compute_vae_scaling.py
    measures them; stage 2 expects std 1) when the export holds a latent scale."""
    from compute_vae_scaling import latent_sample
    from modules.vae_io import load_vae

    device = _device(args)
    vae, config, metadata = load_vae(args.vae)
    vae.to(device).eval()
    factor = _scaling_factor(metadata, args)
    real = reference_images(args, config.img_size)
    perceptual = _lpips_metric(args.lpips).to(device).eval() if "lpips" in args.metrics else None
    inception = None
    if "rfid" in args.metrics:
        inception = add_real(InceptionScores(args.inception_weights, kid_subset_size=args.kid_subset_size,
                                             device=device), real, args)
    per_image: Dict[str, List[torch.Tensor]] = {m: [] for m in ("psnr", "ssim", "lpips") if m in args.metrics}
    started = time.perf_counter()
    latents: List[torch.Tensor] = []
    for start in range(0, len(real), args.batch_size):
        chunk = real[start:start + args.batch_size]
        images = images_to_model(torch.stack([s["image"] for s in chunk]), device)  # [-1, 1]
        posterior = vae.encode(images)
        recon = vae.decode(posterior.mode()).float().clamp(-1.0, 1.0)
        if factor is not None:  # what stage 2 trains on, drawn as compute_vae_scaling.py draws it
            latents.append(latent_sample(posterior, torch.arange(start, start + len(chunk)), args.seed).cpu())
        if "psnr" in per_image:
            per_image["psnr"].append(psnr(images, recon, IMAGE_RANGE).cpu())
        if "ssim" in per_image:
            per_image["ssim"].append(ssim(images, recon, IMAGE_RANGE).cpu())
        if perceptual is not None:
            per_image["lpips"].append(perceptual(images, recon).flatten().cpu())
        if inception is not None:
            inception.update(model_to_images(recon), real=False)
    result: Dict[str, object] = {k: torch.cat(v).mean().item() for k, v in per_image.items()}
    if inception is not None:
        numbers = inception.compute()
        result.update({"rfid": numbers["fid"], "rkid": numbers["kid"], "rkid_std": numbers["kid_std"],
                       "inception_weights": str(inception.weights)})
    if factor is not None:
        scaled = torch.cat(latents) * factor
        result.update({"scaling_factor": factor, "scaled_mean": scaled.mean().item(), "scaled_std": scaled.std().item()})
    result["images"] = len(real)
    result["seconds"] = time.perf_counter() - started
    return result


def _scaling_factor(metadata: Dict[str, object], args: argparse.Namespace) -> Optional[float]:
    """The export's latent scale for --reference_dataset, else its only one (None: none computed)."""
    from modules.vae_io import scaling_factors_from_metadata

    if metadata.get("kind") == "diffusers":
        return None
    factors = scaling_factors_from_metadata(metadata, args.vae)
    factor = factors.get(args.reference_dataset, next(iter(factors.values())) if len(factors) == 1 else None)
    return None if factor is None else float(factor)


def format_table(result: Dict[str, object]) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items() if not isinstance(v, dict)]
    for key, value in result.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in value.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    setup_logging(True)
    if args.json:
        check_writable_file(args.json, "--json")
    if args.reference_features:
        check_writable_file(args.reference_features, "--reference_features")
    for flag in ("ldm", "vae"):
        if getattr(args, flag) is not None and not Path(getattr(args, flag)).exists():
            raise UserError(f"--{flag} {getattr(args, flag)}: file not found")
    result = vae_scores(args) if args.vae else generated_scores(args)
    source = args.vae or args.ldm or args.images
    result = {"scored": source, "reference": f"{args.reference_dataset}:{args.path_to_reference or 'on the fly'}",
              **result}
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_main(main)
