"""Two processes against one (issue 11, item 5): the same training step, every sample once per
epoch, gathered means, one writer, one latent cache.

The real scripts run through ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (DDP
over gloo), against ``accelerate launch`` with one process and twice the per-process batch
(``ACCELERATE_USE_CPU=1`` for both, so a GPU machine compares CPU with CPU). Each run starts in an
empty folder that holds its run folders, so everything it wrote anywhere can be listed. The
commands are the tutorial's, shrunk by the ``--set`` overrides of tests/test_stage1.py and
tests/test_stage2.py.

Why the two must agree: accelerate shards the batches of the shared ``EpochSampler`` order (rank r
takes batches r, r + 2, ...), DDP averages the ranks' gradients, and the losses are batch means;
so both runs take the gradient of the same images, up to float summation order.

What differs by design, and what the configs fix for that: every rank draws its own random
numbers (``seed_per_process``: seed + rank) where one process draws one stream for its whole
batch, so no setting makes the draws equal. The configs remove their effect on the loss instead:

- the VAE's posterior log-variance is clamped to [-110, -100] (``vae.logvar_min/logvar_max``): its
  std is e^-50 ~ 2e-22, so a posterior sample (stage 1's forward, stage 2's latents) equals its mean
  in float32, whatever the noise;
- stage 2 trains on one timestep (``num_train_timesteps: 1``: t = 0 always) with beta 1e-9, for
  which abar_0 = 1 - 1e-9 rounds to exactly 1 in float32: x_t = x_0, the noise has weight 0, and the
  UNet predicts x_0 (``prediction_type: sample``), a target without noise; ``cfg_dropout_prob: 0``.
  (The sample grid at the end is then meaningless, DDIM divides by sqrt(1 - abar) = 0; it is only
  listed, never compared.)
- stage 1's discriminator starts after the run (``disc_start: 100``): neither run nor stepped.

Flips stay on: they are a function of (seed, epoch, index), the same on any rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import OFFLINE_ENV, REPO_ROOT
from modules.autoencoder import VAEConfig, build_autoencoder
from modules.config import load_yaml
from modules.data_loading import EpochSampler
from modules.latent_cache import CachedLatentDataset
from modules.ldm_io import load_ldm_export
from modules.loop import SPEED_KEYS
from modules.lpips import LPIPS, save_lpips_export
from modules.shapes import COLOR_NAMES, SHAPE_NAMES, write_shapes_folder
from modules.text_encoder import build_tiny_clip
from modules.vae_io import load_vae, save_vae_export
from test_stage1 import tutorial_kl_command, with_sets
from test_stage2 import CLIP_LEN, IMG, SHAPE_PROMPTS, train_sets, tutorial_argv, unet_sets

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
B = 2  # per-process batch of the two-process runs; the one-process runs take 2 * B
SCALE = 0.5  # stage 2's latent scale (--set scaling_constants.shapes)
POINT_MASS_POSTERIOR = {"logvar_min": -110.0, "logvar_max": -100.0}  # std e^-50: a sample is its mean
# Stage 1: 1 optimizer step of 2 micro-batches; 2 processes x 2 images x 2 = the 8 training images,
# one epoch (4 more images are held out for validation).
STAGE1_TRAIN_IMAGES, STAGE1_VAL_IMAGES = 8, 4
# Stage 2: 2 optimizer steps, 2 processes x 2 images each = the 8 shapes, one epoch.
STAGE2_IMAGES = 8
# A gradient element below this fraction of the largest one is at the float rounding level of the
# gradient (e.g. an attention key bias, whose exact gradient is 0): the sign Adam steps by is noise.
ROUNDING_LEVEL = 1e-6

# Run as `accelerate launch ... <this file> <script> <args>`: the script itself, as __main__, with
# one observer. Every epoch-keyed training dataset (EpochSeeded, FlipAugmented, CachedLatentDataset)
# decodes its keys with modules.data_loading.epoch_key; wrapped before the script imports anything,
# it records the (epoch, index) keys this rank's loader asked for (validation data is not
# epoch-keyed, so it is not recorded), written to rank_<RANK>.json beside this file.
RECORDER = '''\
import json, os, runpy, sys

sys.path.insert(0, {repo!r})
import modules.data_loading as data_loading

keys, decode = [], data_loading.epoch_key


def recording_epoch_key(key):
    keys.append(list(decode(key)))
    return tuple(keys[-1])


data_loading.epoch_key = recording_epoch_key
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"rank_{{rank}}.json"), "w") as f:
        json.dump(keys, f)
'''


# ----------------------------------------------------------------------------------------
# Launching and reading runs
# ----------------------------------------------------------------------------------------

def launch(argv: list[str], processes: int, cwd: Path, recorder: Path | None = None) -> None:
    """``accelerate launch <REPO>/<script> ...`` from ``cwd`` (with ``recorder``: through it)."""
    cwd.mkdir(parents=True)
    # One thread per process: two processes on two cores are not oversubscribed, and no op's float
    # reductions depend on how many threads a run was given.
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [ACCELERATE, "launch", "--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no"]
    if processes > 1:
        cmd.insert(2, "--multi_gpu")
    script = [str(REPO_ROOT / argv[0])]
    if recorder is not None:
        script = [str(recorder)] + script
    result = subprocess.run(cmd + script + argv[1:], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd + script)} failed:\n{result.stderr[-4000:]}"


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_args(run_dir: Path) -> dict:
    """The run's resolved ``training_args`` (its config.yaml)."""
    return load_yaml(run_dir / "config.yaml")["training_args"]


