"""Self-describing safetensors exports: the final weights of a stage with their config in the
file's metadata, so later stages rebuild the model from that one file."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from modules.errors import UserError

EXPORT_FORMAT = "ldm-toolkit/1"
# What each export kind is, for errors that say what a file is and what was expected instead.
EXPORT_KINDS: Dict[str, str] = {
    "lpips": "a stage-0 LPIPS export (stage0_lpips_trainer.py's <work_dir>/<name>.safetensors)",
    "vae": "a stage-1 VAE export (stage1_vae_trainer.py's <working_directory>/model.safetensors)",
    "ldm": "a stage-2 latent diffusion export (stage2_diffusion_trainer.py's <working_directory>/model.safetensors)",
}


def export_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, Path], kind: str,
                       metadata: Mapping[str, Any]) -> Path:
    """Write final weights to a self-describing safetensors file (atomically).

    Every metadata value is stored JSON-encoded (safetensors metadata is str -> str), plus
    ``format`` and ``kind`` so readers can check what they were given.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": EXPORT_FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update({key: json.dumps(value) for key, value in metadata.items()})
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(contiguous, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_export_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The decoded metadata of a safetensors file written by :func:`export_safetensors`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    decoded: Dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("format", "kind", "created"):
            decoded[key] = value
            continue
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def read_export(path: Union[str, Path], expected_kind: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Tensors and decoded metadata of an export; ``expected_kind`` is checked when given."""
    from safetensors.torch import load_file

    metadata = read_export_metadata(path)
    if expected_kind is not None:
        check_export_kind(metadata, path, expected_kind)
    return load_file(str(path)), metadata


def check_export_kind(metadata: Mapping[str, Any], path: Union[str, Path], expected_kind: str,
                      flag: Optional[str] = None) -> None:
    """An export of another kind than ``expected_kind`` is a :class:`UserError` saying what the file
    is and what was expected (``flag``, when given, names the option or key it came from). A file
    without a kind (a bare state dict) passes: its tensors are checked by the loader."""
    kind = metadata.get("kind")
    if kind is None or kind == expected_kind:
        return
    what = EXPORT_KINDS.get(kind, f"an export of kind {kind!r}")
    expected = EXPORT_KINDS.get(expected_kind, f"an export of kind {expected_kind!r}")
    prefix = f"{flag} {path}" if flag else str(path)
    raise UserError(f"{prefix} is {what}; expected {expected}")


def describe_run(script: str, argv: Sequence[str]) -> Dict[str, Any]:
    """What produced an export: script, command line and library versions."""
    import accelerate

    return {
        "script": script,
        "argv": list(argv),
        "torch": str(torch.__version__),
        "accelerate": accelerate.__version__,
    }


