"""One stage-1 training step, ours against the peer libraries, side by side in one run.

A step after ``disc_start``, as stage1_vae_trainer.py runs it: VAE forward (posterior sample),
L1 + LPIPS + KL + adaptively weighted PatchGAN generator loss, backward, AdamW step of the VAE;
then the hinge discriminator loss on real and detached reconstructed images, backward, AdamW step
of the discriminator.

- ours: modules.autoencoder.AutoencoderKL + modules.lpips.LPIPS + modules.discriminator
  .NLayerDiscriminator + modules.vae_loss.VAELoss (exactly what the trainer calls);
- reference: diffusers' AutoencoderKL + the ``lpips`` package's LPIPS + a PatchGAN of the same
  layout written out plainly here, with the taming-transformers loss computation written out
  plainly (two ``autograd.grad`` calls for the adaptive weight, as taming and the tutorial do).

Both sides get the same weights (diffusers' VAE weights loaded into ours, the lpips package's
state dict into our LPIPS, our discriminator's into the reference one) and the same batch and
posterior noise, so their first-step losses agree; the check is printed. LPIPS trunks are random
(no download), which does not change the cost. Timings alternate ours and the reference every
step so machine noise hits both alike; the median of ``--iters`` steps counts.

``--compile`` torch.compiles the same networks of both sides with the same mode (the VAE's encoder
and decoder, the LPIPS, the discriminator; the loss arithmetic around them stays eager) after the
first, eager step, whose FLOPs (both networks' forward and backward, LPIPS included) are counted
per side (TFLOP/step: what each executes; MFU divides the smaller count, the model's work, by each
side's time); ``--channels_last`` puts both sides' networks and images in channels_last.
With a known peak (``--peak_tflops`` or the device's dense bf16 rate) MFU is printed.

    python benchmarks/bench_stage1.py --device cpu --config tiny --batch_size 4 --iters 10
    python benchmarks/bench_stage1.py --device cuda --config tutorial --batch_size 8 --autocast bf16
    python benchmarks/bench_stage1.py --device cuda --config tutorial --batch_size 4 --autocast bf16 --compile
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (add_speed_args, count_flops, describe_device, fmt,  # noqa: E402
                               markdown_table, mfu, peak_tflops, resolve_device, sync, write_json)
from modules.autoencoder import AutoencoderKL, VAEConfig  # noqa: E402
from modules.performance import compile_modules, set_tf32  # noqa: E402
from modules.discriminator import NLayerDiscriminator  # noqa: E402
from modules.lpips import LPIPS  # noqa: E402
from modules.vae_loss import VAELoss, VAELossConfig  # noqa: E402

# (vae channels, residual layers per block, norm groups, discriminator start channels, default img size)
CONFIGS = {
    "tiny": ([32, 64, 64], 1, 16, 32, 64),
    "tutorial": ([128, 256, 512, 512], 2, 32, 64, 256),
}
LOSS = VAELossConfig(reconstruction_loss="l1", lpips_weight=1.0, kl_weight=1e-6, disc_start=0, disc_weight=0.5,
                     disc_loss="hinge")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                        help="tiny (CPU-sized) or tutorial (configs/ldm.yaml's VAE, 256 px)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--img_size", type=int, default=None, help="default: 64 (tiny) or 256 (tutorial)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps of each side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    parser.add_argument("--lpips_backbone", choices=("vgg", "alex", "squeeze"), default="vgg")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision of both sides (fp16 needs CUDA)")
    parser.add_argument("--channels_last", action="store_true", help="channels_last networks and images, both sides")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: library default)")
    parser.add_argument("--seed", type=int, default=0)
    add_speed_args(parser)
    return parser.parse_args(argv)


def reference_patchgan(start: int, depth: int = 3) -> nn.Sequential:
    """pix2pix / taming NLayerDiscriminator layout: conv-LReLU, (conv-BN-LReLU) x depth, conv."""
    layers: List[nn.Module] = [nn.Conv2d(3, start, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, depth + 1):
        prev, mult = mult, min(2 ** n, 8)
        layers += [nn.Conv2d(start * prev, start * mult, 4, 2 if n < depth else 1, 1, bias=False),
                   nn.BatchNorm2d(start * mult), nn.LeakyReLU(0.2, True)]
    layers.append(nn.Conv2d(start * mult, 1, 4, 1, 1))
    return nn.Sequential(*layers)


def build(args: argparse.Namespace, device: torch.device):
    """(ours, reference): each a dict of vae, lpips, disc, two optimizers, with identical weights."""
    import lpips
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    channels, layers, groups, disc_start_channels, default_size = CONFIGS[args.config]
    img_size = args.img_size or default_size
    torch.manual_seed(args.seed)
    n = len(channels)
    peer_vae = DiffusersAutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=channels, layers_per_block=layers,
        latent_channels=4, norm_num_groups=groups, sample_size=img_size)
    our_vae = AutoencoderKL(VAEConfig(img_size=img_size, vae_channels_per_block=channels,
                                      residual_layers_per_block=layers, norm_num_groups=groups))
    our_vae.load_state_dict(peer_vae.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer_lpips = lpips.LPIPS(net=args.lpips_backbone, pretrained=True, pnet_rand=True, verbose=False)
    our_lpips = LPIPS(args.lpips_backbone, pretrained_backbone=False, use_dropout=True)
    our_lpips.load_lpips_package_state_dict(peer_lpips.state_dict())
    our_disc = NLayerDiscriminator(start_channels=disc_start_channels)
    peer_disc = reference_patchgan(disc_start_channels)
    peer_disc.load_state_dict({k.removeprefix("layers."): v for k, v in our_disc.state_dict().items()})

    sides = {}
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    for name, vae, metric, disc in (("ours", our_vae, our_lpips, our_disc), ("reference", peer_vae, peer_lpips, peer_disc)):
        vae.to(device, memory_format=memory).train()
        disc.to(device, memory_format=memory).train()
        metric.to(device, memory_format=memory).eval().requires_grad_(False)
        sides[name] = {
            "vae": vae, "lpips": metric, "disc": disc,
            "opt": torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9)),
            "disc_opt": torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9)),
        }
    sides["ours"]["loss"] = VAELoss(LOSS, our_lpips)
    return sides, img_size


def autocast(args: argparse.Namespace, device: torch.device):
    if args.autocast == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.autocast == "bf16" else torch.float16)


def our_step(side: Dict, x: torch.Tensor, noise_seed: int, args, device) -> Tuple[float, float]:
    """stage1_vae_trainer.py's step (without Accelerate's wrappers): returns (generator loss, d loss)."""
    vae, disc, loss_fn = side["vae"], side["disc"], side["loss"]
    torch.manual_seed(noise_seed)
    with autocast(args, device):
        recon, posterior = vae(x)
        loss, _ = loss_fn.generator_loss(x, recon, posterior, 1, disc, vae.last_decoder_layer_weight)
    loss.backward()
    side["opt"].step()
    side["opt"].zero_grad(set_to_none=True)
    with autocast(args, device):
        d_loss, _ = loss_fn.discriminator_loss(x, recon.detach(), 1, disc)
    d_loss.backward()
    side["disc_opt"].step()
    side["disc_opt"].zero_grad(set_to_none=True)
    return loss.item(), d_loss.item()


def reference_step(side: Dict, x: torch.Tensor, noise_seed: int, args, device) -> Tuple[float, float]:
    """LDM's LPIPSWithDiscriminator step (logvar 0, as LDM never trains it) on diffusers + lpips, written out."""
    vae, metric, disc = side["vae"], side["lpips"], side["disc"]
    torch.manual_seed(noise_seed)
    disc.requires_grad_(False)  # Lightning's toggle_optimizer: only the VAE's parameters train here
    with autocast(args, device):
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # LDM's reduction: |x - x_hat| + w * LPIPS (broadcast) at every pixel, summed per sample, batch mean
        per_pixel = (x - recon).abs() + LOSS.lpips_weight * metric(x, recon).reshape(-1, 1, 1, 1)
        nll = per_pixel.sum() / x.shape[0]
        kl = posterior.kl().mean()  # (B,) sums over latent elements -> batch mean
        g_loss = -disc(recon).mean()
    last = vae.decoder.conv_out.weight
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    weight = (nll_grad.norm() / (g_grad.norm() + LOSS.adaptive_weight_eps)).clamp(0, LOSS.adaptive_weight_max).detach()
    loss = nll + LOSS.kl_weight * kl + LOSS.disc_weight * weight * g_loss
    loss.backward()
    side["opt"].step()
    side["opt"].zero_grad(set_to_none=True)
    disc.requires_grad_(True)
    with autocast(args, device):
        logits_real = disc(x.detach())
        logits_fake = disc(recon.detach())
        d_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    d_loss.backward()
    side["disc_opt"].step()
    side["disc_opt"].zero_grad(set_to_none=True)
    return loss.item(), d_loss.item()