def step_differences(one: Path, two: Path, names: list[str]) -> dict[str, float]:
    """How far two runs' last checkpoints (``one``, ``two``: checkpoint folders) are apart.

    ``names``: the parameter names in the optimizer's order (its state is indexed by position).
    Returns ``moments``: the relative L2 difference of Adam's first moments over all parameters,
    (1 - beta1) x the step's averaged gradient after one step (a running mean of gradients
    after more); ``weights``: the largest absolute weight difference; ``weights_determined``: the
    same where the first moment is above ``ROUNDING_LEVEL`` of its largest element.
    """
    moments = [torch.load(c / "optimizer.bin", weights_only=False)["state"] for c in (one, two)]
    weights = [load_file(str(c / "model.safetensors")) for c in (one, two)]
    m = [[state[i]["exp_avg"] for i in range(len(names))] for state in moments]
    largest = max(t.abs().max().item() for t in m[0])
    diff_sq = sum(float(((a - b) ** 2).sum()) for a, b in zip(*m))
    norm_sq = sum(float((a ** 2).sum()) for a in m[0])
    out = {"moments": (diff_sq / norm_sq) ** 0.5, "weights": 0.0, "weights_determined": 0.0}
    for name, moment in zip(names, m[0]):
        diff = (weights[0][name].float() - weights[1][name].float()).abs()
        out["weights"] = max(out["weights"], diff.max().item())
        determined = diff[moment.abs() >= ROUNDING_LEVEL * largest]
        if determined.numel():
            out["weights_determined"] = max(out["weights_determined"], determined.max().item())
    return out


# ----------------------------------------------------------------------------------------
# Assets and the four runs
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Stage 1: 12 shapes images and test_stage1's random-init AlexNet LPIPS export. Stage 2:
    test_stage2's tiny VAE (with the point-mass posterior) and tiny CLIP, and its two prompts."""
    root = tmp_path_factory.mktemp("multiprocess_assets")
    write_shapes_folder(root / "celebahq", STAGE1_TRAIN_IMAGES + STAGE1_VAL_IMAGES, 32, seed=3)
    torch.manual_seed(0)
    (root / "lpips").mkdir()
    save_lpips_export(LPIPS("alex", pretrained_backbone=False, use_dropout=False), root / "lpips" / "lpips_alex.pt")
    torch.manual_seed(0)
    vae_config = VAEConfig(img_size=IMG, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                           residual_layers_per_block=1, attention_layers=0, **POINT_MASS_POSTERIOR)
    vae = save_vae_export(build_autoencoder(vae_config), vae_config, root / "vae.safetensors", {})
    words = list(COLOR_NAMES) + list(SHAPE_NAMES) + ["a", "on", "background"]
    clip = build_tiny_clip(root / "clip", [" ".join(words)], hidden_size=32, layers=1, heads=2,
                           max_position_embeddings=CLIP_LEN)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(SHAPE_PROMPTS) + "\n")
    return {"root": root, "data": root / "celebahq", "lpips": root / "lpips" / "lpips_alex.safetensors",
            "vae": vae, "clip": clip, "prompts": prompts}


