"""The demo's report: ``<out>/report.md`` and ``<out>/report.html`` (the same content, images inline).

Built from what the stages left on disk: their state (times, commands), stage 0's
``eval_results.json`` (ours vs L2 per BAPPS category), stage 1's reconstruction grids and held-out
metrics, the latent scale in the VAE export, both trainers' loss curves, stage 2's sample grids,
inference_ldm.py's grids, and the scores (``quality.json``, ``fid.json``, ``rfid.json``). A piece
that is missing (a stage not run yet) is said to be missing, never left out silently.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

Block = Tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption) | ("code", text)


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _jsonl_last(path: Path, key_prefix: str) -> Optional[dict]:
    """The last metrics.jsonl row with a key starting with ``key_prefix``."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if any(k.startswith(key_prefix) for k in r)]
    return rows[-1] if rows else None


def _latest_png(folder: Path) -> Optional[Path]:
    files = sorted(folder.glob("*.png"), key=lambda p: (len(p.stem), p.stem)) if folder.is_dir() else []
    return files[-1] if files else None


def _f(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def build_blocks(out: Path, stages, state: Dict[str, dict], this_run: Dict[str, str], device: str,
                 profile: str) -> List[Block]:
    b: List[Block] = [("h", 1, "Latent diffusion demo report"),
                      ("p", f"Folder `{out}`, profile `{profile}`. {device}.")]
    if profile != "full":
        b.append(("p", "**A smoke run (tiny profile): every stage ran, but on a few steps; the scores mean nothing.**"))

    # -- times and commands ------------------------------------------------------------
    rows, total = [], 0.0
    for s in stages:
        entry = state.get(s.name) if "finished" in state.get(s.name, {}) else None
        if entry:
            total += entry["seconds"]
            how = "skipped (finished earlier)" if this_run.get(s.name) == "skipped" else "ran"
            rows.append([s.name, s.title, f"{entry['seconds']:.0f}", how, entry["finished"]])
        else:
            rows.append([s.name, s.title, "-", "not finished", "-"])
    b += [("h", 2, "Stages"), ("table", ["stage", "what", "seconds", "this run", "finished"], rows),
          ("p", f"Sum of the stage times: {total:.0f} s ({total / 60:.1f} min).")]

    # -- scores --------------------------------------------------------------------------
    quality, fid, rfid = _json(out / "quality.json"), _json(out / "fid.json"), _json(out / "rfid.json")
    b.append(("h", 2, "Scores (held-out shapes, seed 12345; training used seed 0)"))
    if quality and "ldm" in quality:
        ldm = quality["ldm"]
        gen = ldm.get("settings", {})
        b.append(("table", ["prompt adherence", "color", "shape", "background", "all"],
                  [[f"samples ({gen.get('sampler', '?')} {gen.get('num_inference_steps', '?')} steps, guidance "
                    f"{_f(gen.get('guidance_scale'), 2)}: inference_ldm.py's defaults for this model)"]
                   + [_f(ldm["samples"][k]) for k in ("color", "shape", "background", "all")],
                   ["the prompts' own images through the VAE (the ceiling)"]
                   + [_f(ldm["vae_ceiling"][k]) for k in ("color", "shape", "background", "all")],
                   ["chance"] + [_f(ldm["chance"][k]) for k in ("color", "shape", "background", "all")]]))
        b.append(("p", f"{ldm['samples'].get('count', '?')} prompts, one image each; the caption is read back "
                       "from the pixels (modules/shapes.py caption_accuracy)."))
    else:
        b.append(("p", "Prompt adherence: missing (stage `quality` has not finished)."))
    rows = []
    if quality and "vae" in quality:
        v = quality["vae"]
        rows.append(["VAE reconstruction", f"PSNR {_f(v.get('psnr'), 2)} dB, SSIM {_f(v.get('ssim'), 4)}, "
                     f"LPIPS (ours) {_f(v.get('lpips'), 4)} on {v.get('images')} images"])
    if fid:
        rows.append(["generated vs held-out", f"FID {_f(fid.get('fid'), 2)}, KID {_f(fid.get('kid'), 4)} "
                     f"± {_f(fid.get('kid_std'), 4)} ({fid.get('images')} images each)"])
    if rfid:
        rows.append(["VAE reconstructions vs originals", f"rFID {_f(rfid.get('rfid'), 2)}, rKID {_f(rfid.get('rkid'), 4)}"])
    scale = (quality or {}).get("vae", {})
    if "scaling_factor" in scale:
        rows.append(["latent scale", f"factor {_f(scale.get('scaling_factor'), 5)}; scaled held-out latents: mean "
                     f"{_f(scale.get('scaled_mean'), 3)}, std {_f(scale.get('scaled_std'), 3)}"])
    if rows:
        b.append(("table", ["score", "value"], rows))
        if fid or rfid:
            b.append(("p", "FID/KID/rFID use random Inception weights (`generate_data.py inception`, offline): "
                           "they compare this demo's numbers with each other, not with published FIDs. KID is an "
                           "unbiased estimate and can be negative; with random features its scale is arbitrary."))

    # -- stage 0 -------------------------------------------------------------------------
    b.append(("h", 2, "Stage 0: our LPIPS vs L2 (2AFC agreement with the judges; JND mAP)"))
    results = _json(out / "lpips/LPIPSTrainer/eval_results.json")
    if results:
        b.append(("table", ["category", "ours", "L2"],
                  [[c, _f(r.get("ours")), _f(r.get("l2"))] for c, r in results.items()]))
    else:
        b.append(("p", "missing (stage `lpips` has not finished)."))
    b.append(("img", out / "lpips/LPIPSTrainer/loss_curve.png", "stage 0 loss"))

    # -- stage 1 -------------------------------------------------------------------------
    b.append(("h", 2, "Stage 1: the VAE"))
    val = _jsonl_last(out / "vae/VAETrainer/metrics.jsonl", "val")
    if val:
        b.append(("p", "Held-out reconstruction at the end of training: " + ", ".join(
            f"{k} {_f(v, 4)}" for k, v in val.items() if k != "step")))
    b.append(("img", _latest_png(out / "vae_gens"), "held-out images, each directly left of its reconstruction, at the last step"))
    b.append(("img", out / "vae/VAETrainer/loss_curve.png", "stage 1 losses"))

    # -- stage 2 -------------------------------------------------------------------------
    b.append(("h", 2, "Stage 2: the latent UNet"))
    b.append(("img", out / "diffusion/DiffusionTrainer/loss_curve.png", "stage 2 loss"))
    b.append(("img", _latest_png(out / "diffusion_gens"), "stage 2's last sample grid (one row per prompt)"))

    # -- samples -------------------------------------------------------------------------
    b.append(("h", 2, "inference_ldm.py: a grid per prompt (seeds 0-3, default settings)"))
    grids = sorted((out / "samples").glob("*-grid.png")) if (out / "samples").is_dir() else []
    for grid in grids:
        b.append(("img", grid, grid.stem.split("-", 1)[1].rsplit("-grid", 1)[0].replace("_", " ")))
    if not grids:
        b.append(("p", "missing (stage `samples` has not finished)."))
    b.append(("img", out / "quality_samples.png", "the adherence benchmark's samples (held-out prompts and seeds)"))

    # -- commands ------------------------------------------------------------------------
    b.append(("h", 2, "Commands"))
    b.append(("p", "Every stage's exact command lines (run from the repository root; `accelerate launch` runs the "
                   "trainers as a user does). Their output is in `logs/<stage>.log`."))
    for s in stages:
        entry = state.get(s.name) if "finished" in state.get(s.name, {}) else None
        b.append(("code", f"# {s.name}: {s.title}\n" + "\n".join(entry["commands"] if entry else ["(not run yet)"])))
    return b


def to_markdown(blocks: Sequence[Block], out: Path) -> str:
    lines: List[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        elif kind == "img":
            path, caption = block[1], block[2]
            if path is not None and Path(path).is_file():
                lines += [f"![{caption}]({Path(path).relative_to(out)})", f"*{caption}*", ""]
            else:
                lines += [f"*{caption}: missing*", ""]
        elif kind == "code":
            lines += ["```bash", block[1], "```", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in a paragraph, for the HTML page."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(blocks: Sequence[Block]) -> str:
    body: List[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            path, caption = block[1], block[2]
            if path is not None and Path(path).is_file():
                data = base64.b64encode(Path(path).read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            else:
                body.append(f"<p><i>{html.escape(caption)}: missing</i></p>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.2em .6em;text-align:left}"
             "img{image-rendering:pixelated;max-width:100%;min-width:16em}pre{background:#f4f4f4;padding:.6em;"
             "overflow-x:auto}figure{margin:1em 0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Latent diffusion demo report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out: Path, stages, state: Dict[str, dict], this_run: Dict[str, str], device: str,
                 profile: str) -> Path:
    blocks = build_blocks(out, stages, state, this_run, device, profile)
    (out / "report.md").write_text(to_markdown(blocks, out), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks), encoding="utf-8")
    return out / "report.md"
