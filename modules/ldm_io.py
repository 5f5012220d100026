"""The trained latent diffusion model as one self-describing file: export, load and generate.

Stage 2 writes ``<working_directory>/model.safetensors`` with :func:`save_ldm_export`; everything
``inference_ldm.py`` needs is inside it (Latent Diffusion, Rombach et al. 2022, sec. 3):

- tensors ``unet.*`` (the EMA UNet), ``vae.*`` (the frozen first-stage autoencoder) and, unless the
  text encoder is a frozen hub model, ``text_encoder.*`` (a ``CLIPTextModel`` state dict);
- metadata (JSON values, see :func:`modules.export.export_safetensors`): ``model_config`` (the
  resolved ``configs/ldm.yaml``: ``vae``, ``unet``, ``diffusion`` (the noise schedule and
  prediction type) and ``scaling_constants``), ``scaling_factor`` and ``shift_factor`` of the
  latents, ``conditioning`` (``text`` | ``class`` | ``none``), ``training_dataset``,
  ``img_size``, ``class_names`` and ``text_encoder`` (``{"source": "embedded", "name", "files"}``
  with the tokenizer and config files as text, or ``{"source": "hub", "name"}``), plus whatever
  the trainer adds (training config, step, producer).

:class:`LatentDiffusion` bundles the networks with the scale and the schedule and generates
images: text, class or unconditional, with DDPM, DDIM, DPM-Solver++ 2M, Euler, Euler ancestral or
LMS (optionally on Karras sigmas), classifier-free guidance (Ho & Salimans 2022) with an optional
negative prompt as the unconditional branch, and img2img (SDEdit, Meng et al. 2022: noise the
encoded image to an intermediate step and denoise from there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from modules.autoencoder import AutoencoderKL, VQModel, build_autoencoder, load_vae_state_dict_strict
from modules.config import to_dict
from modules.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    EulerAncestralSampler,
    EulerSampler,
    LMSSampler,
    NoiseSchedule,
    Sampler,
    classifier_free_guidance,
    sample_loop,
)
from modules.errors import UserError
from modules.latent_cache import vae_moments
from modules.model_config import LDMConfig, ldm_config_from_dict
from modules.export import export_safetensors, read_export
from modules.unet import UNet, trim_padding

__all__ = [
    "CONDITIONINGS",
    "LDM_EXPORT_KIND",
    "LatentDiffusion",
    "build_sampler",
    "load_ldm_export",
    "save_ldm_export",
    "text_encoder_export",
]

logger = logging.getLogger("ldm")

LDM_EXPORT_KIND = "ldm"
CONDITIONINGS = ("text", "class", "none")
# Sampler names -> classes. ddim/ddpm default to "leading" timestep spacing, the sigma-space
# samplers (DPM-Solver++ 2M, Euler, Euler ancestral, LMS) to "linspace": diffusers' defaults for each.
_SAMPLER_CLASSES = {
    "ddim": DDIMSampler,
    "ddpm": DDPMSampler,
    "dpmpp_2m": DPMSolverMultistepSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "lms": LMSSampler,
}
SAMPLERS = tuple(_SAMPLER_CLASSES)
KARRAS_SAMPLERS = ("dpmpp_2m", "euler", "euler_a", "lms")
# Files of a Hugging Face tokenizer/config folder that are embedded as text (weights are tensors).
_TEXT_SUFFIXES = (".json", ".txt", ".model")

Autoencoder = Union[AutoencoderKL, VQModel]


def build_sampler(diffusion, sampler: str, eta: float = 0.0, timestep_spacing: Optional[str] = None,
                  karras_sigmas: bool = False) -> Sampler:
    """The sampler named ``sampler`` (one of :data:`SAMPLERS`) over the training schedule ``diffusion``
    (a DiffusionConfig).

    ``eta`` is DDIM's noise scale (the other samplers ignore it); ``timestep_spacing`` None means the sampler's own
    default (``leading`` for ddim/ddpm, ``linspace`` for the others, as in diffusers);
    ``karras_sigmas`` puts dpmpp_2m / euler / euler_a / lms on the Karras et al. 2022 noise levels.
    """
    if sampler not in _SAMPLER_CLASSES:
        raise UserError(f"unknown sampler {sampler!r}; expected one of: {', '.join(SAMPLERS)}")
    if karras_sigmas and sampler not in KARRAS_SAMPLERS:
        raise UserError(f"karras_sigmas works with the samplers {', '.join(KARRAS_SAMPLERS)}, not {sampler!r}")
    schedule = NoiseSchedule(diffusion.num_train_timesteps, diffusion.beta_schedule, diffusion.beta_start,
                             diffusion.beta_end)
    spacing = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    if sampler == "ddim":
        return DDIMSampler(schedule, diffusion.prediction_type, eta=eta, **spacing)
    if sampler == "ddpm":
        return DDPMSampler(schedule, diffusion.prediction_type, **spacing)
    return _SAMPLER_CLASSES[sampler](schedule, diffusion.prediction_type, use_karras_sigmas=karras_sigmas, **spacing)


# ----------------------------------------------------------------------------------------
# The model bundle
# ----------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def inference_device(device: Optional[str], dtype: str = "auto") -> Tuple[torch.device, torch.dtype]:
    """``--device`` / ``--dtype`` of the tools that sample (inference_ldm.py, app.py, evaluate_ldm.py).

    ``device`` None is cuda when there is one, else cpu; ``dtype`` "auto" is float32 on a CPU and
    bf16 (fp16 where the GPU lacks it) on a GPU. A device that is not there is a UserError."""
    try:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine has no CUDA GPU that PyTorch can use; "
                            "use --device cpu (or leave --device out)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if dtype != "auto":
        return dev, DTYPES[dtype]
    if dev.type == "cpu":
        return dev, torch.float32
    return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclasses.dataclass
class LatentDiffusion:
    """UNet + autoencoder (+ text encoder) + latent scale + schedule: what generation needs.

    Latents the UNet sees are ``(z - shift_factor) * scaling_factor`` (shift 0 unless the VAE
    defines one), with z the autoencoder's latent; ``img_size`` is the training resolution.
    The modules are used as they are (device, dtype, train/eval mode are the caller's).
    """

    unet: UNet
    vae: Autoencoder
    text_encoder: Optional[torch.nn.Module]
    config: LDMConfig
    scaling_factor: float
    shift_factor: float
    conditioning: str
    img_size: int
    class_names: Optional[List[str]] = None
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        """(C, h, w) of the latents of an ``img_size`` image."""
        f = self.vae.downsample_factor
        return self.vae.latent_channels, self.img_size // f, self.img_size // f

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "LatentDiffusion":
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    # -- latents <-> images ----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), float32 (posterior mean)."""
        mean, _ = vae_moments(self.vae, images)
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], float32."""
        param = next(self.vae.parameters())
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(device=param.device, dtype=param.dtype)).float().clamp(-1, 1)

    # -- conditioning ------------------------------------------------------------------------
    def _unet_inputs(self, batch_size: int, prompts: Optional[Sequence[str]], negative_prompts: Optional[Sequence[str]],
                     class_labels: Optional[Sequence[int]], device: torch.device,
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(conditional, unconditional) keyword arguments of the UNet for a batch."""
        if self.conditioning == "text":
            if self.text_encoder is None:
                raise UserError("this model is text-conditional but has no text encoder")
            if prompts is None or len(prompts) != batch_size:
                raise UserError(f"a text-conditional model needs {batch_size} prompts, got "
                                f"{None if prompts is None else len(prompts)}")
            negatives = list(negative_prompts) if negative_prompts is not None else [""] * batch_size
            if len(negatives) != batch_size:
                raise UserError(f"need {batch_size} negative prompts, got {len(negatives)}")
            # One encoder pass for both branches.
            hidden, mask = self.text_encoder(list(prompts) + negatives)  # (2B, L, D), (2B, L)
            hidden, mask = hidden.to(device), mask.to(device)
            return ({"context": hidden[:batch_size], "context_mask": mask[:batch_size]},
                    {"context": hidden[batch_size:], "context_mask": mask[batch_size:]})
        if prompts is not None or negative_prompts is not None:
            kind = "class-conditional" if self.conditioning == "class" else "unconditional"
            raise UserError(f"this model is {kind}; it takes no prompt")
        if self.conditioning == "class":
            if class_labels is None or len(class_labels) != batch_size:
                raise UserError(f"a class-conditional model needs {batch_size} class labels")
            num_classes = self.unet.config.num_classes
            for label in class_labels:
                if not 0 <= int(label) < num_classes:
                    raise UserError(f"class label {label} is outside [0, {num_classes - 1}]")
            labels = torch.as_tensor([int(v) for v in class_labels], dtype=torch.long, device=device)
            null = torch.full_like(labels, self.unet.null_class_label)
            return {"class_labels": labels}, {"class_labels": null}
        if class_labels is not None:
            raise UserError("this model is unconditional; it takes no class label")
        return {}, {}

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        num_images: int,
        prompts: Optional[Sequence[str]] = None,
        negative_prompts: Optional[Sequence[str]] = None,
        class_labels: Optional[Sequence[int]] = None,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        timestep_spacing: Optional[str] = None,
        karras_sigmas: bool = False,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        init_images: Optional[torch.Tensor] = None,
        strength: float = 1.0,
        autocast=None,
    ) -> torch.Tensor:
        """Sample ``num_images`` images, (B, 3, img_size, img_size) float32 in [-1, 1].

        Args:
            prompts / negative_prompts: one per image (text models); the negative prompt (default
                ``""``) is the unconditional branch of guidance.
            class_labels: one per image (class models); the null class is the unconditional branch.
            guidance_scale: classifier-free guidance weight w of ``uncond + w (cond - uncond)``;
                1 (or an unconditional model) runs the conditional branch alone.
            sampler / num_inference_steps / eta / timestep_spacing / karras_sigmas: one of
                :data:`SAMPLERS` (``ddim``, ``ddpm``, ``dpmpp_2m``, ``euler``, ``euler_a``, ``lms``) over
                that many steps (:func:`build_sampler`); ``eta`` is DDIM's noise scale (0: deterministic);
                ``timestep_spacing`` None is the sampler's default; ``karras_sigmas`` the Karras noise
                levels (not for ddim/ddpm).
            generator: source of every random draw (seeded: same images for the same seed); a list of
                ``num_images`` generators gives each image its own draws, independent of the batch.
            init_images: (B, 3, H, W) in [-1, 1] for img2img with ``strength`` in [0, 1].
            autocast: optional context-manager factory wrapping each UNet call (mixed precision).
        """
        param = next(self.unet.parameters())
        device = param.device
        cond, uncond = self._unet_inputs(num_images, prompts, negative_prompts, class_labels, device)
        guided = self.conditioning != "none" and guidance_scale != 1.0
        if guided:  # one UNet pass on the doubled batch: [uncond; cond]
            merged = _trimmed({key: torch.cat([uncond[key], cond[key]]) for key in cond})
        cond = _trimmed(cond)
        sampling = build_sampler(self.config.diffusion, sampler, eta, timestep_spacing, karras_sigmas)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast() if autocast is not None else contextlib.nullcontext():
                if not guided:
                    return self.unet(x, t, **cond).float()
                out = self.unet(torch.cat([x, x]), torch.cat([t, t]), **merged).float()  # (2B, C, h, w)
            out_uncond, out_cond = out.chunk(2)
            return classifier_free_guidance(out_cond, out_uncond, guidance_scale)

        init = None
        if init_images is not None:
            if init_images.shape[0] != num_images:
                raise UserError(f"got {init_images.shape[0]} init images for {num_images} images")
            init = self.encode_images(init_images.to(device))
        shape = None if init is not None else (num_images, *self.latent_shape)
        latents = sample_loop(model_fn, sampling, shape, num_inference_steps, generator=generator, device=device,
                              dtype=torch.float32, init=init, strength=strength if init is not None else 1.0)
        return self.decode_latents(latents)


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

