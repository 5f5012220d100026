"""Reading and writing trained first-stage autoencoders (the stage-1 output).

One file describes one VAE: ``save_vae_export`` writes the weights to safetensors with the
resolved ``vae:`` config in the metadata (``{"config": {"vae": {...}}, "producer": ..., "step":
...}``, kind ``"vae"``), so stage 2, ``compute_vae_scaling.py`` and ``inference_ldm.py`` rebuild
the network from that file alone. ``load_vae`` reads such a file, or a diffusers
``AutoencoderKL`` folder (e.g. Stable Diffusion's VAE), and checks strictly that the weights fit
the config. ``set_export_metadata`` adds keys later: ``compute_vae_scaling.py`` stores the
latent scale factor of each dataset it was run on as ``scaling_factors`` (``{"celebahq": 0.93,
"shapes": 1.02}``), because the factor depends on the data as well as on the VAE
(:func:`scaling_factors_from_metadata` also reads the single ``scaling_factor`` +
``scaling_dataset`` of exports written before).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from modules.autoencoder import (
    AutoencoderKL,
    VAEConfig,
    VQModel,
    build_autoencoder,
    load_diffusers_vae,
    load_vae_state_dict_strict,
)
from modules.config import from_dict, to_dict
from modules.errors import UserError
from modules.export import EXPORT_FORMAT, export_safetensors, read_export

VAE_EXPORT_KIND = "vae"
SCALING_FACTORS_KEY = "scaling_factors"  # {dataset: 1 / std of the latents on it}
LEGACY_SCALING_KEYS = ("scaling_factor", "scaling_dataset")  # one factor per export, before scaling_factors
# Metadata keys stored verbatim by safetensors (everything else is JSON-encoded).
_PLAIN_METADATA_KEYS = ("format", "kind", "created")

Autoencoder = Union[AutoencoderKL, VQModel]


def save_vae_export(model: torch.nn.Module, vae_config: VAEConfig, path: Union[str, Path],
                    metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors, kind "vae") with its config in the metadata.

    ``model`` is the plain autoencoder (unwrap DDP / take the EMA copy first); ``metadata`` adds
    keys such as ``producer``, ``step`` or ``scaling_factor`` (JSON-encodable values). The
    ``config`` key is always ``{"vae": <vae_config as a dict>}``.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("save_vae_export needs the unwrapped model (accelerator.unwrap_model)")
    meta: Dict[str, Any] = dict(metadata or {})
    meta["config"] = {"vae": to_dict(vae_config)}
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return export_safetensors(state, path, kind=VAE_EXPORT_KIND, metadata=meta)


def vae_config_from_metadata(metadata: Mapping[str, Any], path: Union[str, Path]) -> Optional[VAEConfig]:
    """The ``vae:`` config recorded in an export's metadata (strictly validated), or None when absent."""
    config = metadata.get("config")
    if not isinstance(config, Mapping) or "vae" not in config:
        return None
    return from_dict(VAEConfig, config["vae"], source=f"{path} (metadata)", prefix="vae.")


def scaling_factors_from_metadata(metadata: Mapping[str, Any], path: Union[str, Path]) -> Dict[str, float]:
    """The latent scale factors of a VAE export, ``{dataset: factor}`` (empty when none was computed).

    Read from ``scaling_factors``; an export written before per-dataset factors holds one
    ``scaling_factor`` with its ``scaling_dataset``, read as a one-entry mapping (an entry of
    ``scaling_factors`` for the same dataset wins). A lone ``scaling_factor`` without a dataset
    (a diffusers folder's, or a hand-made export's) belongs to no dataset and is not returned.
    A factor that is not a positive number is a :class:`UserError` naming the file.
    """
    factors: Dict[str, Any] = {}
    legacy_factor, legacy_dataset = (metadata.get(key) for key in LEGACY_SCALING_KEYS)
    if isinstance(legacy_dataset, str) and legacy_factor is not None:
        factors[legacy_dataset] = legacy_factor
    stored = metadata.get(SCALING_FACTORS_KEY)
    if stored is not None:
        if not isinstance(stored, Mapping):
            raise UserError(f"{path}: metadata {SCALING_FACTORS_KEY} must map dataset names to factors, got {stored!r}")
        factors.update(stored)
    for dataset, factor in factors.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise UserError(f"{path}: metadata scaling factor of {dataset!r} must be a number > 0, got {factor!r}; "
                            f"recompute it with compute_vae_scaling.py --dataset {dataset}")
    return {str(dataset): float(factor) for dataset, factor in factors.items()}


