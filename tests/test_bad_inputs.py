"""A catalogue of bad inputs across the six scripts, and the awkward inputs that must work.

Each row of ``CASES`` is (id, script, how to build the bad input in ``tmp_path`` -> the argv, the
regex its error must match). One test runs every row the way a user would meet it (in process
through ``modules.cli.run_main``, as ``python <script>.py`` does; the rows marked ``SUBPROCESS``
really as ``python <script>.py``) and asserts what the project promises for a user error: exit
code 2, exactly one line on stderr that starts with ``error: `` and matches the regex (naming the
file, key or value and what was expected), no traceback, and no file of the user's touched: every
file under the row's folder and the shared assets (inputs, and outputs of earlier runs such as a
previous ``model.safetensors``) has the same bytes afterwards, and nothing new was written.

Then the inputs that must work: captions with emoji and with bytes that are not UTF-8 through
``prep_cc.py``, and a prompt longer than the text encoder's 77 (here 16) tokens through
``inference_ldm.py``, which says once that it was truncated.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import OFFLINE_ENV, REPO_ROOT
from modules.autoencoder import VAEConfig, build_autoencoder
from modules.cli import run_main
from modules.lpips import LPIPS, save_lpips_export
from modules.shapes import write_shapes_folder, write_shapes_parquet
from modules.text_encoder import TextEncoder
from modules.vae_io import save_vae_export
from test_inference import exports, generate, one_thread  # noqa: F401  (fixtures: the tiny exports, one thread)
from test_stage2 import train_sets, unet_sets

CONFIGS = REPO_ROOT / "configs"
IMG = 16
# Shapes captions with an emoji, and one written by a tool that stored Latin-1 bytes as a "string".
EMOJI_CAPTION = "a red circle \N{BALLOON} on a blue background \N{SPARKLES}"
LATIN1_CAPTION = "caf\xe9 cr\xe8me square on a white background".encode("latin-1")


def sets(*pairs: str) -> List[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


# ----------------------------------------------------------------------------------------
# Shared assets: the user's trained files and data (hashed before and after every row)
# ----------------------------------------------------------------------------------------

def _string_column(values: List[bytes]) -> pa.Array:
    """An Arrow string column holding exactly these bytes, valid UTF-8 or not (Arrow does not check)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


def shapes_shards_with_odd_captions(raw: Path) -> Path:
    """4 shapes as img2dataset parquet; caption 0 gets emoji, caption 1 bytes that are not UTF-8."""
    write_shapes_parquet(raw, num_images=4, img_size=IMG, seed=0)
    shard = raw / "00000.parquet"
    table = pq.read_table(shard)
    captions = [c.encode("utf-8") for c in table.column("caption").to_pylist()]
    captions[0], captions[1] = EMOJI_CAPTION.encode("utf-8"), LATIN1_CAPTION
    index = table.schema.get_field_index("caption")
    pq.write_table(table.set_column(index, table.schema.field(index), _string_column(captions)), shard)
    return raw


@pytest.fixture(scope="module")
def assets(exports):
    """Stage-0/1/2 exports, an image folder, raw shards and their prep_cc.py output, under one root."""
    import prep_cc

    root = exports["root"]
    torch.manual_seed(0)
    lpips_pt = root / "lpips" / "lpips_squeeze.pt"
    save_lpips_export(LPIPS("squeeze", pretrained_backbone=False, use_dropout=False), lpips_pt)
    vae_cfg = VAEConfig(img_size=IMG, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                        residual_layers_per_block=1, attention_layers=0)
    vae = save_vae_export(build_autoencoder(vae_cfg), vae_cfg, root / "vae" / "model.safetensors",
                          {"scaling_factors": {"celebahq": 0.5}, "step": 10})
    write_shapes_folder(root / "faces", 6, IMG + 4, seed=1)
    raw = shapes_shards_with_odd_captions(root / "raw")
    out = root / "cc_prepped"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = prep_cc.main(["--path_to_data_root", str(raw), "--path_to_save", str(out), "--hf_clip_model_name",
                                str(exports["clip"]), "--num_cpu_workers", "0"])
    return {**exports, "root": root, "lpips": lpips_pt.with_suffix(".safetensors"), "vae": vae, "faces": root / "faces",
            "raw": raw, "prepped": out, "prep_summary": summary, "prep_stdout": printed.getvalue(),
            "ldm": exports["class"]}


