"""Stage 1 end to end: the tutorial's command lines through ``accelerate launch`` on tiny models.

The shipped configs are used as they are, shrunk only by ``--set`` overrides (a 2-level VAE with
8/16 channels at 32 px, a 2-layer PatchGAN, a few optimizer steps). The LPIPS is a stage-0 style
export (AlexNet trunk, random init, written with ``save_lpips_export``): nothing is downloaded.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import OFFLINE_ENV, REPO_ROOT
from modules.autoencoder import AutoencoderKL, VQModel
from modules.cli import run_main
from modules.lpips import LPIPS, save_lpips_export
from modules.shapes import write_shapes_folder
from modules.vae_io import load_vae

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
IMG = 32
NUM_IMAGES = 24


def tiny_overrides(lpips_path):
    """The shrink: only --set overrides of the shipped configs."""
    return [
        "vae.img_size=32", "vae.vae_channels_per_block=[8,16]", "vae.norm_num_groups=4",
        "vae.residual_layers_per_block=1",
        "training_args.total_training_iterations=6", "training_args.per_gpu_batch_size=2",
        "training_args.gradient_accumulation_steps=2", "training_args.disc_start=4",
        "training_args.checkpoint_iterations=2", "training_args.val_generation_freq=3",
        "training_args.num_val_images=4", "training_args.logging_steps=1", "training_args.num_workers=0",
        "training_args.lr_warmup_steps=2", "training_args.disc_lr_warmup_steps=0", "training_args.use_ema=true",
        "training_args.ema_decay=0.9", f"training_args.lpips_checkpoint={lpips_path}",
        "training_args.lpips_backbone=alex", "discriminator.start_channels=8", "discriminator.depth=2",
    ]


def with_sets(overrides):
    return [arg for text in overrides for arg in ("--set", text)]


def env(**extra):
    out = dict(os.environ)
    out.update(OFFLINE_ENV)
    out.update(extra)
    return out


def launch(args, processes=1, check=True):
    """``accelerate launch <script> ...`` from the repository root, as a user types it."""
    if processes == 1:
        cmd = [ACCELERATE, "launch"] + args
        extra = {}
    else:
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"] + args
        extra = {"ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env(**extra), capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def tutorial_kl_command(work, data, gens, lpips_path, extra=()):
    return ["stage1_vae_trainer.py", "--experiment_name", "VAETrainer", "--wandb_run_name", "vae_celeba",
            "--working_directory", str(work), "--training_config", "configs/stage1_vae_train.yaml",
            "--model_config", "configs/ldm.yaml", "--dataset", "celebahq", "--path_to_dataset", str(data),
            "--path_to_save_gens", str(gens)] + with_sets(tiny_overrides(lpips_path)) + list(extra)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    data = root / "celebahq"
    write_shapes_folder(data, NUM_IMAGES, IMG, seed=3)
    torch.manual_seed(0)
    lpips_path = root / "lpips" / "lpips_64x64_alex.pt"
    lpips_path.parent.mkdir()
    save_lpips_export(LPIPS("alex", pretrained_backbone=False, use_dropout=False), lpips_path)
    return {"root": root, "data": data, "lpips": lpips_path.with_suffix(".safetensors")}


@pytest.fixture(scope="module")
def kl_run(assets):
    """The tutorial's KL celebahq command, uninterrupted: 6 steps of 2 micro-batches of 2 images, GAN from
    step 4, EMA."""
    work, gens = assets["root"] / "vae_celeba", assets["root"] / "gens"
    launch(tutorial_kl_command(work, assets["data"], gens, assets["lpips"]))
    return {"work": work, "run": work / "VAETrainer", "gens": gens}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kl_celebahq_tutorial_command_writes_checkpoints_export_and_grids(kl_run):
    run = kl_run["run"]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint_2", "checkpoint_4", "checkpoint_6"]
    for name in ("config.yaml", "model_config.yaml", "metrics.jsonl", "loss_curve.png"):
        assert (run / name).is_file(), name
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # validation every 3 optimizer steps (not micro-batches, not step 0): 4 held-out pairs, 2 per row
    assert sorted(p.name for p in kl_run["gens"].iterdir()) == ["step_3.png", "step_6.png"]
    with Image.open(kl_run["gens"] / "step_6.png") as grid:
        assert grid.size == (4 * (IMG + 2) + 2, 2 * (IMG + 2) + 2)
    rows = records(run)
    val = [r for r in rows if "val_psnr" in r]
    assert [r["step"] for r in val] == [3, 6]
    assert all({"val_ssim", "val_lpips"} <= set(r) for r in val)
    train = [r for r in rows if "total" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # the GAN terms appear from disc_start (step index 4, i.e. the 5th optimizer step) on
    assert [r["step"] for r in train if "d_loss" in r] == [5, 6]
    assert all({"rec", "lpips", "kl"} <= set(r) for r in train)
    # warm-up of 2 steps: lr 1/2 then full
    assert [r["lr"] for r in train[:3]] == pytest.approx([5e-5, 1e-4, 1e-4])

    model, config, meta = load_vae(kl_run["work"] / "model.safetensors")
    assert isinstance(model, AutoencoderKL)
    assert config.vae_channels_per_block == [8, 16] and config.img_size == IMG
    assert meta["kind"] == "vae" and meta["step"] == 6 and meta["ema"] is True
    assert meta["producer"]["script"] == "stage1_vae_trainer.py"
    # the export is the EMA copy stored in the last checkpoint
    ema_state = torch.load(run / "checkpoint_6" / "custom_checkpoint_2.pkl", weights_only=False)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ema_state[name].cpu()), name


def test_discriminator_untouched_before_disc_start_and_trained_after(kl_run):
    run = kl_run["run"]
    disc = {s: load_file(str(run / f"checkpoint_{s}" / "model_1.safetensors")) for s in (2, 4, 6)}
    vae = {s: load_file(str(run / f"checkpoint_{s}" / "model.safetensors")) for s in (2, 4)}
    assert all(torch.equal(disc[2][k], disc[4][k]) for k in disc[2])  # weights and BatchNorm buffers
    assert any(not torch.equal(disc[4][k], disc[6][k]) for k in disc[4] if k.endswith("weight"))
    assert any(not torch.equal(vae[2][k], vae[4][k]) for k in vae[2])
    disc_opt = torch.load(run / "checkpoint_4" / "optimizer_1.bin", weights_only=False)
    assert disc_opt["state"] == {}  # never stepped
    assert torch.load(run / "checkpoint_6" / "optimizer_1.bin", weights_only=False)["state"]


def test_resume_equals_uninterrupted(assets, kl_run):
    work, gens = assets["root"] / "resumed", assets["root"] / "gens_resumed"
    command = tutorial_kl_command(work, assets["data"], gens, assets["lpips"])
    launch(command + ["--stop_after_steps", "3"])  # mid-epoch, mid-warm-up, before disc_start
    assert sorted(p.name for p in (work / "VAETrainer").glob("checkpoint_*")) == ["checkpoint_2", "checkpoint_3"]
    assert not (work / "model.safetensors").exists()
    launch(command + ["--resume_from_checkpoint", "latest"])
    resumed, full = load_file(str(work / "model.safetensors")), load_file(str(kl_run["work"] / "model.safetensors"))
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    for s in (4, 6):
        a = load_file(str(work / "VAETrainer" / f"checkpoint_{s}" / "model_1.safetensors"))
        b = load_file(str(kl_run["run"] / f"checkpoint_{s}" / "model_1.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in gens.iterdir()) == ["step_3.png", "step_6.png"]
    assert [r["step"] for r in records(work / "VAETrainer") if "total" in r] == [1, 2, 3, 4, 5, 6]


def write_cc_dataset(path, num_images, max_length=8):
    """A tiny dataset in prep_cc.py's output format (images of several aspect ratios)."""
    import datasets
    from prep_cc import build_features

    write_shapes_folder(path.parent / "cc_src", num_images, 48, seed=5)
    images, captions = [], []
    for i, png in enumerate(sorted((path.parent / "cc_src").glob("*.png"))):
        with Image.open(png) as img:
            images.append(img.convert("RGB").resize((48 + 8 * (i % 3), 48)))  # some non-square
        captions.append(png.with_suffix(".txt").read_text())
    rows = {
        "image": images, "caption": captions,
        "input_ids": [[49406] + [320 + i] * (max_length - 2) + [49407] for i in range(num_images)],
        "attention_mask": [[1] * max_length for _ in range(num_images)],
        "key": [f"{i:09d}" for i in range(num_images)], "url": [f"http://x/{i}.jpg" for i in range(num_images)],
        "width": [img.width for img in images], "height": [img.height for img in images],
    }
    datasets.Dataset.from_dict(rows, features=build_features(max_length, None, None)).save_to_disk(str(path))


