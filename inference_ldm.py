"""Generate images with a trained latent diffusion model (the stage-2 export).

Everything is rebuilt from the one file stage 2 writes (``<working_directory>/model.safetensors``):
the UNet, the VAE, the text encoder, the latent scale and the noise schedule. Sampling is DDIM
(Song et al. 2021) or DDPM (Ho et al. 2020) with classifier-free guidance (Ho & Salimans 2022):
``eps = eps(uncond) + w (eps(cond) - eps(uncond))``, where the unconditional branch is the
negative prompt (default ``""``) for text models and the null class for class models. With
``--init_image`` it runs img2img (SDEdit, Meng et al. 2022): the image is encoded, noised to the
step that ``--strength`` picks, and denoised from there. The same ``--seed`` gives the same bytes.

Usage (the tutorial's command):

    python inference_ldm.py --model_config "configs/ldm.yaml" \\
      --path_to_weights "work_dir/diffusion_cc/model.safetensors" --text_conditional \\
      --training_dataset "conceptual_captions" --prompt "A beautiful sunset at the beach"

``--model_config`` and ``--training_dataset`` are checked against the export and only used when
the file does not say (its own config describes its weights); ``--output`` is a PNG file (several
images: one grid) or a folder (one PNG per image; default ``generated/``).
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from modules.cli import run_main
from modules.config import to_dict
from modules.errors import OneLineArgumentParser, UserError
from modules.image_datasets import DATASET_NAMES, build_image_transform, images_to_model
from modules.export import check_export_kind, read_export_metadata
from modules.ldm_io import LDM_EXPORT_KIND, LatentDiffusion, load_ldm_export
from modules.model_config import LDMConfig, load_ldm_config
from modules.paths import check_writable_file, check_writable_folder
from modules.cli import positive_int, setup_logging

logger = logging.getLogger("ldm")
REPO_ROOT = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_weights", required=True, help="the stage-2 export (model.safetensors)")
    parser.add_argument("--model_config", default=None,
                        help="model config; the export's own config wins, differences are reported")
    parser.add_argument("--text_conditional", action="store_true", help="the model is text-conditional (checked)")
    parser.add_argument("--training_dataset", default=None,
                        help="the dataset the model was trained on (checked against the export)")
    parser.add_argument("--prompt", default=None, help="text prompt (text-conditional models)")
    parser.add_argument("--negative_prompt", default=None,
                        help="what to steer away from: the unconditional branch of guidance (default: \"\")")
    parser.add_argument("--class_label", default=None,
                        help="class index or class folder name (class-conditional models)")
    parser.add_argument("--num_images", type=positive_int, default=1)
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance weight (1 = off)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--num_inference_steps", type=positive_int, default=50)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0 = deterministic)")
    parser.add_argument("--timestep_spacing", choices=("leading", "trailing", "linspace"), default="leading")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and printed)")
    parser.add_argument("--init_image", default=None, help="img2img: start from this image")
    parser.add_argument("--strength", type=float, default=None,
                        help="img2img: the part of the schedule to run, 0 = keep the image, 1 = ignore it "
                             "(default 0.8)")
    parser.add_argument("--output", default="generated", help="PNG file, or a folder for one PNG per image")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                        help="weights dtype (auto: bfloat16/float16 on a GPU, float32 on a CPU)")
    parser.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache for a hub text encoder")
    args = parser.parse_args(argv)
    if args.strength is not None and args.init_image is None:
        parser.error("--strength is an img2img setting: it needs --init_image")
    args.strength = 0.8 if args.strength is None else args.strength
    if not 0.0 <= args.strength <= 1.0:
        parser.error(f"--strength must be in [0, 1], got {args.strength}")
    if args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    return args


def _flatten(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


def report_config_differences(given: LDMConfig, model: LatentDiffusion, source: str) -> None:
    """Log the keys where --model_config disagrees with the export (the export describes the weights)."""
    ours = dict(_flatten({k: v for k, v in to_dict(given).items() if k != "scaling_constants"}))
    theirs = dict(_flatten({k: v for k, v in to_dict(model.config).items() if k != "scaling_constants"}))
    differ = sorted(k for k in ours if ours.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        logger.info("%s differs from the export's own model config in %s; using the export's "
                    "(it describes the weights)", source, shown)


def resolve_class_label(text: str, model: LatentDiffusion) -> int:
    """A class index, or a class folder name of the training data."""
    names = model.class_names or []
    if text in names:
        return names.index(text)
    try:
        return int(text)
    except ValueError:
        known = f"; known names: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names else ""
        raise UserError(f"--class_label {text!r} is neither a class index nor a class name{known}") from None


def load_init_image(path: str, img_size: int, count: int) -> torch.Tensor:
    """The img2img start image: resized (short side) and center-cropped to the model's size,
    (count, 3, S, S) float32 in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--init_image {path}: file not found")
    try:
        with Image.open(file) as img:
            image = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"--init_image {path}: not a readable image ({err})") from None
    pixels = build_image_transform(img_size, crop="center")(image)  # (3, S, S) uint8
    tensor = images_to_model(pixels.unsqueeze(0), "cpu")  # (1, 3, S, S) in [-1, 1]
    return tensor.expand(count, -1, -1, -1)