# ----------------------------------------------------------------------------------------
# How each bad input is built: tmp is the row's own folder, a the shared assets
# ----------------------------------------------------------------------------------------

def a_file(tmp: Path, name: str = "notes.txt") -> Path:
    """A regular file of the user's, used where a folder is expected."""
    path = tmp / name
    path.write_text("my notes\n")
    return path


def previous_export(work: Path) -> Path:
    """The export of an earlier run in the working directory: it must survive a refused run."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "model.safetensors").write_bytes(b"the weights of an earlier run")
    return work


def stage0(tmp: Path, *extra: str) -> List[str]:
    return ["--path_to_root", str(tmp / "bapps"), "--work_dir", str(tmp / "work"), "--num_workers", "0", *extra]


def stage1(tmp: Path, a, *extra: str, dataset: str = "celebahq", data: Path | None = None,
           training_config: Path = CONFIGS / "stage1_vae_train.yaml", model_config: Path = CONFIGS / "ldm.yaml",
           work: Path | None = None) -> List[str]:
    """The tutorial's stage-1 flags, shrunk by --set (no LPIPS unless a row sets lpips_weight)."""
    work = previous_export(tmp / "work") if work is None else work
    return ["--experiment_name", "VAETrainer", "--working_directory", str(work), "--training_config",
            str(training_config), "--model_config", str(model_config), "--dataset", dataset, "--path_to_dataset",
            str(a["faces"] if data is None else data),
            *sets(f"vae.img_size={IMG}", "vae.vae_channels_per_block=[8,16]", "vae.norm_num_groups=4",
                  "vae.residual_layers_per_block=1", "discriminator.start_channels=8", "discriminator.depth=2",
                  "training_args.num_workers=0", "training_args.per_gpu_batch_size=2",
                  "training_args.num_val_images=1", "training_args.mixed_precision=no"), *extra]


def no_lpips() -> List[str]:
    return sets("training_args.lpips_weight=0")


def stage2(tmp: Path, a, *extra: str, vae: Path | None = None, dataset: str = "celebahq", data: Path | None = None,
           classes: bool = False, gens: Path | None = None, model_config: Path = CONFIGS / "ldm.yaml") -> List[str]:
    """The tutorial's stage-2 flags with test_stage2's tiny UNet and short-run overrides."""
    return ["--experiment_name", "DiffusionTrainer", "--working_directory", str(previous_export(tmp / "work")),
            "--training_config", str(CONFIGS / "stage2_diffusion_train.yaml"), "--model_config",
            str(model_config), "--path_to_vae_backbone", str(a["vae"] if vae is None else vae),
            "--dataset", dataset, "--path_to_dataset", str(a["faces"] if data is None else data),
            "--path_to_save_gens", str(tmp / "gens" if gens is None else gens),
            *unet_sets(a["clip"], text=False, classes=classes),
            *train_sets(CONFIGS / "sample_text_cond_prompts.txt", per_gpu_batch_size=2), *extra]


def scaling(a, weights: Path, *extra: str, dataset: str = "celebahq", data: Path | None = None) -> List[str]:
    return ["--path_to_pretrained_weights", str(weights), "--dataset", dataset, "--path_to_dataset",
            str(a["faces"] if data is None else data), "--num_workers", "0", *extra]


def prep(tmp: Path, a, raw: Path, *extra: str, out: Path | None = None) -> List[str]:
    return ["--path_to_data_root", str(raw), "--path_to_save", str(tmp / "out" if out is None else out),
            "--hf_clip_model_name", str(a["clip"]), "--num_cpu_workers", "0", *extra]


def inference(tmp: Path, weights: Path, *extra: str) -> List[str]:
    out = tmp / "earlier.png"
    out.write_bytes(b"an image the user made before")  # must not be replaced by a refused run
    return ["--path_to_weights", str(weights), "--num_inference_steps", "2", "--output", str(out), *extra]