def text_encoder_export(text_encoder, source_name: str, embed: bool,
                        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, metadata entry) describing a :class:`modules.text_encoder.TextEncoder` in an export.

    ``embed=False`` (a frozen hub model) stores only ``source_name``; ``embed=True`` (a local folder,
    or a trained encoder) stores the weights (``state_dict``, default the module's own, as float32)
    and the tokenizer + config files as text, so the export alone rebuilds it.
    """
    if not embed:
        return {}, {"source": "hub", "name": source_name}
    files: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder.tokenizer.save_pretrained(tmp)
        text_encoder.model.config.save_pretrained(tmp)
        for file in sorted(Path(tmp).iterdir()):
            if file.is_file() and file.suffix in _TEXT_SUFFIXES:
                files[file.name] = file.read_text(encoding="utf-8")
    state = state_dict if state_dict is not None else text_encoder.model.state_dict()
    tensors = {f"text_encoder.{k}": v.detach().float().cpu() for k, v in state.items()}
    return tensors, {"source": "embedded", "name": source_name, "files": files}


def save_ldm_export(
    path: Union[str, Path],
    unet_state: Mapping[str, torch.Tensor],
    vae_state: Mapping[str, torch.Tensor],
    config: LDMConfig,
    scaling_factor: float,
    shift_factor: float,
    conditioning: str,
    training_dataset: str,
    img_size: int,
    text_encoder: Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]] = None,
    class_names: Optional[Sequence[str]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write the whole latent diffusion model to one safetensors file (kind ``"ldm"``).

    Args:
        unet_state / vae_state: plain (unwrapped) state dicts; the UNet's is the EMA copy.
        config: the resolved model config; its ``vae`` section must describe ``vae_state``.
        scaling_factor / shift_factor: latents = (z - shift) * scale.
        conditioning: ``text`` | ``class`` | ``none``; text needs ``text_encoder`` from
            :func:`text_encoder_export`.
        metadata: extra JSON-encodable keys (training config, step, producer).
    """
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    if conditioning == "text" and text_encoder is None:
        raise ValueError("a text-conditional export needs its text encoder")
    tensors: Dict[str, torch.Tensor] = {}
    tensors.update({f"unet.{k}": v for k, v in unet_state.items()})
    tensors.update({f"vae.{k}": v for k, v in vae_state.items()})
    meta: Dict[str, Any] = dict(metadata or {})
    if text_encoder is not None:
        text_tensors, text_meta = text_encoder
        tensors.update(text_tensors)
        meta["text_encoder"] = text_meta
    meta.update({
        "model_config": to_dict(config),
        "scaling_factor": float(scaling_factor),
        "shift_factor": float(shift_factor),
        "conditioning": conditioning,
        "training_dataset": training_dataset,
        "img_size": int(img_size),
        "class_names": list(class_names) if class_names is not None else None,
    })
    return export_safetensors(tensors, path, kind=LDM_EXPORT_KIND, metadata=meta)


# ----------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------

def _split_tensors(tensors: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    parts: Dict[str, Dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for name, tensor in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix not in parts:
            raise UserError(f"unexpected tensor {name!r} in the export (expected unet.*, vae.*, text_encoder.*)")
        parts[prefix][rest] = tensor
    return parts


def _load_text_encoder(entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: Path,
                       cache_dir: Optional[Union[str, Path]]):
    from modules.text_encoder import TextEncoder

    if entry.get("source") == "hub":
        return TextEncoder(entry["name"], cache_dir=cache_dir)
    if entry.get("source") != "embedded" or not isinstance(entry.get("files"), Mapping):
        raise UserError(f"{path}: the text_encoder entry of the metadata is not understood: {dict(entry)!r}")
    if not tensors:
        raise UserError(f"{path}: the metadata says the text encoder is embedded but there are no "
                        "text_encoder.* tensors")
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in entry["files"].items():
            if Path(name).name != name:
                raise UserError(f"{path}: bad embedded file name {name!r}")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"))
        return TextEncoder(tmp, local_files_only=True)


def load_ldm_export(
    path: Union[str, Path],
    fallback_config: Optional[LDMConfig] = None,
    text_encoder_cache_dir: Optional[Union[str, Path]] = None,
) -> LatentDiffusion:
    """Rebuild a :class:`LatentDiffusion` (float32, CPU, eval mode) from a stage-2 export.

    The export's own ``model_config`` describes the weights and is used; ``fallback_config`` is
    used only for a file that carries none. Every tensor must fit its network exactly.
    """
    path = Path(path)
    tensors, meta = read_export(path, expected_kind=LDM_EXPORT_KIND)
    if "model_config" in meta:
        config = ldm_config_from_dict(meta["model_config"], f"{path} (metadata model_config)")
    elif fallback_config is not None:
        config = fallback_config
    else:
        raise UserError(f"{path}: no model_config in its metadata (not written by stage2_diffusion_trainer.py); "
                        "pass --model_config with the config it was trained with")
    for key in ("scaling_factor", "conditioning", "img_size"):
        if key not in meta:
            raise UserError(f"{path}: metadata lacks {key!r}; re-export it with stage2_diffusion_trainer.py")
    conditioning = meta["conditioning"]
    if conditioning not in CONDITIONINGS:
        raise UserError(f"{path}: unknown conditioning {conditioning!r} in the metadata")
    parts = _split_tensors(tensors)

    unet = UNet(config.unet)
    try:
        unet.load_state_dict(parts["unet"], strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: the unet.* tensors do not fit the unet config ({str(err).splitlines()[0]})") from None
    vae = build_autoencoder(config.vae)
    load_vae_state_dict_strict(vae, parts["vae"], f"{path} (vae.*)")

    text_encoder = None
    if conditioning == "text":
        if "text_encoder" not in meta:
            raise UserError(f"{path}: a text-conditional export without a text_encoder entry in its metadata")
        text_encoder = _load_text_encoder(meta["text_encoder"], parts["text_encoder"], path, text_encoder_cache_dir)
        if text_encoder.hidden_size != config.unet.text_embed_dim:
            raise UserError(f"{path}: text encoder width {text_encoder.hidden_size} != unet.text_embed_dim "
                            f"{config.unet.text_embed_dim}")
        text_encoder.eval()
    shift = meta.get("shift_factor") or 0.0
    return LatentDiffusion(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder, config=config,
        scaling_factor=float(meta["scaling_factor"]), shift_factor=float(shift), conditioning=conditioning,
        img_size=int(meta["img_size"]), class_names=meta.get("class_names"), metadata=meta,
    )


def _trimmed(unet_inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The UNet's keywords with the text context cut to its longest caption (:func:`modules.unet.trim_padding`):
    once per batch here, one host read of the mask, rather than in each of the sampler's UNet calls."""
    if "context" not in unet_inputs:
        return unet_inputs
    context, mask = trim_padding(unet_inputs["context"], unet_inputs["context_mask"])
    return {**unet_inputs, "context": context, "context_mask": mask}

