"""Stage 2 end to end: the tutorial's command line on tiny models, and each mechanic asserted.

The real script runs through ``accelerate launch`` (one and two processes) with the shipped
configs, shrunk only by ``--set`` overrides: a tiny VAE written with the stage-1 classes and
``vae_io.save_vae_export``, a tiny CLIP from ``build_tiny_clip``, and four datasets: ``shapes``
(rendered on the fly), a ``prep_cc.py``-style Hugging Face dataset with pre-encoded text, an
ImageNet-style class folder and an unconditional image folder. Cheaper checks call ``main`` in
process (resume, EMA, frozen nets, caching) or the small pure functions (CFG dropout, padding).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import stage2_diffusion_trainer as s2
from modules.autoencoder import VAEConfig, build_autoencoder
from modules.cli import run_main
from modules.image_datasets import DATASET_NAMES
from modules.latent_cache import cache_is_complete
from modules.ldm_io import load_ldm_export
from modules.model_config import load_ldm_config
from modules.shapes import COLOR_NAMES, SHAPE_NAMES, render_shape, sample_specs
from modules.text_encoder import TextEncoder, build_tiny_clip
from modules.unet import UNet
from modules.vae_io import save_vae_export

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# One thread per process: the networks are tiny, and on a shared 2-core machine OpenMP threads
# waiting on each other make small ops many times slower.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
IMG = 16  # image side; the VAE halves it: 8x8 latents
CLIP_LEN = 16  # tokens of the tiny CLIP
SHAPE_PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


# ----------------------------------------------------------------------------------------
# Assets
# ----------------------------------------------------------------------------------------

def _vae(path: Path, latent_channels: int = 4, scaling_factor=0.5) -> Path:
    torch.manual_seed(0)
    cfg = VAEConfig(img_size=IMG, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=latent_channels,
                    residual_layers_per_block=1, attention_layers=0)
    # compute_vae_scaling.py keeps one factor per dataset; this VAE has one for each dataset the tests use.
    meta = {} if scaling_factor is None else {"scaling_factors": {name: scaling_factor for name in DATASET_NAMES}}
    return save_vae_export(build_autoencoder(cfg), cfg, path, meta)


def _png(path: Path, spec_seed: int, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_shape(sample_specs(index + 1, spec_seed)[index], IMG + 4).save(path)  # not square-cropped yet


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    words = list(COLOR_NAMES) + list(SHAPE_NAMES) + ["a", "on", "background"]
    a = {
        "root": root,
        "vae": _vae(root / "vae.safetensors"),
        "vae_unscaled": _vae(root / "vae_unscaled.safetensors", scaling_factor=None),
        "vae_3ch": _vae(root / "vae_3ch.safetensors", latent_channels=3),
        "clip": build_tiny_clip(root / "clip", [" ".join(words)], hidden_size=32, layers=1, heads=2,
                                max_position_embeddings=CLIP_LEN),
        "prompts": root / "shapes_prompts.txt",
    }
    a["prompts"].write_text("# shapes prompts\n" + "\n".join(SHAPE_PROMPTS) + "\n")
    for i in range(8):  # unconditional folder
        _png(root / "faces" / f"{i:03d}.png", 1, i)
    for c, name in enumerate(["cat", "dog", "fox"]):  # class folders
        for i in range(4):
            _png(root / "imagenet" / name / f"{i}.png", 2 + c, i)
    (root / "empty").mkdir()
    a["cc"] = _conceptual_captions(root / "cc", a["clip"])
    return a


def _conceptual_captions(path: Path, clip: Path) -> Path:
    """A prep_cc.py-style dataset: its features, captions tokenized and pre-encoded by the tiny CLIP."""
    import datasets

    from prep_cc import build_features

    specs = sample_specs(8, 5)
    captions = [s.caption for s in specs]
    encoder = TextEncoder(clip)
    tokens = encoder.tokenize(captions)
    with torch.no_grad():
        hidden, _ = encoder.encode(tokens.input_ids, tokens.attention_mask)  # (8, L, 32)
    rows = {
        "image": [render_shape(s, IMG) for s in specs], "caption": captions,
        "input_ids": tokens.input_ids.int().tolist(), "attention_mask": tokens.attention_mask.tolist(),
        "text_embeddings": hidden.numpy().astype(np.float32).tolist(),
        "key": [f"{i:09d}" for i in range(8)], "url": [f"http://x/{i}.jpg" for i in range(8)],
        "width": [IMG] * 8, "height": [IMG] * 8,
    }
    features = build_features(CLIP_LEN, 32, "float32")
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    (path / "prep_cc_summary.json").write_text(json.dumps({"hf_clip_model_name": str(clip)}))
    return path


def unet_sets(clip: Path, text: bool = True, classes: bool = False) -> list[str]:
    """--set overrides that shrink configs/ldm.yaml's UNet to a few thousand parameters."""
    sets = {
        "unet.unet_channels_per_block": "[16,32]", "unet.down_block_types": "[AttnDown,Down]",
        "unet.up_block_types": "[Up,AttnUp]", "unet.mid_block_type": "None", "unet.unet_residual_layers_per_block": 1,
        "unet.groupnorm_groups": 4, "unet.num_attention_heads": 2, "unet.time_embed_start_dim": 16,
        "unet.time_embed_proj_dim": 32, "unet.transformer_dim_mult": 2, "unet.text_embed_dim": 32,
        "unet.text_conditioning_hf_model": str(clip), "unet.text_conditioning": str(text).lower(),
        "unet.class_conditioning": str(classes).lower(), "unet.num_classes": 4, "unet.class_embed_dim": 16,
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def train_sets(prompts: Path, **overrides) -> list[str]:
    """--set overrides that shrink configs/stage2_diffusion_train.yaml to a few CPU steps."""
    sets = {
        "total_training_iterations": 4, "per_gpu_batch_size": 4, "num_workers": 0, "checkpoint_iterations": 2,
        "val_generation_freq": 2, "num_inference_steps": 3, "sample_prompts_file": str(prompts),
        "shapes_num_images": 16, "logging_steps": 1, "mixed_precision": "no", "lr_warmup_steps": 1,
        "num_samples_per_condition": 2, "num_unconditional_samples": 4, "learning_rate": 1e-3,
    }
    sets.update(overrides)
    return [arg for key, value in sets.items() for arg in ("--set", f"training_args.{key}={value}")]


def tutorial_argv(work: Path, vae: Path, dataset: str, data: Path | None, gens: Path) -> list[str]:
    """The tutorial's stage-2 flags, with the shipped configs."""
    argv = ["--experiment_name", "DiffusionTrainer", "--wandb_run_name", "diffusion_cc", "--working_directory",
            str(work), "--training_config", "configs/stage2_diffusion_train.yaml", "--model_config", "configs/ldm.yaml",
            "--path_to_vae_backbone", str(vae), "--dataset", dataset, "--path_to_save_gens", str(gens)]
    return argv + (["--path_to_dataset", str(data)] if data is not None else [])


def launch(argv: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    """``accelerate launch stage2_diffusion_trainer.py ...`` as a user runs it (two processes: gloo on the CPU)."""
    env = dict(ENV)
    if processes == 1:
        cmd = [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--dynamo_backend", "no"]
    result = subprocess.run(cmd + ["stage2_diffusion_trainer.py", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reset_accelerate_state() -> None:
    """In-process runs build their own Accelerator; accelerate's state is a process-wide singleton
    that refuses a second mixed-precision setting, so each run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The whole module on one thread (set before the module fixtures run): the same float
    reductions in every in-process run, and no OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


CHECKPOINT_FILES = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "model.safetensors", "optimizer.bin",
                    "random_states_0.pkl", "trainer_state.json"]


# ----------------------------------------------------------------------------------------
# The tutorial's command line, per conditioning
# ----------------------------------------------------------------------------------------

def test_tutorial_command_on_shapes_writes_checkpoints_grids_and_a_complete_export(assets, tmp_path):
    work, gens = tmp_path / "work", tmp_path / "gens"
    launch(tutorial_argv(work, assets["vae"], "shapes", None, gens) + unet_sets(assets["clip"]) +
           train_sets(assets["prompts"], checkpoints_total_limit=1))

    run = work / "DiffusionTrainer"
    assert files_under(work) == sorted(
        ["model.safetensors", "DiffusionTrainer/config.yaml", "DiffusionTrainer/metrics.jsonl",
         "DiffusionTrainer/loss_curve.png"] + [f"DiffusionTrainer/checkpoint_4/{f}" for f in CHECKPOINT_FILES])
    assert files_under(gens) == ["step_2.png", "step_4.png"]
    with Image.open(gens / "step_4.png") as grid:  # 2 prompts x 2 samples of 16 px, make_grid's 2 px padding
        assert grid.size == (2 * IMG + 3 * 2, 2 * IMG + 3 * 2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["images_per_second"] > 0 for r in records)
    assert records[0]["lr"] == pytest.approx(1e-3)  # 1 warm-up step, then cosine over 4 steps
    assert json.loads((run / "checkpoint_4" / "trainer_state.json").read_text())["step"] == 4

    # The export alone rebuilds the model: UNet, the untouched VAE and text encoder, scale, schedule.
    model = load_ldm_export(work / "model.safetensors")
    meta = model.metadata
    assert (meta["conditioning"], meta["training_dataset"], meta["img_size"]) == ("text", "shapes", IMG)
    assert meta["step"] == 4
    assert model.scaling_factor == 0.5 and model.shift_factor == 0.0
    assert meta["model_config"]["diffusion"] == {"num_train_timesteps": 1000, "beta_schedule": "linear",
                                                 "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"}
    assert meta["model_config"]["vae"]["vae_channels_per_block"] == [8, 16]
    assert meta["text_encoder"]["source"] == "embedded"
    assert meta["training_config"]["total_training_iterations"] == 4
    exported = load_file(str(work / "model.safetensors"))
    source_vae = load_file(str(assets["vae"]))
    assert all(torch.equal(exported[f"vae.{k}"], v) for k, v in source_vae.items())
    source_clip = load_file(str(assets["clip"] / "model.safetensors"))
    assert all(torch.equal(exported[f"text_encoder.{k}"], v) for k, v in source_clip.items())
    # The export holds the EMA weights, the checkpoint the same EMA (custom object 1).
    ema_state = torch.load(run / "checkpoint_4" / "custom_checkpoint_1.pkl", weights_only=False)["model"]
    assert all(torch.equal(exported[f"unet.{k}"], v) for k, v in ema_state.items())


def test_class_conditional_imagenet_on_two_processes_with_a_shared_latent_cache(assets, tmp_path):
    work = tmp_path / "work"
    sets = train_sets(assets["prompts"], total_training_iterations=2, per_gpu_batch_size=2, checkpoint_iterations=1,
                      sample_class_labels="[0,2]", num_samples_per_condition=1, lr_scheduler="linear",
                      lr_warmup_steps=2, cache_latents="true")
    # With wandb (offline) on: every rank must wait for rank 0's export before the tracker ends.
    launch(tutorial_argv(work, assets["vae"], "imagenet", assets["root"] / "imagenet", tmp_path / "gens") +
           unet_sets(assets["clip"], text=False, classes=True) + sets + ["--log_wandb"], processes=2)
    run = work / "DiffusionTrainer"
    assert (run / "wandb_run_id.txt").is_file() and (run / "wandb").is_dir()
    files = set(files_under(run / "checkpoint_2"))
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= files
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Warm-up over 2 optimizer steps whatever the number of processes: lr 0.5e-3, then 1e-3.
    assert [r["step"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == pytest.approx([0.5e-3, 1e-3])
    assert records[0]["images_per_second"] > 0
    with Image.open(tmp_path / "gens" / "step_2.png") as grid:  # 2 classes x 1 sample: one column
        assert grid.size == (IMG + 4, 2 * IMG + 6)
    model = load_ldm_export(work / "model.safetensors")
    assert model.conditioning == "class" and model.class_names == ["cat", "dog", "fox"]
    assert model.text_encoder is None and "text_encoder" not in model.metadata
    # Both ranks encoded their half of the 12 images (and mirrors) into one cache; labels in index order.
    cache = run / "latent_cache"
    assert sorted(p.name for p in cache.iterdir()) == ["labels.npy", "meta.json", "moments.npy"]
    assert np.load(cache / "labels.npy").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    moments = np.load(cache / "moments.npy")
    assert moments.shape == (12, 2, 2, 4, 8, 8) and np.all(moments[:, :, 1] > 0)


# ----------------------------------------------------------------------------------------
# In-process runs: resume, EMA, frozen networks, latent caching
# ----------------------------------------------------------------------------------------

def inprocess_argv(assets, work: Path, dataset: str = "shapes", data: Path | None = None, **train) -> list[str]:
    defaults = dict(total_training_iterations=4, per_gpu_batch_size=2, gradient_accumulation_steps=2,
                    shapes_num_images=12, checkpoint_iterations=1, checkpoints_total_limit=10, val_generation_freq=100,
                    cfg_dropout_prob=0.5, ema_decay=0.9)
    defaults.update(train)
    text = s2.dataset_conditioning(dataset) == "text"
    return (tutorial_argv(work, assets["vae"], dataset, data, work / "gens") + unet_sets(assets["clip"], text=text)
            + train_sets(assets["prompts"], **defaults))


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """4 optimizer steps of 2 micro-batches (12 images: an epoch boundary inside), a checkpoint every step."""
    work = tmp_path_factory.mktemp("uninterrupted")
    reset_accelerate_state()
    return s2.main(inprocess_argv(assets, work)), work


def test_resume_equals_uninterrupted_bit_for_bit(assets, uninterrupted, tmp_path):
    _, full_work = uninterrupted
    argv = inprocess_argv(assets, tmp_path)
    stopped = s2.main(argv + ["--stop_after_steps", "2"])
    assert stopped.step == 2 and stopped.export_path is None and not (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "DiffusionTrainer/checkpoint_2/trainer_state.json").read_text()) == \
        {"step": 2, "epoch": 0, "batch_in_epoch": 4, "skipped_steps": 0, "num_processes": 1, "per_gpu_batch_size": 2,
         "flops_per_step": json.loads((tmp_path / "DiffusionTrainer/checkpoint_1/trainer_state.json").read_text())["flops_per_step"],
         "nonfinite_steps": 0}
    resumed = s2.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed.step == 4
    full = load_file(str(full_work / "model.safetensors"))
    again = load_file(str(tmp_path / "model.safetensors"))
    assert full.keys() == again.keys()
    assert all(torch.equal(full[k], again[k]) for k in full)
    # The loss curve of the resumed run continues the same numbers.
    lines = lambda w: [json.loads(x)["loss"] for x in (w / "DiffusionTrainer/metrics.jsonl").read_text().splitlines()]
    assert lines(tmp_path) == lines(full_work)


def test_ema_follows_its_formula_in_the_trainer(uninterrupted):
    _, work = uninterrupted
    run = work / "DiffusionTrainer"
    ema = {s: torch.load(run / f"checkpoint_{s}" / "custom_checkpoint_1.pkl", weights_only=False) for s in (2, 3)}
    weights3 = load_file(str(run / "checkpoint_3" / "model.safetensors"))
    assert ema[2]["num_updates"] == 2 and ema[3]["num_updates"] == 3
    d = min(0.9, (1 + 2) / (10 + 2))  # warm-up decay of the third update
    for name, value in ema[3]["model"].items():
        expected = d * ema[2]["model"][name] + (1 - d) * weights3[name]
        assert torch.allclose(value, expected, atol=1e-7), name
    assert not torch.equal(ema[3]["model"]["conv_in.weight"], weights3["conv_in.weight"])


def test_frozen_vae_and_text_encoder_do_not_change(assets, uninterrupted):
    result, _ = uninterrupted
    assert not result.vae.training and not any(p.requires_grad for p in result.vae.parameters())
    assert not result.text_encoder.model.training
    assert not any(p.requires_grad for p in result.text_encoder.parameters())
    clip = load_file(str(assets["clip"] / "model.safetensors"))
    for live, source in ((result.vae.state_dict(), load_file(str(assets["vae"]))),
                         (result.text_encoder.model.state_dict(), clip)):
        assert all(torch.equal(live[k].cpu(), v) for k, v in source.items())
    # ... while the UNet did learn (its output conv starts at zero).
    assert result.unet.conv_out.weight.abs().sum() > 0


def test_unconditional_latent_cache_trains_like_encoding_on_the_fly(assets, tmp_path):
    common = dict(dataset="celebahq", data=assets["root"] / "faces", total_training_iterations=3, cfg_dropout_prob=0.0,
                  checkpoint_iterations=100)
    on_the_fly = s2.main(inprocess_argv(assets, tmp_path / "a", **common))
    cached = s2.main(inprocess_argv(assets, tmp_path / "b", cache_latents="true", **common))
    cache = tmp_path / "b/DiffusionTrainer/latent_cache"
    assert sorted(p.name for p in cache.iterdir()) == ["meta.json", "moments.npy"]
    moments = np.load(cache / "moments.npy")
    assert moments.shape == (8, 2, 2, 4, 8, 8)  # images, (original, mirror), (mean, std), C, h, w
    assert np.all(moments[:, :, 1] > 0)  # a KL posterior: std stored, each epoch draws a fresh latent
    loss = lambda r: [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert loss(cached) == pytest.approx(loss(on_the_fly), rel=1e-4)
    a, b = load_file(str(on_the_fly.export_path)), load_file(str(cached.export_path))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    meta = load_ldm_export(cached.export_path).metadata
    assert meta["conditioning"] == "none" and "text_encoder" not in meta
    # The cache is reused only when everything that made it is the same.
    stored = json.loads((cache / "meta.json").read_text())["fingerprint"]
    assert cache_is_complete(cache, stored)
    assert not cache_is_complete(cache, {**stored, "vae": "0" * 32})
    assert not cache_is_complete(cache, {**stored, "flips": False})


def test_conceptual_captions_uses_pre_encoded_text_in_bf16_with_workers(assets, tmp_path):
    argv = inprocess_argv(assets, tmp_path, "conceptual_captions", assets["cc"], total_training_iterations=2,
                          gradient_accumulation_steps=1, mixed_precision="bf16", num_workers=1)
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("ldm").addHandler(handler)
    try:
        result = s2.main(argv)
    finally:
        logging.getLogger("ldm").removeHandler(handler)
    assert any("using the dataset's pre-encoded text" in r for r in records)
    assert not any("pre-encoded with" in r for r in records)  # the text encoder prep_cc's summary names
    assert any("mixed precision bf16" in r for r in records)
    # The frozen networks ran in bf16; the export keeps their float32 weights bit for bit.
    assert next(result.vae.parameters()).dtype == torch.bfloat16
    assert result.text_encoder.model.dtype == torch.bfloat16
    exported = load_file(str(result.export_path))
    assert all(torch.equal(exported[f"vae.{k}"], v) for k, v in load_file(str(assets["vae"])).items())
    clip = load_file(str(assets["clip"] / "model.safetensors"))
    assert all(torch.equal(exported[f"text_encoder.{k}"], v) for k, v in clip.items())
    model = load_ldm_export(result.export_path)
    assert model.metadata["training_dataset"] == "conceptual_captions"
    assert model.metadata["training_config"]["mixed_precision"] == "bf16"


def test_trainable_text_encoder_and_loss_options(assets, tmp_path):
    """The original LDM trained its text encoder; v-prediction, Min-SNR, Huber and offset noise on top."""
    argv = inprocess_argv(assets, tmp_path, total_training_iterations=2, gradient_accumulation_steps=1,
                          train_text_encoder="true", snr_gamma=5.0, loss_type="huber", offset_noise=0.1,
                          use_ema="false", sampler="ddpm", max_grad_norm="null")
    result = s2.main(argv + ["--set", "diffusion.prediction_type=v_prediction"])
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records) and "grad_norm" not in records[0]
    exported = load_file(str(result.export_path))
    clip = load_file(str(assets["clip"] / "model.safetensors"))
    assert any(not torch.equal(exported[f"text_encoder.{k}"], v) for k, v in clip.items())  # it learned
    model = load_ldm_export(result.export_path)
    assert model.metadata["text_encoder"]["source"] == "embedded" and not model.metadata["ema"]
    assert model.config.diffusion.prediction_type == "v_prediction"
    assert all(torch.equal(exported[f"unet.{k}"], v.cpu()) for k, v in result.unet.state_dict().items())  # no EMA
    images = model.generate(1, prompts=[SHAPE_PROMPTS[0]], num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, IMG, IMG) and torch.isfinite(images).all()


# ----------------------------------------------------------------------------------------
# Mechanics: classifier-free-guidance dropout, padding
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prob", [0.0, 0.1, 0.5, 1.0])
def test_cfg_dropout_fraction_matches_probability(prob):
    n = 200_000
    torch.manual_seed(0)
    mask = s2.cfg_dropout_mask(n, prob, torch.device("cpu"))
    sigma = (prob * (1 - prob) / n) ** 0.5
    assert abs(mask.float().mean().item() - prob) <= 5 * sigma + 1e-12
    # Independent draws: no correlation between neighbours.
    if 0 < prob < 1:
        x = mask.float()
        corr = ((x[1:] - prob) * (x[:-1] - prob)).mean().item() / (prob * (1 - prob))
        assert abs(corr) < 5 / n ** 0.5


def test_conditioner_drops_captions_to_the_empty_prompt_and_labels_to_the_null_class(assets):
    encoder = TextEncoder(assets["clip"])
    conditioner = s2.Conditioner("text", encoder)
    captions = SHAPE_PROMPTS * 200
    torch.manual_seed(1)
    drop = s2.cfg_dropout_mask(len(captions), 0.3, torch.device("cpu"))
    tokens = encoder.caption_tokenizer(captions)  # as the DataLoader workers tokenize
    cond = conditioner({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}, drop,
                       torch.device("cpu"))
    null_hidden, null_mask = encoder([""])
    is_null = [torch.equal(m, null_mask[0]) and torch.allclose(h, null_hidden[0], atol=1e-6)
               for h, m in zip(cond["context"], cond["context_mask"])]
    assert is_null == drop.tolist()
    assert abs(np.mean(is_null) - 0.3) < 5 * (0.3 * 0.7 / len(captions)) ** 0.5

    classes = s2.Conditioner("class", null_class=4)
    labels = torch.arange(400) % 4
    torch.manual_seed(2)
    drop = s2.cfg_dropout_mask(400, 0.25, torch.device("cpu"))
    out = classes({"label": labels}, drop, torch.device("cpu"))["class_labels"]
    assert torch.equal(out == 4, drop) and torch.equal(out[~drop], labels[~drop])


def test_padded_text_tokens_do_not_change_the_unet_output(assets):
    """Through the trainer's conditioning path: captions, and pre-encoded text with junk in the padding."""
    encoder = TextEncoder(assets["clip"])
    config = load_ldm_config(REPO / "configs/ldm.yaml", [a for a in unet_sets(assets["clip"]) if a != "--set"])
    torch.manual_seed(0)
    unet = UNet(config.unet).eval()
    with torch.no_grad():
        for p in unet.parameters():  # the zero-initialised output convs would hide everything
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    keep = torch.zeros(2, dtype=torch.bool)
    cpu = torch.device("cpu")
    with torch.no_grad():
        tokens = encoder.caption_tokenizer(SHAPE_PROMPTS)
        cond = s2.Conditioner("text", encoder)({"input_ids": tokens.input_ids,
                                                "attention_mask": tokens.attention_mask}, keep, cpu)
        reference = unet(x, t, **cond)
        mask = cond["context_mask"]
        assert (~mask).sum() > 0  # there is padding to perturb
        junk = torch.where(mask[..., None], cond["context"], 100 * torch.randn_like(cond["context"]))
        pre = s2.Conditioner("text", encoder, use_pre_encoded=True)(
            {"text_embeddings": junk, "text_embeddings_mask": mask}, keep, cpu)
        assert torch.allclose(unet(x, t, **pre), reference, atol=1e-5)
        # Fewer padding positions (truncated to the longest caption): the same output too.
        length = int(mask.sum(1).max())
        short = s2.Conditioner("text", encoder, use_pre_encoded=True)(
            {"text_embeddings": cond["context"][:, :length], "text_embeddings_mask": mask[:, :length]}, keep, cpu)
        assert torch.allclose(unet(x, t, **short), reference, atol=1e-5)
        # Without the mask the padding does change it: the test can see a difference.
        assert not torch.allclose(unet(x, t, context=junk), reference, atol=1e-3)


def test_shipped_config_keys_match_the_trainer_and_every_key_is_read():
    import dataclasses
    import re

    from modules.config import load_yaml

    shipped = load_yaml(REPO / "configs/stage2_diffusion_train.yaml")["training_args"]
    from modules.performance import SpeedArgs

    fields = {f.name: f.default for f in dataclasses.fields(s2.Stage2TrainingArgs)}
    speed = [f.name for f in dataclasses.fields(SpeedArgs)]  # shared keys, listed beside mixed_precision
    assert sorted(shipped) == sorted(fields)
    assert [k for k in shipped if k not in speed] == [k for k in fields if k not in speed]  # same order
    assert shipped == {k: v for k, v in fields.items()}  # the dataclass defaults are the shipped values
    source = (REPO / "stage2_diffusion_trainer.py").read_text()
    body = source[source.index("class Stage2Config"):]  # after the field declarations
    body += (REPO / "modules/performance.py").read_text().split("class SpeedArgs")[1]  # SpeedArgs reads its own
    unread = [name for name in fields if not re.search(rf"(?:train_cfg|args|self)\.{name}\b", body)]
    assert unread == []
    prompts = s2.read_prompts(REPO / "configs/sample_text_cond_prompts.txt")
    assert len(prompts) == 8 and prompts[0] == "A beautiful sunset at the beach"


# ----------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2
# ----------------------------------------------------------------------------------------

def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(s2.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def test_bad_inputs_are_one_line_errors(assets, tmp_path, capsys):
    clip = assets["clip"]
    base = lambda vae, dataset, data, text=False: (
        tutorial_argv(tmp_path / "w", vae, dataset, data, tmp_path / "g") + unet_sets(clip, text=text)
        + train_sets(assets["prompts"]))
    msg = one_line_error(base(assets["vae"], "celebahq", assets["root"] / "empty"), capsys)
    assert "no images in" in msg and "empty" in msg
    msg = one_line_error(base(assets["vae_3ch"], "celebahq", assets["root"] / "faces"), capsys)
    assert "3 latent channels" in msg and "unet.in_channels 4" in msg
    msg = one_line_error(base(assets["vae_unscaled"], "celebahq", assets["root"] / "faces"), capsys)
    assert "no latent scale factor for dataset 'celebahq'" in msg and "compute_vae_scaling.py" in msg
    msg = one_line_error(base(assets["vae"], "celebahq", assets["root"] / "faces")
                         + ["--set", "diffusion.prediction_type=x0"], capsys)
    assert "diffusion.prediction_type" in msg and "'epsilon', 'v_prediction', 'sample'" in msg and "'x0'" in msg
    msg = one_line_error(base(assets["vae"], "shapes", None, text=False), capsys)
    assert "text-conditional" in msg and "unet.text_conditioning=true" in msg
    msg = one_line_error(base(assets["vae"], "shapes", None, text=True) + ["--set", "unet.text_embed_dim=48"], capsys)
    assert "hidden size 32" in msg and "unet.text_embed_dim 48" in msg
    # Captions tokenized and encoded by another model than the one that will encode the prompts.
    other = tmp_path / "cc_other_encoder"
    shutil.copytree(assets["cc"], other)
    (other / "prep_cc_summary.json").write_text(json.dumps({"hf_clip_model_name": "openai/clip-vit-large-patch14"}))
    msg = one_line_error(base(assets["vae"], "conceptual_captions", other, text=True), capsys)
    assert "was pre-encoded with 'openai/clip-vit-large-patch14'" in msg and str(clip) in msg
    (other / "prep_cc_summary.json").unlink()
    msg = one_line_error(base(assets["vae"], "conceptual_captions", other, text=True), capsys)
    assert "no prep_cc_summary.json" in msg and "re-run prep_cc.py" in msg
    msg = one_line_error(base(assets["vae"], "laion", None), capsys)
    assert "unknown dataset 'laion'" in msg and "conceptual_captions" in msg
    msg = one_line_error(base(assets["vae"], "celebahq", assets["root"] / "faces")
                         + ["--set", "training_args.sample_prompt_file=x"], capsys)
    assert "unknown key 'sample_prompt_file'" in msg


def test_cli_error_has_no_traceback(assets, tmp_path):
    argv = tutorial_argv(tmp_path, assets["vae"], "celebahq", assets["root"] / "empty", tmp_path / "g")
    argv += unet_sets(assets["clip"], text=False)
    result = subprocess.run([sys.executable, "stage2_diffusion_trainer.py", *argv],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no images in")


# ----------------------------------------------------------------------------------------
# The shared loop as stage 2 drives it: epochs reach the workers, nothing is re-tokenized or
# re-encoded per step, the trained text encoder is exported as its EMA
# ----------------------------------------------------------------------------------------

def recording_loop(seen, forbidden=()):
    """A stand-in for stage 2's train_loop that records every batch the step function receives and
    makes each (class, method) in ``forbidden`` raise while the step function runs."""
    from modules.loop import train_loop

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"{name} ran inside the training step")
        return method

    def loop(accelerator, *, step_fn, **kwargs):
        def recorded(batch, step):
            seen.append((step, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}))
            saved = [(owner, name, getattr(owner, name)) for owner, name in forbidden]
            for owner, name in forbidden:
                setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
            try:
                yield from step_fn(batch, step)
            finally:
                for owner, name, original in saved:
                    setattr(owner, name, original)
        return train_loop(accelerator, step_fn=recorded, **kwargs)
    return loop


@pytest.mark.parametrize("cache", ["false", "true"])
def test_flips_change_every_epoch_with_workers_and_resume_sees_the_same_batches(assets, tmp_path, monkeypatch, cache):
    """12 shapes, 4 per batch, 2 persistent workers: 3 steps per epoch, 9 steps = 3 epochs. Captions
    arrive tokenized (in the workers); with the cache they arrive encoded, so neither the tokenizer
    nor (with the cache) the text encoder runs in the step."""
    from modules.text_encoder import CaptionTokenizer

    argv = lambda work: inprocess_argv(assets, work, total_training_iterations=9, per_gpu_batch_size=4,
                                       gradient_accumulation_steps=1, num_workers=2, cache_latents=cache,
                                       checkpoint_iterations=100, val_generation_freq=100)
    forbidden = [(CaptionTokenizer, "__call__")] + ([(TextEncoder, "encode")] if cache == "true" else [])
    full, part = [], []
    monkeypatch.setattr(s2, "train_loop", recording_loop(full, forbidden))
    s2.main(argv(tmp_path / "full"))
    key = "latent_mean" if cache == "true" else "image"
    assert [step for step, _ in full] == list(range(9))
    first = full[0][1]
    if cache == "true":
        assert first["text_embeddings"].shape[:2] == first["text_embeddings_mask"].shape
    else:
        assert first["image"].dtype == torch.uint8 and first["input_ids"].shape == (4, CLIP_LEN)
    epochs = [torch.cat([batch[key] for _, batch in full[i:i + 3]]) for i in (0, 3, 6)]
    for a, b in ((0, 1), (1, 2)):  # frozen flips would serve every sample exactly as before
        same = sum(any(torch.equal(x, y) for y in epochs[b]) for x in epochs[a])
        assert same <= 9, f"{same} of 12 samples of epoch {a} reappear unchanged in epoch {b}"

    monkeypatch.setattr(s2, "train_loop", recording_loop(part, forbidden))
    s2.main(argv(tmp_path / "part") + ["--stop_after_steps", "4"])
    s2.main(argv(tmp_path / "part") + ["--resume_from_checkpoint", "latest"])
    assert [step for step, _ in part] == [step for step, _ in full]
    for (_, a), (_, b) in zip(part, full):  # mid-epoch resume: exactly the same batches
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_cached_captions_train_like_captions_encoded_every_step(assets, tmp_path):
    """The latent cache keeps the frozen text encoder's states: same losses as encoding per step."""
    common = dict(total_training_iterations=3, checkpoint_iterations=100, val_generation_freq=100)
    on_the_fly = s2.main(inprocess_argv(assets, tmp_path / "a", **common))
    cached = s2.main(inprocess_argv(assets, tmp_path / "b", cache_latents="true", **common))
    loss = lambda r: [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert loss(cached) == pytest.approx(loss(on_the_fly), rel=1e-4)


def test_text_encoder_learning_rate_is_the_text_encoders_own(assets, tmp_path):
    """One AdamW, a parameter group per network: the text encoder's at text_encoder_learning_rate
    (scheduled like the UNet's), else at learning_rate. AdamW moves a weight by about its learning
    rate per step, so the encoder moves ~100x less at 1e-5 than at the UNet's 1e-3."""
    clip = load_file(str(assets["clip"] / "model.safetensors"))
    moved = {}
    for te_lr in ("null", "1e-5"):
        result = s2.main(inprocess_argv(assets, tmp_path / te_lr, total_training_iterations=4, gradient_accumulation_steps=1,
                                        train_text_encoder="true", use_ema="false", learning_rate=1e-3,
                                        text_encoder_learning_rate=te_lr, lr_warmup_steps=2, lr_scheduler="constant",
                                        adam_weight_decay=0.0, max_grad_norm="null", checkpoint_iterations=4,
                                        cfg_dropout_prob=0.0))
        groups = torch.load(result.run_dir / "checkpoint_4" / "optimizer.bin", weights_only=False)["param_groups"]
        te_params = len(list(getattr(result.text_encoder, "module", result.text_encoder).parameters()))
        assert [len(g["params"]) for g in groups] == [len(list(result.unet.parameters())), te_params]
        assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3 if te_lr == "null" else 1e-5])
        exported = load_file(str(result.export_path))
        moved[te_lr] = max((exported[f"text_encoder.{k}"] - v).abs().max().item() for k, v in clip.items())
    assert 0 < moved["1e-5"] < 4e-5 < 1e-4 < moved["null"]


def test_trained_text_encoder_is_exported_as_its_ema_with_the_ema_unet(assets, tmp_path):
    result = s2.main(inprocess_argv(assets, tmp_path, total_training_iterations=3, gradient_accumulation_steps=1,
                                    train_text_encoder="true", checkpoint_iterations=100, ema_decay=0.5))
    exported = load_file(str(result.export_path))
    averaged = result.text_encoder_ema.model.model.state_dict()
    live = getattr(result.text_encoder, "module", result.text_encoder).model.state_dict()
    assert all(torch.equal(exported[f"text_encoder.{k}"], v.float().cpu()) for k, v in averaged.items())
    assert any(not torch.equal(exported[f"text_encoder.{k}"], v.float().cpu()) for k, v in live.items())
    assert all(torch.equal(exported[f"unet.{k}"], v.float().cpu()) for k, v in result.ema.model.state_dict().items())
    assert load_ldm_export(result.export_path).metadata["ema"] is True


# ----------------------------------------------------------------------------------------
# No host syncs in the step
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["false", "true"])
def test_training_step_reads_nothing_back_to_the_host(assets, tmp_path, cache):
    """Text-conditional steps with CFG dropout and workers, captions encoded in the step or read from
    the latent cache: the step reads nothing on the host (no padding length, no dropout mask, no
    text-encoder mask check, no loss). Logs are read once, at the logging step (tests/host_syncs.py)."""
    from host_syncs import syncs_per_step

    def run(steps):
        reset_accelerate_state()
        s2.main(inprocess_argv(assets, tmp_path / f"{steps}", total_training_iterations=steps, checkpoint_iterations=100,
                               logging_steps=100, shapes_num_images=32, num_workers=2, gradient_accumulation_steps=1,
                               per_gpu_batch_size=4, cache_latents=cache))
    assert syncs_per_step(run, steps=(2, 5)) == {}


def test_compiled_training_matches_eager(assets, tmp_path):
    """training_args.compile (cached latents and text: the UNet alone is compiled) and channels_last: the same losses
    as eager to float tolerance (inductor reorders float sums), and an export with the same keys."""
    common = dict(total_training_iterations=3, gradient_accumulation_steps=1, per_gpu_batch_size=4,
                  checkpoint_iterations=100, val_generation_freq=100, num_workers=0, channels_last="true", cache_latents="true")
    eager = s2.main(inprocess_argv(assets, tmp_path / "eager", **common))
    reset_accelerate_state()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = s2.main(inprocess_argv(assets, tmp_path / "compiled", compile="true", **common))
    assert counters["stats"]["unique_graphs"] >= 1  # the UNet went through dynamo and inductor
    loss = lambda r: [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loss(compiled), loss(eager), rtol=1e-4)
    assert load_file(compiled.export_path).keys() == load_file(eager.export_path).keys()


# ----------------------------------------------------------------------------------------
# Preemption and numerical faults (modules/preemption.py, modules/nonfinite.py)
# ----------------------------------------------------------------------------------------

def _nan_loss_at(monkeypatch, calls, poison=None):
    """denoising_loss returns NaN at the given call indices (one call per optimizer step with no
    accumulation); ``poison(unet, call)`` may also damage the weights."""
    real, seen = s2.denoising_loss, {"n": 0}

    def loss_fn(unet, *args, **kwargs):
        loss, logs = real(unet, *args, **kwargs)
        call = seen["n"]
        seen["n"] += 1
        if poison is not None:
            poison(unet, call)
        return (loss * float("nan") if call in calls else loss), logs
    monkeypatch.setattr(s2, "denoising_loss", loss_fn)


def _unet_state(run: Path, step: int) -> dict:
    return load_file(str(run / f"checkpoint_{step}" / "model.safetensors"))


def test_non_finite_steps_are_skipped_counted_and_leave_weights_and_ema_alone(assets, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {1, 2})
    result = s2.main(inprocess_argv(assets, tmp_path, gradient_accumulation_steps=1, max_consecutive_nonfinite=3))
    run = result.run_dir
    assert result.step == 4 and result.export_path.is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 2, 2]
    assert json.loads((run / "checkpoint_4" / "trainer_state.json").read_text())["nonfinite_steps"] == 2
    # Steps 2 and 3 changed nothing: the weights, the optimizer's moments and step count, the EMA.
    one, three = _unet_state(run, 1), _unet_state(run, 3)
    assert all(torch.equal(one[k], three[k]) for k in one)
    opt = lambda s: torch.load(run / f"checkpoint_{s}" / "optimizer.bin", weights_only=False)["state"]
    assert all(torch.equal(opt(1)[i]["exp_avg"], opt(3)[i]["exp_avg"]) and float(opt(3)[i]["step"]) == 1
               for i in opt(1))
    ema = lambda s: torch.load(run / f"checkpoint_{s}" / "custom_checkpoint_1.pkl", weights_only=False)["model"]
    assert all(torch.equal(ema(1)[k], ema(3)[k]) for k in ema(1))
    four = _unet_state(run, 4)
    assert not all(torch.equal(three[k], four[k]) for k in three)  # step 4 trains again
    assert all(torch.isfinite(v).all() for v in load_file(str(result.export_path)).values())


def test_too_many_non_finite_steps_in_a_row_stop_the_run_naming_the_step(assets, tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {1, 2, 3})
    argv = inprocess_argv(assets, tmp_path, gradient_accumulation_steps=1, max_consecutive_nonfinite=2)
    with pytest.raises(SystemExit) as stop:
        run_main(s2.main, argv)
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: step 3: 2 optimizer steps in a row had a non-finite loss or gradient")
    assert "checkpoint_2" in line
    run = tmp_path / "DiffusionTrainer"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_1", "checkpoint_2"]
    assert not (tmp_path / "model.safetensors").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_written(assets, tmp_path, monkeypatch, capsys):
    def poison(unet, call):
        if call == 2:  # during step 3: as if a bad kernel wrote NaN into a weight
            with torch.no_grad():
                next(unet.parameters()).view(-1)[0] = float("nan")
    _nan_loss_at(monkeypatch, set(), poison)
    with pytest.raises(SystemExit) as stop:
        run_main(s2.main, inprocess_argv(assets, tmp_path, gradient_accumulation_steps=1))
    assert stop.value.code == 2
    assert "error: step 3: the weights are no longer finite (NaN or inf), so no checkpoint is written; " \
           "the last good one, checkpoint_2, is kept" in capsys.readouterr().err
    run = tmp_path / "DiffusionTrainer"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_1", "checkpoint_2"]
    assert all(torch.isfinite(v).all() for v in _unet_state(run, 2).values())


def test_sigterm_finishes_the_step_checkpoints_and_resumes_to_the_same_weights(assets, uninterrupted, tmp_path,
                                                                               monkeypatch):
    """SIGTERM arrives in the first micro-batch of step 3: step 3 ends, checkpoint_3 is written, the run
    stops (Interrupted: exit 143 from the command line) and resumes to the uninterrupted weights."""
    import signal

    from modules.errors import Interrupted

    real, seen = s2.denoising_loss, {"n": 0}

    def loss_fn(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 5:  # micro-batches 1-4 are steps 1 and 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(s2, "denoising_loss", loss_fn)
    argv = inprocess_argv(assets, tmp_path)
    with pytest.raises(Interrupted) as stop:
        s2.main(argv)
    assert (stop.value.signum, stop.value.step) == (signal.SIGTERM, 3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the loop's only
    run = tmp_path / "DiffusionTrainer"
    assert json.loads((run / "checkpoint_3" / "trainer_state.json").read_text())["step"] == 3
    assert not (tmp_path / "model.safetensors").exists()
    monkeypatch.setattr(s2, "denoising_loss", real)
    s2.main(argv + ["--resume_from_checkpoint", "latest"])
    full, again = load_file(str(uninterrupted[1] / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(full[k], again[k]) for k in full)


def preemption_argv(assets, work: Path) -> list[str]:
    """40 short steps on shapes with 2 loader workers per process; checkpoints only when asked."""
    sets = train_sets(assets["prompts"], total_training_iterations=40, per_gpu_batch_size=2, shapes_num_images=16,
                      num_workers=2, checkpoint_iterations=1000, val_generation_freq=1000, checkpoints_total_limit=2,
                      num_inference_steps=2)
    return tutorial_argv(work, assets["vae"], "shapes", None, work / "gens") + unet_sets(assets["clip"]) + sets


def test_two_processes_sigterm_then_sigkill_then_resume_equals_an_uninterrupted_run(assets, tmp_path):
    """Under ``accelerate launch --multi_gpu`` with two CPU processes: SIGTERM to the launcher (the
    elastic agent forwards it) stops both ranks after the same step (a multiple of --stop_check_steps)
    with a checkpoint holding both RNG states; the resumed run, checkpointing every few seconds
    (--checkpoint_every_minutes), is SIGKILLed whole; the second resume ends with the weights of an
    uninterrupted two-process run, bit for bit."""
    import signal

    from interrupts import kill_everything, logged_steps, signal_launcher, start, wait_for_step

    reference = tmp_path / "reference"
    launch(preemption_argv(assets, reference), processes=2)

    work = tmp_path / "work"
    run_dir = work / "DiffusionTrainer"
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend",
           "no", "stage2_diffusion_trainer.py", *preemption_argv(assets, work), "--stop_check_steps", "2"]
    first = start(cmd, REPO, env, tmp_path / "logs1")
    wait_for_step(first, run_dir, 3)
    assert signal_launcher(first, signal.SIGTERM) != 0
    stopped = [p.name for p in run_dir.glob("checkpoint_*")]
    assert len(stopped) == 1, first.output()[-3000:]
    k = int(stopped[0].split("_")[1])
    assert k % 2 == 0 and 4 <= k < 40
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files_under(run_dir / stopped[0]))
    assert first.stderr.read_text().count(f"stopped by SIGTERM at step {k} of 40") == 1
    assert not (work / "model.safetensors").exists()

    second = start(cmd + ["--resume_from_checkpoint", "latest", "--checkpoint_every_minutes", "0.001"], REPO, env,
                   tmp_path / "logs2")
    wait_for_step(second, run_dir, k + 8)
    kill_everything(second)
    assert max(logged_steps(run_dir)) < 40 and not (work / "model.safetensors").exists()
    latest = max(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_*") if p.name.split("_")[1].isdigit())
    assert latest > k  # time-based checkpoints were written after the resume

    launch(preemption_argv(assets, work) + ["--resume_from_checkpoint", "latest"], processes=2)
    full, again = load_file(str(reference / "model.safetensors")), load_file(str(work / "model.safetensors"))
    assert full.keys() == again.keys()
    assert all(torch.equal(full[k_], again[k_]) for k_ in full)


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_good_checkpoint(assets, uninterrupted, tmp_path,
                                                                             monkeypatch, capsys):
    """ENOSPC half-way through writing checkpoint_3 (one file written): one line naming the checkpoint and
    the error, the partial folder removed, checkpoint_2 untouched; resuming from it finishes the run
    with the uninterrupted weights."""
    import errno

    from accelerate import Accelerator

    real = Accelerator.save_state

    def full_disk(self, output_dir=None, **kwargs):
        if output_dir.endswith("checkpoint_3.tmp"):
            Path(output_dir, "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kwargs)
    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    argv = inprocess_argv(assets, tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_main(s2.main, argv)
    assert stop.value.code == 2
    run = tmp_path / "DiffusionTrainer"
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"error: {run}/checkpoint_3: the checkpoint could not be written (No space left on device); it "
                    "was removed, and the last complete one, checkpoint_2, is untouched: free space (or fix the folder) "
                    "and continue with --resume_from_checkpoint latest")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint_1", "checkpoint_2"]
    monkeypatch.setattr(Accelerator, "save_state", real)
    s2.main(argv + ["--resume_from_checkpoint", "latest"])
    full, again = load_file(str(uninterrupted[1] / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(full[k], again[k]) for k in full)