def config_copy(tmp: Path, source: Path, edit: Callable[[str], str]) -> Path:
    path = tmp / source.name
    path.write_text(edit(source.read_text()))
    return path


def duplicate_learning_rate(text: str) -> str:
    """training_args: gets learning_rate a second time, just below the first (a paste gone wrong)."""
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("learning_rate:"))
    return "".join(lines[: at + 1] + ["  learning_rate: 1.0e-3\n"] + lines[at + 1:])


def tab_indented(text: str) -> str:
    """The first indented line of vae: indented with a tab instead of spaces."""
    return re.sub(r"^vae:\n  ", "vae:\n\t", text, count=1, flags=re.M)


def unet_of_8_channels(text: str) -> str:
    """A model config whose UNet takes 8-channel latents (its vae: still makes 4)."""
    edited = text.replace("unet:\n  in_channels: 4\n  out_channels: 4\n", "unet:\n  in_channels: 8\n  out_channels: 8\n")
    assert edited != text
    return edited


def shards_without_last_stats(tmp: Path) -> Path:
    """Two img2dataset shards; the run was killed before it wrote 00001_stats.json."""
    raw = tmp / "raw"
    write_shapes_parquet(raw, num_images=4, img_size=IMG, seed=0, shard_size=2)
    (raw / "00001_stats.json").unlink()
    return raw


def truncated_first_shard(tmp: Path) -> Path:
    """The run was killed while writing its first shard: half a parquet file, no stats file yet."""
    raw = tmp / "raw"
    write_shapes_parquet(raw, num_images=4, img_size=IMG, seed=0)
    (raw / "00000_stats.json").unlink()
    shard = raw / "00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return raw


def raw_shards(tmp: Path) -> Path:
    write_shapes_parquet(tmp / "raw", num_images=2, img_size=IMG, seed=0)
    return tmp / "raw"


class Case(NamedTuple):
    id: str
    script: str
    build: Callable[[Path, dict], List[str]]
    error: str  # regex the one error line must match (searched, after "error: ")


