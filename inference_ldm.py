"""Generate images with a trained latent diffusion model (the stage-2 export).

Everything is rebuilt from the one file stage 2 writes (``<working_directory>/model.safetensors``):
the UNet, the VAE, the text encoder, the latent scale and the noise schedule. Sampling is DDIM
(Song et al. 2021), DDPM (Ho et al. 2020), DPM-Solver++ 2M, Euler, Euler ancestral or LMS
(optionally on Karras sigmas) with classifier-free guidance (Ho & Salimans 2022):
``eps = eps(uncond) + w (eps(cond) - eps(uncond))``, where the unconditional branch is the
negative prompt (default ``""``) for text models and the null class for class models. With
``--init_image`` it runs img2img (SDEdit, Meng et al. 2022): the image is encoded, noised to the
step that ``--strength`` picks, and denoised from there. The same ``--seed`` gives the same bytes.

Usage (the tutorial's command):

    python inference_ldm.py --model_config "configs/ldm.yaml" \\
      --path_to_weights "work_dir/diffusion_cc/model.safetensors" --text_conditional \\
      --training_dataset "conceptual_captions" --prompt "A beautiful sunset at the beach"

``--model_config`` and ``--training_dataset`` are checked against the export and only used when
the file does not say (its own config describes its weights). ``--prompts_file`` takes one prompt
per line ('#' lines and blank lines skipped). ``--output`` is a folder (default ``generated/``):
one PNG per image, ``<prompt>-seed<S>.png``, and with ``--num_images`` > 1 a grid per prompt,
``<prompt>-grid.png``; or, for one prompt, a single ``.png`` file (a grid of its images).

Image i of a prompt is drawn with seed ``--seed`` + i from its own generator, so any one image
can be made again alone (``--seed S+i --num_images 1``), and ``--batch_size`` (images per UNet
batch) changes the speed, not the images. Every PNG carries its settings as PNG text, and a
``parameters`` text in the form the Stable Diffusion web UIs read (:mod:`modules.generation_record`).
The sampler, steps and guidance that no flag gives are those stage 2 drew its sample grids with
(recorded in the export; :mod:`modules.sampling_settings` says how flags and export combine), and
the log says which.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from modules.cli import run_main
from modules.config import to_dict
from modules.errors import OneLineArgumentParser, UserError
from modules.image_datasets import DATASET_NAMES, build_image_transform, images_to_model, model_to_images
from modules.export import check_export_kind, read_export_metadata
from modules.generation_record import file_sha256, read_prompts, save_png
from modules.ldm_io import (DTYPES, LDM_EXPORT_KIND, LatentDiffusion, build_sampler,
                            inference_device, load_ldm_export)
from modules.model_config import LDMConfig, load_ldm_config
from modules.paths import check_writable_file, check_writable_folder
from modules.sampling_settings import add_sampling_arguments, check_sampling_arguments, settings_from_args
from modules.cli import positive_int, setup_logging

logger = logging.getLogger("ldm")
REPO_ROOT = Path(__file__).resolve().parent


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_weights", required=True, help="the stage-2 export (model.safetensors)")
    parser.add_argument("--model_config", default=None,
                        help="model config; the export's own config wins, differences are reported")
    parser.add_argument("--text_conditional", action="store_true", help="the model is text-conditional (checked)")
    parser.add_argument("--training_dataset", default=None,
                        help="the dataset the model was trained on (checked against the export)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None, help="text prompt (text-conditional models)")
    prompts.add_argument("--prompts_file", default=None,
                         help="a text file of prompts, one per line ('#' lines and blank lines skipped)")
    parser.add_argument("--negative_prompt", default=None,
                        help="what to steer away from: the unconditional branch of guidance (default: \"\")")
    parser.add_argument("--class_label", default=None,
                        help="class index or class folder name (class-conditional models)")
    parser.add_argument("--num_images", type=positive_int, default=1, help="images per prompt (or per class)")
    parser.add_argument("--batch_size", type=positive_int, default=4,
                        help="images per UNet batch (speed and memory only: the images do not depend on it)")
    add_sampling_arguments(parser)
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
    check_sampling_arguments(parser, args)
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


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "sample"


def conditions(args: argparse.Namespace, model: LatentDiffusion) -> List[Tuple[str, dict]]:
    """(file-name stem, generate() keywords for one image) per condition: each prompt of
    ``--prompt`` / ``--prompts_file``, the ``--class_label``, or one unconditional condition."""
    if model.conditioning == "text":
        if args.class_label is not None:
            raise UserError(f"{args.path_to_weights} is text-conditional; it takes --prompt or --prompts_file, "
                            "not --class_label")
        if args.prompt is None and args.prompts_file is None:
            raise UserError("this model is text-conditional: pass --prompt \"...\" or --prompts_file FILE")
        texts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file, "--prompts_file")
        for text in texts:
            warn_if_truncated(model, text, "--prompt" if args.prompt is not None else f"prompt {text[:40]!r}")
        if args.negative_prompt is not None:
            warn_if_truncated(model, args.negative_prompt, "--negative_prompt")
        stems = [slugify(t) for t in texts]
        if args.prompts_file is not None:  # prompts may share a stem: the line's index keeps them apart
            stems = [f"{i:03d}-{stem}" for i, stem in enumerate(stems)]
        return [(stem, {"prompt": text, "negative_prompt": args.negative_prompt or ""}) for stem, text in zip(stems, texts)]
    if args.text_conditional:
        raise UserError(f"--text_conditional: {args.path_to_weights} is not text-conditional "
                        f"({model.conditioning} conditioning)")
    if args.prompt is not None or args.prompts_file is not None or args.negative_prompt is not None:
        kind = "class-conditional" if model.conditioning == "class" else "unconditional"
        raise UserError(f"{args.path_to_weights} is {kind}; it takes no --prompt / --prompts_file / --negative_prompt")
    if model.conditioning == "class":
        if args.class_label is None:
            raise UserError("this model is class-conditional: pass --class_label (an index or a class name)")
        return [(slugify(f"class-{args.class_label}"), {"class_label": resolve_class_label(args.class_label, model)})]
    if args.class_label is not None:
        raise UserError(f"{args.path_to_weights} is unconditional; it takes no --class_label")
    return [("sample", {})]


def to_pil(image: torch.Tensor):
    """(3, H, W) in [-1, 1] -> an RGB PIL image, rounded as torchvision's save_image rounds."""
    from PIL import Image

    return Image.fromarray(model_to_images(image).permute(1, 2, 0).numpy())


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    args = parse_args(argv)
    setup_logging(True)
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise UserError(f"--init_image {args.init_image}: file not found")  # before the slow model load
    single_file = Path(args.output).suffix.lower() == ".png"
    if single_file and args.prompts_file is not None:
        raise UserError(f"--output {args.output}: with --prompts_file the output is a folder (a grid per prompt)")
    if args.prompts_file is not None:
        read_prompts(args.prompts_file, "--prompts_file")  # before the slow model load
    check_output(args.output)
    device, dtype = inference_device(args.device, args.dtype)

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

    model.to(device, dtype)

    # -- conditions and settings ----------------------------------------------------------
    todo = conditions(args, model)
    sampling = settings_from_args(args, model.metadata)
    guidance = sampling.guidance_scale
    init = load_init_image(args.init_image, model.img_size, 1) if args.init_image else None
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    n = args.num_images
    common = {
        "negative_prompt": None, "guidance_scale": guidance, "sampler": sampling.sampler,
        "num_inference_steps": sampling.num_inference_steps, "eta": sampling.eta if sampling.sampler == "ddim" else None,
        "timestep_spacing": build_sampler(model.config.diffusion, sampling.sampler, sampling.eta,
                                          sampling.timestep_spacing, sampling.karras).timestep_spacing,
        "karras": True if sampling.karras else None,
        "size": f"{model.img_size}x{model.img_size}",
        "weights": weights.name, "weights_sha256": file_sha256(weights),
        "init_image": Path(args.init_image).name if init is not None else None,
        "strength": args.strength if init is not None else None,
    }
    # One job per image: (condition index, image index, seed); image i of a condition has seed + i.
    jobs = [(c, i, seed + i) for c in range(len(todo)) for i in range(n)]
    logger.info("sampling %d image(s) (%d per condition), seeds %d-%d, batches of %d%s", len(jobs), n,
                seed, seed + n - 1,
                args.batch_size, f", img2img strength {args.strength}" if init is not None else "")

    # -- sample, in batches; every image from its own generator ---------------------------------
    images: List[Optional[torch.Tensor]] = [None] * len(jobs)
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        keywords = [todo[c][1] for c, _, _ in batch]
        generators = [torch.Generator().manual_seed(s) for _, _, s in batch]  # CPU draws: the same on any device
        out = model.generate(
            len(batch),
            prompts=[k["prompt"] for k in keywords] if model.conditioning == "text" else None,
            negative_prompts=[k["negative_prompt"] for k in keywords] if model.conditioning == "text" else None,
            class_labels=[k["class_label"] for k in keywords] if model.conditioning == "class" else None,
            guidance_scale=guidance, sampler=sampling.sampler, num_inference_steps=sampling.num_inference_steps,
            eta=sampling.eta, timestep_spacing=sampling.timestep_spacing, karras_sigmas=sampling.karras,
            generator=generators,
            init_images=init.expand(len(batch), -1, -1, -1) if init is not None else None,
            strength=args.strength if init is not None else 1.0)
        for k, image in enumerate(out):
            images[start + k] = image

    # -- save: one PNG per image (+ a grid per condition), or one file ----------------------------
    from torchvision.utils import make_grid

    out_dir = Path(args.output)
    paths: List[Path] = []
    for c, (stem, keywords) in enumerate(todo):
        mine = [(i, s, images[j]) for j, (cc, i, s) in enumerate(jobs) if cc == c]
        settings = {**common, **keywords}
        if single_file:
            grid = make_grid(torch.stack([img for _, _, img in mine]), nrow=math.ceil(math.sqrt(n)), padding=2,
                             pad_value=-1.0) if n > 1 else mine[0][2]
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            paths.append(save_png(to_pil(grid), out_dir, {**settings, "seed": seed if n == 1 else None,
                                                         "seeds": [s for _, s, _ in mine] if n > 1 else None}))
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        for _, s, img in mine:
            paths.append(save_png(to_pil(img), out_dir / f"{stem}-seed{s}.png", {**settings, "seed": s}))
        if n > 1:
            grid = make_grid(torch.stack([img for _, _, img in mine]), nrow=math.ceil(math.sqrt(n)), padding=2,
                             pad_value=-1.0)
            paths.append(save_png(to_pil(grid), out_dir / f"{stem}-grid.png",
                                  {**settings, "seeds": [s for _, s, _ in mine]}))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run_main(main)
