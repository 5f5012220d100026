"""Quality of trained exports on `shapes`: how well the VAE reconstructs, how well the LDM follows prompts.

    python benchmarks/bench_quality.py --vae demo_out/vae/model.safetensors \
      --dataset shapes --path_to_dataset demo_out/shapes_test \
      --ldm demo_out/ldm/model.safetensors --num_samples 64

Two tables, each part optional (give --vae, --ldm or both):

- **VAE** (a stage-1 export): every image of ``--dataset/--path_to_dataset`` (at most
  ``--num_images``, resized by the short side and center-cropped to the VAE's ``img_size``) is
  encoded, its posterior mode decoded, and PSNR and SSIM (modules/image_metrics.py, data range
  2 on [-1, 1]) are averaged over the images; with ``--lpips`` (a stage-0 export) LPIPS too.
  Give it images the VAE never saw (``scripts/demo.py`` renders shapes with another seed). Also
  the mean and std of the scaled latents (the export's factor for ``--dataset``, else its only one)
  of those images: stage 2 expects std 1.
- **LDM** (a text-conditional stage-2 export trained on shapes): ``--num_samples`` prompts drawn
  with ``--seed`` from all shapes captions (shape color != background) are sampled (sampler, steps
  and classifier-free guidance by default those ``inference_ldm.py`` picks for the export, the
  flags as there; image i from its own generator, seed + i), and
  ``modules.shapes.caption_accuracy`` reads color, shape and background back from the pixels.
  Beside it: chance (a random caption: 1/8 color, 1/3 shape, 1/8 background, 1/168 all) and the
  same reader on the prompts' own images passed through the export's VAE (what a perfect
  diffusion model would score: the ceiling that the decoder and the reader allow).

Prints plain-text tables; ``--json`` also writes the numbers to a file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cli import run_main  # noqa: E402
from modules.errors import UserError  # noqa: E402
from modules.image_datasets import images_to_model  # noqa: E402
from modules.sampling_settings import add_sampling_arguments, check_sampling_arguments, settings_from_args  # noqa: E402
from modules.shapes import COLOR_NAMES, SHAPE_NAMES, ShapeSpec, caption_accuracy, render_shape  # noqa: E402

ACCURACY_KEYS = ("color", "shape", "background", "all")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vae = parser.add_argument_group("VAE reconstruction")
    vae.add_argument("--vae", default=None, help="a stage-1 export (model.safetensors)")
    vae.add_argument("--dataset", default="shapes", help="dataset name of the reconstruction images (as the trainers)")
    vae.add_argument("--path_to_dataset", default=None,
                     help="their folder (shapes without it: rendered on the fly with --shapes_seed)")
    vae.add_argument("--num_images", type=int, default=256, help="reconstruct at most this many images")
    vae.add_argument("--shapes_seed", type=int, default=12345,
                     help="seed of on-the-fly shapes (not the training data's 0)")
    vae.add_argument("--lpips", default=None, help="a stage-0 LPIPS export: adds an LPIPS column")
    vae.add_argument("--batch_size", type=int, default=64)
    ldm = parser.add_argument_group("LDM prompt following")
    ldm.add_argument("--ldm", default=None, help="a text-conditional stage-2 export trained on shapes")
    ldm.add_argument("--num_samples", type=int, default=64, help="prompts (one image each)")
    add_sampling_arguments(ldm)  # default: inference_ldm.py's for the export (what stage 2's grids used)
    ldm.add_argument("--save_grid", default=None, help="PNG path for a grid of the generated samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the sampling noise")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if args.vae is None and args.ldm is None:
        parser.error("give --vae, --ldm or both")
    for name in ("num_images", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned first column and right-aligned numbers, under a title line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title, "  ".join(f"{h:<{widths[0]}}" if i == 0 else f"{h:>{widths[i]}}" for i, h in enumerate(header))]
    for row in rows:
        lines.append("  ".join(f"{c:<{widths[0]}}" if i == 0 else f"{c:>{widths[i]}}" for i, c in enumerate(row)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------

def vae_quality(args: argparse.Namespace) -> Dict[str, float]:
    """Mean PSNR / SSIM (/ LPIPS) of posterior-mode reconstructions: evaluate_ldm.py's --vae scores."""
    from evaluate_ldm import parse_args as evaluate_args, vae_scores

    argv = ["--vae", args.vae, "--reference_dataset", args.dataset, "--num_images", str(args.num_images),
            "--shapes_seed", str(args.shapes_seed), "--batch_size", str(args.batch_size), "--device", "cpu",
            "--metrics", "psnr,ssim" + (",lpips" if args.lpips else "")]
    argv += ["--path_to_reference", args.path_to_dataset] if args.path_to_dataset else []
    argv += ["--lpips", args.lpips] if args.lpips else []
    argv += ["--seed", str(args.seed)]
    return vae_scores(evaluate_args(argv))