CASES = [
    # ---- stage 0 ------------------------------------------------------------------------------
    Case("stage0-batch-size-zero", "stage0_lpips_trainer", lambda t, a: stage0(t, "--batch_size", "0"),
         r"^argument --batch_size: expected a number >= 1, got 0 \(see stage0_lpips_trainer\.py --help\)$"),
    Case("stage0-batch-size-negative", "stage0_lpips_trainer", lambda t, a: stage0(t, "--batch_size", "-4"),
         r"^argument --batch_size: expected a number >= 1, got -4 "),
    Case("stage0-work-dir-under-a-file", "stage0_lpips_trainer",
         lambda t, a: stage0(t, "--work_dir", str(a_file(t) / "work")),
         r"^--work_dir \S+/notes\.txt/work: cannot be created: \S+/notes\.txt is a file, not a folder$"),
    Case("stage0-missing-bapps-root", "stage0_lpips_trainer", lambda t, a: stage0(t),
         r"^BAPPS root \S+/bapps does not exist \(expected the folder that holds 2afc/ and optionally jnd/\)$"),
    # ---- stage 1 ------------------------------------------------------------------------------
    Case("stage1-lpips-checkpoint-is-a-vae-export", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *sets(f"training_args.lpips_checkpoint={a['vae']}")),
         r"^training_args\.lpips_checkpoint \S+/vae/model\.safetensors is a stage-1 VAE export .*; "
         r"expected a stage-0 LPIPS export"),
    Case("stage1-per-gpu-batch-size-zero", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), *sets("training_args.per_gpu_batch_size=0")),
         r"stage1_vae_train\.yaml \(with --set overrides\): training_args: per_gpu_batch_size must be >= 1, got 0$"),
    Case("stage1-per-gpu-batch-size-negative", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), *sets("training_args.per_gpu_batch_size=-2")),
         r"per_gpu_batch_size must be >= 1, got -2$"),
    Case("stage1-dataset-smaller-than-a-batch", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), *sets("training_args.per_gpu_batch_size=8")),
         r"^5 training images give no full batch of per_gpu_batch_size 8 on 1 process\(es\)"),
    Case("stage1-celebahq-given-a-prep-cc-output", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), data=a["prepped"]),
         r"^dataset 'celebahq' expects a folder of images, but \S+/cc_prepped is a saved Hugging Face dataset "
         r"\(a prep_cc\.py output\); train on it as dataset conceptual_captions"),
    Case("stage1-imagenet-given-a-flat-folder", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), dataset="imagenet"),
         r"^\S+/faces holds 6 images directly \(e\.g\. .*\); a class-folder dataset \(imagenet\) needs "
         r"root/<class>/<image>"),
    Case("stage1-yaml-duplicate-key", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), training_config=config_copy(
             t, CONFIGS / "stage1_vae_train.yaml", duplicate_learning_rate)),
         r"^\S+/stage1_vae_train\.yaml: duplicate key 'learning_rate' on line (\d+) \(first given on line \d+\); "
         r"each key may appear once"),
    Case("stage1-yaml-tab-indent", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), model_config=config_copy(t, CONFIGS / "ldm.yaml", tab_indented)),
         r"^\S+/ldm\.yaml: invalid YAML \(line \d+, column 1: indented with a tab; YAML indentation must be spaces\)$"),
    Case("stage1-set-on-a-section-that-does-not-exist", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), *sets("nosuch.learning_rate=1")),
         r"^--set nosuch\.learning_rate=1: there is no section 'nosuch'; .*\(training_args, discriminator, vae\) "
         r"or of the model config \(vae, unet, diffusion, scaling_constants\)"),
    Case("stage1-working-directory-under-a-file", "stage1_vae_trainer",
         lambda t, a: stage1(t, a, *no_lpips(), work=a_file(t) / "vae_run"),
         r"^--working_directory \S+/notes\.txt/vae_run: cannot be created: \S+/notes\.txt is a file, not a folder$"),
    Case("stage1-unknown-flag", "stage1_vae_trainer", lambda t, a: stage1(t, a, "--learning_rate", "1e-4"),
         r"^unrecognized arguments: --learning_rate 1e-4 \(see \S+ --help\)$"),
    # ---- compute_vae_scaling.py ---------------------------------------------------------------
    Case("scaling-given-an-lpips-export", "compute_vae_scaling", lambda t, a: scaling(a, a["lpips"]),
         r"^--path_to_pretrained_weights \S+/lpips_squeeze\.safetensors is a stage-0 LPIPS export .*; "
         r"expected a stage-1 VAE export"),
    Case("scaling-given-an-ldm-export", "compute_vae_scaling", lambda t, a: scaling(a, a["ldm"]),
         r"^--path_to_pretrained_weights \S+/class\.safetensors is a stage-2 latent diffusion export .*; "
         r"expected a stage-1 VAE export"),
    Case("scaling-batch-size-zero", "compute_vae_scaling", lambda t, a: scaling(a, a["vae"], "--batch_size", "0"),
         r"^argument --batch_size: expected a number >= 1, got 0 "),
    Case("scaling-celebahq-given-raw-parquet-shards", "compute_vae_scaling",
         lambda t, a: scaling(a, a["vae"], data=raw_shards(t)),
         r"^dataset 'celebahq' expects a folder of images, but \S+/raw holds parquet shards \(00000\.parquet, "
         r"\.\.\.: e\.g\. img2dataset output\); run prep_cc\.py on it"),
    # ---- stage 2 ------------------------------------------------------------------------------
    Case("stage2-vae-is-an-lpips-export", "stage2_diffusion_trainer", lambda t, a: stage2(t, a, vae=a["lpips"]),
         r"^--path_to_vae_backbone \S+/lpips_squeeze\.safetensors is a stage-0 LPIPS export .*; "
         r"expected a stage-1 VAE export"),
    Case("stage2-vae-is-an-ldm-export", "stage2_diffusion_trainer", lambda t, a: stage2(t, a, vae=a["ldm"]),
         r"^--path_to_vae_backbone \S+/class\.safetensors is a stage-2 latent diffusion export .*; "
         r"expected a stage-1 VAE export"),
    Case("stage2-vae-latent-channels-differ-from-unet-in-channels", "stage2_diffusion_trainer",
         lambda t, a: stage2(t, a, model_config=config_copy(t, CONFIGS / "ldm.yaml", unet_of_8_channels)),
         r"^\S+/vae/model\.safetensors has 4 latent channels but \S+/ldm\.yaml has unet\.in_channels 8 and "
         r"unet\.out_channels 8; they must be equal$"),
    Case("stage2-no-scale-factor-for-this-dataset", "stage2_diffusion_trainer",
         lambda t, a: stage2(t, a, dataset="ffhq"),
         r"^no latent scale factor for dataset 'ffhq': (?P<vae>\S+/vae/model\.safetensors) has factors only for "
         r"celebahq and \S+/ldm\.yaml has no scaling_constants\.ffhq; compute it with: python compute_vae_scaling\.py "
         r"--path_to_pretrained_weights (?P=vae) --dataset ffhq --path_to_dataset \S+/faces "),
    Case("stage2-per-gpu-batch-size-negative", "stage2_diffusion_trainer",
         lambda t, a: stage2(t, a, *sets("training_args.per_gpu_batch_size=-1")),
         r"stage2_diffusion_train\.yaml \(with --set overrides\): training_args: per_gpu_batch_size must be >= 1, "
         r"got -1$"),
    Case("stage2-dataset-smaller-than-a-batch", "stage2_diffusion_trainer",
         lambda t, a: stage2(t, a, *sets("training_args.per_gpu_batch_size=8")),
         r"^6 training images give no full batch of per_gpu_batch_size 8 on 1 process\(es\); lower it$"),
    Case("stage2-imagenet-given-a-flat-folder", "stage2_diffusion_trainer",
         lambda t, a: stage2(t, a, *sets("scaling_constants.imagenet=0.5"), dataset="imagenet", classes=True),
         r"^\S+/faces holds 6 images directly .*; a class-folder dataset \(imagenet\) needs root/<class>/<image>"),
    Case("stage2-celebahq-given-a-prep-cc-output", "stage2_diffusion_trainer",
         lambda t, a: stage2(t, a, data=a["prepped"]),
         r"^dataset 'celebahq' expects a folder of images, but \S+/cc_prepped is a saved Hugging Face dataset"),
    Case("stage2-sample-grids-folder-under-a-file", "stage2_diffusion_trainer",
         lambda t, a: stage2(t, a, gens=a_file(t) / "grids"),
         r"^--path_to_save_gens \S+/notes\.txt/grids: cannot be created: \S+/notes\.txt is a file, not a folder$"),
    # ---- prep_cc.py ---------------------------------------------------------------------------
    Case("prep-cc-shard-without-its-stats-json", "prep_cc", lambda t, a: prep(t, a, shards_without_last_stats(t)),
         r"^\S+/raw/00001\.parquet has no 00001_stats\.json beside it while other shards in \S+/raw have theirs: "
         r"img2dataset writes it when a shard is finished, .*; re-run the same img2dataset command to finish it, "
         r"or pass --skip_incomplete_shards"),
    Case("prep-cc-truncated-shard", "prep_cc", lambda t, a: prep(t, a, truncated_first_shard(t)),
         r"^\S+/raw/00000\.parquet is not a readable parquet file \(.*\): truncated, like the shard an interrupted "
         r"img2dataset run was writing, .*--skip_incomplete_shards"),
    Case("prep-cc-cpu-batch-size-zero", "prep_cc", lambda t, a: prep(t, a, raw_shards(t), "--cpu_batch_size", "0"),
         r"^--cpu_batch_size must be >= 1, got 0$"),
    Case("prep-cc-save-path-under-a-file", "prep_cc",
         lambda t, a: prep(t, a, raw_shards(t), out=a_file(t) / "cc"),
         r"^--path_to_save \S+/notes\.txt/cc: cannot be created: \S+/notes\.txt is a file, not a folder$"),
    Case("prep-cc-output-exists", "prep_cc", lambda t, a: prep(t, a, a["raw"], out=a["prepped"]),
         r"^--path_to_save \S+/cc_prepped already exists; pass --overwrite to replace it"),
    # ---- inference_ldm.py ---------------------------------------------------------------------
    Case("inference-weights-are-a-vae-export", "inference_ldm", lambda t, a: inference(t, a["vae"]),
         r"^--path_to_weights \S+/vae/model\.safetensors is a stage-1 VAE export .*; expected a stage-2 latent "
         r"diffusion export"),
    Case("inference-weights-are-an-lpips-export", "inference_ldm", lambda t, a: inference(t, a["lpips"]),
         r"^--path_to_weights \S+/lpips_squeeze\.safetensors is a stage-0 LPIPS export"),
    Case("inference-zero-steps", "inference_ldm",
         lambda t, a: inference(t, a["ldm"], "--class_label", "1", "--num_inference_steps", "0"),
         r"^argument --num_inference_steps: expected a number >= 1, got 0 \(see \S+ --help\)$"),
    Case("inference-negative-eta", "inference_ldm", lambda t, a: inference(t, a["ldm"], "--eta", "-0.5"),
         r"^--eta must be >= 0, got -0\.5 \(see \S+ --help\)$"),
    Case("inference-output-under-a-file", "inference_ldm",
         lambda t, a: inference(t, a["ldm"], "--class_label", "1", "--output", str(a_file(t) / "cat.png")),
         r"^--output \S+/notes\.txt/cat\.png: \S+/notes\.txt is a file, not a folder$"),
    Case("inference-model-config-duplicate-key", "inference_ldm",
         lambda t, a: inference(t, a["ldm"], "--model_config", str(config_copy(
             t, CONFIGS / "ldm.yaml", lambda text: text.replace("  latent_channels: 4\n",
                                                                "  latent_channels: 4\n  latent_channels: 8\n")))),
         r"^\S+/ldm\.yaml: duplicate key 'latent_channels' on line \d+ \(first given on line \d+\)"),
    Case("inference-init-image-is-not-an-image", "inference_ldm",
         lambda t, a: inference(t, a["ldm"], "--class_label", "1", "--init_image", str(a_file(t, "photo.png"))),
         r"^--init_image \S+/photo\.png: not a readable image"),
]
# Seen exactly as a user sees them: a new `python <script>.py` process (the others run in process).
SUBPROCESS = {"stage0-batch-size-zero", "prep-cc-truncated-shard", "stage2-no-scale-factor-for-this-dataset"}


