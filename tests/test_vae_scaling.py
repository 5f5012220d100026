"""compute_vae_scaling.py and modules/vae_io.py: the factor is 1 / std of the latents, exactly,
for any number of processes; it is written where it belongs; bad weights are one-line errors."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import OFFLINE_ENV, REPO_ROOT
from modules.autoencoder import AutoencoderKL, VAEConfig, VQModel, build_autoencoder, export_diffusers_vae
from modules.cli import run_main
from modules.errors import UserError
from modules.image_datasets import build_dataset, images_to_model
from modules.model_config import load_ldm_config, scale_factor_for
from modules.shapes import write_shapes_folder
from modules.export import read_export_metadata
from modules.vae_io import load_vae, save_vae_export, scaling_factors_from_metadata, set_export_metadata

import compute_vae_scaling as scaling

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
NUM_IMAGES = 13  # odd, so 2 processes pad the last batch with a duplicate
TINY = dict(img_size=32, vae_channels_per_block=[8, 16], norm_num_groups=4, residual_layers_per_block=1)


def env(**extra):
    out = dict(os.environ)
    out.update(OFFLINE_ENV)
    out.update(extra)
    return out


def tiny_model(quantize=False, seed=0):
    torch.manual_seed(seed)
    config = VAEConfig(**TINY, quantize=quantize, codebook_size=16)
    model = build_autoencoder(config)
    with torch.no_grad():  # a non-trivial posterior: latents of std far from 1
        model.quant_conv.bias.add_(torch.linspace(-1.0, 2.0, model.quant_conv.bias.numel()))
    return model.eval(), config


def model_yaml(path, **vae):
    path.write_text(yaml.safe_dump({"vae": {**TINY, **vae}}))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    write_shapes_folder(root / "data", NUM_IMAGES, 32, seed=7)
    kl, kl_config = tiny_model()
    vq, vq_config = tiny_model(quantize=True)
    save_vae_export(kl, kl_config, root / "kl.safetensors", {"step": 1})
    save_vae_export(vq, vq_config, root / "vq.safetensors", {"step": 1})
    save_file({k: v.contiguous() for k, v in kl.state_dict().items()}, str(root / "kl_bare.safetensors"))
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(root / "vq_bare.safetensors"))
    return root


def all_images(root):
    """Every image of the test folder as the VAE sees it: (N, 3, 32, 32) float32 in [-1, 1]."""
    dataset = build_dataset("celebahq", root / "data", 32)
    return images_to_model(torch.stack([dataset[i]["image"] for i in range(len(dataset))]), "cpu")


def script(args, processes=1):
    if processes == 1:
        cmd = [sys.executable, "compute_vae_scaling.py"] + args
        extra = {}
    else:
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "compute_vae_scaling.py"] + args
        extra = {"ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env(**extra), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """The tutorial's command (+ --write_to_config into a copy of configs/ldm.yaml) on one process."""
    work = tmp_path_factory.mktemp("one")
    weights = shutil.copy(assets / "kl.safetensors", work / "kl.safetensors")
    config = shutil.copy(REPO_ROOT / "configs" / "ldm.yaml", work / "ldm.yaml")
    result = script(["--path_to_pretrained_weights", str(weights), "--dataset", "celebahq",
                     "--path_to_dataset", str(assets / "data"), "--batch_size", "4", "--num_workers", "0",
                     "--write_to_config", "--model_config", str(config)])
    return {"weights": Path(weights), "config": Path(config), "stdout": result.stdout,
            "factor": read_export_metadata(weights)["scaling_factors"]["celebahq"]}


def test_factor_makes_the_latents_unit_std_on_the_data(assets, one_process):
    factor = one_process["factor"]
    model, _, meta = load_vae(one_process["weights"])
    assert meta["scaling_factors"] == {"celebahq": factor} and "scaling_factor" not in meta
    # Independent reference: all latents at once (same per-image noise), plain torch statistics.
    latents = scaling.encode_latents(model, all_images(assets), torch.arange(NUM_IMAGES), seed=0).double()
    assert (latents * factor).std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert abs(factor - 1.0) > 0.05  # the test model's latents are really rescaled
    lines = one_process["stdout"].splitlines()
    before = next(line for line in lines if "before scaling" in line)
    after = next(line for line in lines if "after scaling" in line)
    assert f"std {latents.std(unbiased=False).item():.6f}" in before
    assert f"mean {latents.mean().item():.6f}" in before
    assert "std 1.000000" in after and f"mean {latents.mean().item() * factor:.6f}" in after


