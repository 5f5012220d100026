"""Turn a text-conditional stage-2 export into a diffusers StableDiffusionPipeline folder.

Usage:

    python export_diffusers.py --path_to_weights work_dir/diffusion_cc/model.safetensors \\
      --output_dir work_dir/diffusion_cc/diffusers

and then, with diffusers installed:

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("work_dir/diffusion_cc/diffusers")
    image = pipe("A beautiful sunset at the beach", num_inference_steps=50).images[0]

Reads the export (``<working_directory>/model.safetensors`` of stage2_diffusion_trainer.py).
Writes ``--output_dir`` with unet/, vae/ (the latent scale as ``scaling_factor``), text_encoder/
+ tokenizer/ (the export's embedded CLIP, or the hub model it names, from the Hugging Face cache),
scheduler/ (a DDIMScheduler of the training schedule, set as our DDIM sampler) and
model_index.json, without a safety checker. Writing needs no diffusers; reading does.
A class-conditional or unconditional export, a file that is not a stage-2 export, or an existing
``--output_dir`` (without ``--overwrite``) is a one-line error, exit code 2. See
modules/diffusers_interop.py for what maps to what, and for the one behavioural difference
(the pipeline attends to padded caption tokens, our model masks them).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

from modules.cli import run_main, setup_logging
from modules.diffusers_interop import export_stable_diffusion_pipeline
from modules.errors import OneLineArgumentParser, UserError
from modules.ldm_io import load_ldm_export
from modules.paths import check_writable_folder

logger = logging.getLogger("ldm")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_weights", required=True, help="the stage-2 export (model.safetensors)")
    parser.add_argument("--output_dir", required=True, help="the pipeline folder to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--timestep_spacing", choices=("leading", "trailing", "linspace"), default="leading",
                        help="the DDIM scheduler's timestep spacing (default: leading, as inference_ldm.py)")
    parser.add_argument("--hf_cache_dir", default=None,
                        help="Hugging Face cache of the text encoder, for an export that names a hub model")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    weights, out = Path(args.path_to_weights), Path(args.output_dir)
    if out.exists() and not args.overwrite:
        raise UserError(f"--output_dir {out} exists; pass --overwrite to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder")
    check_writable_folder(out.parent, "--output_dir")  # the folder is written beside it, then renamed
    model = load_ldm_export(weights, text_encoder_cache_dir=args.hf_cache_dir)
    if model.conditioning != "text":  # before anything is removed or written
        kind = "class-conditional" if model.conditioning == "class" else "unconditional"
        raise UserError(f"--path_to_weights {weights} is {kind}; a StableDiffusionPipeline needs a text-conditional "
                        "model")
    staging = out.with_name(out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        export_stable_diffusion_pipeline(model, staging, str(weights), args.timestep_spacing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    logger.info("wrote %s (StableDiffusionPipeline; %s, %d x %d)", out, model.config.diffusion.prediction_type,
                model.img_size, model.img_size)
    return out


if __name__ == "__main__":
    run_main(main)