def snapshot(*roots: Path) -> Dict[str, str]:
    """sha256 of every file under ``roots``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def run_as_user(script: str, argv: List[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``python <script>.py argv``: in process through run_main (what the
    script's ``__main__`` does), or as a new process for the SUBPROCESS rows."""
    ldm_logger = logging.getLogger("ldm")
    saved = ldm_logger.handlers[:]
    ldm_logger.handlers.clear()  # a handler made under capsys must not outlive it
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_main(importlib.import_module(script).main, argv)
    finally:
        ldm_logger.handlers[:] = saved
    return exit_info.value.code, capsys.readouterr().err


def run_subprocess(script: str, argv: List[str]) -> tuple[int, str]:
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, f"{script}.py", *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    return result.returncode, result.stderr


def test_catalogue_covers_every_script_and_ids_are_unique():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {c.script for c in CASES} == {"stage0_lpips_trainer", "stage1_vae_trainer", "compute_vae_scaling",
                                         "stage2_diffusion_trainer", "prep_cc", "inference_ldm"}
    assert SUBPROCESS <= {c.id for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, assets, tmp_path, capsys):
    argv = case.build(tmp_path, assets)
    before = snapshot(tmp_path, assets["root"])
    if case.id in SUBPROCESS:
        code, stderr = run_subprocess(case.script, argv)
    else:
        code, stderr = run_as_user(case.script, argv, capsys)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr[-3000:]
    assert re.search(case.error, errors[0][len("error: "):]), errors[0]
    assert snapshot(tmp_path, assets["root"]) == before  # same files, same bytes: nothing touched or written


