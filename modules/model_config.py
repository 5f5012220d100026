"""The model config, ``configs/ldm.yaml``: the VAE, the UNet, the diffusion process and the
latent scale factor per dataset, as one strict dataclass.

``--set`` overrides whose first key is a section of this file (``vae.``, ``unet.``,
``diffusion.``, ``scaling_constants.``) change the model config; all others change the training
config (see :func:`split_overrides`), so one flag shrinks a whole run for a quick test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from modules.autoencoder import VAEConfig
from modules.config import apply_overrides, from_dict, load_yaml
from modules.errors import UserError
from modules.unet import UNetConfig

MODEL_SECTIONS = ("vae", "unet", "diffusion", "scaling_constants")


@dataclass
class DiffusionConfig:
    """The forward process the UNet is trained for (and sampled with).

    The default is DDPM's linear schedule, 1e-4 -> 0.02 over 1000 steps (Ho et al. 2020).
    """

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


@dataclass
class LDMConfig:
    """``configs/ldm.yaml``: ``vae:``, ``unet:``, ``diffusion:`` and ``scaling_constants:``."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # 1 / std of the VAE's latents per dataset (compute_vae_scaling.py --write_to_config); null = unknown.
    scaling_constants: Dict[str, Optional[float]] = field(default_factory=dict)


def split_overrides(overrides: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Separate ``--set`` overrides into (model-config ones, training-config ones) by first key."""
    model, training = [], []
    for text in overrides:
        first = text.split("=", 1)[0].split(".", 1)[0].strip()
        (model if first in MODEL_SECTIONS else training).append(text)
    return model, training


def ldm_config_from_dict(data: Mapping[str, Any], source: str, overrides: Sequence[str] = ()) -> LDMConfig:
    """Build an :class:`LDMConfig` from a raw mapping (a YAML file's, or an export's metadata)."""
    data = dict(data)
    apply_overrides(data, overrides, schema=LDMConfig)
    if overrides:
        source += " (with --set overrides)"
    return from_dict(LDMConfig, data, source=source)


def load_ldm_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> LDMConfig:
    """Read ``configs/ldm.yaml`` (or another model config) strictly, ``--set`` applied."""
    return ldm_config_from_dict(load_yaml(path), str(path), overrides)


def scale_factor_for(config: LDMConfig, dataset: str, export_metadata: Optional[Mapping[str, Any]],
                     config_path: str, vae_path: str) -> float:
    """The latent scale: ``scaling_constants[dataset]``, else the VAE export's metadata, else an error.

    Never a silent 1.0: training on unscaled latents quietly ruins a diffusion model.
    """
    value = config.scaling_constants.get(dataset)
    if value is not None:
        if value <= 0:
            raise UserError(f"{config_path}: scaling_constants.{dataset} must be > 0, got {value}")
        return float(value)
    meta_value = (export_metadata or {}).get("scaling_factor")
    if isinstance(meta_value, (int, float)) and meta_value > 0:
        return float(meta_value)
    raise UserError(
        f"no latent scale factor for dataset {dataset!r}: none in {config_path} scaling_constants and none in "
        f"{vae_path}'s metadata; run compute_vae_scaling.py --path_to_pretrained_weights {vae_path} --dataset {dataset} "
        f"(add --write_to_config to store it in the config)"
    )
