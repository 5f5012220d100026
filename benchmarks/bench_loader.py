"""The data loaders alone: images/s the trainers' loaders deliver to the device, no model step.

A trainer can only go as fast as its loader feeds it (issue 10's goal: ~600 images/s per H100 for
stage 2). This times the loaders the trainers build, from the same functions, on a captioned
``shapes`` folder at the model config's resolution, with ``--num_workers`` worker processes:

- stage 2, cached: a latent cache built once by ``modules.latent_cache.build_latent_cache`` (the
  VAE's moments of both orientations and a frozen text encoder's caption states, ``--cache_dtype``:
  float16 is what bf16 training picks) served by ``CachedLatentDataset`` through
  ``modules.batching.Collate`` and ``modules.data_loading.build_dataloader``, as stage2_diffusion_trainer.py
  does with ``cache_latents: true``;
- stage 1: the image loader of ``stage1_vae_trainer.build_loaders`` (PNG decode, crop, flip, uint8).

Every tensor of a batch is copied to the device with ``non_blocking`` (pinned memory on GPU
machines, as the trainers' loaders); the clock runs from the first batch's arrival (worker start-up
excluded) to the last batch on the device, over ``--batches`` batches (epochs restart as needed).

Usage:
    python benchmarks/bench_loader.py --quick --device cpu
    python benchmarks/bench_loader.py --num_workers 8 --batch_size 32      # GPU machine, tutorial sizes
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.assets import (CLIP_LAYERS, MODEL_CONFIGS, REPO, clip_folder, load_model_config,  # noqa: E402
                               shapes_folder)
from benchmarks.common import describe_device, markdown_table, resolve_device, sync, write_json  # noqa: E402

QUICK = dict(num_images=96, batches=24, num_workers=2, batch_size=8)
FULL = dict(num_images=1024, batches=200, num_workers=8, batch_size=32)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quick", action="store_true", help="demo sizes (configs/demo/ldm_shapes.yaml, 32 px): for a CPU")
    p.add_argument("--model_config", default=None, help="default: configs/ldm.yaml (--quick: configs/demo/ldm_shapes.yaml)")
    p.add_argument("--loaders", nargs="+", choices=("stage2_cached", "stage1_images"),
                   default=["stage2_cached", "stage1_images"])
    p.add_argument("--batch_size", type=int, default=None, help="default 32 (--quick 8)")
    p.add_argument("--num_workers", type=int, default=None, help="default 8 (--quick 2)")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 200; --quick 24)")
    p.add_argument("--num_images", type=int, default=None, help="images in the dataset (default 1024; --quick 96)")
    p.add_argument("--cache_dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--clip_layers", type=int, default=None, help="text encoder depth (default 12; --quick 2)")
    p.add_argument("--work_dir", default="bench_out/loader", help="data and cache go here (kept)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_config = args.model_config or MODEL_CONFIGS["quick" if args.quick else "tutorial"]
    args.clip_layers = args.clip_layers or CLIP_LAYERS["quick" if args.quick else "tutorial"]
    return args


def to_device(batch, device: torch.device):
    """Every tensor of a batch (a tensor or a dict) to ``device``, non-blocking."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def epochs(loader) -> Iterator:
    """The loader's batches, epoch after epoch (the trainers' EpochSampler keyed by the epoch)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_loader(loader, device: torch.device, batches: int, batch_size: int) -> Dict[str, float]:
    """(images/s after the first batch, seconds to the first batch)."""
    started = time.perf_counter()
    stream = epochs(loader)
    to_device(next(stream), device)
    sync(device)
    first = time.perf_counter() - started
    start = time.perf_counter()
    for _ in range(batches):
        to_device(next(stream), device)
    sync(device)
    return {"images_per_second": batches * batch_size / (time.perf_counter() - start), "first_batch_s": first}


def stage2_cached_loader(args: argparse.Namespace, root: Path, data: Path, device: torch.device):
    """The cache (built once) and stage 2's loader over it."""
    from accelerate import Accelerator

    from modules.autoencoder import build_autoencoder
    from modules.batching import Collate
    from modules.data_loading import build_dataloader
    from modules.image_datasets import build_dataset
    from modules.latent_cache import CachedLatentDataset, build_latent_cache, vae_fingerprint
    from modules.text_encoder import TextEncoder

    ldm = load_model_config(args.model_config)
    torch.manual_seed(0)
    vae = build_autoencoder(ldm.vae).to(device).eval().requires_grad_(False)
    text_encoder = TextEncoder(clip_folder(root, ldm.unet.text_embed_dim, args.clip_layers)).to(device).eval()
    base = build_dataset("shapes", str(data), ldm.vae.img_size, crop="center", random_flip=False)
    side = ldm.vae.img_size // vae.downsample_factor
    cache = root / f"cache_{data.name}_{args.cache_dtype}"
    fingerprint = {"dataset": str(data), "vae": vae_fingerprint(vae), "img_size": ldm.vae.img_size}
    started = time.perf_counter()
    build_latent_cache(Accelerator(cpu=device.type == "cpu"), base, vae, cache, fingerprint,
                       (vae.latent_channels, side, side), flips=True, cache_dtype=args.cache_dtype,
                       batch_size=args.batch_size, num_workers=args.num_workers, text_encoder=text_encoder)
    print(f"latent cache {cache} ready in {time.perf_counter() - started:.1f}s", flush=True)
    dataset = CachedLatentDataset(cache, seed=0, random_flip=True)
    return build_dataloader(dataset, args.batch_size, shuffle=True, num_workers=args.num_workers, drop_last=True,
                            seed=0, collate_fn=Collate(None, context_length=text_encoder.max_length))


def stage1_image_loader(args: argparse.Namespace, data: Path):
    """stage1_vae_trainer.py's training loader (its own function)."""
    sys.path.insert(0, str(REPO))
    import stage1_vae_trainer as stage1

    ldm = load_model_config(args.model_config)
    train = stage1.Stage1TrainingArgs(per_gpu_batch_size=args.batch_size, num_workers=args.num_workers,
                                      num_val_images=8)
    loader, _, _ = stage1.build_loaders(argparse.Namespace(dataset="shapes", path_to_dataset=str(data)), train,
                                        ldm.vae.img_size)
    return loader


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    root = Path(args.work_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ldm = load_model_config(args.model_config)
    data = shapes_folder(root, args.num_images, ldm.vae.img_size)
    results: List[Dict[str, object]] = []
    for name in args.loaders:
        loader = stage2_cached_loader(args, root, data, device) if name == "stage2_cached" else \
            stage1_image_loader(args, data)
        results.append({"loader": name, **time_loader(loader, device, args.batches, args.batch_size)})
        del loader  # ends its workers
    print(f"\ndata loaders alone, {describe_device(device)}, {args.num_images} shapes images at {ldm.vae.img_size} px, "
          f"batch {args.batch_size}, {args.num_workers} workers, {args.batches} batches timed, pinned memory "
          f"{torch.cuda.is_available()}")
    labels = {"stage2_cached": f"stage 2, cached latents + text states ({args.cache_dtype})",
              "stage1_images": "stage 1, PNG images (decode, crop, flip)"}
    print(markdown_table(["loader", "images/s", "first batch s"],
                         [[labels[r["loader"]], f"{r['images_per_second']:.0f}", f"{r['first_batch_s']:.2f}"]
                          for r in results]))
    result = {"benchmark": "loader", "device": describe_device(device), "batch": args.batch_size,
              "num_workers": args.num_workers, "img_size": ldm.vae.img_size, "rows": results}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
