"""Time to an image: DDIM 50 steps with classifier-free guidance against DDPM 1000, model load excluded.

Builds the text-conditional latent diffusion model of a model config (configs/ldm.yaml: the SD-size
UNet, the tutorial VAE at 256 px and a CLIP-L-shaped text encoder; ``--quick``: the demo's) with
random weights, puts it on the device in the dtype ``inference_ldm.py`` uses (bf16 on GPUs that
have it, fp16 on older ones, float32 on a CPU) and times ``LatentDiffusion.generate`` (what
``inference_ldm.py`` calls: text encoding, the sampler's UNet calls on the doubled guidance batch,
VAE decoding) after one untimed warm-up call. With diffusers installed, its StableDiffusionPipeline
of the same architecture (a folder built by benchmarks/assets.py) runs the same samplers, dtype,
steps and guidance beside it.

Usage:
    python benchmarks/bench_sampling.py --quick --device cpu
    python benchmarks/bench_sampling.py                      # GPU: tutorial sizes
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.assets import CLIP_LAYERS, MODEL_CONFIGS, clip_folder, diffusers_pipeline_folder, load_model_config  # noqa: E402
from benchmarks.common import describe_device, fmt, markdown_table, resolve_device, sync, write_json  # noqa: E402

PROMPT = "a red circle on a blue background"
# (sampler, steps) pairs timed; DDPM's steps are the full training schedule.
RUNS = (("ddim", 50), ("ddpm", 1000))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quick", action="store_true", help="the demo's model (configs/demo/ldm_shapes.yaml): for a CPU")
    p.add_argument("--model_config", default=None, help="default: configs/ldm.yaml (--quick: configs/demo/ldm_shapes.yaml)")
    p.add_argument("--num_images", type=int, default=1, help="images per call")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="timed DDIM calls (median); DDPM runs once")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--clip_layers", type=int, default=None, help="text encoder depth (default 12 = CLIP-L; --quick 2)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="time ours alone")
    p.add_argument("--work_dir", default="bench_out/sampling", help="the CLIP and diffusers folders go here")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.model_config = args.model_config or MODEL_CONFIGS["quick" if args.quick else "tutorial"]
    args.clip_layers = args.clip_layers or CLIP_LAYERS["quick" if args.quick else "tutorial"]
    return args


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """inference_ldm.py's ``--dtype auto``: float32 on a CPU, bf16 (else fp16) on a GPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(ldm, clip: Path, device: torch.device, dtype: torch.dtype):
    """Our LatentDiffusion pipeline with random weights, on ``device`` in ``dtype``, in eval mode."""
    from modules.autoencoder import build_autoencoder
    from modules.ldm_io import LatentDiffusion
    from modules.text_encoder import TextEncoder
    from modules.unet import UNet

    model = LatentDiffusion(unet=UNet(ldm.unet).eval(), vae=build_autoencoder(ldm.vae).eval(),
                            text_encoder=TextEncoder(clip).eval(), config=ldm, scaling_factor=0.18215,
                            shift_factor=0.0, conditioning="text", img_size=ldm.vae.img_size)
    return model.to(device, dtype)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = inference_dtype(args.dtype, device)
    root = Path(args.work_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ldm = load_model_config(args.model_config)
    clip = clip_folder(root, ldm.unet.text_embed_dim, args.clip_layers)
    n, prompts = args.num_images, [PROMPT] * args.num_images
    generator = torch.Generator().manual_seed(0)

    calls: Dict[str, Dict[str, Callable[[], object]]] = {"ours": {}}
    model = ours(ldm, clip, device, dtype)
    for sampler, steps in RUNS:
        calls["ours"][sampler] = lambda s=sampler, k=steps: model.generate(
            n, prompts=prompts, guidance_scale=args.guidance_scale, sampler=s, num_inference_steps=k,
            generator=generator)
    if args.diffusers:
        try:
            from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
        except ImportError:
            print("diffusers is not installed: timing ours alone")
        else:
            folder = diffusers_pipeline_folder(root, ldm, clip, ldm.vae.img_size)
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
            pipe.set_progress_bar_config(disable=True)
            # steps_offset 0 as ours (the pipeline sets 1 on old configs, which DDPM at 1000 steps overruns)
            schedulers = {"ddim": DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=0),
                          "ddpm": DDPMScheduler.from_config(pipe.scheduler.config, steps_offset=0)}
            calls["diffusers"] = {}
            for sampler, steps in RUNS:
                def call(s=sampler, k=steps):
                    pipe.scheduler = schedulers[s]
                    return pipe(prompts, num_inference_steps=k, guidance_scale=args.guidance_scale,
                                height=ldm.vae.img_size, width=ldm.vae.img_size, output_type="pt",
                                generator=torch.Generator().manual_seed(0))
                calls["diffusers"][sampler] = call

    seconds: Dict[str, Dict[str, float]] = {}
    for side, by_sampler in calls.items():
        with torch.inference_mode():
            by_sampler["ddim"]()  # warm-up: kernels, allocator, autotuning
            seconds[side] = {s: timed(fn, device, args.repeats if s == "ddim" else 1) for s, fn in by_sampler.items()}

    print(f"time to {n} image(s) at {ldm.vae.img_size} px, {describe_device(device)}, {dtype}, model "
          f"{args.model_config} (random weights, CLIP {ldm.unet.text_embed_dim}x{args.clip_layers}), guidance "
          f"{args.guidance_scale} (one UNet call on the doubled batch per step), model load excluded")
    header = ["sampler", "steps"] + [f"{side} s" for side in seconds] + (
        ["diffusers / ours"] if "diffusers" in seconds else [])
    rows: List[List[str]] = []
    for sampler, steps in RUNS:
        row = [sampler.upper(), str(steps)] + [f"{seconds[side][sampler]:.2f}" for side in seconds]
        if "diffusers" in seconds:
            row.append(f"{seconds['diffusers'][sampler] / seconds['ours'][sampler]:.2f}x")
        rows.append(row)
    print(markdown_table(header, rows))
    ratio = seconds["ours"]["ddpm"] / seconds["ours"]["ddim"]
    print(f"DDIM 50 is {ratio:.1f}x faster than DDPM 1000 (ours); {fmt(n / seconds['ours']['ddim'], '.2f')} images/s")
    result = {"benchmark": "sampling", "device": describe_device(device), "dtype": str(dtype), "num_images": n,
              "img_size": ldm.vae.img_size, "seconds": seconds}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
