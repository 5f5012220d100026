"""The diffusers ecosystem, both ways: our UNet <-> ``UNet2DConditionModel``, and a stage-2 export
-> a ``StableDiffusionPipeline`` folder.

Our text UNet is Stable Diffusion's ``UNet2DConditionModel`` with linear transformer projections
(:mod:`modules.unet`), so the weights map one to one: the names below, with our fused q/k/v
(self-attention) and k/v (cross-attention) projections split or joined. The VAE needs no renaming
(:func:`modules.autoencoder.export_diffusers_vae` / ``load_diffusers_vae``), the text encoder is a
Hugging Face ``CLIPTextModel`` already.

- :func:`unet_diffusers_config` is the one config mapping: our ``unet:`` section -> the
  ``UNet2DConditionModel`` config.json that describes the same network. Exporting writes it;
  :func:`check_diffusers_unet_config` compares a folder's config.json with it key by key, so
  stage 2 can start from a diffusers UNet folder (``training_args.init_unet_from``).
- :func:`diffusers_to_our_unet_state` / :func:`our_unet_state_to_diffusers`: the weight names.
- :func:`export_stable_diffusion_pipeline`: unet/, vae/, text_encoder/, tokenizer/, scheduler/
  and model_index.json (no safety checker) for ``StableDiffusionPipeline.from_pretrained``.

Two numeric differences remain, both small and both diffusers' hard-coded constants: the
transformer's GroupNorm has eps 1e-6 in diffusers (ours: ``unet.norm_eps``) and its LayerNorms
1e-5. And one of behaviour: our model masks padded caption tokens out of cross-attention (it is
trained so), ``StableDiffusionPipeline`` always attends to all ``model_max_length`` positions,
padding included; a prompt that fills the text encoder's context gives the same image either way,
a shorter one a somewhat different image. (Also: ``StableDiffusionPipeline`` rewrites a scheduler's
``steps_offset`` 0 to 1 when it loads it, shifting "leading" timesteps by one; set the scheduler again
after loading, or use "trailing" spacing, to sample exactly as our DDIM does.)

Files are read and written only by the functions named ``load_*``, ``read_*`` and ``export_*``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

# The weight-file reader is the VAE's: the same diffusers file names.
from modules.autoencoder import _read_diffusers_weights, export_diffusers_vae
from modules.errors import UserError
from modules.model_config import DiffusionConfig
from modules.unet import UNetConfig

__all__ = [
    "check_diffusers_schedule",
    "check_diffusers_unet_config",
    "diffusers_to_our_unet_state",
    "export_stable_diffusion_pipeline",
    "load_diffusers_unet_state",
    "our_unet_state_to_diffusers",
    "scheduler_config",
    "unet_diffusers_config",
]

logger = logging.getLogger("ldm")

# diffusers name fragment <-> ours; True: anchored at the start of the key.
_RENAMES: Tuple[Tuple[str, str, bool], ...] = (
    ("time_embedding.", "time_embed.", True),
    ("conv_norm_out.", "norm_out.", True),
    ("mid_block.attentions.0.", "mid_block.attention.", True),
    (".transformer_blocks.", ".blocks.", False),
    (".to_out.0.", ".to_out.", False),
    (".ff.net.0.proj.", ".ff.proj_in.", False),
    (".ff.net.2.", ".ff.proj_out.", False),
    (".downsamplers.0.", ".downsample.", False),
    (".upsamplers.0.", ".upsample.", False),
)
# Our fused projections: (our name, diffusers' names in concatenation order).
_FUSED = (("attn1.to_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")), ("attn2.to_kv", ("attn2.to_k", "attn2.to_v")))
_DOWN = {"AttnDown": "CrossAttnDownBlock2D", "Down": "DownBlock2D"}
_UP = {"AttnUp": "CrossAttnUpBlock2D", "Up": "UpBlock2D"}
_MID = {"AttnMid": "UNetMidBlock2DCrossAttn", "None": None}  # our "Mid" (2 ResBlocks) has no diffusers twin
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
# Keys of a UNet2DConditionModel config that change no weight or output in float32/bf16.
_IGNORED_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout",
                 "use_linear_projection", "upcast_attention")


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------

def _rename(key: str, to_ours: bool) -> str:
    for theirs, ours, anchored in _RENAMES:
        old, new = (theirs, ours) if to_ours else (ours, theirs)
        key = re.sub(("^" if anchored else "") + re.escape(old), new, key)
    return key


def diffusers_to_our_unet_state(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict -> ours: names renamed, q/k/v (self) and k/v (cross) fused.

    SD 1.x's 1x1-convolution transformer projections (``use_linear_projection: false``, weights
    (C, C, 1, 1)) become the equivalent linear weights (C, C): a 1x1 convolution is the same
    linear map at every position.
    """
    out = {_rename(key, to_ours=True): value for key, value in state_dict.items()}
    for key in [k for k in out if re.search(r"\.attentions?\.(\d+\.)?proj_(in|out)\.weight$", k)]:
        if out[key].ndim == 4:
            out[key] = out[key][:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
    for fused, parts in _FUSED:
        for key in [k for k in out if k.endswith(f"{parts[0]}.weight") or k.endswith(f"{parts[0]}.bias")]:
            base, suffix = key[: key.rindex(parts[0])], key.rsplit(".", 1)[1]
            out[f"{base}{fused}.{suffix}"] = torch.cat([out.pop(f"{base}{part}.{suffix}") for part in parts])
    return out


def our_unet_state_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`diffusers_to_our_unet_state` (linear projections kept linear)."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for fused, parts in _FUSED:
            if re.search(rf"{re.escape(fused)}\.(weight|bias)$", key):
                base, suffix = key[: key.rindex(fused)], key.rsplit(".", 1)[1]
                for part, chunk in zip(parts, value.chunk(len(parts))):
                    out[_rename(f"{base}{part}.{suffix}", to_ours=False)] = chunk.contiguous()
                break
        else:
            out[_rename(key, to_ours=False)] = value
    return out


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

def _expressible(cfg: UNetConfig, where: str) -> None:
    """Our UNet configs that no ``UNet2DConditionModel`` describes: a UserError naming the key."""
    checks = [
        ("text_conditioning", cfg.text_conditioning, "true (a diffusers UNet2DConditionModel cross-attends to text)"),
        ("class_conditioning", not cfg.class_conditioning, "false"),
        ("mid_block_type", cfg.mid_block_type in _MID, "AttnMid or None"),
        ("transformer_dim_mult", cfg.transformer_dim_mult == 4, "4"),
        ("attention_bias", not cfg.attention_bias, "false"),
        ("unet_up_down_factor", cfg.unet_up_down_factor == 2, "2"),
        ("unet_up_down_kernel_size", cfg.unet_up_down_kernel_size == 3, "3"),
        ("time_embed_start_dim", cfg.time_embed_start_dim == cfg.unet_channels_per_block[0],
         f"unet_channels_per_block[0] = {cfg.unet_channels_per_block[0]}"),
    ]
    for key, ok, needed in checks:
        if not ok:
            value = json.dumps(getattr(cfg, key))
            raise UserError(f"{where}: unet.{key}={value} cannot be expressed as a diffusers UNet2DConditionModel "
                            f"(needs {needed})")


def _config_rows(cfg: UNetConfig) -> List[Tuple[str, Optional[str], Any]]:
    """(diffusers key, our unet key or None, value) for every key that decides the network."""
    return [
        ("in_channels", "in_channels", cfg.in_channels),
        ("out_channels", "out_channels", cfg.out_channels),
        ("down_block_types", "down_block_types", [_DOWN[k] for k in cfg.down_block_types]),
        ("mid_block_type", "mid_block_type", _MID.get(cfg.mid_block_type, cfg.mid_block_type)),
        ("up_block_types", "up_block_types", [_UP[k] for k in cfg.up_block_types]),
        ("block_out_channels", "unet_channels_per_block", list(cfg.unet_channels_per_block)),
        ("layers_per_block", "unet_residual_layers_per_block", cfg.unet_residual_layers_per_block),
        ("transformer_layers_per_block", "transformer_blocks_per_layer", cfg.transformer_blocks_per_layer),
        # diffusers' SD configs call the number of heads attention_head_dim (a historical name).
        ("attention_head_dim", "num_attention_heads", cfg.num_attention_heads),
        ("cross_attention_dim", "text_embed_dim", cfg.text_embed_dim),
        ("time_embedding_dim", "time_embed_proj_dim", cfg.time_embed_proj_dim),
        ("flip_sin_to_cos", "flip_sin_to_cos", cfg.flip_sin_to_cos),
        ("freq_shift", "freq_shift", cfg.freq_shift),
        ("norm_num_groups", "groupnorm_groups", cfg.groupnorm_groups),
        ("norm_eps", "norm_eps", cfg.norm_eps),
        # What our UNet is by construction (diffusers' defaults for SD 1.x).
        ("act_fn", None, "silu"),
        ("center_input_sample", None, False),
        ("downsample_padding", None, 1),
        ("mid_block_scale_factor", None, 1),
        ("only_cross_attention", None, False),
        ("dual_cross_attention", None, False),
        ("num_attention_heads", None, None),
        ("class_embed_type", None, None),
        ("num_class_embeds", None, None),
        ("addition_embed_type", None, None),
        ("encoder_hid_dim", None, None),
        ("encoder_hid_dim_type", None, None),
        ("time_embedding_type", None, "positional"),
        ("time_embedding_act_fn", None, None),
        ("timestep_post_act", None, None),
        ("time_cond_proj_dim", None, None),
        ("resnet_time_scale_shift", None, "default"),
        ("resnet_skip_time_act", None, False),
        ("resnet_out_scale_factor", None, 1.0),
        ("conv_in_kernel", None, 3),
        ("conv_out_kernel", None, 3),
        ("projection_class_embeddings_input_dim", None, None),
        ("class_embeddings_concat", None, False),
        ("mid_block_only_cross_attention", None, None),
        ("cross_attention_norm", None, None),
        ("attention_type", None, "default"),
        ("reverse_transformer_layers_per_block", None, None),
    ]


def unet_diffusers_config(cfg: UNetConfig, sample_size: int, where: str = "unet") -> Dict[str, Any]:
    """The ``UNet2DConditionModel`` config.json of the network ``cfg`` describes (latents of side
    ``sample_size``); a config diffusers cannot express is a UserError naming our key."""
    _expressible(cfg, where)
    config: Dict[str, Any] = {"_class_name": "UNet2DConditionModel", "sample_size": int(sample_size)}
    config.update({key: value for key, _, value in _config_rows(cfg)})
    config.update({"use_linear_projection": True, "upcast_attention": False, "dropout": cfg.dropout})
    return config


def _per_block(value: Any, levels: int) -> Any:
    """diffusers allows one value per level where ours has one for all: equal entries collapse."""
    if isinstance(value, (list, tuple)) and len(value) == levels and len({json.dumps(v) for v in value}) == 1:
        return value[0]
    return value


def check_diffusers_unet_config(raw: Mapping[str, Any], cfg: UNetConfig, source: str) -> None:
    """A diffusers ``UNet2DConditionModel`` config.json describes the same network as our ``unet:``
    section, or a UserError names the first key that differs (both names: diffusers' and ours)."""
    if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise UserError(f"{source}: _class_name={raw.get('_class_name')!r}; expected a UNet2DConditionModel")
    _expressible(cfg, "the unet: section of the model config")
    levels = len(cfg.unet_channels_per_block)
    defaults = {key: value for key, _, value in _config_rows(UNetConfig(text_conditioning=True))}
    defaults.update({"time_embedding_dim": None, "layers_per_block": 2, "cross_attention_dim": 1280,
                     "norm_eps": 1e-5, "freq_shift": 0, "flip_sin_to_cos": True})  # diffusers' defaults
    for key, ours, expected in _config_rows(cfg):
        value = raw.get(key, defaults.get(key))
        if key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
                   "only_cross_attention"):
            value = _per_block(value, levels)
        if key == "time_embedding_dim" and value is None:
            value = 4 * list(raw.get("block_out_channels", [320]))[0]  # diffusers' default
        if key == "mid_block_only_cross_attention" and value is None:
            continue
        same = (json.dumps(value) == json.dumps(expected)
                or (isinstance(value, (int, float)) and isinstance(expected, (int, float))
                    and not isinstance(value, bool) and float(value) == float(expected)))
        if not same:
            mine = f"; our unet.{ours} is {json.dumps(getattr(cfg, ours))}" if ours else ""
            raise UserError(f"{source}: {key}={json.dumps(value)} differs from the model config "
                            f"(needs {json.dumps(expected)}{mine})")
    unknown = sorted(set(raw) - {key for key, _, _ in _config_rows(cfg)} - set(_IGNORED_KEYS)
                     - {"addition_time_embed_dim", "addition_embed_type_num_heads"})
    if raw.get("addition_time_embed_dim") is not None or unknown:
        raise UserError(f"{source}: keys our UNet cannot load: {', '.join(unknown or ['addition_time_embed_dim'])}")


