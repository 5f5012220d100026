"""Our stage-2 trainer against diffusers' ``examples/text_to_image/train_text_to_image.py``: images/s
at the same model, data, resolution, batch and device, side by side in one run.

What a user would pick instead of ``stage2_diffusion_trainer.py`` is the diffusers example script.
This benchmark gives both the same job:

- model: a diffusers-format Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/,
  scheduler/) built with the real diffusers/transformers classes from OUR model config
  (configs/ldm.yaml; ``--quick``: configs/demo/ldm_shapes.yaml) with random weights: the UNet of
  the ``unet:`` section (same parameter count as ours, checked), our VAE exported as a diffusers
  AutoencoderKL (our trainer loads the same ``vae/`` folder), a random-init CLIP text model of the
  UNet's text width with a real tokenizer (CLIP-L's 12 layers; ``--quick``: 2) that both use;
- data: the same captioned ``shapes`` images, as our image folder and, linked, as the
  ``imagefolder`` + ``metadata.jsonl`` layout the script's ``--train_data_dir`` reads;
- settings: the script's defaults (no EMA, no gradient checkpointing, 0 data-loader workers, the VAE
  and text encoder run every step) with ``--resolution``, ``--train_batch_size``, ``--max_train_steps``
  and ``--mixed_precision`` set like ours; ours with our YAML's defaults (``default``: the VAE and
  text encoder run every step, EMA on) and with ``cache_latents: true`` (``cached``: latents and
  text states encoded once).

Both are launched with ``accelerate launch`` on one process. Images/s is timed by this script from
each run's progress bar as it is drawn: from the first step shown at or after ``--skip_steps``
(start-up, data set-up, cache build and warm-up excluded) to the last step (the final save
excluded). Ours also reports what it logs itself (``images_per_second`` of metrics.jsonl, first
window dropped).

Nothing of diffusers is copied into this project: pass the path of your checkout's ``examples``
folder (``--examples`` or ``$DIFFUSERS_EXAMPLES``); the script must fit the installed diffusers
(``check_min_version``).

Usage:
    git clone https://github.com/huggingface/diffusers ~/diffusers
    python benchmarks/bench_diffusers_t2i.py --examples ~/diffusers/examples            # GPU, tutorial sizes
    python benchmarks/bench_diffusers_t2i.py --examples ~/diffusers/examples --quick --device cpu
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.assets import (CLIP_LAYERS, MODEL_CONFIGS, REPO, accelerate_launch, clip_folder,  # noqa: E402
                               diffusers_pipeline_folder, diffusers_unet_kwargs, imagefolder_dataset,
                               load_model_config, metrics_windows, run_env, run_with_progress, set_flags,
                               shapes_folder, steady_rate, timing_only_sets)
from benchmarks.common import fmt, markdown_table, write_json  # noqa: E402

SCRIPT = Path("text_to_image") / "train_text_to_image.py"
QUICK = dict(batch_size=8, steps=16, skip_steps=4, num_images=96, num_workers=1)
FULL = dict(batch_size=32, steps=60, skip_steps=10, num_images=1024, num_workers=8)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", default=os.environ.get("DIFFUSERS_EXAMPLES"),
                   help="diffusers' examples/ folder (holds text_to_image/train_text_to_image.py), or the script "
                        "itself (default: $DIFFUSERS_EXAMPLES)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="demo sizes (configs/demo/ldm_shapes.yaml, 32 px): for a CPU")
    p.add_argument("--model_config", default=None, help="default: configs/ldm.yaml (--quick: configs/demo/ldm_shapes.yaml)")
    p.add_argument("--batch_size", type=int, default=None, help="per-GPU batch of both (default 32; --quick 8)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each run (default 60; --quick 16)")
    p.add_argument("--skip_steps", type=int, default=None, help="steps not timed at the start (default 10; --quick 4)")
    p.add_argument("--num_images", type=int, default=None, help="images in the dataset (default 1024; --quick 96)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="our data-loader workers (default 8 as our YAML; --quick 1); the script keeps its default 0")
    p.add_argument("--mixed_precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="both runs (auto: bf16 on a GPU that has it, fp16 on older ones, no on a CPU)")
    p.add_argument("--clip_layers", type=int, default=None, help="text encoder depth (default 12 = CLIP-L; --quick 2)")
    p.add_argument("--ours", nargs="+", choices=("default", "cached"), default=["default", "cached"],
                   help="our runs: YAML defaults (VAE + text encoder per step) and/or cache_latents: true")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: inherited)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is killed")
    p.add_argument("--work_dir", default="bench_out/t2i", help="assets and runs go here (kept)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_config = args.model_config or MODEL_CONFIGS["quick" if args.quick else "tutorial"]
    args.clip_layers = args.clip_layers or CLIP_LAYERS["quick" if args.quick else "tutorial"]
    if not args.examples:
        p.error("give the path of diffusers' examples folder: --examples <diffusers>/examples or $DIFFUSERS_EXAMPLES")
    script = Path(args.examples).expanduser()
    args.script = script if script.is_file() else script / SCRIPT
    if not args.script.is_file():
        p.error(f"{args.script} not found: --examples must be diffusers' examples/ folder or the script")
    if args.steps <= args.skip_steps + 1:
        p.error("--steps must exceed --skip_steps by at least 2")
    return args


def resolve_precision(value: str, device: str) -> str:
    """``auto`` as our trainers resolve it: bf16 on a GPU that has it, else fp16; no on a CPU."""
    import torch

    if value != "auto":
        return value
    if device == "cpu":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_same_unet(ldm, folder: Path) -> int:
    """Parameter count of both UNets (they must be equal: the same architecture)."""
    from diffusers import UNet2DConditionModel

    from modules.unet import UNet

    ours = sum(p.numel() for p in UNet(ldm.unet).parameters())
    theirs = sum(p.numel() for p in UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(folder / "unet")).parameters())
    if ours != theirs:
        raise SystemExit(f"UNet parameter counts differ: ours {ours:,}, diffusers {theirs:,} "
                         f"({diffusers_unet_kwargs(ldm.unet)})")
    return ours


def diffusers_command(args: argparse.Namespace, model: Path, data: Path, out: Path, img_size: int,
                      precision: str) -> List[str]:
    flags = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
             "--resolution", str(img_size), "--train_batch_size", str(args.batch_size),
             "--max_train_steps", str(args.steps), "--mixed_precision", precision, "--output_dir", str(out),
             "--checkpointing_steps", str(10 ** 6), "--seed", "0"]
    return accelerate_launch(args.script, flags)


def ours_command(args: argparse.Namespace, root: Path, run: str, model: Path, clip: Path, data: Path,
                 precision: str, cached: bool) -> List[str]:
    """stage2_diffusion_trainer.py on the same model folder (its vae/, the same CLIP) and images."""
    sets = {
        **timing_only_sets(root),
        "unet.text_conditioning_hf_model": str(clip),
        "training_args.total_training_iterations": args.steps,
        "training_args.per_gpu_batch_size": args.batch_size,
        "training_args.mixed_precision": precision,
        "training_args.num_workers": args.num_workers,
        "training_args.cache_latents": str(cached).lower(),
        "training_args.logging_steps": max(1, args.skip_steps),
    }
    flags = ["--experiment_name", run, "--working_directory", str(root / run), "--model_config", args.model_config,
             "--path_to_vae_backbone", str(model / "vae"), "--dataset", "shapes", "--path_to_dataset", str(data),
             "--path_to_save_gens", str(root / run / "gens")]
    return accelerate_launch(REPO / "stage2_diffusion_trainer.py", flags + set_flags(sets))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    precision = resolve_precision(args.mixed_precision, device)
    root = Path(args.work_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)

    # -- the same model and data for both ---------------------------------------------------
    ldm = load_model_config(args.model_config)
    img_size = ldm.vae.img_size
    shapes = shapes_folder(root, args.num_images, img_size)
    clip = clip_folder(root, ldm.unet.text_embed_dim, args.clip_layers)
    model = diffusers_pipeline_folder(root, ldm, clip, img_size)
    params = check_same_unet(ldm, model)
    imagefolder = imagefolder_dataset(root, shapes)
    env = run_env(device, args.threads)
    env["HF_DATASETS_CACHE"] = str(root / "hf_datasets_cache")  # the script's dataset cache stays in the work dir

    # -- runs ---------------------------------------------------------------------------------
    rows: List[Dict[str, object]] = []
    out = root / "diffusers_run"
    shutil.rmtree(out, ignore_errors=True)
    print(f"diffusers {SCRIPT.name}: running (log {root / 'diffusers_run.log'})", flush=True)
    wall, progress = run_with_progress(diffusers_command(args, model, imagefolder, out, img_size, precision),
                                       root / "diffusers_run.log", env, "Steps", cwd=root, timeout=args.timeout)
    rows.append({"run": f"diffusers {SCRIPT.name} (its defaults)", "images_per_second":
                 steady_rate(progress, args.skip_steps, args.batch_size), "logged": None, "wall_s": wall})
    for mode in args.ours:
        run = f"ours_{mode}"
        shutil.rmtree(root / run, ignore_errors=True)
        print(f"stage2_diffusion_trainer.py ({mode}): running (log {root / (run + '.log')})", flush=True)
        command = ours_command(args, root, run, model, clip, shapes, precision, mode == "cached")
        wall, progress = run_with_progress(command, root / f"{run}.log", env, "stage2", cwd=REPO, timeout=args.timeout)
        windows = metrics_windows(root / run / run / "metrics.jsonl")
        logged = sorted(w["images_per_second"] for w in windows)
        label = "cache_latents: true" if mode == "cached" else "our YAML defaults"
        rows.append({"run": f"ours stage2_diffusion_trainer.py ({label})",
                     "images_per_second": steady_rate(progress, args.skip_steps, args.batch_size),
                     "logged": logged[len(logged) // 2] if logged else None, "wall_s": wall})

    base = rows[0]["images_per_second"]
    print(f"\ntext-to-image training, {device}, model {args.model_config} (UNet {params / 1e6:.1f}M params both, "
          f"CLIP {ldm.unet.text_embed_dim}x{args.clip_layers}), {img_size} px, batch {args.batch_size}, "
          f"{args.steps} steps (first {args.skip_steps} not timed), mixed precision {precision}, "
          f"{args.num_images} shapes images")
    header = ["run", "images/s", "vs diffusers", "logged images/s", "wall s"]
    table = [[r["run"], fmt(r["images_per_second"]),
              fmt(r["images_per_second"] / base if r["images_per_second"] and base else None, ".2f", "x"),
              fmt(r["logged"]), f"{r['wall_s']:.0f}"] for r in rows]
    print(markdown_table(header, table))
    result = {"benchmark": "diffusers_t2i", "device": device, "model_config": args.model_config, "img_size": img_size,
              "batch": args.batch_size, "mixed_precision": precision, "unet_params": params, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
