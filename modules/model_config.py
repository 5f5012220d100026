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


def split_overrides(overrides: Sequence[str], training_sections: Optional[Sequence[str]] = None,
                    ) -> Tuple[List[str], List[str]]:
    """Separate ``--set`` overrides into (model-config ones, training-config ones) by first key.

    With ``training_sections`` (the top-level keys of the trainer's training YAML), a first key
    that is a section of neither file is a :class:`UserError` listing the sections of both.
    """
    model, training = [], []
    for text in overrides:
        first = text.split("=", 1)[0].split(".", 1)[0].strip()
        if first in MODEL_SECTIONS:
            model.append(text)
            continue
        if training_sections is not None and "=" in text and first and first not in training_sections:
            raise UserError(f"--set {text}: there is no section {first!r}; a key starts with a section of the "
                            f"training config ({', '.join(training_sections)}) or of the model config "
                            f"({', '.join(MODEL_SECTIONS)}), e.g. training_args.learning_rate=1e-4")
        training.append(text)
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


def scale_factor_for(config: LDMConfig, dataset: str, export_factors: Mapping[str, float],
                     shipped_factor: Optional[float], config_path: str, vae_path: str,
                     dataset_path: Optional[str] = None) -> float:
    """The latent scale of training on ``dataset``, from the first of:

    1. ``scaling_constants[dataset]`` of the model config;
    2. the VAE export's factor for ``dataset`` (``export_factors``: its ``{dataset: factor}``,
       one entry per ``compute_vae_scaling.py`` run);
    3. ``shipped_factor``: the one a diffusers VAE folder ships in its config.json (its authors'
       choice for any data, e.g. Stable Diffusion's 0.18215);

    else a :class:`UserError` saying which datasets the export has factors for and the command
    that computes the missing one. Never a silent 1.0, nor another dataset's factor: training on
    wrongly scaled latents quietly ruins a diffusion model.
    """
    value = config.scaling_constants.get(dataset)
    if value is not None:
        if value <= 0:
            raise UserError(f"{config_path}: scaling_constants.{dataset} must be > 0, got {value}")
        return float(value)
    if dataset in export_factors:
        return float(export_factors[dataset])
    if shipped_factor is not None:
        return float(shipped_factor)
    have = (f"has factors only for {', '.join(sorted(export_factors))}" if export_factors
            else "has no factor for any dataset yet")
    command = f"python compute_vae_scaling.py --path_to_pretrained_weights {vae_path} --dataset {dataset}"
    if dataset_path is not None:
        command += f" --path_to_dataset {dataset_path}"
    raise UserError(
        f"no latent scale factor for dataset {dataset!r}: {vae_path} {have} and {config_path} has no "
        f"scaling_constants.{dataset}; compute it with: {command} (add --write_to_config to also store it in the config)"
    )
