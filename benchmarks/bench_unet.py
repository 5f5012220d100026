"""Training-step speed of our UNet against diffusers' UNet2DConditionModel at the same config.

One step = forward + MSE loss + backward + AdamW step, on random latents, timesteps and text
hidden states. Both models are built with the same levels, channels, layers, heads, transformer
depth, cross-attention width and time-embedding size; the script checks that their parameter
counts are equal before timing them. Both get the same AdamW (``--optimizer``: the fused one, as
stage2_diffusion_trainer.py uses through ``modules.optim.build_adamw``, or torch's default /
foreach implementation). With ``--context_mask`` both get a padding mask for the text tokens
(``--caption_tokens``: real tokens per caption, drawn uniformly up to that many). Steps of the
two models are interleaved in rounds so that clock drift and thermal state affect both alike; the
table reports the median ms/step and the speed-up of the medians and of the minima (the minimum
is the better estimate on a busy, shared machine).

``--compile`` torch.compiles both models (same ``--compile_mode``) after one eager step each; the
untimed warm-up steps then include the compilation, whose time is reported. The model FLOPs of a
step (forward + backward) are counted once per side on that eager step (FlopCounterMode), and
with a known peak (``--peak_tflops``, or the device's dense bf16 rate) the table gives TFLOP/s and
MFU of each side (see benchmarks/common.py).

Usage:
    python benchmarks/bench_unet.py --device cpu --config tiny --batch_size 4 --latent_size 16
    python benchmarks/bench_unet.py --device cpu --config tiny --batch_size 2 --latent_size 8 --compile
    python benchmarks/bench_unet.py --device cuda --config sd --batch_size 8 --latent_size 64 --dtype bfloat16
    python benchmarks/bench_unet.py --device cuda --config sd --batch_size 64 --latent_size 32 --dtype bfloat16 \
        --tf32 --compile
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.assets import diffusers_unet_kwargs  # noqa: E402
from benchmarks.common import (add_speed_args, count_flops, describe_device, fmt,  # noqa: E402
                               markdown_table, mfu, peak_tflops, sync, write_json)
from modules.performance import compile_modules, set_tf32  # noqa: E402
from modules.unet import UNet, UNetConfig  # noqa: E402

# Named sizes: SD 1.x, a small one with the same 4-level layout for CPUs, and a 2-level one that
# torch.compile compiles in a minute or two on a CPU (the compile path of benchmarks/bench_gpu.sh --quick).
CONFIGS: Dict[str, Dict[str, object]] = {
    "micro": dict(channels=[32, 64], heads=2, text_dim=32, groups=8),
    "tiny": dict(channels=[32, 64, 128, 128], heads=4, text_dim=64, groups=32),
    "sd": dict(channels=[320, 640, 1280, 1280], heads=8, text_dim=768, groups=32),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--latent_size", type=int, default=16)
    p.add_argument("--context_length", type=int, default=77, help="text tokens (CLIP: 77)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="float32, or autocast to bfloat16/float16 with float32 weights (mixed precision)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--context_mask", action="store_true", help="pass a padding mask for the text tokens to both")
    p.add_argument("--caption_tokens", type=int, default=0,
                   help="with --context_mask: real tokens per caption drawn from [2, this] (0: context_length)")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format for both")
    p.add_argument("--gradient_checkpointing", action="store_true", help="activation checkpointing for both")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: library default)")
    p.add_argument("--optimizer", choices=("default", "foreach", "fused"), default="fused",
                   help="AdamW implementation of both models: fused (as the trainers), torch's default "
                        "(per-parameter loop on CPU, foreach on CUDA) or foreach")
    p.add_argument("--seed", type=int, default=0)
    add_speed_args(p)
    return p.parse_args(argv)


def build_models(name: str, gradient_checkpointing: bool):
    """Our UNet and diffusers' UNet2DConditionModel with identical architecture hyper-parameters."""
    from diffusers import UNet2DConditionModel

    c = CONFIGS[name]
    channels: List[int] = list(c["channels"])  # type: ignore[arg-type]
    levels = len(channels)
    config = UNetConfig(
        unet_channels_per_block=channels,
        down_block_types=["AttnDown"] * (levels - 1) + ["Down"],
        up_block_types=["Up"] + ["AttnUp"] * (levels - 1),
        mid_block_type="AttnMid",
        num_attention_heads=int(c["heads"]),
        time_embed_start_dim=channels[0],
        time_embed_proj_dim=4 * channels[0],
        text_conditioning=True,
        text_embed_dim=int(c["text_dim"]),
        groupnorm_groups=int(c["groups"]),
        gradient_checkpointing=gradient_checkpointing,
    )
    ours, theirs = UNet(config), UNet2DConditionModel(**diffusers_unet_kwargs(config))
    if gradient_checkpointing:
        theirs.enable_gradient_checkpointing()
    return ours, theirs


