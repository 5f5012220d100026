"""Images/s and MFU of the real trainers, launched as a user launches them, eager and compiled.

Runs ``accelerate launch stage2_diffusion_trainer.py`` and/or ``stage1_vae_trainer.py`` (one
process) on a captioned ``shapes`` folder with the shipped training YAMLs, changing only size,
batch, steps and logging through ``--set`` (``--set training_args.compile=true`` for the compiled
runs), and reads what the trainer itself logs in ``metrics.jsonl``: ``images_per_second`` and,
where the trainer logs them, ``tflops`` and ``mfu``. The first logging window (warm-up, and the
compilation of compiled runs) is dropped; the table gives the median of the others. Wall time is
the whole run (start-up, latent cache, compilation, final checkpoint and export included).

- stage 2: the model config's UNet (configs/ldm.yaml: SD-size) at its VAE's resolution (256 px),
  ``cache_latents: true`` (the VAE never runs per step) with a frozen text encoder, so the captions'
  hidden states come pre-encoded from the cache; a random-init CLIP of the UNet's text width
  (CLIP-L's 12 layers with ``--tutorial``-sized models); ``mixed_precision`` as given (auto: bf16 on
  GPUs that have it).
- stage 1: the model config's VAE with a random-init stage-0 LPIPS export (``--lpips_backbone``)
  and the PatchGAN on from step 0 (``--disc_start``), the step the tutorial's run spends most
  of its time in.

Weights are random: the cost of a step does not depend on them. Nothing is downloaded.

Usage:
    python benchmarks/bench_trainer.py --quick --device cpu                    # demo-sized, a minute or two
    python benchmarks/bench_trainer.py --stages 2 --modes eager compiled       # GPU: tutorial sizes
    python benchmarks/bench_trainer.py --stages 1 --batch_size 8 --steps 60 --log_every 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.assets import (CLIP_LAYERS, MODEL_CONFIGS, REPO, accelerate_launch, clip_folder,  # noqa: E402
                               load_model_config, lpips_export, metrics_windows, run_env, run_with_progress, set_flags,
                               shapes_folder, timing_only_sets, vae_export)
from benchmarks.common import fmt, markdown_table, write_json  # noqa: E402

TRAINING_CONFIGS = {1: "configs/stage1_vae_train.yaml", 2: "configs/stage2_diffusion_train.yaml"}
# Per-stage batch defaults of the shipped YAMLs (stage 1: 8, stage 2: 32); --quick shrinks them.
QUICK = dict(batch_size={1: 4, 2: 8}, steps=12, log_every=3, num_images=96, num_workers=1)
FULL = dict(batch_size={1: 8, 2: 32}, steps=60, log_every=10, num_images=1024, num_workers=8)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu hides the GPUs from the runs (CUDA_VISIBLE_DEVICES=)")
    p.add_argument("--quick", action="store_true",
                   help="demo sizes (configs/demo/ldm_shapes.yaml, 32 px, few steps): for a CPU")
    p.add_argument("--stages", type=int, nargs="+", choices=(1, 2), default=[2, 1])
    p.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    p.add_argument("--model_config", default=None, help="default: configs/ldm.yaml (--quick: configs/demo/ldm_shapes.yaml)")
    p.add_argument("--batch_size", type=int, default=None, help="per_gpu_batch_size (default: stage 1: 8, stage 2: 32)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; --quick 12)")
    p.add_argument("--log_every", type=int, default=None, help="logging window in steps (default 10; --quick 3)")
    p.add_argument("--num_images", type=int, default=None, help="images in the dataset (default 1024; --quick 96)")
    p.add_argument("--num_workers", type=int, default=None, help="data-loader workers (default 8; --quick 1)")
    p.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--clip_layers", type=int, default=None, help="text encoder depth (default 12 = CLIP-L; --quick 2)")
    p.add_argument("--lpips_backbone", choices=("vgg", "alex", "squeeze"), default="vgg")
    p.add_argument("--disc_start", type=int, default=0, help="stage 1: step the PatchGAN starts (0: every step)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the trainers' training_args.peak_tflops for MFU (default: the device's known bf16 peak)")
    p.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="more --set overrides for every run (e.g. training_args.channels_last=true)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: inherited)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is killed")
    p.add_argument("--work_dir", default="bench_out/trainer", help="assets and runs go here (kept)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key in ("steps", "log_every", "num_images", "num_workers"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    args.batch_sizes = {s: args.batch_size or sizes["batch_size"][s] for s in (1, 2)}
    args.model_config = args.model_config or MODEL_CONFIGS["quick" if args.quick else "tutorial"]
    args.clip_layers = args.clip_layers or CLIP_LAYERS["quick" if args.quick else "tutorial"]
    if args.steps % args.log_every or args.steps < 2 * args.log_every:
        p.error("--steps must be a multiple of --log_every and at least two windows (the first is dropped)")
    return args


def common_sets(args: argparse.Namespace, root: Path, stage: int, compiled: bool) -> Dict[str, object]:
    """The --set overrides shared by both stages: size of the run, logging, no periodic checkpoints."""
    return {
        **timing_only_sets(root, stage),
        "training_args.total_training_iterations": args.steps,
        "training_args.per_gpu_batch_size": args.batch_sizes[stage],
        "training_args.gradient_accumulation_steps": 1,
        "training_args.logging_steps": args.log_every,
        "training_args.num_workers": args.num_workers,
        "training_args.mixed_precision": args.mixed_precision,
        "training_args.compile": str(compiled).lower(),
        **({"training_args.peak_tflops": args.peak_tflops} if args.peak_tflops else {}),
    }


def stage2_command(args: argparse.Namespace, root: Path, run: str, compiled: bool) -> List[str]:
    ldm = load_model_config(args.model_config)
    img_size = ldm.vae.img_size
    data = shapes_folder(root, args.num_images, img_size)
    clip = clip_folder(root, ldm.unet.text_embed_dim, args.clip_layers)
    vae = vae_export(root, ldm.vae)
    sets = {
        **common_sets(args, root, 2, compiled),
        "unet.text_conditioning_hf_model": str(clip),
        "training_args.cache_latents": "true",
        # one cache for the eager and the compiled run (built by the first; its fingerprint matches)
        "training_args.latent_cache_dir": str(root / f"latent_cache_{data.name}_{args.mixed_precision}"),
        "training_args.lr_warmup_steps": 0,
    }
    flags = ["--experiment_name", run, "--working_directory", str(root / run), "--training_config",
             TRAINING_CONFIGS[2], "--model_config", args.model_config, "--path_to_vae_backbone", str(vae),
             "--dataset", "shapes", "--path_to_dataset", str(data), "--path_to_save_gens", str(root / run / "gens")]
    return accelerate_launch(REPO / "stage2_diffusion_trainer.py", flags + set_flags(sets, args.extra), args.launcher)


def stage1_command(args: argparse.Namespace, root: Path, run: str, compiled: bool) -> List[str]:
    ldm = load_model_config(args.model_config)
    data = shapes_folder(root, args.num_images, ldm.vae.img_size)
    sets = {
        **common_sets(args, root, 1, compiled),
        "training_args.lpips_checkpoint": str(lpips_export(root, args.lpips_backbone)),
        "training_args.lpips_backbone": args.lpips_backbone,
        "training_args.use_lpips_package": "false",
        "training_args.disc_start": args.disc_start,
        "training_args.lr_warmup_steps": 0,
        "training_args.disc_lr_warmup_steps": 0,
        "training_args.num_val_images": min(8, args.num_images // 4),
    }
    flags = ["--experiment_name", run, "--working_directory", str(root / run), "--training_config",
             TRAINING_CONFIGS[1], "--model_config", args.model_config, "--dataset", "shapes",
             "--path_to_dataset", str(data), "--path_to_save_gens", str(root / run / "gens")]
    return accelerate_launch(REPO / "stage1_vae_trainer.py", flags + set_flags(sets, args.extra), args.launcher)


def summarize(windows: List[Dict[str, float]]) -> Dict[str, Optional[float]]:
    """Medians over the logging windows of images/s, TFLOP/s and MFU (None where not logged)."""
    def median(key: str) -> Optional[float]:
        values = [w[key] for w in windows if key in w]
        return statistics.median(values) if values else None

    return {"images_per_second": median("images_per_second"), "tflops": median("tflops"), "mfu": median("mfu")}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    args = parse_args(argv)
    import torch

    root = Path(args.work_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    env = run_env(device, args.threads)
    builders = {1: stage1_command, 2: stage2_command}
    results: List[Dict[str, object]] = []
    for stage in args.stages:
        for mode in args.modes:
            run = f"stage{stage}_{mode}_b{args.batch_sizes[stage]}"
            run_dir = root / run
            if run_dir.exists():  # a fresh run every time (the trainers refuse to start over old checkpoints)
                import shutil

                shutil.rmtree(run_dir)
            command = builders[stage](args, root, run, mode == "compiled")
            log = root / f"{run}.log"
            print(f"stage {stage}, {mode}: running (log {log})", flush=True)
            wall, _ = run_with_progress(command, log, env, f"stage{stage}", cwd=REPO, timeout=args.timeout)
            windows = metrics_windows(run_dir / run / "metrics.jsonl")
            results.append({"stage": stage, "mode": mode, "batch": args.batch_sizes[stage], "wall_s": wall,
                            "windows": len(windows), **summarize(windows)})

    ldm = load_model_config(args.model_config)
    print(f"\nreal trainers, {device}, model {args.model_config} ({ldm.vae.img_size} px), mixed precision "
          f"{args.mixed_precision}, {args.steps} steps logged every {args.log_every} (first window dropped), "
          f"{args.num_images} shapes images, {args.num_workers} workers, launcher {args.launcher}")
    names = {1: "stage1_vae_trainer.py (VAE + LPIPS + PatchGAN)", 2: "stage2_diffusion_trainer.py (cached latents)"}
    header = ["trainer", "mode", "batch", "images/s", "TFLOP/s", "MFU", "wall s"]
    rows = [[names[r["stage"]], r["mode"], r["batch"], fmt(r["images_per_second"]), fmt(r["tflops"], ".4g"),
             fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f", "%"), f"{r['wall_s']:.0f}"] for r in results]
    print(markdown_table(header, rows))
    write_json(args.json, {"benchmark": "trainer", "device": device, "model_config": args.model_config,
                           "img_size": ldm.vae.img_size, "mixed_precision": args.mixed_precision, "rows": results})
    return results


if __name__ == "__main__":
    main()