@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory):
    """The tutorial's KL command, one optimizer step: 1 process x 4 images x 2 micro-batches, and
    2 processes x 2 x 2 (the two-process run observed by RECORDER)."""
    root = tmp_path_factory.mktemp("multiprocess_stage1")
    record = root / "record"
    record.mkdir()
    recorder = record / "record_keys.py"
    recorder.write_text(RECORDER.format(repo=str(REPO_ROOT)))
    runs = {}
    for processes, batch in ((1, 2 * B), (2, B)):
        cwd = root / f"{processes}_process"
        sets = with_sets([
            "training_args.total_training_iterations=1", f"training_args.per_gpu_batch_size={batch}",
            "training_args.gradient_accumulation_steps=2", "training_args.disc_start=100",
            "training_args.checkpoint_iterations=1", "training_args.val_generation_freq=1",
            f"training_args.num_val_images={STAGE1_VAL_IMAGES}",
            *(f"vae.{key}={value}" for key, value in POINT_MASS_POSTERIOR.items())])
        launch(tutorial_kl_command("work", assets["data"], "gens", assets["lpips"], sets), processes, cwd,
               recorder if processes == 2 else None)
        runs[processes] = cwd
    keys = [json.loads((record / f"rank_{r}.json").read_text()) for r in (0, 1)]
    return {"one": runs[1], "two": runs[2], "keys": keys}


@pytest.fixture(scope="module")
def stage2(assets, tmp_path_factory):
    """The tutorial's stage-2 command on shapes with the latent cache, two optimizer steps:
    1 process x 4 images, and 2 processes x 2."""
    root = tmp_path_factory.mktemp("multiprocess_stage2")
    model = ["diffusion.num_train_timesteps=1", "diffusion.beta_start=1e-9", "diffusion.beta_end=2e-9",
             "diffusion.prediction_type=sample", f"scaling_constants.shapes={SCALE}"]
    runs = {}
    for processes, batch in ((1, 2 * B), (2, B)):
        cwd = root / f"{processes}_process"
        argv = (["stage2_diffusion_trainer.py"]
                + tutorial_argv(Path("work"), assets["vae"], "shapes", None, Path("gens"))
                + unet_sets(assets["clip"]) + with_sets(model)
                + train_sets(assets["prompts"], total_training_iterations=2, per_gpu_batch_size=batch,
                             shapes_num_images=STAGE2_IMAGES, cache_latents="true", cfg_dropout_prob=0.0,
                             num_inference_steps=1, num_samples_per_condition=1))
        launch(argv, processes, cwd)
        runs[processes] = cwd
    return {"one": runs[1], "two": runs[2]}


# ----------------------------------------------------------------------------------------
# The same step
# ----------------------------------------------------------------------------------------

def test_stage1_step_on_two_processes_equals_one_process_with_twice_the_batch(stage1):
    """One optimizer step of the KL-VAE (L1 + LPIPS + KL, LDM's per-image sums, batch-averaged).

    Adam's first step is lr * g / (|g| + eps) per element: +-lr wherever the gradient is above eps,
    so it compares the gradients' signs exactly, and turns a gradient element that is rounding
    noise in both runs (the attention key biases: softmax is shift-invariant, their exact gradient
    is 0) into a +-lr step of random sign. Hence three checks: the averaged gradient itself (Adam's
    first moment) agrees to a relative 1e-5 (measured 6.5e-7); the weights agree to 1e-6 wherever
    the gradient is determined (above 1e-6 of its largest element; measured 6e-11, 147 of the
    43,711 weights not bit-identical); and the largest weight difference anywhere, always at a key
    bias, stays below the step's 2 x lr (measured 3e-6 here, 3.4e-5 with other data, at lr 5e-5).
    """
    names = [name for name, _ in load_vae(stage1["one"] / "work" / "model.safetensors")[0].named_parameters()]
    checkpoint = Path("work") / "VAETrainer" / "checkpoint_1"
    diff = step_differences(stage1["one"] / checkpoint, stage1["two"] / checkpoint, names)
    assert diff["moments"] < 1e-5, diff
    assert diff["weights_determined"] < 1e-6, diff
    lr = records(stage1["one"] / "work" / "VAETrainer")[0]["lr"]
    assert diff["weights"] <= 2 * lr, diff
    states = [json.loads((stage1[k] / checkpoint / "trainer_state.json").read_text()) for k in ("one", "two")]
    assert [(s["num_processes"], s["per_gpu_batch_size"]) for s in states] == [(1, 2 * B), (2, B)]
    assert [(s["epoch"], s["step"]) for s in states] == [(0, 1), (0, 1)]