def test_write_to_config_changes_only_that_line(one_process):
    original = (REPO_ROOT / "configs" / "ldm.yaml").read_text().splitlines()
    written = one_process["config"].read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, written) if a != b]
    assert len(original) == len(written) and len(changed) == 1
    assert changed[0][0].strip().startswith("celebahq:") and changed[0][1].strip().startswith("celebahq:")
    assert load_ldm_config(one_process["config"]).scaling_constants["celebahq"] == one_process["factor"]


def test_two_processes_give_the_same_factor(assets, one_process, tmp_path):
    weights = shutil.copy(assets / "kl.safetensors", tmp_path / "kl.safetensors")
    script(["--path_to_pretrained_weights", str(weights), "--dataset", "celebahq",
            "--path_to_dataset", str(assets / "data"), "--batch_size", "3", "--num_workers", "0"], processes=2)
    assert read_export_metadata(weights)["scaling_factors"]["celebahq"] == pytest.approx(one_process["factor"], rel=1e-6)


def test_vq_factor_uses_pre_quantization_latents(assets, tmp_path):
    weights = shutil.copy(assets / "vq.safetensors", tmp_path / "vq.safetensors")
    factor = scaling.main(["--path_to_pretrained_weights", str(weights), "--dataset", "celebahq",
                           "--path_to_dataset", str(assets / "data"), "--batch_size", "5", "--num_workers", "0"])
    model, _, _ = load_vae(weights)
    assert isinstance(model, VQModel)
    with torch.no_grad():
        z_e = model.encode(all_images(assets)).double()
    assert factor == pytest.approx(1.0 / z_e.std(unbiased=False).item(), rel=1e-6)
    assert read_export_metadata(weights)["scaling_factors"] == {"celebahq": factor}


def test_diffusers_folder_gives_the_same_factor_and_is_left_alone(assets, one_process, tmp_path):
    kl, _, _ = load_vae(assets / "kl.safetensors")
    export_diffusers_vae(kl, tmp_path / "vae", scaling_factor=0.5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "vae").iterdir()}
    config = shutil.copy(REPO_ROOT / "configs" / "ldm.yaml", tmp_path / "ldm.yaml")
    factor = scaling.main(["--path_to_pretrained_weights", str(tmp_path / "vae"), "--dataset", "shapes",
                           "--path_to_dataset", str(assets / "data"), "--batch_size", "6", "--num_workers", "0",
                           "--write_to_config", "--model_config", str(config)])
    assert factor == pytest.approx(one_process["factor"], rel=1e-6)  # same weights, data and noise
    assert {p.name: p.read_bytes() for p in (tmp_path / "vae").iterdir()} == before
    assert load_ldm_config(config).scaling_constants["shapes"] == factor


# ----------------------------------------------------------------------------------------
# Bad weights: one line, exit code 2
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