def test_kl_conceptual_captions_command_without_model_config(assets):
    data = assets["root"] / "cc_prepped"
    write_cc_dataset(data, 10)
    work, gens = assets["root"] / "vae_cc", assets["root"] / "gens_cc"
    overrides = tiny_overrides(assets["lpips"]) + [
        "training_args.total_training_iterations=2", "training_args.val_generation_freq=2",
        "training_args.num_val_images=2", "training_args.use_ema=false"]
    launch(["stage1_vae_trainer.py", "--experiment_name", "VAETrainer", "--wandb_run_name", "vae_cc",
            "--working_directory", str(work), "--training_config", "configs/stage1_vae_train_cc.yaml",
            "--dataset", "conceptual_captions", "--path_to_dataset", str(data),
            "--path_to_save_gens", str(gens)] + with_sets(overrides))
    assert sorted(p.name for p in (work / "VAETrainer").glob("checkpoint_*")) == ["checkpoint_2"]
    assert sorted(p.name for p in gens.iterdir()) == ["step_2.png"]
    model, config, meta = load_vae(work / "model.safetensors")
    assert isinstance(model, AutoencoderKL) and meta["dataset"] == "conceptual_captions" and meta["ema"] is False
    # no --model_config: configs/ldm.yaml's vae: with the --set shrink
    assert config.latent_channels == 4 and config.vae_channels_per_block == [8, 16]