def test_stage2_steps_on_two_processes_equal_one_process_with_twice_the_batch(stage2):
    """Two optimizer steps of the text-conditional UNet on cached latents and text (its first
    step trains only the zero-initialised output convolution, the second all of it), gradient
    clipping, AdamW with weight decay, LR warm-up. Measured: Adam's first moments agree to a
    relative 1.8e-7, the UNet's weights to 1.4e-7 (max abs diff, every weight; a one-process run
    on rank 0's images alone is 2.8e-3 away), the EMA export to 1.1e-7."""
    export = stage2["one"] / "work" / "model.safetensors"
    names = [name for name, _ in load_ldm_export(export).unet.named_parameters()]
    checkpoint = Path("work") / "DiffusionTrainer" / "checkpoint_2"
    diff = step_differences(stage2["one"] / checkpoint, stage2["two"] / checkpoint, names)
    assert diff["moments"] < 1e-5, diff
    assert diff["weights"] < 1e-6, diff
    exports = [load_file(str(stage2[k] / "work" / "model.safetensors")) for k in ("one", "two")]
    assert exports[0].keys() == exports[1].keys()
    assert max((exports[0][k] - exports[1][k]).abs().max().item() for k in exports[0]) < 1e-6


# ----------------------------------------------------------------------------------------
# Data, metrics, files, cache
# ----------------------------------------------------------------------------------------

def test_every_training_sample_is_seen_once_per_epoch_across_ranks(stage1):
    """The keys each rank's training loader asked for in the real two-process run (one epoch:
    8 images = 2 ranks x 2 micro-batches x 2). Rank r serves the batches r, r + 2, ... of the
    EpochSampler order, a pure function of (seed, epoch): together the ranks serve every sample
    once, and each micro-batch of the two ranks is exactly the one-process run's micro-batch of
    twice the size. (drop_last: with N not a multiple of processes x batch, each epoch's last
    N mod (processes x batch) samples of that epoch's order are left out, as one process leaves out
    N mod batch.)"""
    seed = training_args(stage1["two"] / "work" / "VAETrainer")["seed"]
    order = [index for _, index in EpochSampler(STAGE1_TRAIN_IMAGES, seed)]
    ranks = [[tuple(key) for key in keys] for keys in stage1["keys"]]
    assert all(epoch == 0 for keys in ranks for epoch, _ in keys)
    served = [[index for _, index in keys] for keys in ranks]
    assert sorted(served[0] + served[1]) == list(range(STAGE1_TRAIN_IMAGES))  # each sample once
    assert served[0] == order[0:2] + order[4:6] and served[1] == order[2:4] + order[6:8]
    one_process_micro_batches = [order[0:4], order[4:8]]
    for k, expected in enumerate(one_process_micro_batches):
        assert sorted(served[0][2 * k:2 * k + 2] + served[1][2 * k:2 * k + 2]) == sorted(expected)