# ----------------------------------------------------------------------------------------
# Inputs that must work
# ----------------------------------------------------------------------------------------

def test_prep_cc_keeps_emoji_and_non_utf8_captions(assets):
    """Emoji pass unchanged; bytes that are not UTF-8 keep their row, become U+FFFD and are counted."""
    import datasets

    summary = assets["prep_summary"]
    assert (summary["rows_read"], summary["kept"], summary["dropped"]) == (4, 4, 0)
    assert summary["captions_invalid_utf8"] == 1
    assert "captions with invalid UTF-8 (bytes replaced by U+FFFD): 1" in assets["prep_stdout"].splitlines()
    rows = datasets.load_from_disk(str(assets["prepped"]))
    captions = list(rows["caption"])
    assert captions[0] == EMOJI_CAPTION
    assert captions[1] == "caf\ufffd cr\ufffdme square on a white background"
    # The stored tokens are the tokenizer's of exactly these strings, and the emoji come back from them.
    encoder = TextEncoder(assets["clip"])
    tokens = encoder.tokenize(captions)
    assert torch.equal(torch.tensor(list(rows["input_ids"])).long(), tokens.input_ids)
    assert encoder.tokenizer.decode(tokens.input_ids[0], skip_special_tokens=True) == EMOJI_CAPTION