def test_vq_config_trains_a_vq_vae_on_two_processes(assets):
    """configs/stage1_vqvae_train.yaml, 2-process DDP on the CPU, discriminator on from step 2."""
    work, gens = assets["root"] / "vqvae", assets["root"] / "gens_vq"
    overrides = tiny_overrides(assets["lpips"]) + [
        "vae.codebook_size=32", "vae.vq_dead_code_restart_steps=2", "training_args.total_training_iterations=4",
        "training_args.disc_start=2", "training_args.val_generation_freq=4", "training_args.use_ema=false"]
    launch(["stage1_vae_trainer.py", "--experiment_name", "VQVAETrainer", "--wandb_run_name", "vqvae_celeba",
            "--working_directory", str(work), "--training_config", "configs/stage1_vqvae_train.yaml",
            "--model_config", "configs/ldm.yaml", "--dataset", "celebahq", "--path_to_dataset", str(assets["data"]),
            "--path_to_save_gens", str(gens)] + with_sets(overrides), processes=2)
    assert sorted(p.name for p in (work / "VQVAETrainer").glob("checkpoint_*")) == ["checkpoint_2", "checkpoint_4"]
    assert (work / "VQVAETrainer" / "checkpoint_4" / "random_states_1.pkl").is_file()  # both ranks saved RNG
    with Image.open(gens / "step_4.png") as grid:  # all 4 held-out images, gathered from both ranks
        assert grid.size == (4 * (IMG + 2) + 2, 2 * (IMG + 2) + 2)
    model, config, _ = load_vae(work / "model.safetensors")
    assert isinstance(model, VQModel) and config.quantize and config.codebook_size == 32
    rows = [r for r in records(work / "VQVAETrainer") if "total" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("codebook" in r and "vq_window_perplexity" in r and "kl" not in r for r in rows)
    assert [r["step"] for r in rows if "d_loss" in r] == [3, 4]


# ----------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, exit code 2, no traceback
# ----------------------------------------------------------------------------------------

@pytest.fixture
def fresh_log_handler():
    """The toolkit's log handler binds the sys.stderr of its creation; in-process runs under capsys
    must not leave one behind that writes to a stream pytest has closed."""
    ldm_logger = logging.getLogger("ldm")
    saved = ldm_logger.handlers[:]
    ldm_logger.handlers.clear()
    yield
    ldm_logger.handlers[:] = saved


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process runs build an Accelerator, a process-wide singleton: leave none behind."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_in_process(argv, capsys):
    import stage1_vae_trainer

    with pytest.raises(SystemExit) as exc:
        run_main(stage1_vae_trainer.main, argv)
    # stderr also carries the INFO log of the set-up; the error itself is its last line
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    return exc.value.code, lines[-1]


def bad_input_command(tmp_path, assets, data, extra=()):
    return ["--working_directory", str(tmp_path / "work"), "--training_config", str(REPO_ROOT / "configs/stage1_vae_train.yaml"),
            "--model_config", str(REPO_ROOT / "configs/ldm.yaml"), "--dataset", "celebahq",
            "--path_to_dataset", str(data)] + with_sets(tiny_overrides(assets["lpips"])) + list(extra)


def test_empty_image_folder_is_one_line_error(tmp_path, assets, capsys, fresh_log_handler):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, err = run_in_process(bad_input_command(tmp_path, assets, tmp_path / "empty"), capsys)
    assert code == 2 and err.startswith("error: no images in") and "\n" not in err


def test_folder_of_broken_files_is_one_line_error(tmp_path, assets, capsys, fresh_log_handler):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    code, err = run_in_process(bad_input_command(tmp_path, assets, folder), capsys)
    assert code == 2 and err.startswith("error: no readable images in") and "\n" not in err


def test_missing_lpips_checkpoint_says_what_to_pass(tmp_path, assets, capsys, fresh_log_handler):
    command = bad_input_command(tmp_path, assets, assets["data"],
                                with_sets([f"training_args.lpips_checkpoint={tmp_path / 'none.safetensors'}"]))
    code, err = run_in_process(command, capsys)
    assert code == 2 and "\n" not in err
    assert "lpips_checkpoint" in err and "stage0_lpips_trainer.py" in err and "use_lpips_package" in err


def test_lpips_package_without_pretrained_trunk_says_what_to_pass(tmp_path, assets, capsys, fresh_log_handler, monkeypatch):
    import lpips

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    command = bad_input_command(tmp_path, assets, assets["data"], with_sets(["training_args.use_lpips_package=true"]))
    code, err = run_in_process(command, capsys)
    assert code == 2 and "\n" not in err and "lpips_checkpoint" in err and "pretrained alex" in err


def test_negative_kl_weight_is_one_line_error_from_the_command_line(tmp_path, assets):
    command = [sys.executable, "stage1_vae_trainer.py"] + bad_input_command(
        tmp_path, assets, assets["data"], with_sets(["training_args.kl_weight=-1e-6"]))
    result = subprocess.run(command, cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "kl_weight must be >= 0, got -1e-06" in lines[0], result.stderr


def test_user_error_under_a_two_process_launch_is_said_once_and_named_in_the_launchers_summary(tmp_path, assets):
    """Both ranks fail on the same bad value: our line is printed once (rank 1 waits, and the elastic
    agent ends it once rank 0 has failed), and torch's failure summary, which the launcher prints
    after it, shows that line instead of "To enable traceback see ..."."""
    args = ["stage1_vae_trainer.py"] + bad_input_command(tmp_path, assets, assets["data"],
                                                         with_sets(["training_args.kl_weight=-1e-6"]))
    result = launch(args, processes=2, check=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    message = f"error: {REPO_ROOT}/configs/stage1_vae_train.yaml (with --set overrides): training_args: " \
              "kl_weight must be >= 0, got -1e-06"
    assert ours == [message], result.stderr[-3000:]
    assert f"traceback : {message}" in result.stderr
    assert "To enable traceback see" not in result.stderr


def test_a_run_folder_that_one_rank_cannot_see_stops_with_one_line_naming_it(tmp_path, assets):
    """Two processes where rank 1 behaves like a node with its own local disk: it cannot read the
    marker rank 0 writes into the run folder (its reads of that file fail as on another machine).
    Every rank stops before any training with the line naming rank 1 and its host."""
    import socket

    wrapper = tmp_path / "rank1_on_another_disk.py"
    wrapper.write_text(
        "import os, pathlib, runpy, sys\n"
        "if os.environ.get('RANK') == '1':\n"
        "    real = pathlib.Path.read_text\n"
        "    def read_text(self, *a, **k):\n"
        "        if self.name == '.shared_filesystem_check':\n"
        "            raise FileNotFoundError(str(self))\n"
        "        return real(self, *a, **k)\n"
        "    pathlib.Path.read_text = read_text\n"
        f"sys.argv[0] = {str(REPO_ROOT / 'stage1_vae_trainer.py')!r}\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    work = tmp_path / "work"
    args = [str(wrapper)] + tutorial_kl_command(work, assets["data"], tmp_path / "gens", assets["lpips"])[1:]
    result = launch(args, processes=2, check=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: {work / 'VAETrainer'}: the run folder (--working_directory/--experiment_name) must be "
                    f"on a filesystem every process sees, but rank 1 on {socket.gethostname()} cannot see the file "
                    "rank 0 wrote there; put it on a shared filesystem (NFS, Lustre, ...)"], result.stderr[-3000:]
    assert not list((work / "VAETrainer").glob("checkpoint_*")) and not (work / "VAETrainer" / ".shared_filesystem_check").exists()


def test_config_errors_name_the_key(tmp_path, assets, capsys, fresh_log_handler):
    code, err = run_in_process(bad_input_command(tmp_path, assets, assets["data"],
                                                 with_sets(["training_args.per_gpu_batch_size=0"])), capsys)
    assert code == 2 and "per_gpu_batch_size must be >= 1, got 0" in err
    code, err = run_in_process(bad_input_command(tmp_path, assets, assets["data"],
                                                 with_sets(["training_args.disc_lr=1"])), capsys)
    assert code == 2 and "unknown key 'disc_lr'" in err and "disc_learning_rate" in err
    code, err = run_in_process(bad_input_command(tmp_path, assets, assets["data"], ["--dataset", "mnist"]), capsys)
    assert code == 2 and "unknown dataset 'mnist'" in err and "celebahq" in err


# ---- the shared loop as stage 1 drives it ---------------------------------------------------------

def recording_loop(seen):
    """A stand-in for stage1's train_loop that records every micro-batch (step, uint8 images) the
    step function receives, then runs the real loop."""
    from modules.loop import train_loop

    def loop(accelerator, *, step_fn, **kwargs):
        def recorded(batch, step):
            seen.append((step, batch.clone()))
            yield from step_fn(batch, step)
        return train_loop(accelerator, step_fn=recorded, **kwargs)
    return loop


def augmenting_command(work, assets, extra=()):
    """Random crops and flips, 2 persistent workers, 4-image micro-batches x 2 accumulation: the 20
    training images are 5 micro-batches = 3 optimizer steps (2 + 2 + 1) per epoch; 9 steps = 3 epochs."""
    return ["--working_directory", str(work), "--training_config", str(REPO_ROOT / "configs/stage1_vae_train.yaml"),
            "--model_config", str(REPO_ROOT / "configs/ldm.yaml"), "--dataset", "celebahq",
            "--path_to_dataset", str(assets["data"])] + with_sets(tiny_overrides(assets["lpips"]) + [
                "training_args.total_training_iterations=9", "training_args.per_gpu_batch_size=4",
                "training_args.num_workers=2", "training_args.crop=random_resized",
                "training_args.random_resized_crop_scale=[0.5,1.0]", "training_args.disc_start=100",
                "training_args.val_generation_freq=100", "training_args.checkpoint_iterations=100"]) + list(extra)


def test_augmentations_change_every_epoch_with_workers_and_resume_sees_the_same_images(
        tmp_path, assets, monkeypatch, fresh_log_handler):
    import stage1_vae_trainer

    full, part = [], []
    monkeypatch.setattr(stage1_vae_trainer, "train_loop", recording_loop(full))
    stage1_vae_trainer.main(augmenting_command(tmp_path / "full", assets))
    # per_gpu_batch_size is the micro-batch: 4 images per forward, 2 per optimizer step (1 at an epoch's end)
    assert all(images.shape == (4, 3, IMG, IMG) and images.dtype == torch.uint8 for _, images in full)
    assert [step for step, _ in full] == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8]
    epochs = [torch.cat([images for _, images in full[i:i + 5]]) for i in (0, 5, 10)]
    for a, b in ((0, 1), (1, 2)):  # frozen augmentations would repeat every image exactly
        same = sum(any(torch.equal(x, y) for y in epochs[b]) for x in epochs[a])
        assert same <= 5, f"{same} of 20 images of epoch {a} reappear unchanged in epoch {b}"

    monkeypatch.setattr(stage1_vae_trainer, "train_loop", recording_loop(part))
    stage1_vae_trainer.main(augmenting_command(tmp_path / "part", assets, ["--stop_after_steps", "4"]))
    stage1_vae_trainer.main(augmenting_command(tmp_path / "part", assets, ["--resume_from_checkpoint", "latest"]))
    assert [step for step, _ in part] == [step for step, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(part, full))  # mid-epoch resume: the same images
    exported = [load_file(str(tmp_path / w / "model.safetensors")) for w in ("full", "part")]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_lpips_weight_zero_needs_no_lpips_checkpoint(tmp_path, assets, fresh_log_handler):
    import stage1_vae_trainer

    command = bad_input_command(tmp_path, assets, assets["data"], with_sets([
        "training_args.lpips_weight=0", f"training_args.lpips_checkpoint={tmp_path / 'never_trained.safetensors'}",
        "training_args.total_training_iterations=3", "training_args.disc_start=100"]))
    assert stage1_vae_trainer.main(command) == tmp_path / "work" / "model.safetensors"
    rows = records(tmp_path / "work" / "VAETrainer")
    assert [r["step"] for r in rows if "val_psnr" in r] == [3]  # the last step is always validated
    assert not any("lpips" in r or "val_lpips" in r for r in rows)


# ---- no host syncs in the step --------------------------------------------------------------------

@pytest.mark.parametrize("model", ["kl", "vq"])
def test_training_step_reads_nothing_back_to_the_host(tmp_path, assets, fresh_log_handler, model):
    """A step from the GAN on (disc_start 0), with workers: nothing of the VAE, LPIPS, discriminator,
    adaptive weight, loss logs or (VQ) dead-code restarts is read on the host. Logs are read once,
    at the logging step (here the last), checkpoints and grids at the end (tests/host_syncs.py)."""
    from accelerate.state import AcceleratorState, GradientState
    from host_syncs import syncs_per_step
    import stage1_vae_trainer

    vq = ["vae.quantize=true", "vae.vq_embed_dim=4", "vae.codebook_size=64", "vae.vq_dead_code_restart_steps=1"]

    def run(steps):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        stage1_vae_trainer.main(augmenting_command(tmp_path / f"{steps}", assets) + with_sets([
            f"training_args.total_training_iterations={steps}", "training_args.per_gpu_batch_size=2",
            "training_args.gradient_accumulation_steps=1", "training_args.disc_start=0",
            "training_args.logging_steps=100"] + (vq if model == "vq" else [])))
    assert syncs_per_step(run, steps=(2, 5)) == {}


def test_compiled_training_matches_eager(tmp_path, assets, fresh_log_handler, monkeypatch):
    """training_args.compile with channels_last, GAN on from the first step: the VAE, the discriminator
    and the LPIPS traced and compiled (the adaptive weight's autograd.grad through the compiled decoder
    too, the posterior noise drawn as in eager mode); the same losses as eager, the same export keys.
    Compiled with the aot_eager backend: the same dynamo graphs and AOT-autograd backward, without
    inductor's C++ compile (over two minutes for these three networks on two cores; stage 2's test
    compiles its UNet with inductor itself)."""
    from functools import partial

    from accelerate.state import AcceleratorState, GradientState
    from modules.performance import compile_modules
    import stage1_vae_trainer

    from torch._dynamo.backends.common import aot_autograd  # noqa: F401 (registers aot_eager)
    from torch._dynamo import lookup_backend

    graphs = []

    def aot_eager_counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)
    monkeypatch.setattr(stage1_vae_trainer, "compile_modules", partial(compile_modules, backend=aot_eager_counting))

    def run(name, *extra):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        stage1_vae_trainer.main(augmenting_command(tmp_path / name, assets) + with_sets([
            "training_args.total_training_iterations=2", "training_args.per_gpu_batch_size=2",
            "training_args.gradient_accumulation_steps=1", "training_args.disc_start=0",
            "training_args.num_workers=0", "training_args.channels_last=true", *extra]))
        return tmp_path / name
    eager = run("eager")
    assert graphs == []
    compiled = run("compiled", "training_args.compile=true")
    assert len(graphs) >= 3  # the VAE, the discriminator, the LPIPS (and their eval-mode graphs)
    rows = [[r for r in records(run / "VAETrainer") if "total" in r] for run in (eager, compiled)]
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]] == [1, 2]
    for a, b in zip(*rows):
        for key in ("total", "rec", "d_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert load_file(compiled / "model.safetensors").keys() == load_file(eager / "model.safetensors").keys()


# ---- preemption: SIGTERM to the launcher, SIGKILL during a checkpoint save, resume ---------------------------

def test_sigterm_to_the_launcher_then_a_kill_during_a_save_then_resume_equals_uninterrupted(assets, tmp_path):
    """One process under ``accelerate launch`` with 2 loader workers, 24 steps, GAN from step 4.
    SIGTERM to the launcher alone (which forwards nothing: the trainer asked the kernel for SIGTERM
    when its launcher dies) stops the run after the step in flight with a checkpoint and exit 143
    (read from the log: the launcher is gone); the resumed run is SIGKILLed while it writes its next
    checkpoint (files in checkpoint_<N>.tmp, not renamed); the second resume ignores the broken save,
    continues from the last complete checkpoint and ends with the uninterrupted run's weights."""
    import signal

    from interrupts import kill_during_save_command, signal_launcher, start, wait_for_step, was_killed

    sets = ["training_args.total_training_iterations=24", "training_args.num_workers=2",
            "training_args.checkpoint_iterations=8", "training_args.val_generation_freq=1000",
            "training_args.checkpoints_total_limit=2"]
    command = lambda work, extra=(): tutorial_kl_command(work, assets["data"], tmp_path / "gens", assets["lpips"],
                                                         with_sets(sets) + list(extra))
    reference = tmp_path / "reference"
    launch(command(reference))

    work = tmp_path / "work"
    run_dir = work / "VAETrainer"
    first = start([ACCELERATE, "launch", *command(work)], REPO_ROOT, env(), tmp_path / "logs1")
    wait_for_step(first, run_dir, 3)
    signal_launcher(first, signal.SIGTERM)
    stopped = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_*"))
    assert len(stopped) == 1 and 3 <= stopped[0] < 24, first.output()[-3000:]
    k = stopped[0]
    assert f"stopped by SIGTERM at step {k} of 24" in first.stderr.read_text()
    assert not (work / "model.safetensors").exists()

    save_at = (k // 8 + 1) * 8  # the next periodic (or the final) checkpoint of the resumed run
    script_argv = command(work, ["--resume_from_checkpoint", "latest"])
    second = start(kill_during_save_command(script_argv[0], script_argv[1:], save_at), REPO_ROOT, env(),
                   tmp_path / "logs2")
    assert was_killed(second.wait(), signal.SIGKILL)
    assert (run_dir / f"checkpoint_{save_at}.tmp" / "model.safetensors").is_file()  # the save was under way
    assert not (run_dir / f"checkpoint_{save_at}").exists()

    launch(command(work, ["--resume_from_checkpoint", "latest"]))
    resumed, full = load_file(str(work / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    assert not list(run_dir.glob("*.tmp"))  # the broken save was cleared by the next save of that step