def test_logged_metrics_are_means_over_ranks(stage1, stage2, assets):
    """Every logged number of a two-process run is the one-process run's over twice the batch
    (losses, gradient norm, LR; stage 1's validation PSNR/SSIM/LPIPS over both ranks' held-out
    images): relative 1e-5 (measured: at most 2.1e-6, val_ssim). Directly, for stage 2's first step: the UNet's
    output is 0 at initialisation (zero output convolution), so sample i's loss is mean(z_i^2)
    with z_i its cached latent mean x scale; the logged loss is the mean of the two ranks' batch
    means (to 1e-6), which differ from it by far more than that."""
    for runs, name in ((stage1, "VAETrainer"), (stage2, "DiffusionTrainer")):
        one, two = (records(runs[k] / "work" / name) for k in ("one", "two"))
        assert [r["step"] for r in two] == [r["step"] for r in one]
        for a, b in zip(one, two):
            assert a.keys() == b.keys()
            for key in a.keys() - set(SPEED_KEYS):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (name, a["step"], key)
    assert {"val_psnr", "val_ssim", "val_lpips"} <= set(records(stage1["two"] / "work" / "VAETrainer")[-1])

    run = stage2["two"] / "work" / "DiffusionTrainer"
    args = training_args(run)
    cache = CachedLatentDataset(run / "latent_cache", args["seed"], args["random_flip"])  # what the loader served
    order = [index for _, index in EpochSampler(STAGE2_IMAGES, args["seed"])]
    per_sample = [float((SCALE * cache[(0, i)]["latent_mean"]).pow(2).mean()) for i in order]
    rank_means = [np.mean(per_sample[0:B]), np.mean(per_sample[B:2 * B])]  # step 1: rank 0's batch, rank 1's
    logged = records(run)[0]["loss"]
    assert logged == pytest.approx(np.mean(rank_means), rel=1e-6)
    assert all(abs(m - logged) > 1e-3 * logged for m in rank_means)


def test_only_the_main_process_writes_files(stage1, stage2):
    """Everything each run wrote, anywhere under the folder it ran in: the two-process runs wrote
    exactly the one-process runs' files plus rank 1's RNG state in the checkpoint (every process
    saves its own), no per-rank copies, part files or strays, and one metrics line per step."""
    checkpoint1 = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "custom_checkpoint_2.pkl", "model.safetensors",
                   "model_1.safetensors", "optimizer.bin", "optimizer_1.bin", "random_states_0.pkl",
                   "random_states_1.pkl", "trainer_state.json"]
    expected1 = {"work/model.safetensors", "gens/step_1.png"} | {
        f"work/VAETrainer/{f}" for f in ("config.yaml", "model_config.yaml", "metrics.jsonl", "loss_curve.png")} | {
        f"work/VAETrainer/checkpoint_1/{f}" for f in checkpoint1}
    checkpoint2 = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "model.safetensors", "optimizer.bin",
                   "random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"]
    cache = ["attention_mask.npy", "caption_offsets.npy", "captions.bin", "input_ids.npy", "meta.json", "moments.npy",
             "text_embeddings.npy", "text_offsets.npy"]
    expected2 = {"work/model.safetensors", "gens/step_2.png"} | {
        f"work/DiffusionTrainer/{f}" for f in ("config.yaml", "metrics.jsonl", "loss_curve.png")} | {
        f"work/DiffusionTrainer/checkpoint_2/{f}" for f in checkpoint2} | {
        f"work/DiffusionTrainer/latent_cache/{f}" for f in cache}
    for runs, expected, name in ((stage1, expected1, "VAETrainer"), (stage2, expected2, "DiffusionTrainer")):
        assert files_under(runs["two"]) == expected
        rank1_rng = {f for f in expected if f.endswith("random_states_1.pkl")}
        assert files_under(runs["one"]) == expected - rank1_rng
        lines = records(runs["two"] / "work" / name)
        assert len(lines) == len({(r["step"], tuple(sorted(r))) for r in lines})  # no line written twice


def test_latent_cache_built_by_two_processes_equals_one_built_by_one(stage2):
    """Each rank encodes indices r, r + 2, ... (in batches of 2, the one process in batches of 4)
    into the shared memory map, rank 0 assembles captions, tokens and text offsets, each rank
    places its text states: every file of the cache is byte-identical to the one-process cache
    (tolerance 0), meta.json (the fingerprint) included."""
    caches = [stage2[k] / "work" / "DiffusionTrainer" / "latent_cache" for k in ("one", "two")]
    names = sorted(p.name for p in caches[0].iterdir())
    assert names == sorted(p.name for p in caches[1].iterdir())
    for name in names:
        assert (caches[0] / name).read_bytes() == (caches[1] / name).read_bytes(), name
    moments = np.load(caches[1] / "moments.npy")
    assert moments.shape == (STAGE2_IMAGES, 2, 2, 4, IMG // 2, IMG // 2)  # images, (original, mirror), (mean, std)
