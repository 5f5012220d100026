"""Write ``<results>/RESULTS.md`` from a results folder of ``benchmarks/bench_gpu.sh``.

The folder holds ``status.tsv`` (one row per benchmark: name, status, seconds, command) and, for
each benchmark that finished, ``<name>.json`` (its numbers, from ``--json``) and ``<name>.out``
(its printed tables). RESULTS.md gets: the summary in the layout of issue 10's table (ours,
reference, ratio, MFU), the status of every benchmark (ok, failed, timeout, skipped) and every
benchmark's own output.

    python benchmarks/report.py bench_out/gpu_20260101_120000 [--device_description "NVIDIA H100 ..."]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, markdown_table  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="the results folder of bench_gpu.sh")
    p.add_argument("--device_description", default="", help="named in the title (bench_gpu.sh passes the GPU's name)")
    return p.parse_args(argv)


def pct(value: Optional[float]) -> str:
    return fmt(None if value is None else 100 * value, ".1f", "%")


def unet_row(r: Dict[str, Any]) -> List[str]:
    options = [o for o in r["options"] if not o.endswith("AdamW")]
    what = (f"UNet train step, {r['config']}, batch {r['batch']}, {r['latent']}x{r['latent']} latents, {r['dtype']}, "
            + ", ".join(options))
    return [what, f"{r['ours_ms']:.1f} ms", f"diffusers {r['diffusers_ms']:.1f} ms", f"{r['speedup']:.2f}x",
            pct(r["ours_mfu"])]


def stage1_row(r: Dict[str, Any]) -> List[str]:
    mode = "compiled" if r["compile"] else "eager"
    what = (f"stage-1 step, {r['config']} VAE + LPIPS + PatchGAN, batch {r['batch']}, {r['img_size']} px, "
            f"autocast {r['autocast']}, {mode}{', channels_last' if r['channels_last'] else ''}")
    return [what, f"{r['ours_ms']:.1f} ms", f"diffusers + lpips {r['reference_ms']:.1f} ms", f"{r['speedup']:.2f}x",
            pct(r["ours_mfu"])]


def lpips_rows(r: Dict[str, Any]) -> List[List[str]]:
    rows = r["rows"]
    names = " / ".join(x["backbone"] for x in rows)
    return [[f"LPIPS distances, batch {r['batch']}, {r['img_size']} px: {names}",
             " / ".join(f"{x['ours img/s']} img/s" for x in rows), "lpips package",
             " / ".join(f"{x['ratio']}x" for x in rows), ""]]


def trainer_rows(r: Dict[str, Any]) -> List[List[str]]:
    names = {1: "stage1_vae_trainer.py", 2: "stage2_diffusion_trainer.py (cached latents, pre-encoded text)"}
    return [[f"{names[x['stage']]}, {r['img_size']} px, batch {x['batch']}, {r['mixed_precision']}, {x['mode']}",
             f"{fmt(x['images_per_second'])} img/s", "", "", pct(x["mfu"])] for x in r["rows"]]


def t2i_rows(r: Dict[str, Any]) -> List[List[str]]:
    rows = r["rows"]
    base = rows[0]["images_per_second"]
    out = []
    for x in rows[1:]:
        ratio = x["images_per_second"] / base if x["images_per_second"] and base else None
        out.append([f"{x['run']}, {r['img_size']} px, batch {r['batch']}, {r['mixed_precision']}",
                    f"{fmt(x['images_per_second'])} img/s", f"train_text_to_image.py {fmt(base)} img/s",
                    fmt(ratio, ".2f", "x"), ""])
    return out


def sampling_rows(r: Dict[str, Any]) -> List[List[str]]:
    seconds = r["seconds"]
    out = []
    for sampler, steps in (("ddim", 50), ("ddpm", 1000)):
        theirs = seconds.get("diffusers", {}).get(sampler)
        ours = seconds["ours"][sampler]
        out.append([f"time to {r['num_images']} image(s), {sampler.upper()} {steps} + guidance, {r['img_size']} px, "
                    f"{r['dtype'].replace('torch.', '')}", f"{ours:.2f} s",
                    f"diffusers {theirs:.2f} s" if theirs else "", fmt(theirs / ours if theirs else None, ".2f", "x"), ""])
    return out


def loader_rows(r: Dict[str, Any]) -> List[List[str]]:
    return [[f"data loader alone: {x['loader']}, batch {r['batch']}, {r['num_workers']} workers, {r['img_size']} px",
             f"{x['images_per_second']:.0f} img/s", "", "", ""] for x in r["rows"]]


def summary_rows(name: str, r: Dict[str, Any]) -> List[List[str]]:
    kind = r.get("benchmark")
    if kind == "unet":
        return [unet_row(r)]
    if kind == "stage1":
        return [stage1_row(r)]
    builders = {"lpips": lpips_rows, "trainer": trainer_rows, "diffusers_t2i": t2i_rows, "sampling": sampling_rows,
                "loader": loader_rows}
    return builders[kind](r) if kind in builders else []


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    folder = Path(args.results)
    with (folder / "status.tsv").open() as handle:
        status = list(csv.DictReader(handle, delimiter="\t"))
    summary: List[List[str]] = []
    devices = set()
    for entry in status:
        path = folder / f"{entry['name']}.json"
        if entry["status"] == "ok" and path.is_file():
            result = json.loads(path.read_text())
            devices.add(str(result.get("device", "")))
            summary += summary_rows(entry["name"], result)

    lines = [f"# Speed benchmarks (issue 10): {args.device_description or ', '.join(sorted(devices))}", "",
             "From `benchmarks/bench_gpu.sh`; every row was measured in this run. Ratios: reference time / ours "
             "(> 1: ours faster). MFU: model FLOPs of a step (FlopCounterMode, one eager step) / time / the "
             "device's peak (n/a where none is known, e.g. a CPU).", "", "## Summary", "",
             markdown_table(["what", "ours", "reference", "ours vs reference", "MFU (ours)"], summary), "",
             "## Status", "",
             markdown_table(["benchmark", "status", "seconds"], [[e["name"], e["status"], e["seconds"]] for e in status]),
             "", "## Every benchmark's output", ""]
    for entry in status:
        out = folder / f"{entry['name']}.out"
        lines += [f"### {entry['name']} ({entry['status']})", "", f"`{entry['command']}`", ""]
        if out.is_file() and out.read_text().strip():
            lines += ["```", out.read_text().rstrip(), "```", ""]
    target = folder / "RESULTS.md"
    target.write_text("\n".join(lines) + "\n")
    return target


if __name__ == "__main__":
    main()