def check_output(output: str) -> None:
    """``--output`` can be written (a .png file, or a folder), checked before the slow model load."""
    if Path(output).suffix.lower() == ".png":
        check_writable_file(output, "--output")
    else:
        check_writable_folder(output, "--output")


def warn_if_truncated(model: LatentDiffusion, text: str, flag: str) -> None:
    """Say once when ``text`` has more tokens than the text encoder reads (the rest is dropped,
    as CLIP does: its position embeddings stop at 77)."""
    encoder = model.text_encoder
    ids = encoder.tokenizer(text, truncation=False, padding=False, verbose=False)["input_ids"]
    if len(ids) > encoder.max_length:
        logger.warning("%s has %d tokens; the text encoder reads only the first %d (start and end tokens included), "
                       "the rest is dropped", flag, len(ids), encoder.max_length)


def output_paths(output: str, count: int, slug: str, seed: int) -> List[Path]:
    """One PNG path per image in a folder, or a single file (a grid when count > 1)."""
    out = Path(output)
    if out.suffix.lower() == ".png":
        return [out]
    return [out / f"{slug}-seed{seed}-{i:03d}.png" for i in range(count)]


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    args = parse_args(argv)
    setup_logging(True)
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise UserError(f"--init_image {args.init_image}: file not found")  # before the slow model load
    check_output(args.output)

    # -- model --------------------------------------------------------------------------
    given_config = None
    if args.model_config is not None:
        config_path = Path(args.model_config)
        if not config_path.exists() and not config_path.is_absolute() and (REPO_ROOT / config_path).exists():
            config_path = REPO_ROOT / config_path
        given_config = load_ldm_config(config_path)
    if args.training_dataset is not None and args.training_dataset not in DATASET_NAMES:
        raise UserError(f"--training_dataset {args.training_dataset!r} is unknown; known datasets: "
                        f"{', '.join(DATASET_NAMES)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-tensor loading bar for the text encoder
    weights = Path(args.path_to_weights)
    check_export_kind(read_export_metadata(weights), weights, LDM_EXPORT_KIND, "--path_to_weights")
    model = load_ldm_export(args.path_to_weights, fallback_config=given_config,
                            text_encoder_cache_dir=args.hf_cache_dir)
    if given_config is not None:
        report_config_differences(given_config, model, args.model_config)
    trained_on = model.metadata.get("training_dataset")
    if args.training_dataset is not None and trained_on and args.training_dataset != trained_on:
        logger.warning("--training_dataset %s, but the export was trained on %s; using the export's latent scale %.6g",
                       args.training_dataset, trained_on, model.scaling_factor)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.float32 if device.type == "cpu" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        dtype = DTYPES[args.dtype]
    model.to(device, dtype)

    # -- conditions -----------------------------------------------------------------------
    n = args.num_images
    prompts = negatives = labels = None
    if model.conditioning == "text":
        if args.prompt is None:
            raise UserError("this model is text-conditional: pass --prompt \"...\"")
        prompts = [args.prompt] * n
        negatives = [args.negative_prompt] * n if args.negative_prompt is not None else None
        warn_if_truncated(model, args.prompt, "--prompt")
        if args.negative_prompt is not None:
            warn_if_truncated(model, args.negative_prompt, "--negative_prompt")
        slug = args.prompt
    else:
        if args.text_conditional:
            raise UserError(f"--text_conditional: {args.path_to_weights} is not text-conditional "
                            f"({model.conditioning} conditioning)")
        if args.prompt is not None or args.negative_prompt is not None:
            kind = "class-conditional" if model.conditioning == "class" else "unconditional"
            raise UserError(f"{args.path_to_weights} is {kind}; it takes no --prompt / --negative_prompt")
        if model.conditioning == "class":
            if args.class_label is None:
                raise UserError("this model is class-conditional: pass --class_label (an index or a class name)")
            labels = [resolve_class_label(args.class_label, model)] * n
            slug = f"class-{args.class_label}"
        else:
            if args.class_label is not None:
                raise UserError(f"{args.path_to_weights} is unconditional; it takes no --class_label")
            slug = "sample"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", slug).strip("_")[:60] or "sample"
    init = load_init_image(args.init_image, model.img_size, n) if args.init_image else None

    # -- sample ---------------------------------------------------------------------------
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    generator = torch.Generator().manual_seed(seed)  # CPU draws: the same images on any device
    logger.info("sampling %d image(s) with %s, %d steps, guidance %.3g, seed %d%s", n, args.sampler,
                args.num_inference_steps, args.guidance_scale, seed,
                f", img2img strength {args.strength}" if init is not None else "")
    images = model.generate(n, prompts=prompts, negative_prompts=negatives, class_labels=labels,
                            guidance_scale=args.guidance_scale, sampler=args.sampler,
                            num_inference_steps=args.num_inference_steps, eta=args.eta,
                            timestep_spacing=args.timestep_spacing, generator=generator,
                            init_images=init, strength=args.strength if init is not None else 1.0)

    # -- save -----------------------------------------------------------------------------
    from torchvision.utils import save_image

    paths = output_paths(args.output, n, slug, seed)
    pixels = images * 0.5 + 0.5  # [-1, 1] -> [0, 1]
    if len(paths) == 1:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        save_image(pixels, str(paths[0]), nrow=math.ceil(math.sqrt(n)))  # a grid when n > 1
    else:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, image in zip(paths, pixels):
            save_image(image, str(path))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run_main(main)