def networks(side: Dict) -> List[nn.Module]:
    """What --compile compiles on each side: the VAE's encoder and decoder, the LPIPS, the discriminator."""
    return [side["vae"].encoder, side["vae"].decoder, side["lpips"], side["disc"]]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    set_tf32(args.tf32)
    sides, img_size = build(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    batches = [(torch.rand(args.batch_size, 3, img_size, img_size, generator=generator) * 2 - 1).to(device)
               .contiguous(memory_format=memory) for _ in range(4)]
    steps: Dict[str, Callable] = {"ours": our_step, "reference": reference_step}

    # The first step of each side, eager and counted: the loss check and the model FLOPs of a step.
    first: Dict[str, Tuple[float, float]] = {}
    flops: Dict[str, int] = {}
    for name in steps:
        flops[name] = count_flops(lambda: first.__setitem__(name, steps[name](sides[name], batches[0], 0, args, device)))
    compile_s = {name: 0.0 for name in steps}
    if args.compile:
        for name in steps:
            compile_modules(networks(sides[name]), device, args.compile_mode)
            sync(device)
            start = time.perf_counter()
            steps[name](sides[name], batches[0], 0, args, device)  # compiles forward and backward
            sync(device)
            compile_s[name] = time.perf_counter() - start
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.iters):
        for name in steps:  # alternate, so that machine noise hits both sides alike
            sync(device)
            start = time.perf_counter()
            steps[name](sides[name], batches[i % len(batches)], i + 1, args, device)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    peak = peak_tflops(device, args.peak_tflops)
    # MFU counts the model's work once: the smaller count (the reference's two extra autograd.grad passes
    # through the decoder for the adaptive weight are executed FLOPs, not model FLOPs).
    ratio = {name: mfu(min(flops.values()), ms[name] / 1e3, peak) for name in steps}
    vae_params = sum(p.numel() for p in sides["ours"]["vae"].parameters()) / 1e6
    mode = f"torch.compile ({args.compile_mode})" if args.compile else "eager"
    print(f"stage-1 training step (VAE {vae_params:.1f}M params + {args.lpips_backbone} LPIPS + PatchGAN, "
          f"both optimizers), config {args.config}, batch {args.batch_size}, {img_size}px, {describe_device(device)}, "
          f"autocast {args.autocast}, {mode}{', channels_last' if args.channels_last else ''}, median of {args.iters}")
    print(f"first-step losses  ours: g {first['ours'][0]:.6f} d {first['ours'][1]:.6f}   "
          f"reference: g {first['reference'][0]:.6f} d {first['reference'][1]:.6f}")
    labels = {"ours": "ours (modules/)", "reference": "diffusers + lpips + PatchGAN"}
    header = ["side", "ms/step", "images/s", "TFLOP/step", "TFLOP/s", "MFU"] + (["compile s"] if args.compile else [])
    rows = []
    for name in steps:
        row = [labels[name], f"{ms[name]:.1f}", f"{1e3 * args.batch_size / ms[name]:.1f}", f"{flops[name] / 1e12:.4g}",
               f"{flops[name] / ms[name] / 1e9:.4g}", fmt(None if ratio[name] is None else 100 * ratio[name], ".1f", "%")]
        rows.append(row + ([f"{compile_s[name]:.1f}"] if args.compile else []))
    print(markdown_table(header, rows))
    print(f"speed-up (reference / ours): {ms['reference'] / ms['ours']:.2f}x; peak {fmt(peak, '.4g', ' TFLOP/s')}")
    result = {"benchmark": "stage1", "device": describe_device(device), "config": args.config, "batch": args.batch_size,
              "img_size": img_size, "autocast": args.autocast, "compile": args.compile,
              "channels_last": args.channels_last, "ours_ms": ms["ours"], "reference_ms": ms["reference"],
              "speedup": ms["reference"] / ms["ours"], "ours_flops": flops["ours"], "reference_flops": flops["reference"],
              "ours_mfu": ratio["ours"], "reference_mfu": ratio["reference"], "peak_tflops": peak,
              "compile_s": compile_s}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