def test_prep_cc_skip_incomplete_shards_leaves_them_out_and_counts_them(assets, tmp_path, capsys):
    """The opt-in alternative to the error: both kinds of incomplete shard skipped, the rest kept."""
    import prep_cc

    raw = tmp_path / "raw"
    write_shapes_parquet(raw, num_images=6, img_size=IMG, seed=0, shard_size=2)
    (raw / "00001_stats.json").unlink()  # finished writing rows, killed before the stats file
    shard = raw / "00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # killed mid-shard
    ldm_logger = logging.getLogger("ldm")
    saved = ldm_logger.handlers[:]
    ldm_logger.handlers.clear()
    try:
        summary = prep_cc.main(prep(tmp_path, assets, raw, "--skip_incomplete_shards"))
    finally:
        ldm_logger.handlers[:] = saved
    assert (summary["shards"], summary["rows_read"], summary["kept"]) == (1, 2, 2)
    assert summary["shards_skipped"] == [str(raw / "00001.parquet"), str(raw / "00002.parquet")]
    captured = capsys.readouterr()
    assert "incomplete shards skipped: 2" in captured.out.splitlines()
    warnings = [line for line in captured.err.splitlines() if "leaving out" in line]
    assert len(warnings) == 2 and "00001_stats.json" in warnings[0] and "not a readable parquet" in warnings[1]


def test_long_prompt_is_truncated_with_one_warning(assets, tmp_path, capsys):
    """A prompt past the text encoder's length (16 tokens here, 77 for CLIP) generates, says so once,
    and gives exactly the images of its first 14 words (start and end tokens take the other two)."""
    words = "a red circle on a blue background".split()
    long_prompt = " ".join(words * 13)  # 91 words, one token each with the tiny CLIP
    kept = " ".join((words * 2)[:14])
    ldm_logger = logging.getLogger("ldm")
    saved = ldm_logger.handlers[:]
    ldm_logger.handlers.clear()
    try:
        long_png = generate(assets["text"], tmp_path / "long.png", "--prompt", long_prompt, "--num_images", "2",
                            "--seed", "5")
        long_err = capsys.readouterr().err
        kept_png = generate(assets["text"], tmp_path / "kept.png", "--prompt", kept, "--num_images", "2", "--seed", "5")
        kept_err = capsys.readouterr().err
    finally:
        ldm_logger.handlers[:] = saved
    said = [line for line in long_err.splitlines() if "reads only the first" in line]
    assert len(said) == 1 and "--prompt has 93 tokens" in said[0] and "first 16" in said[0], long_err
    assert "reads only the first" not in kept_err
    # The pixels are the same (the PNGs' settings text differs: it records each prompt as given).
    from PIL import Image

    pixels = lambda path: np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(pixels(tmp_path / "long.png"), pixels(tmp_path / "kept.png")) and long_png != kept_png