def check_diffusers_schedule(raw: Mapping[str, Any], diffusion: DiffusionConfig, source: str) -> None:
    """A diffusers scheduler config trains/samples the schedule of our ``diffusion:`` section, or a
    UserError names the key (a UNet fine-tuned on another schedule than it learned would unlearn it)."""
    expected = scheduler_config(diffusion)
    for key, ours in (("num_train_timesteps", "num_train_timesteps"), ("beta_schedule", "beta_schedule"),
                      ("beta_start", "beta_start"), ("beta_end", "beta_end"), ("prediction_type", "prediction_type")):
        value = raw.get(key, {"prediction_type": "epsilon"}.get(key))
        if key in ("beta_start", "beta_end") and expected["beta_schedule"] == "squaredcos_cap_v2":
            continue  # the cosine schedule does not use them
        if value != expected[key] and not (isinstance(value, float) and abs(value - expected[key]) < 1e-12):
            raise UserError(f"{source}: {key}={json.dumps(value)} but the model config has diffusion.{ours}: "
                            f"{json.dumps(getattr(diffusion, ours))} (needs {json.dumps(expected[key])})")


def load_diffusers_unet_state(path: Path, cfg: UNetConfig,
                              diffusion: Optional[DiffusionConfig] = None) -> Dict[str, torch.Tensor]:
    """Our UNet's state dict (float32) from a diffusers ``UNet2DConditionModel`` folder (or a
    pipeline folder with ``unet/``), after :func:`check_diffusers_unet_config` against ``cfg``.

    With ``diffusion``, the pipeline's ``scheduler/scheduler_config.json`` (beside ``unet/``), when
    there is one, must describe the same schedule (:func:`check_diffusers_schedule`).
    """
    folder = path if (path / "config.json").is_file() else path / "unet"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json (nor unet/config.json); expected a diffusers UNet2DConditionModel "
                        "folder or one of our stage-2 exports")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file}: cannot read JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: expected a JSON object")
    check_diffusers_unet_config(raw, cfg, str(config_file))
    scheduler_file = folder.parent / "scheduler" / "scheduler_config.json"
    if diffusion is not None and scheduler_file.is_file():
        try:
            scheduler = json.loads(scheduler_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{scheduler_file}: cannot read JSON ({err})") from None
        check_diffusers_schedule(scheduler, diffusion, str(scheduler_file))
    return {k: v.float() for k, v in diffusers_to_our_unet_state(_read_diffusers_weights(folder)).items()}


# ----------------------------------------------------------------------------------------
# The Stable Diffusion pipeline folder
# ----------------------------------------------------------------------------------------

def scheduler_config(diffusion: DiffusionConfig, timestep_spacing: str = "leading") -> Dict[str, Any]:
    """A diffusers ``DDIMScheduler`` config of our training schedule, set as our DDIM samples
    (``modules.diffusion.DDIMSampler``: no clipping, abar_0 after the last step, no offset)."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": diffusion.num_train_timesteps,
        "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "beta_schedule": _BETA_SCHEDULES[diffusion.beta_schedule],
        "trained_betas": None,
        "prediction_type": diffusion.prediction_type,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": False,
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": timestep_spacing,
        "rescale_betas_zero_snr": False,
    }


def _model_index() -> Dict[str, Any]:
    index: Dict[str, Any] = {"_class_name": "StableDiffusionPipeline"}
    try:
        from importlib.metadata import version

        index["_diffusers_version"] = version("diffusers")
    except Exception:  # diffusers is not needed to write the folder, only to read it
        pass
    index.update({
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return index


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def export_stable_diffusion_pipeline(model, out: Path, where: str, timestep_spacing: str = "leading") -> Path:
    """Write ``model`` (a text-conditional :class:`modules.ldm_io.LatentDiffusion`) as a
    ``StableDiffusionPipeline`` folder ``out`` (which must not exist yet or be empty).

    unet/: the UNet (:func:`unet_diffusers_config`, :func:`our_unet_state_to_diffusers`);
    vae/: the autoencoder with ``scaling_factor`` (and ``shift_factor``) of the latents;
    text_encoder/ + tokenizer/: the CLIP text model and tokenizer; scheduler/: :func:`scheduler_config`;
    model_index.json without safety checker or feature extractor. ``where`` names the source in errors.
    """
    if model.conditioning != "text":
        kind = "class-conditional" if model.conditioning == "class" else "unconditional"
        raise UserError(f"{where} is {kind}; a StableDiffusionPipeline needs a text-conditional model")
    factor = model.vae.downsample_factor
    unet_config = unet_diffusers_config(model.config.unet, model.img_size // factor, where)
    from safetensors.torch import save_file

    from modules.autoencoder import AutoencoderKL

    if not isinstance(model.vae, AutoencoderKL):
        raise UserError(f"{where}: a VQ autoencoder (vae.quantize: true) cannot be a diffusers AutoencoderKL")
    out.mkdir(parents=True, exist_ok=True)
    unet_state = our_unet_state_to_diffusers({k: v.detach().float().cpu().contiguous()
                                              for k, v in model.unet.state_dict().items()})
    (out / "unet").mkdir()
    save_file(unet_state, str(out / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "unet" / "config.json", unet_config)

    vae = model.vae
    previous = vae.shift_factor
    vae.shift_factor = float(model.shift_factor) if model.shift_factor else None
    try:
        export_diffusers_vae(vae, out / "vae", scaling_factor=model.scaling_factor)
    finally:
        vae.shift_factor = previous
    if model.shift_factor:
        logger.warning("%s: the latents have shift_factor %s, written to vae/config.json; StableDiffusionPipeline "
                       "does not apply it (its images will differ), pipelines of SD3/Flux-style VAEs do",
                       where, model.shift_factor)

    model.text_encoder.model.save_pretrained(out / "text_encoder", safe_serialization=True)
    model.text_encoder.tokenizer.save_pretrained(out / "tokenizer")
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(model.config.diffusion, timestep_spacing))
    _write_json(out / "model_index.json", _model_index())
    return out