# ----------------------------------------------------------------------------------------
# LDM
# ----------------------------------------------------------------------------------------

def draw_prompts(count: int, seed: int) -> List[ShapeSpec]:
    """``count`` shapes specs with uniformly drawn (color, shape, background != color), each a
    prompt, and a random geometry (so their images can be rendered for the ceiling row)."""
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(count):
        color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        background = COLOR_NAMES[rng.choice([i for i, c in enumerate(COLOR_NAMES) if c != color])]
        size = float(rng.uniform(0.3, 0.6))
        specs.append(ShapeSpec(shape=SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))], color=color, background=background,
                               size=size, x=float(rng.uniform(0, 1 - size)), y=float(rng.uniform(0, 1 - size))))
    return specs


def chance_accuracy() -> Dict[str, float]:
    """Accuracy of a caption drawn at random (background != color): 1/8, 1/3, 1/8 and 1/(8*3*7)."""
    colors, shapes = len(COLOR_NAMES), len(SHAPE_NAMES)
    return {"color": 1 / colors, "shape": 1 / shapes, "background": 1 / colors,
            "all": 1 / (colors * shapes * (colors - 1))}


@torch.no_grad()
def ldm_quality(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Caption accuracy of generated samples, of the prompts' images through the VAE, and of chance."""
    from modules.ldm_io import load_ldm_export

    model = load_ldm_export(args.ldm)
    if model.conditioning != "text":
        raise UserError(f"{args.ldm} is {model.conditioning}-conditional; the prompt benchmark needs a text model")
    sampling = settings_from_args(args, model.metadata)
    specs = draw_prompts(args.num_samples, args.seed)
    prompts = [spec.caption for spec in specs]
    started = time.perf_counter()
    samples = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(start, start + len(batch))]
        samples.append(model.generate(len(batch), prompts=batch, guidance_scale=sampling.guidance_scale,
                                      sampler=sampling.sampler, num_inference_steps=sampling.num_inference_steps,
                                      eta=sampling.eta, timestep_spacing=sampling.timestep_spacing,
                                      karras_sigmas=sampling.karras, generator=generators))
    images = torch.cat(samples)  # (N, 3, S, S) in [-1, 1]
    seconds = time.perf_counter() - started
    if args.save_grid:
        from torchvision.utils import save_image

        Path(args.save_grid).parent.mkdir(parents=True, exist_ok=True)
        save_image(images * 0.5 + 0.5, args.save_grid, nrow=8)

    # Ceiling: the prompts' own images, rendered and passed through the export's VAE.
    from modules.image_datasets import ToUint8Tensor

    to_tensor = ToUint8Tensor()
    real = images_to_model(torch.stack([to_tensor(render_shape(spec, model.img_size)) for spec in specs]), "cpu")
    decoded = model.decode_latents(model.encode_images(real))
    return {
        "samples": caption_accuracy(list(images), prompts) | {"seconds": seconds, "count": len(prompts)},
        "settings": {"sampler": sampling.sampler + (" karras" if sampling.karras else ""),
                     "num_inference_steps": sampling.num_inference_steps, "guidance_scale": sampling.guidance_scale},
        "vae_ceiling": caption_accuracy(list(decoded), prompts),
        "chance": chance_accuracy(),
    }


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    results: Dict[str, object] = {}
    if args.vae is not None:
        vae = vae_quality(args)
        results["vae"] = vae
        header = ["VAE export", "images", "PSNR dB", "SSIM"] + (["LPIPS"] if "lpips" in vae else [])
        row = [args.vae, str(vae["images"]), f"{vae['psnr']:.2f}", f"{vae['ssim']:.4f}"]
        row += [f"{vae['lpips']:.4f}"] if "lpips" in vae else []
        print(table(f"VAE reconstruction of {args.path_to_dataset or args.dataset} (posterior mode)", header, [row]))
        print()
    if args.ldm is not None:
        ldm = ldm_quality(args)
        results["ldm"] = ldm
        rows = [
            [f"samples (guidance {ldm['settings']['guidance_scale']:g})"]
            + [f"{ldm['samples'][k]:.3f}" for k in ACCURACY_KEYS],
            ["prompt images through the VAE"] + [f"{ldm['vae_ceiling'][k]:.3f}" for k in ACCURACY_KEYS],
            ["chance"] + [f"{ldm['chance'][k]:.3f}" for k in ACCURACY_KEYS],
        ]
        title = (f"LDM prompt following: {args.num_samples} prompts, {ldm['settings']['sampler']} "
                 f"{ldm['settings']['num_inference_steps']} steps ({ldm['samples']['seconds']:.0f} s, "
                 f"{ldm['samples']['seconds'] / args.num_samples:.3f} s per image), caption read back from the pixels")
        print(table(title, ["", *ACCURACY_KEYS], rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_main(main)
