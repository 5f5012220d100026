"""The diffusers ecosystem, both ways.

- export_diffusers.py turns a tiny text-conditional stage-2 export into a StableDiffusionPipeline
  folder; the pipeline loaded from it and our ``LatentDiffusion.generate`` (DDIM, guidance, negative
  prompts) draw the same images from the same initial noise.
- stage2_diffusion_trainer.py starts from a diffusers UNet2DConditionModel folder
  (``training_args.init_unet_from``): the loaded UNet computes what diffusers computes, one step
  of training moves it, and a config that does not match is one line naming the key.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import export_diffusers
import stage2_diffusion_trainer as s2
from modules.autoencoder import VAEConfig, build_autoencoder
from modules.cli import run_main
from modules.diffusers_interop import diffusers_to_our_unet_state, unet_diffusers_config
from modules.errors import UserError
from modules.ldm_io import load_ldm_export, save_ldm_export, text_encoder_export
from modules.model_config import DiffusionConfig, LDMConfig
from modules.text_encoder import TextEncoder, build_tiny_clip
from modules.unet import UNet, UNetConfig
from test_inference import one_thread  # noqa: F401  (one_thread: a fixture)
from tiny_exports import IMG, perturbed as _perturbed, tiny_export as _export
from test_stage2 import assets, inprocess_argv  # noqa: F401  (assets: a fixture)

# Seven words + start and end tokens fill the tiny CLIP's 9 positions: no padding (see test below).
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
NEGATIVES = ["a blue square on a red background", "a white circle on a green background"]
WORDS = "a red green blue white circle square on background"


def sd_unet_config(clip: Path, **overrides) -> UNetConfig:
    """The tiny text UNet of test_inference, in the subset diffusers' UNet2DConditionModel expresses."""
    kwargs = dict(unet_channels_per_block=[16, 32], down_block_types=["AttnDown", "Down"],
                  up_block_types=["Up", "AttnUp"], mid_block_type="AttnMid", unet_residual_layers_per_block=1,
                  groupnorm_groups=4, num_attention_heads=2, time_embed_start_dim=16, time_embed_proj_dim=32,
                  transformer_dim_mult=4, text_conditioning=True, text_embed_dim=32,
                  text_conditioning_hf_model=str(clip))
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


def sd_export(path: Path, clip: Path, diffusion: DiffusionConfig) -> Path:
    torch.manual_seed(0)
    vae_cfg = VAEConfig(img_size=IMG, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                        residual_layers_per_block=1, attention_layers=0)
    unet_cfg = sd_unet_config(clip)
    unet = _perturbed(UNet(unet_cfg), 1)
    vae = _perturbed(build_autoencoder(vae_cfg), 2, scale=0.02)
    text = text_encoder_export(TextEncoder(clip), str(clip), embed=True)
    return save_ldm_export(path, unet.state_dict(), vae.state_dict(), LDMConfig(vae=vae_cfg, unet=unet_cfg,
                                                                                 diffusion=diffusion),
                           0.7, 0.0, "text", "shapes", IMG, text_encoder=text, metadata={"step": 0})


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    clip = build_tiny_clip(root / "clip", [WORDS], hidden_size=32, layers=1, heads=2, max_position_embeddings=9)
    return {"root": root, "clip": clip}


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(export_diffusers.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ----------------------------------------------------------------------------------------
# Export: our model -> StableDiffusionPipeline
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,prediction,spacing", [("scaled_linear", "epsilon", "leading"),
                                                         ("cosine", "v_prediction", "trailing")])