def failing(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(scaling.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "Traceback" not in "\n".join(lines)
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    return lines[-1]


def test_weights_that_do_not_fit_the_config_name_the_tensors(assets, tmp_path, capsys, fresh_log_handler):
    wide = model_yaml(tmp_path / "wide.yaml", vae_channels_per_block=[16, 32])
    err = failing(["--path_to_pretrained_weights", str(assets / "kl_bare.safetensors"), "--dataset", "celebahq",
                   "--path_to_dataset", str(assets / "data"), "--model_config", str(wide)], capsys)
    assert "weights do not fit the autoencoder config" in err
    assert "encoder.conv_in.weight (file (8, 3, 3, 3), model (16, 3, 3, 3))" in err


def test_vq_weights_given_to_a_kl_config(assets, tmp_path, capsys, fresh_log_handler):
    kl_yaml = model_yaml(tmp_path / "kl.yaml", quantize=False)
    err = failing(["--path_to_pretrained_weights", str(assets / "vq_bare.safetensors"), "--dataset", "celebahq",
                   "--path_to_dataset", str(assets / "data"), "--model_config", str(kl_yaml)], capsys)
    assert "VQ-VAE weights" in err and "vae.quantize: false" in err


def test_bare_weights_read_with_the_model_config(assets, tmp_path):
    config = model_yaml(tmp_path / "tiny.yaml")
    weights = shutil.copy(assets / "kl_bare.safetensors", tmp_path / "bare.safetensors")
    factor = scaling.main(["--path_to_pretrained_weights", str(weights), "--dataset", "celebahq",
                           "--path_to_dataset", str(assets / "data"), "--num_workers", "0", "--model_config", str(config)])
    assert read_export_metadata(weights)["scaling_factors"] == {"celebahq": factor}


def test_one_factor_per_dataset_kept_across_runs_and_old_exports_converted(assets, tmp_path):
    """Another dataset adds its entry and keeps the others; a rerun replaces only its own; an export
    of the single-factor format (scaling_factor + scaling_dataset) becomes a one-entry mapping."""
    weights = shutil.copy(assets / "kl.safetensors", tmp_path / "kl.safetensors")
    set_export_metadata(weights, {"scaling_factor": 0.25, "scaling_dataset": "ffhq"})  # as written before
    assert scaling_factors_from_metadata(read_export_metadata(weights), weights) == {"ffhq": 0.25}
    args = ["--path_to_pretrained_weights", str(weights), "--path_to_dataset", str(assets / "data"),
            "--num_workers", "0", "--num_samples", "4"]
    celebahq = scaling.main(args + ["--dataset", "celebahq"])
    shapes = scaling.main(args + ["--dataset", "shapes", "--seed", "1"])
    meta = read_export_metadata(weights)
    assert meta["scaling_factors"] == {"ffhq": 0.25, "celebahq": celebahq, "shapes": shapes} and celebahq != shapes
    assert "scaling_factor" not in meta and "scaling_dataset" not in meta
    again = scaling.main(args + ["--dataset", "celebahq", "--seed", "2"])
    assert read_export_metadata(weights)["scaling_factors"] == {"ffhq": 0.25, "celebahq": again, "shapes": shapes}
    # A factor for no dataset (a diffusers folder's, a hand-made export's) belongs to none; a broken one is an error.
    assert scaling_factors_from_metadata({"scaling_factor": 0.5}, weights) == {}
    with pytest.raises(UserError, match="scaling factor of 'ffhq' must be a number > 0"):
        scaling_factors_from_metadata({"scaling_factors": {"ffhq": -1.0}}, weights)


def test_stage2_takes_the_factor_of_its_own_dataset():
    """scaling_constants[dataset] first, then the export's entry for that dataset, then a diffusers
    folder's shipped factor; never another dataset's entry."""
    config = load_ldm_config(REPO_ROOT / "configs" / "ldm.yaml")  # every scaling_constants entry is null
    factors = {"celebahq": 0.9, "shapes": 1.1}
    assert scale_factor_for(config, "shapes", factors, None, "ldm.yaml", "vae.safetensors") == 1.1
    assert scale_factor_for(config, "ffhq", {}, 0.18215, "ldm.yaml", "sd_vae") == 0.18215
    config.scaling_constants["shapes"] = 0.7
    assert scale_factor_for(config, "shapes", factors, None, "ldm.yaml", "vae.safetensors") == 0.7
    with pytest.raises(UserError, match=r"no latent scale factor for dataset 'ffhq': vae\.safetensors has factors only "
                                        r"for celebahq, shapes and ldm\.yaml has no scaling_constants\.ffhq; compute it "
                                        r"with: python compute_vae_scaling\.py --path_to_pretrained_weights "
                                        r"vae\.safetensors --dataset ffhq --path_to_dataset /data/ffhq "):
        scale_factor_for(config, "ffhq", factors, None, "ldm.yaml", "vae.safetensors", "/data/ffhq")
    with pytest.raises(UserError, match="has no factor for any dataset yet"):
        scale_factor_for(config, "ffhq", {}, None, "ldm.yaml", "vae.safetensors")


def test_num_samples_takes_a_seeded_subset(assets, tmp_path):
    weights = shutil.copy(assets / "kl.safetensors", tmp_path / "kl.safetensors")
    args = ["--path_to_pretrained_weights", str(weights), "--dataset", "celebahq", "--path_to_dataset",
            str(assets / "data"), "--num_workers", "0", "--num_samples", "5"]
    assert scaling.main(args) == pytest.approx(scaling.main(args + ["--batch_size", "2"]), rel=1e-7)
    assert scaling.main(args) != scaling.main(args + ["--seed", "1"])


# ----------------------------------------------------------------------------------------
# modules/vae_io.py
# ----------------------------------------------------------------------------------------

def test_export_round_trip_and_explicit_config(assets):
    kl, config = tiny_model()
    model, loaded_config, meta = load_vae(assets / "kl.safetensors")
    assert loaded_config == config and meta["config"]["vae"]["vae_channels_per_block"] == [8, 16]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x).mode()), kl.decode(kl.encode(x).mode()))
    # an explicit config that fits replaces the stored one; one that does not is a UserError
    model, _, _ = load_vae(assets / "kl.safetensors", VAEConfig(**TINY, dropout=0.1))
    assert model.config.dropout == 0.1
    with pytest.raises(UserError, match=r"shape mismatch \d+: encoder\.down_blocks\.1\.resnets\.0\.conv1\.weight "
                                        r"\(file \(16, 8, 3, 3\), model \(32, 8, 3, 3\)\)"):
        load_vae(assets / "kl.safetensors", VAEConfig(**{**TINY, "vae_channels_per_block": [8, 32]}))
    with pytest.raises(UserError, match="VQ-VAE weights"):
        load_vae(assets / "vq.safetensors", VAEConfig(**TINY))
    with pytest.raises(UserError, match="no VAE config in its metadata"):
        load_vae(assets / "kl_bare.safetensors")
    with pytest.raises(UserError, match="VAE weights not found"):
        load_vae(assets / "missing.safetensors")