def load_vae(path: Union[str, Path], vae_config: Optional[VAEConfig] = None) -> Tuple[Autoencoder, VAEConfig, Dict[str, Any]]:
    """Rebuild a trained autoencoder: returns (model in eval mode on the CPU, its VAEConfig, metadata).

    ``path`` is either
    - our export (``save_vae_export``): the config comes from its metadata; or
    - a diffusers ``AutoencoderKL`` folder (``config.json`` + weights, or a pipeline folder with
      ``vae/``), read with :func:`modules.autoencoder.load_diffusers_vae`; the metadata returned is
      ``{"kind": "diffusers", "source": ..., "scaling_factor": ..., "shift_factor": ...}`` from
      its config.json.

    ``vae_config``, when given, replaces the config found with the file, and the weights must fit
    it: otherwise a :class:`UserError` names the missing / unexpected / mis-shaped tensors (and
    says so specifically when VQ weights meet a KL config or the reverse). A diffusers folder's
    ``scaling_factor`` is attached to the model as ``model.scaling_factor``; our exports keep one
    factor per dataset (:func:`scaling_factors_from_metadata`), so theirs stays None.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: VAE weights not found (expected a stage-1 model.safetensors or a diffusers VAE folder)")
    if path.is_dir():
        model = load_diffusers_vae(path)
        metadata: Dict[str, Any] = {
            "kind": "diffusers",
            "source": str(path),
            "scaling_factor": model.scaling_factor,
            "shift_factor": model.shift_factor,
        }
        if vae_config is None or vae_config == model.config:
            return model.eval(), model.config, metadata
        fitted = build_autoencoder(vae_config)
        load_vae_state_dict_strict(fitted, model.state_dict(), str(path))
        fitted.scaling_factor, fitted.shift_factor = model.scaling_factor, model.shift_factor
        return fitted.eval(), vae_config, metadata

    tensors, metadata = read_export(path, expected_kind=VAE_EXPORT_KIND)
    if vae_config is None:
        vae_config = vae_config_from_metadata(metadata, path)
        if vae_config is None:
            raise UserError(f"{path}: no VAE config in its metadata (not written by stage1_vae_trainer.py); "
                            "pass the model config whose vae: section it was trained with (--model_config)")
    model = build_autoencoder(vae_config)
    load_vae_state_dict_strict(model, tensors, str(path))
    return model.eval(), vae_config, metadata


def set_export_metadata(path: Union[str, Path], updates: Mapping[str, Any],
                        remove: Sequence[str] = ()) -> Dict[str, Any]:
    """Add or replace metadata keys of a safetensors export in place, and drop the keys in
    ``remove``; returns the decoded metadata.

    The tensors are kept bit for bit; values are JSON-encoded like :func:`export_safetensors`
    does. The file is rewritten through a temporary file and renamed, so an interruption never
    leaves a truncated export.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    for key in (*updates, *remove):
        if key in _PLAIN_METADATA_KEYS:
            raise ValueError(f"metadata key {key!r} is managed by the exporter and cannot be set or removed")
    for key in remove:
        raw.pop(key, None)
    raw.setdefault("format", EXPORT_FORMAT)
    raw.update({key: json.dumps(value) for key, value in updates.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=raw)
    os.replace(tmp, path)
    decoded: Dict[str, Any] = {}
    for key, value in raw.items():
        try:
            decoded[key] = value if key in _PLAIN_METADATA_KEYS else json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded
