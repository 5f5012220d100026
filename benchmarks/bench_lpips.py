"""Throughput of our LPIPS against the `lpips` package: images/s, forward only, no grad.

Both models get the same random trunk (``pnet_rand=True``) and the package's weights copied into
ours (so they compute the same distances), the same batch and image size, in one run:

    python benchmarks/bench_lpips.py --device cpu --batch_size 8 --img_size 64 --backbones vgg alex squeeze

"images/s" counts image pairs (one distance) per second. Each measurement runs ``--warmup`` calls,
then the best of ``--repeats`` timings of ``--iters`` calls, alternating ours and the package so
that machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_json  # noqa: E402
from modules.lpips import BACKBONES, LPIPS  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--batch_size", type=int, default=8, help="image pairs per call")
    parser.add_argument("--img_size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--iters", type=int, default=10, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the best one counts")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--no-channels_last", dest="channels_last", action="store_false",
                        help="run our trunk in the default (NCHW) memory format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], torch.Tensor], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` calls of fn."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return time.perf_counter() - start


def bench_backbone(backbone: str, args: argparse.Namespace, device: torch.device) -> List[str]:
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package passes torchvision's deprecated `pretrained=`
        reference = lpips.LPIPS(net=backbone, pnet_rand=True, verbose=False).to(device).eval()
    ours = LPIPS(backbone, pretrained_backbone=False, channels_last=args.channels_last)
    ours.load_lpips_package_state_dict(reference.state_dict())
    ours.to(device).eval()

    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    x0 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    x1 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)

    with torch.inference_mode():
        max_diff = (ours(x0, x1) - reference(x0, x1).flatten()).abs().max().item()
        for _ in range(args.warmup):
            ours(x0, x1)
            reference(x0, x1)
        best_ours = best_ref = float("inf")
        for _ in range(args.repeats):
            best_ours = min(best_ours, time_calls(lambda: ours(x0, x1), args.iters, device))
            best_ref = min(best_ref, time_calls(lambda: reference(x0, x1), args.iters, device))
    ours_ips = args.iters * args.batch_size / best_ours
    ref_ips = args.iters * args.batch_size / best_ref
    return [backbone, str(args.batch_size), str(args.img_size), f"{ours_ips:.1f}", f"{ref_ips:.1f}",
            f"{ours_ips / ref_ips:.2f}", f"{max_diff:.1e}"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    header = ["backbone", "batch", "size", "ours img/s", "lpips img/s", "ratio", "max|diff|"]
    rows = [bench_backbone(backbone, args, device) for backbone in args.backbones]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print(f"device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    write_json(args.json, {"benchmark": "lpips", "device": str(device), "batch": args.batch_size,
                           "img_size": args.img_size, "rows": [dict(zip(header, row)) for row in rows]})


if __name__ == "__main__":
    main()
