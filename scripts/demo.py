"""`make demo`: the whole pipeline on the built-in data, offline, resumable, ending in a report.

    synthetic BAPPS -> stage 0 LPIPS -> shapes (img2dataset parquet) + a tiny CLIP -> prep_cc.py
    -> stage 1 KL-VAE -> compute_vae_scaling.py -> stage 2 text-conditional latent UNet
    -> inference_ldm.py (its default settings) -> scores (prompt adherence, PSNR, FID) -> report

Each stage is one or more of the tutorial's command lines, run as a user runs them (the trainers
through ``accelerate launch``), its output teed to ``<out>/logs/<stage>.log``. A stage is finished
when its outputs exist and its fingerprint (its command lines, the contents of the config files
it reads, and when the stages it depends on finished) is the one recorded in
``<out>/demo_state.json``: a second ``make demo`` skips finished stages and says so; a changed
config, or a re-run upstream stage, re-runs the stage and everything after it. A trainer stopped
part-way (Ctrl-C, a crash) continues from its last checkpoint when nothing it depends on changed.
``--force`` (``make demo FORCE=1``) starts over. A code change is not part of the fingerprint:
use ``--force``.

On a machine with a CUDA GPU the trainers use it (``mixed_precision: auto`` picks bf16/fp16 there);
the run says which device it found. ``--profile tiny`` is a smoke run of every stage in about two
minutes (the tests' setting: its scores mean nothing). The report is ``<out>/report.md`` and
``<out>/report.html`` (images inline: opens in any browser).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.errors import OneLineArgumentParser, UserError  # noqa: E402

MODEL_CONFIG = "configs/demo/ldm_shapes.yaml"
VAE_CONFIG = "configs/demo/stage1_vae_shapes.yaml"
STAGE2_CONFIG = "configs/demo/stage2_shapes.yaml"
SAMPLE_PROMPTS = "configs/demo/shapes_prompts.txt"
HELD_OUT_SEED = 12345  # shapes rendered with it for every score; the training data is seed 0

# What each profile changes: sizes and step counts only, never the code path.
PROFILES: Dict[str, Dict[str, object]] = {
    "full": {"bapps": ["--num_train", "300", "--num_val", "50", "--num_jnd", "50"], "lpips_epochs": ["3", "2"],
             "shapes": 4000, "stage1": [], "stage2": [], "samples": [], "quality": [], "adherence": 256, "fid": 100,
             "psnr": 512},
    "tiny": {"bapps": ["--num_train", "10", "--num_val", "5", "--num_jnd", "5"], "lpips_epochs": ["1", "0"],
             "shapes": 256,
             "stage1": ["--set", "training_args.total_training_iterations=12", "--set", "training_args.disc_start=6",
                        "--set", "training_args.per_gpu_batch_size=8", "--set", "training_args.val_generation_freq=6",
                        "--set", "training_args.num_val_images=8", "--set", "training_args.logging_steps=4"],
             "stage2": ["--set", "training_args.total_training_iterations=12", "--set",
                        "training_args.per_gpu_batch_size=8", "--set", "training_args.val_generation_freq=6",
                        "--set", "training_args.checkpoint_iterations=6", "--set", "training_args.logging_steps=4",
                        "--set", "training_args.lr_warmup_steps=2", "--set", "training_args.num_inference_steps=4",
                        "--set", "training_args.num_samples_per_condition=1"],
             "samples": ["--num_inference_steps", "4"], "quality": ["--num_inference_steps", "4"],
             "adherence": 8, "fid": 8, "psnr": 16},
}


@dataclass
class Stage:
    name: str
    title: str
    commands: List[List[str]]
    outputs: List[str]                     # relative to the demo folder; all must exist when finished
    clean: List[str] = field(default_factory=list)    # removed before the stage runs
    configs: List[str] = field(default_factory=list)  # repo files whose contents are part of the fingerprint
    after: List[str] = field(default_factory=list)    # stages it reads the outputs of
    resumable: bool = False  # a trainer: an interrupted attempt with the same fingerprint continues from its checkpoint


def launch() -> List[str]:
    return ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]


RESUME = ["--resume_from_checkpoint", "latest"]  # a fresh folder: a new run; an interrupted one: continues


def build_stages(out: Path, profile: str) -> List[Stage]:
    p = PROFILES[profile]
    o = str(out)
    py = [sys.executable]
    vae, ldm = f"{o}/vae/model.safetensors", f"{o}/diffusion/model.safetensors"
    epochs, decay = p["lpips_epochs"]
    return [
        Stage("bapps", "synthetic BAPPS", [py + ["generate_data.py", "bapps", f"{o}/bapps", *p["bapps"], "--img_size", "64"]],
              ["bapps/2afc"], clean=["bapps"]),
        Stage("lpips", "stage 0: our LPIPS on BAPPS", [launch() + [
            "stage0_lpips_trainer.py", "--path_to_root", f"{o}/bapps", "--work_dir", f"{o}/lpips",
            "--checkpoint_name", "lpips_demo.pt", "--img_size", "64", "--batch_size", "25", "--num_workers", "2",
            "--num_epochs", epochs, "--decay_epochs", decay, "--logging_steps", "10", "--backbone", "alex",
            "--no-pretrained_backbone", "--initial_lr", "1e-3", "--use_dropout", "--img_range", "minus_one_to_one",
            "--middle_channels", "32", *RESUME]], ["lpips/lpips_demo.safetensors", "lpips/LPIPSTrainer/eval_results.json"],
              clean=["lpips"], after=["bapps"], resumable=True),
        Stage("shapes", "the shapes dataset as img2dataset parquet, and a tiny CLIP", [
            py + ["generate_data.py", "shapes", f"{o}/shapes_raw", "--num_images", str(p["shapes"]), "--img_size", "32"],
            py + ["generate_data.py", "tiny_clip", f"{o}/tiny_clip", "--hidden_size", "64"]],
              ["shapes_raw/00000.parquet", "tiny_clip/config.json"], clean=["shapes_raw", "tiny_clip"]),
        Stage("prep", "prep_cc.py: parquet -> Hugging Face dataset", [py + [
            "prep_cc.py", "--path_to_data_root", f"{o}/shapes_raw", "--path_to_save", f"{o}/shapes_hf",
            "--hf_clip_model_name", f"{o}/tiny_clip", "--cpu_batch_size", "512", "--gpu_batch_size", "256",
            "--num_cpu_workers", "0", "--dtype", "float32"]], ["shapes_hf/dataset_info.json"], clean=["shapes_hf"],
              after=["shapes"]),
        Stage("vae", "stage 1: KL-VAE, L1/L2 + our LPIPS + PatchGAN switched on part-way", [launch() + [
            "stage1_vae_trainer.py", "--experiment_name", "VAETrainer", "--working_directory", f"{o}/vae",
            "--training_config", VAE_CONFIG, "--model_config", MODEL_CONFIG, "--dataset", "conceptual_captions",
            "--path_to_dataset", f"{o}/shapes_hf", "--path_to_save_gens", f"{o}/vae_gens",
            "--set", f"training_args.lpips_checkpoint={o}/lpips/lpips_demo.safetensors", *p["stage1"], *RESUME]],
              ["vae/model.safetensors"], clean=["vae", "vae_gens"], configs=[VAE_CONFIG, MODEL_CONFIG],
              after=["lpips", "prep"], resumable=True),
        Stage("scale", "the latent scale factor", [py + [
            "compute_vae_scaling.py", "--path_to_pretrained_weights", vae, "--dataset", "conceptual_captions",
            "--path_to_dataset", f"{o}/shapes_hf", "--model_config", MODEL_CONFIG]], ["logs/scale.log"],
              configs=[MODEL_CONFIG], after=["vae"]),
        Stage("diffusion", "stage 2: text-conditional latent UNet with DDPM (cached latents)", [launch() + [
            "stage2_diffusion_trainer.py", "--experiment_name", "DiffusionTrainer", "--working_directory",
            f"{o}/diffusion", "--training_config", STAGE2_CONFIG, "--model_config", MODEL_CONFIG,
            "--path_to_vae_backbone", vae, "--dataset", "conceptual_captions", "--path_to_dataset", f"{o}/shapes_hf",
            "--path_to_save_gens", f"{o}/diffusion_gens", "--set", f"unet.text_conditioning_hf_model={o}/tiny_clip",
            *p["stage2"], *RESUME]], ["diffusion/model.safetensors"], clean=["diffusion", "diffusion_gens"],
              configs=[STAGE2_CONFIG, MODEL_CONFIG, SAMPLE_PROMPTS], after=["scale", "prep"], resumable=True),
        Stage("samples", "inference_ldm.py with its default settings for this model", [py + [
            "inference_ldm.py", "--model_config", MODEL_CONFIG, "--path_to_weights", ldm, "--text_conditional",
            "--training_dataset", "conceptual_captions", "--prompts_file", SAMPLE_PROMPTS, "--num_images", "4",
            "--seed", "0", "--output", f"{o}/samples", *p["samples"]]], ["samples"], clean=["samples"],
              configs=[SAMPLE_PROMPTS], after=["diffusion"]),
        Stage("quality", "held-out VAE reconstruction and prompt adherence (caption read back from the pixels)", [py + [
            "benchmarks/bench_quality.py", "--vae", vae, "--ldm", ldm, "--dataset", "shapes", "--shapes_seed",
            str(HELD_OUT_SEED), "--num_images", str(p["psnr"]), "--num_samples", str(p["adherence"]),
            "--lpips", f"{o}/lpips/lpips_demo.safetensors", "--seed", "1", "--save_grid", f"{o}/quality_samples.png",
            "--json", f"{o}/quality.json", *p["quality"]]], ["quality.json", "quality_samples.png"], after=["diffusion", "lpips"]),
        Stage("fid", "FID / KID of generated vs held-out shapes, rFID of the VAE (random Inception: offline)", [
            py + ["generate_data.py", "inception", f"{o}/inception_random.pth", "--seed", "0"],
            py + ["evaluate_ldm.py", "--ldm", ldm, "--reference_dataset", "shapes", "--shapes_seed",
                  str(HELD_OUT_SEED), "--num_images", str(p["fid"]), "--metrics", "fid,kid", "--inception_weights",
                  f"{o}/inception_random.pth", "--reference_features", f"{o}/reference_features.pt",
                  "--json", f"{o}/fid.json"],
            py + ["evaluate_ldm.py", "--vae", vae, "--reference_dataset", "shapes", "--shapes_seed",
                  str(HELD_OUT_SEED), "--num_images", str(p["fid"]), "--metrics", "rfid",
                  "--inception_weights", f"{o}/inception_random.pth", "--reference_features", f"{o}/reference_features.pt",
                  "--json", f"{o}/rfid.json"]],  # the held-out shapes' Inception features once, for both
              ["fid.json", "rfid.json"], clean=["inception_random.pth", "reference_features.pt"], after=["diffusion"]),
    ]


# ----------------------------------------------------------------------------------------
# Fingerprints and state
# ----------------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    """SHA-256 of a file; of a YAML file's parsed contents, so that a comment or layout change re-runs nothing."""
    if not path.is_file():
        return "missing"
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return hashlib.sha256(json.dumps(yaml.safe_load(path.read_text()), sort_keys=True,
                                             default=str).encode()).hexdigest()
        except yaml.YAMLError:
            pass  # the trainer reading it will say what is wrong
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(stage: Stage, state: Dict[str, dict], profile: str) -> str:
    record = {"profile": profile, "commands": [c[1:] if c[0] == sys.executable else c for c in stage.commands],
              "configs": {c: file_digest(REPO / c) for c in stage.configs},
              "after": {s: state.get(s, {}).get("finished") for s in stage.after}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def load_state(out: Path) -> Dict[str, dict]:
    path = out / "demo_state.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a run killed mid-write: every stage counts as not finished


def save_state(out: Path, state: Dict[str, dict]) -> None:
    tmp = out / "demo_state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, out / "demo_state.json")


def shell_line(command: Sequence[str]) -> str:
    parts = list(command)
    if parts[0] == sys.executable:
        parts[0] = "python"
    return shlex.join(parts)


def run_stage(stage: Stage, out: Path, env: Dict[str, str], resume: bool) -> None:
    for rel in [] if resume else stage.clean:
        target = out / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    log_path = out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        for command in stage.commands:
            print(f"$ {shell_line(command)}", flush=True)
            log.write(f"$ {shell_line(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
            try:
                for line in proc.stdout:
                    log.write(line)
                    if "%|" not in line:  # progress bars (tqdm's "45%|####  | 83/180 [...]") go to the log only
                        sys.stdout.write(line)
            except KeyboardInterrupt:  # the stage got the Ctrl-C too: let a trainer write its checkpoint
                proc.wait()
                print(f"\ninterrupted in stage {stage.name}; make demo continues from there", file=sys.stderr)
                raise
            if proc.wait() != 0:
                raise UserError(f"stage {stage.name} failed (exit {proc.returncode}): {shell_line(command)}; "
                                f"its output is in {log_path}")


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()}; the trainers use one)"
    return f"CPU: {os.cpu_count()} cores, no CUDA GPU"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="demo_out", help="the demo folder (default demo_out/)")
    parser.add_argument("--force", action="store_true", help="run every stage again")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full",
                        help="full (the demo) or tiny (a smoke run of every stage)")
    parser.add_argument("--only_report", action="store_true", help="write the report from what is there")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    state = {} if args.force else load_state(out)
    if state.get("_profile") not in (None, args.profile):
        print(f"the folder holds a {state['_profile']} run; starting over with the {args.profile} profile")
        state = {}
    state["_profile"] = args.profile
    stages = build_stages(out, args.profile)
    started = time.perf_counter()
    print(f"demo: {out} ({args.profile} profile); {device_line()}", flush=True)
    this_run: Dict[str, str] = {}
    for index, stage in enumerate(stages if not args.only_report else [], 1):
        fp = fingerprint(stage, state, args.profile)
        done = state.get(stage.name, {})
        print(f"\n=== [{index}/{len(stages)}] {stage.name}: {stage.title}", flush=True)
        if "finished" in done and done.get("fingerprint") == fp and all((out / rel).exists() for rel in stage.outputs):
            print(f"    skipped: finished {done['finished']} in {done['seconds']:.0f} s, inputs and config unchanged "
                  "(make demo FORCE=1 starts over)", flush=True)
            this_run[stage.name] = "skipped"
            continue
        resume = stage.resumable and done.get("attempt") == fp and "finished" not in done
        if resume:
            print("    continuing the interrupted attempt from its last checkpoint", flush=True)
        state[stage.name] = {"attempt": fp}
        save_state(out, state)
        t0 = time.perf_counter()
        run_stage(stage, out, env, resume)
        seconds = time.perf_counter() - t0
        state[stage.name] = {"fingerprint": fingerprint(stage, state, args.profile), "seconds": seconds,
                             "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                             "commands": [shell_line(c) for c in stage.commands]}
        save_state(out, state)
        this_run[stage.name] = "ran"
        print(f"    {stage.name} done in {seconds:.0f} s", flush=True)

    from scripts.demo_report import write_report

    report = write_report(out, stages, state, this_run, device_line(), args.profile)
    total = time.perf_counter() - started
    print("\nstage times (s): " + ", ".join(
        f"{s.name} {state[s.name]['seconds']:.0f}{' (skipped)' if this_run.get(s.name) == 'skipped' else ''}"
        for s in stages if "finished" in state.get(s.name, {})))
    print(f"demo finished in {total:.0f} s; report: {report} (and {report.with_suffix('.html')})")
    return state


if __name__ == "__main__":
    from modules.cli import run_main

    run_main(main)