def test_exported_pipeline_draws_our_images(sd, tmp_path, schedule, prediction, spacing):
    diffusion = DiffusionConfig(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    weights = sd_export(tmp_path / "model.safetensors", sd["clip"], diffusion)
    out = export_diffusers.main(["--path_to_weights", str(weights), "--output_dir", str(tmp_path / "pipe"),
                                 "--timestep_spacing", spacing])
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "unet", "vae"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                                      "prediction_type", "clip_sample", "set_alpha_to_one", "steps_offset")} == {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": prediction,
        "beta_schedule": {"scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[schedule],
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 0}
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.7

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "steps_offset should be 1", below
        pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.safety_checker is None and isinstance(pipe.scheduler, DDIMScheduler)
    # StableDiffusionPipeline.__init__ rewrites steps_offset 0 to 1, which shifts "leading" timesteps
    # by one (our DDIM: 0, 200, ...; it: 1, 201, ...). The scheduler set after loading keeps the file's.
    assert pipe.scheduler.config.steps_offset == 1
    if spacing == "leading":
        pipe.scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    ours = load_ldm_export(weights)
    assert ours.text_encoder.tokenize(PROMPTS + NEGATIVES).attention_mask.all()  # the prompts fill the context
    steps, guidance, seed = 6, 4.0, 3
    latents = torch.randn((2, *ours.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # Our sampler draws its initial noise first from the generator, as the pipeline's randn_tensor does:
        # the same seed is the same x_T, passed to the pipeline explicitly.
        mine = ours.generate(2, prompts=PROMPTS, negative_prompts=NEGATIVES, guidance_scale=guidance,
                             num_inference_steps=steps, timestep_spacing=spacing,
                             generator=torch.Generator().manual_seed(seed))
        theirs = pipe(PROMPTS, negative_prompt=NEGATIVES, latents=latents, num_inference_steps=steps,
                      guidance_scale=guidance, height=IMG, width=IMG, output_type="pt").images  # (2, 3, H, W) in [0, 1]
    mine = (mine + 1) / 2
    assert theirs.shape == mine.shape == (2, 3, IMG, IMG)
    assert mine.std() > 0.01  # an image, not a constant: the comparison below is not vacuous
    # Measured: max |diff| 1.1e-6 (leading) and 2.2e-6 (trailing) of the [0, 1] range: float rounding and
    # diffusers' fixed transformer GroupNorm eps (1e-6 vs our norm_eps 1e-5).
    assert (theirs - mine).abs().max() < 2e-5


def test_export_refuses_other_models_and_existing_folders(sd, tmp_path, capsys):
    clip = sd["clip"]
    text = sd_export(tmp_path / "text.safetensors", clip, DiffusionConfig())
    assert "class-conditional; a StableDiffusionPipeline needs a text-conditional" in one_line_error(
        ["--path_to_weights", str(_export(tmp_path / "class.safetensors", "class", None)), "--output_dir",
         str(tmp_path / "a")], capsys)
    assert "unconditional; a StableDiffusionPipeline" in one_line_error(
        ["--path_to_weights", str(_export(tmp_path / "none.safetensors", "none", None)), "--output_dir",
         str(tmp_path / "b")], capsys)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not weights")
    assert "not a readable safetensors file" in one_line_error(
        ["--path_to_weights", str(junk), "--output_dir", str(tmp_path / "c")], capsys)
    from modules.vae_io import save_vae_export

    vae_cfg = VAEConfig(img_size=IMG, vae_channels_per_block=[8, 16], norm_num_groups=4, residual_layers_per_block=1)
    vae_file = save_vae_export(build_autoencoder(vae_cfg), vae_cfg, tmp_path / "vae.safetensors", {})
    assert "is a stage-1 VAE export (stage1_vae_trainer.py's <working_directory>/model.safetensors); expected a " \
        "stage-2" in one_line_error(["--path_to_weights", str(vae_file), "--output_dir", str(tmp_path / "d")], capsys)
    # A UNet diffusers cannot express (GEGLU width 2x): the key is named, nothing is left behind.
    narrow = _export(tmp_path / "narrow.safetensors", "text", clip)
    assert "unet.transformer_dim_mult=2 cannot be expressed" in one_line_error(
        ["--path_to_weights", str(narrow), "--output_dir", str(tmp_path / "e")], capsys)
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "d", "e", "e.tmp"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert "exists; pass --overwrite" in one_line_error(
        ["--path_to_weights", str(text), "--output_dir", str(tmp_path / "taken")], capsys)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    export_diffusers.main(["--path_to_weights", str(text), "--output_dir", str(tmp_path / "taken"), "--overwrite"])
    assert (tmp_path / "taken" / "model_index.json").is_file() and not (tmp_path / "taken" / "keep.txt").exists()


# ----------------------------------------------------------------------------------------
# Import: a diffusers UNet -> stage 2
# ----------------------------------------------------------------------------------------

# The tiny stage-2 UNet of test_stage2.unet_sets, with the GEGLU width diffusers fixes at 4x.
SD_SETS = ["--set", "unet.transformer_dim_mult=4"]


def tiny_diffusers_unet(clip: Path, seed: int = 5) -> UNet2DConditionModel:
    """A UNet2DConditionModel with random weights (not zero outputs) equivalent to test_stage2's tiny UNet."""
    cfg = sd_unet_config(clip, mid_block_type="None")
    config = {k: v for k, v in unet_diffusers_config(cfg, sample_size=8).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    _perturbed(model, seed, scale=0.05)
    return model


def test_stage2_starts_from_a_diffusers_unet_folder(assets, tmp_path, monkeypatch):
    folder = tmp_path / "sd_unet"
    reference = tiny_diffusers_unet(assets["clip"])
    reference.save_pretrained(folder)
    work = tmp_path / "work"
    argv = inprocess_argv(assets, work, total_training_iterations=1, gradient_accumulation_steps=1,
                          checkpoint_iterations=1, use_ema="false", init_unet_from=str(folder)) + SD_SETS

    seen = {}
    real_unet = s2.UNet

    class Recording(real_unet):
        def forward(self, x, t, context=None, context_mask=None, class_labels=None):
            if "first" not in seen:  # the first training forward, before any update
                with torch.no_grad():
                    seen["first"] = (x.detach().clone(), t.clone(), context.detach().clone(),
                                     None if context_mask is None else context_mask.clone())
                    seen["out"] = real_unet.forward(self, x, t, context, context_mask).detach().clone()
            return real_unet.forward(self, x, t, context, context_mask, class_labels)

    monkeypatch.setattr(s2, "UNet", Recording)
    result = s2.main(argv)
    x, t, context, mask = seen["first"]
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    # The same network: diffusers' transformer GroupNorm eps (1e-6) is the only difference (measured 1.1e-5
    # on outputs of size ~2).
    assert expected.abs().max() > 0.1 and mask is not None  # an output to compare; the padding masked in both
    torch.testing.assert_close(seen["out"], expected, atol=1e-4, rtol=1e-4)

    # One AdamW step later the export differs from the init by that step: every trained tensor moved a little.
    exported = {k[len("unet."):]: v for k, v in load_file(str(result.export_path)).items() if k.startswith("unet.")}
    init = diffusers_to_our_unet_state(reference.state_dict())
    assert exported.keys() == init.keys()
    deltas = {k: (exported[k] - init[k]).abs().max().item() for k in init}
    lr = 1e-3  # test_stage2.train_sets; warm-up of 1 step: the first step runs at lr * 1 / 1
    assert max(deltas.values()) <= 1.5 * lr and sum(d > 0 for d in deltas.values()) > len(deltas) // 2
    meta = load_ldm_export(result.export_path).metadata
    assert meta["training_config"]["init_unet_from"] == str(folder)


def test_init_unet_from_a_mismatching_config_names_the_key(assets, tmp_path, capsys):
    folder = tmp_path / "sd_unet"
    tiny_diffusers_unet(assets["clip"]).save_pretrained(folder)
    base = inprocess_argv(assets, tmp_path / "w", total_training_iterations=1, init_unet_from=str(folder))
    with pytest.raises(SystemExit) as exc:  # our UNet with the 2x GEGLU diffusers cannot express
        run_main(s2.main, base)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unet.transformer_dim_mult=2 cannot be expressed" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        run_main(s2.main, base + SD_SETS + ["--set", "unet.unet_residual_layers_per_block=2"])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "layers_per_block=1 differs" in line[0], err
    assert "unet.unet_residual_layers_per_block is 2" in line[0]
    with pytest.raises(UserError, match="no config.json"):
        s2.main(base[:-2] + ["--set", f"training_args.init_unet_from={tmp_path}"] + SD_SETS)


# The unet/config.json of Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5), as the Hub has it.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def test_sd15_config_fits_the_shipped_model_config_and_conv_projections_load(tmp_path):
    from modules.diffusers_interop import check_diffusers_unet_config, load_diffusers_unet_state
    from modules.model_config import load_ldm_config

    shipped = load_ldm_config(Path(__file__).resolve().parents[1] / "configs/ldm.yaml", []).unet
    check_diffusers_unet_config(SD15_UNET_CONFIG, shipped, "sd15")  # configs/ldm.yaml's unet: is SD 1.x's
    with pytest.raises(UserError, match=r"cross_attention_dim=768 differs .*unet.text_embed_dim is 1024"):
        check_diffusers_unet_config(SD15_UNET_CONFIG, UNetConfig(text_conditioning=True, text_embed_dim=1024), "sd15")
    with pytest.raises(UserError, match="class_embed_type"):
        check_diffusers_unet_config({**SD15_UNET_CONFIG, "class_embed_type": "timestep"}, shipped, "sd15")
    # SD 1.x's transformers project with 1x1 convolutions (use_linear_projection false): the same linear map.
    clip = tmp_path / "unused"
    cfg = sd_unet_config(clip)
    config = {k: v for k, v in unet_diffusers_config(cfg, 8).items() if not k.startswith("_")}
    torch.manual_seed(0)
    theirs = _perturbed(UNet2DConditionModel(**{**config, "use_linear_projection": False}).eval(), 4, scale=0.05)
    theirs.save_pretrained(tmp_path / "pipe" / "unet")
    ours = UNet(cfg).eval()
    ours.load_state_dict(load_diffusers_unet_state(tmp_path / "pipe", cfg), strict=True)  # a pipeline folder
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([10, 900]), context),
                                   theirs(x, torch.tensor([10, 900]), encoder_hidden_states=context).sample,
                                   atol=1e-4, rtol=1e-4)


def test_init_from_our_export_or_a_pipeline_checks_model_and_schedule(sd, tmp_path):
    from modules.diffusers_interop import load_diffusers_unet_state

    diffusion = DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    weights = sd_export(tmp_path / "model.safetensors", sd["clip"], diffusion)
    export_diffusers.main(["--path_to_weights", str(weights), "--output_dir", str(tmp_path / "pipe")])
    model = load_ldm_export(weights)
    ldm = model.config
    tensors = load_file(str(weights))
    from_export = s2.initial_unet_state(str(weights), ldm, Path("ldm.yaml"))
    from_pipe = load_diffusers_unet_state(tmp_path / "pipe", ldm.unet, ldm.diffusion)
    for state in (from_export, from_pipe):  # both round trips are exact
        assert state.keys() == model.unet.state_dict().keys()
        assert all(torch.equal(state[k], tensors[f"unet.{k}"]) for k in state)
    other = LDMConfig(vae=ldm.vae, unet=ldm.unet, diffusion=DiffusionConfig())
    with pytest.raises(UserError, match=r"beta_schedule=\"scaled_linear\" but the model config has diffusion.beta_sch"):
        load_diffusers_unet_state(tmp_path / "pipe" / "unet", other.unet, other.diffusion)
    with pytest.raises(UserError, match=r"its diffusion.beta_schedule is \"scaled_linear\" but ldm.yaml has \"linear\""):
        s2.initial_unet_state(str(weights), other, Path("ldm.yaml"))
    wider = LDMConfig(vae=ldm.vae, unet=sd_unet_config(sd["clip"], num_attention_heads=4), diffusion=diffusion)
    with pytest.raises(UserError, match=r"its unet.num_attention_heads is 2 but ldm.yaml has 4"):
        s2.initial_unet_state(str(weights), wider, Path("ldm.yaml"))
    with pytest.raises(UserError, match="init_unet_from .*: not found"):
        s2.initial_unet_state(str(tmp_path / "nope"), ldm, Path("ldm.yaml"))


def test_shipped_finetune_example_is_a_valid_stage2_config():
    from modules.config import load_config

    repo = Path(__file__).resolve().parents[1]
    args = load_config(s2.Stage2Config, repo / "configs/stage2_finetune_sd15.yaml", []).training_args
    assert args.init_unet_from == "sd15/unet" and args.learning_rate == 1e-5