def make_step(model: torch.nn.Module, is_diffusers: bool, inputs: Dict[str, torch.Tensor], autocast_dtype,
              optimizer_kind: str = "default") -> Callable[[], None]:
    implementation = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optimizer_kind]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **implementation)
    device_type = inputs["x"].device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if is_diffusers:
                pred = model(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                             encoder_attention_mask=inputs.get("mask")).sample
            else:
                pred = model(inputs["x"], inputs["t"], inputs["context"], inputs.get("mask"))
            loss = F.mse_loss(pred.float(), inputs["noise"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    set_tf32(args.tf32)
    ours, theirs = build_models(args.config, args.gradient_checkpointing)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if n_ours != n_theirs:
        raise SystemExit(f"parameter counts differ: ours {n_ours:,} vs diffusers {n_theirs:,}")

    fmt_memory = torch.channels_last if args.channels_last else torch.contiguous_format
    ours.to(device, memory_format=fmt_memory).train()
    theirs.to(device, memory_format=fmt_memory).train()
    b, s = args.batch_size, args.latent_size
    text_dim = int(CONFIGS[args.config]["text_dim"])
    inputs = {
        "x": torch.randn(b, 4, s, s, device=device).contiguous(memory_format=fmt_memory),
        "noise": torch.randn(b, 4, s, s, device=device),
        "t": torch.randint(0, 1000, (b,), device=device),
        "context": torch.randn(b, args.context_length, text_dim, device=device),
    }
    if args.context_mask:
        longest = args.caption_tokens or args.context_length
        if not 2 <= longest <= args.context_length:
            raise SystemExit(f"--caption_tokens must be in [2, {args.context_length}], got {longest}")
        lengths = torch.randint(2, longest + 1, (b,), device=device)
        inputs["mask"] = torch.arange(args.context_length, device=device)[None, :] < lengths[:, None]  # (B, L)
    autocast_dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    models = {"ours": ours, "diffusers": theirs}
    steps = {"ours": make_step(ours, False, inputs, autocast_dtype, args.optimizer),
             "diffusers": make_step(theirs, True, inputs, autocast_dtype, args.optimizer)}

    # One eager step per side, counted: the model FLOPs of a training step.
    flops = {name: count_flops(step) for name, step in steps.items()}
    compile_s = {name: 0.0 for name in steps}
    if args.compile:
        compile_modules(models.values(), device, args.compile_mode)
        for name, step in steps.items():  # the first compiled step compiles (forward and backward)
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            compile_s[name] = time.perf_counter() - start
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(args.iters):  # interleaved rounds
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1000.0)

    ms = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    peak = peak_tflops(device, args.peak_tflops)
    ratio = {name: mfu(min(flops.values()), ms[name] / 1e3, peak) for name in steps}  # the same model work
    extras = [k for k in ("context_mask", "channels_last", "gradient_checkpointing", "tf32") if getattr(args, k)]
    if args.context_mask and args.caption_tokens:
        extras.append(f"captions of 2-{args.caption_tokens} tokens")
    extras.append(f"{args.optimizer} AdamW")
    extras.append(f"torch.compile ({args.compile_mode})" if args.compile else "eager")
    print(f"UNet training step, {describe_device(device)}, config {args.config} ({n_ours:,} params both), "
          f"{args.dtype}, batch {b}, {s}x{s} latents, median of {args.iters}; {', '.join(extras)}")
    header = ["model", "ms/step", "min ms", "images/s", "TFLOP/step", "TFLOP/s", "MFU"]
    if args.compile:
        header.append("compile s")
    rows = []
    for name in steps:
        row = [name, f"{ms[name]:.1f}", f"{best[name]:.1f}", f"{1e3 * b / ms[name]:.1f}", f"{flops[name] / 1e12:.4g}",
               f"{flops[name] / ms[name] / 1e9:.4g}", fmt(None if ratio[name] is None else 100 * ratio[name], ".1f", "%")]
        if args.compile:
            row.append(f"{compile_s[name]:.1f}")
        rows.append(row)
    print(markdown_table(header, rows))
    print(f"speed-up (diffusers / ours): {ms['diffusers'] / ms['ours']:.2f}x median, "
          f"{best['diffusers'] / best['ours']:.2f}x min; peak {fmt(peak, '.4g', ' TFLOP/s')}")
    result = {"benchmark": "unet", "device": describe_device(device), "config": args.config, "dtype": args.dtype,
              "batch": b, "latent": s, "options": extras, "compile": args.compile, "peak_tflops": peak,
              "ours_ms": ms["ours"], "diffusers_ms": ms["diffusers"], "speedup": ms["diffusers"] / ms["ours"],
              "speedup_min": best["diffusers"] / best["ours"], "ours_flops": flops["ours"],
              "diffusers_flops": flops["diffusers"], "ours_mfu": ratio["ours"], "diffusers_mfu": ratio["diffusers"],
              "compile_s": compile_s, "params": n_ours}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
