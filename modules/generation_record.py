"""Images that remember how they were made: the settings of a generation, written into its PNG.

Every PNG that ``inference_ldm.py`` writes carries its settings twice:

- one PNG text chunk per setting (``prompt``, ``negative_prompt``, ``seed``, ``guidance_scale``,
  ``sampler``, ``num_inference_steps``, ``size``, ``weights``, ``weights_sha256``, ...), read back
  by :func:`read_png_settings`;
- a ``parameters`` chunk in the form the Stable Diffusion web UIs (AUTOMATIC1111, Forge, ComfyUI's
  importers, civitai) write and read::

      a red circle on a blue background
      Negative prompt: blurry
      Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 4, Seed: 7, Size: 32x32, Model hash: 1a2b3c4d5e, Model: model

  (the first line is the prompt; ``Model hash`` is the first 10 hex digits of the weights'
  SHA-256, the web UIs' own short hash).

Also: reading a prompts file (:func:`read_prompts`), and the weights' hash (:func:`file_sha256`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

from modules.errors import UserError

__all__ = ["WEBUI_SAMPLER_NAMES", "file_sha256", "read_png_settings", "read_prompts", "save_png", "webui_parameters"]

# Our sampler names -> the web UIs' (the Karras variants add " Karras").
WEBUI_SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp_2m": "DPM++ 2M", "euler": "Euler",
                       "euler_a": "Euler a", "lms": "LMS"}
PARAMETERS_KEY = "parameters"


def read_prompts(path: Union[str, Path], what: str = "prompts file") -> List[str]:
    """The non-empty lines of a prompts file that do not start with '#' (UTF-8)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {path}: file not found")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    prompts = [line.strip() for line in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"{what} {path}: no prompts in it (one per line; '#' starts a comment)")
    return prompts


def file_sha256(path: Union[str, Path], chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in 16 MiB pieces (exports of SD-size models are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def webui_parameters(settings: Mapping[str, Any]) -> str:
    """The web UIs' ``parameters`` text of one image's settings (see the module docstring)."""
    lines = [str(settings.get("prompt") or "")]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    sampler = WEBUI_SAMPLER_NAMES.get(str(settings.get("sampler")), str(settings.get("sampler")))
    if settings.get("karras"):
        sampler += " Karras"
    fields = [("Steps", settings.get("num_inference_steps")), ("Sampler", sampler),
              ("CFG scale", _number(settings.get("guidance_scale"))), ("Seed", settings.get("seed")),
              ("Size", settings.get("size")),
              ("Model hash", (settings.get("weights_sha256") or "")[:10] or None),
              ("Model", Path(str(settings["weights"])).stem if settings.get("weights") else None)]
    if settings.get("strength") is not None:
        fields.append(("Denoising strength", _number(settings["strength"])))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields if value is not None))
    return "\n".join(lines)


def save_png(image, path: Union[str, Path], settings: Mapping[str, Any]) -> Path:
    """Write ``image`` (a PIL image) to ``path`` with ``settings`` as PNG text chunks plus the
    ``parameters`` chunk. Values are written as text (None ones left out)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        if value is not None:
            info.add_itxt(key, _text(value))
    info.add_itxt(PARAMETERS_KEY, webui_parameters(settings))
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_settings(path: Union[str, Path]) -> Dict[str, str]:
    """The text chunks of a PNG (``parameters`` included), as strings."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}


def _number(value: Any) -> Any:
    """7.0 -> 7, 4.5 -> 4.5: as the web UIs print a CFG scale."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # exact: 7.5 stays 7.5, 0.1 stays 0.1
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)