def test_diffusers_folder_loads_with_its_scaling_factor(assets, tmp_path):
    kl, _, _ = load_vae(assets / "kl.safetensors")
    export_diffusers_vae(kl, tmp_path / "vae", scaling_factor=0.25)
    model, config, meta = load_vae(tmp_path / "vae")
    assert isinstance(model, AutoencoderKL) and meta["kind"] == "diffusers" and meta["scaling_factor"] == 0.25
    assert all(torch.equal(v, kl.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="weights do not fit"):
        load_vae(tmp_path / "vae", VAEConfig(**{**TINY, "latent_channels": 8}))


def test_set_export_metadata_keeps_tensors_and_other_keys(assets, tmp_path):
    path = shutil.copy(assets / "kl.safetensors", tmp_path / "kl.safetensors")
    before = load_file(str(path))
    meta = set_export_metadata(path, {"scaling_factor": 0.5, "scaling_dataset": "ffhq"})
    after = load_file(str(path))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    stored = read_export_metadata(path)
    assert stored == meta and stored["scaling_factor"] == 0.5 and stored["step"] == 1 and stored["kind"] == "vae"
    meta = set_export_metadata(path, {"note": "x"}, remove=["scaling_dataset", "not_there"])
    assert "scaling_dataset" not in read_export_metadata(path) and meta["note"] == "x" and meta["scaling_factor"] == 0.5
    assert not (tmp_path / "kl.safetensors.tmp").exists()
    with pytest.raises(ValueError, match="managed by the exporter"):
        set_export_metadata(path, {"kind": "unet"})


# ----------------------------------------------------------------------------------------
# Editing the model YAML
# ----------------------------------------------------------------------------------------

def test_scaling_constant_text_edits_keep_the_rest():
    text = "vae:\n  img_size: 32\n\nscaling_constants:\n  # per dataset\n  celebahq: null   # fill me\n  ffhq: 0.5\n"
    edited = scaling.set_scaling_constant_text(text, "celebahq", 0.25)
    assert edited == text.replace("celebahq: null   # fill me", "celebahq: 0.25   # fill me")
    added = scaling.set_scaling_constant_text(text, "imagenet", 0.125)
    assert added == text + "  imagenet: 0.125\n"
    assert yaml.safe_load(added)["scaling_constants"] == {"celebahq": None, "ffhq": 0.5, "imagenet": 0.125}
    followed = "scaling_constants:\n    ffhq: 0.5\nunet:\n  in_channels: 4\n"
    assert scaling.set_scaling_constant_text(followed, "shapes", 2.0) == (
        "scaling_constants:\n    ffhq: 0.5\n    shapes: 2.0\nunet:\n  in_channels: 4\n")
    assert scaling.set_scaling_constant_text("vae: {}\n", "ffhq", 3.0) == "vae: {}\nscaling_constants:\n  ffhq: 3.0\n"
    assert scaling.set_scaling_constant_text("scaling_constants: {ffhq: 1.0}\n", "ffhq", 3.0) is None


def test_flow_style_section_is_rewritten(tmp_path):
    path = tmp_path / "ldm.yaml"
    path.write_text("# model\nscaling_constants: {ffhq: 1.0}\n")
    scaling.write_scaling_constant(path, "celebahq", 0.2)
    assert yaml.safe_load(path.read_text())["scaling_constants"] == {"ffhq": 1.0, "celebahq": 0.2}


def test_moments_combine_exactly():
    latents = torch.randn(7, 3, 5, 5, dtype=torch.float64) * 3 + 1
    means, m2s = scaling.per_sample_moments(latents)
    mean, std = scaling.combine_moments(means, m2s, 3 * 5 * 5)
    assert mean == pytest.approx(latents.mean().item(), rel=1e-12)
    assert std == pytest.approx(latents.std(unbiased=False).item(), rel=1e-12)
