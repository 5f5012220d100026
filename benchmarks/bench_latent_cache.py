"""Stage-2 training throughput with and without latent caching, side by side.

Runs the real ``stage2_diffusion_trainer.py`` twice on the same small text-conditional setup
(a captioned ``shapes`` image folder, a random-init VAE of the tutorial's 4-level layout, a
small UNet, a tiny CLIP), once encoding every batch with the frozen VAE and once with
``cache_latents: true``, and reads the trainer's own ``images_per_second`` (gathered, excluding
checkpoints and sample grids) from ``metrics.jsonl``. The first logging window (warm-up) is
dropped; the table gives the median of the rest, the one-off cache build time and the number of
steps after which the cache has paid for itself.

Usage:
    python benchmarks/bench_latent_cache.py                       # CPU-sized defaults
    python benchmarks/bench_latent_cache.py --img_size 256 --vae_channels 128,256,512,512 \\
        --unet_channels 320,640,1280,1280 --batch_size 32 --steps 60 --num_images 2048   # on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--vae_channels", default="32,64,128,128", help="vae_channels_per_block (4 levels: factor 8)")
    p.add_argument("--unet_channels", default="32,64", help="unet_channels_per_block")
    p.add_argument("--batch_size", type=int, default=8, help="per_gpu_batch_size")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--log_every", type=int, default=4, help="logging window (steps)")
    p.add_argument("--num_images", type=int, default=256, help="images in the dataset (the cache encodes all)")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--mixed_precision", default="no", choices=("no", "bf16", "fp16", "auto"))
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS of the runs (0: library default); 1 is steadiest on a shared machine")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating; the median window counts")
    p.add_argument("--work_dir", default=None, help="keep the runs here (default: a temporary folder)")
    return p.parse_args(argv)


def prepare(root: Path, args: argparse.Namespace) -> Dict[str, Path]:
    """A captioned shapes folder, a random-init VAE export and a tiny CLIP in ``root`` (benchmarks/assets.py)."""
    from benchmarks.assets import clip_folder, shapes_folder, vae_export
    from modules.autoencoder import VAEConfig

    channels = [int(c) for c in args.vae_channels.split(",")]
    cfg = VAEConfig(img_size=args.img_size, vae_channels_per_block=channels, norm_num_groups=min(32, channels[0]),
                    residual_layers_per_block=2, attention_layers=1)
    return {"data": shapes_folder(root, args.num_images, args.img_size), "vae": vae_export(root, cfg, 0.18),
            "clip": clip_folder(root, 64, 2)}


def run(root: Path, assets: Dict[str, Path], args: argparse.Namespace, cache: bool, repeat: int) -> Dict[str, object]:
    """One trainer run; returns the images/s of its logging windows (the first dropped) and wall times."""
    from benchmarks.assets import metrics_windows, run_env, run_with_progress, set_flags, timing_only_sets

    name = f"{'cached' if cache else 'on_the_fly'}_{repeat}"
    channels = args.unet_channels.split(",")
    levels = len(channels)
    sets = {
        **timing_only_sets(root),
        "unet.unet_channels_per_block": f"[{args.unet_channels}]",
        "unet.down_block_types": "[" + ",".join(["AttnDown"] * (levels - 1) + ["Down"]) + "]",
        "unet.up_block_types": "[" + ",".join(["Up"] + ["AttnUp"] * (levels - 1)) + "]",
        "unet.groupnorm_groups": min(32, int(channels[0])), "unet.text_embed_dim": 64,
        "unet.time_embed_start_dim": int(channels[0]), "unet.time_embed_proj_dim": 4 * int(channels[0]),
        "unet.text_conditioning_hf_model": str(assets["clip"]),
        "training_args.total_training_iterations": args.steps, "training_args.per_gpu_batch_size": args.batch_size,
        "training_args.num_workers": args.num_workers, "training_args.logging_steps": args.log_every,
        "training_args.mixed_precision": args.mixed_precision, "training_args.cache_latents": str(cache).lower(),
        "training_args.lr_warmup_steps": 0,
    }
    argv = [sys.executable, str(REPO / "stage2_diffusion_trainer.py"), "--experiment_name", name,
            "--working_directory", str(root / name), "--path_to_vae_backbone", str(assets["vae"]),
            "--dataset", "shapes", "--path_to_dataset", str(assets["data"]), "--path_to_save_gens", str(root / "gens")]
    log = root / f"{name}.log"
    wall, _ = run_with_progress(argv + set_flags(sets), log, run_env("auto", args.threads), "stage2")
    rates = [w["images_per_second"] for w in metrics_windows(root / name / name / "metrics.jsonl")]
    build = 0.0
    for line in log.read_text(errors="replace").splitlines():
        if "latent cache ready in" in line:
            build = float(line.rsplit("in ", 1)[1].rstrip("s"))
    return {"rates": rates, "cache_build_s": build, "wall_s": wall}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work_dir) if args.work_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        assets = prepare(root, args)
        runs: Dict[bool, List[Dict[str, object]]] = {False: [], True: []}
        for repeat in range(args.repeats):  # alternate, so load changes on the machine hit both alike
            for cache in (False, True):
                runs[cache].append(run(root, assets, args, cache, repeat))
    results = {cache: {"images_per_second": statistics.median([x for r in rs for x in r["rates"]]),
                       "cache_build_s": statistics.median([r["cache_build_s"] for r in rs]),
                       "wall_s": statistics.median([r["wall_s"] for r in rs])} for cache, rs in runs.items()}
    threads = args.threads or torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else f"cpu ({threads} thread{'s' if threads > 1 else ''})"
    print(f"stage-2 step throughput, {device}: {args.num_images} shapes images at {args.img_size}px, "
          f"VAE {args.vae_channels}, UNet {args.unet_channels}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.num_workers} workers, mixed precision {args.mixed_precision}, median of {args.repeats} runs")
    print(f"{'mode':<12} {'images/s':>10} {'ms/step':>10} {'cache build s':>14} {'wall s':>8}")
    for cache, r in results.items():
        ms = 1000 * args.batch_size / r["images_per_second"]
        print(f"{'cached' if cache else 'on the fly':<12} {r['images_per_second']:>10.1f} {ms:>10.1f} "
              f"{r['cache_build_s']:>14.1f} {r['wall_s']:>8.1f}")
    fly, cached = results[False], results[True]
    ratio = cached["images_per_second"] / fly["images_per_second"]
    step_fly = args.batch_size / fly["images_per_second"]
    step_cached = args.batch_size / cached["images_per_second"]
    saved = step_fly - step_cached
    print(f"speed-up from latent caching: {ratio:.2f}x")
    if saved > 0:
        print(f"the cache build pays for itself after {cached['cache_build_s'] / saved:.0f} optimizer steps")


if __name__ == "__main__":
    main()
