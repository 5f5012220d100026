"""The sampling settings a stage-2 export recommends, and how the user's flags combine with them.

Stage 2 draws its sample grids with a sampler, a number of steps and a guidance weight from its
training config, and records that config in the export (``training_config``). Those are the
settings the model was watched with while it trained, so ``inference_ldm.py``, ``app.py`` and the
benchmarks start from them: a model trained to be sampled with DPM-Solver++ 2M in 20 steps at
guidance 4 is sampled that way unless the user says otherwise. An export that records nothing
gets the built-in defaults (DDIM, 50 steps, guidance 7.5: Stable Diffusion's).

How a setting is chosen, flag by flag:

- ``guidance_scale``: the flag, else the export's, else 7.5;
- ``sampler``: the flag, else the export's, else ``ddim``;
- ``num_inference_steps``, ``eta`` (DDIM's only), ``timestep_spacing``, ``karras``: the flag, else
  the export's *when the sampler is the export's* (20 steps of DPM-Solver++ are not a recipe for
  DDIM), else the built-in defaults (50 steps, eta 0, the sampler's own spacing, no Karras sigmas).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, List, Mapping, Optional, Tuple

from modules.cli import positive_int
from modules.diffusion import TIMESTEP_SPACINGS
from modules.errors import UserError
from modules.ldm_io import KARRAS_SAMPLERS, SAMPLERS

__all__ = ["BUILTIN", "SamplingSettings", "add_sampling_arguments", "check_sampling_arguments", "recorded_settings",
           "resolve_sampling", "settings_from_args"]

logger = logging.getLogger("ldm")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """One way to sample a model. ``timestep_spacing`` None: the sampler's own (as diffusers)."""

    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    timestep_spacing: Optional[str] = None
    karras: bool = False

    def describe(self) -> str:
        """E.g. ``dpmpp_2m (Karras sigmas), 20 steps, guidance 4``."""
        extra = " (Karras sigmas)" if self.karras else ""
        extra += f" eta {self.eta:g}" if self.sampler == "ddim" and self.eta else ""
        return f"{self.sampler}{extra}, {self.num_inference_steps} steps, guidance {self.guidance_scale:g}"


BUILTIN = SamplingSettings()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def recorded_settings(metadata: Mapping[str, Any]) -> dict:
    """The settings the export's ``training_config`` records and that are valid: a dict holding
    some of the keys of :class:`SamplingSettings` (none for an export that records nothing)."""
    config = metadata.get("training_config")
    if not isinstance(config, Mapping):
        return {}
    found: dict = {}
    if config.get("sampler") in SAMPLERS:
        found["sampler"] = config["sampler"]
    if _number(config.get("num_inference_steps")) and int(config["num_inference_steps"]) >= 1:
        found["num_inference_steps"] = int(config["num_inference_steps"])
    if _number(config.get("guidance_scale")):
        found["guidance_scale"] = float(config["guidance_scale"])
    if _number(config.get("ddim_eta")) and config["ddim_eta"] >= 0:
        found["eta"] = float(config["ddim_eta"])
    if config.get("timestep_spacing") in TIMESTEP_SPACINGS:
        found["timestep_spacing"] = config["timestep_spacing"]
    if isinstance(config.get("karras_sigmas"), bool):
        found["karras"] = config["karras_sigmas"] and found.get("sampler") in KARRAS_SAMPLERS
    return found


def resolve_sampling(metadata: Mapping[str, Any], *, sampler: Optional[str] = None,
                     num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                     eta: Optional[float] = None, timestep_spacing: Optional[str] = None,
                     karras: Optional[bool] = None) -> Tuple[SamplingSettings, str]:
    """The settings to sample with: each given value (not None) wins, the rest as the module
    docstring says. Returns them and a sentence for the log saying which came from the export."""
    recorded = recorded_settings(metadata)
    from_export: List[str] = []

    def pick(key: str, given: Any, source: Mapping[str, Any]) -> Any:
        if given is not None:
            return given
        if key in source:
            from_export.append(key)
            return source[key]
        return getattr(BUILTIN, key)

    values = {"guidance_scale": pick("guidance_scale", guidance_scale, recorded),
              "sampler": pick("sampler", sampler, recorded)}
    # The export's step count and sampler options belong to its sampler.
    companion = recorded if values["sampler"] == recorded.get("sampler", BUILTIN.sampler) else {}
    for key, given in (("num_inference_steps", num_inference_steps), ("eta", eta),
                       ("timestep_spacing", timestep_spacing), ("karras", karras)):
        values[key] = pick(key, given, companion if key != "eta" or values["sampler"] == "ddim" else {})
    if from_export:
        source = (f"{', '.join(from_export)} from the export (stage 2 drew its sample grids with them; "
                  "the flags override)")
    elif not recorded:
        source = "the export records no sampling settings: built-in defaults for what no flag gives"
    else:
        source = "as given"
    return SamplingSettings(**values), source


def add_sampling_arguments(group) -> None:
    """The sampling flags of every script that samples an export, all defaulting to None
    ("not given": :func:`resolve_sampling` fills them from the export)."""
    group.add_argument("--sampler", choices=SAMPLERS, default=None,
                       help="ddim, ddpm, dpmpp_2m (DPM-Solver++ 2M: good images in ~20 steps), euler, euler_a "
                            "(ancestral), lms (default: the one stage 2 drew its sample grids with, from the export, "
                            f"else {BUILTIN.sampler})")
    group.add_argument("--num_inference_steps", type=positive_int, default=None,
                       help=f"denoising steps (default: the export's for its sampler, else {BUILTIN.num_inference_steps})")
    group.add_argument("--guidance_scale", type=float, default=None,
                       help="classifier-free guidance weight, 1 = off (default: the export's, the one stage 2 drew "
                            f"its sample grids with, else {BUILTIN.guidance_scale:g})")
    group.add_argument("--karras", action="store_true", default=None,
                       help=f"Karras et al.'s sigma spacing (samplers {', '.join(KARRAS_SAMPLERS)}; default: the "
                            "export's for its sampler)")
    group.add_argument("--eta", type=float, default=None,
                       help="DDIM noise scale, 0 = deterministic (default: the export's for ddim, else 0)")
    group.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                       help="how the steps spread over the training schedule (default: the export's for its "
                            "sampler, else the sampler's own, as in diffusers: leading for ddim/ddpm, linspace "
                            "for the others)")


def check_sampling_arguments(parser, args) -> None:
    """What the flags of :func:`add_sampling_arguments` can be told wrong before the model loads
    (``parser.error``: one line, exit 2); :func:`settings_from_args` checks what the export adds."""
    if args.eta is not None and args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    if args.karras and args.sampler is not None and args.sampler not in KARRAS_SAMPLERS:
        parser.error(f"--karras works with the samplers {', '.join(KARRAS_SAMPLERS)}, not {args.sampler}")


def settings_from_args(args, metadata: Mapping[str, Any]) -> SamplingSettings:
    """:func:`resolve_sampling` of the flags of :func:`add_sampling_arguments`, checked and logged."""
    settings, source = resolve_sampling(metadata, sampler=args.sampler, num_inference_steps=args.num_inference_steps,
                                        guidance_scale=args.guidance_scale, eta=args.eta,
                                        timestep_spacing=args.timestep_spacing, karras=args.karras)
    if settings.karras and settings.sampler not in KARRAS_SAMPLERS:  # --karras with the export's sampler
        raise UserError(f"--karras works with the samplers {', '.join(KARRAS_SAMPLERS)}, not {settings.sampler}")
    logger.info("sampling with %s: %s", settings.describe(), source)
    return settings
