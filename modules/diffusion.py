"""Gaussian diffusion: noise schedules, the forward process, training losses, DDPM and DDIM samplers.

Everything here is parameter-free math on tensors. Networks only appear as callables
``model_fn(x_t, t) -> model_output``, so the same code trains and samples any denoiser.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", DDPM)
---------------------------------------------------------------------------
- ``T`` training timesteps, indexed ``t = 0 .. T-1`` (diffusers' 0-based convention).
- ``beta_t``: variance of the noise added at step t;  ``alpha_t = 1 - beta_t``.
- ``abar_t = prod_{s<=t} alpha_s`` (``alphas_cumprod``): the fraction of signal power left at t.
- Forward process, DDPM eq. 4:   q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), i.e.
      x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)          (:meth:`NoiseSchedule.add_noise`)
- Signal-to-noise ratio (Kingma et al. 2021, "Variational Diffusion Models"):
      SNR(t) = abar_t / (1 - abar_t)                                           (:meth:`NoiseSchedule.snr`)
- Velocity (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D):
      v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0                             (:meth:`NoiseSchedule.velocity`)

What a network predicts (``prediction_type``)
---------------------------------------------
- ``"epsilon"``: the noise eps (DDPM eq. 11).  x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar).
- ``"v_prediction"``: v.  x_0 = sqrt(abar) x_t - sqrt(1-abar) v,  eps = sqrt(abar) v + sqrt(1-abar) x_t.
- ``"sample"``: x_0 itself.  eps = (x_t - sqrt(abar) x_0) / sqrt(1-abar).
:meth:`NoiseSchedule.predict_x0_and_eps` is the one place that converts any of them to (x_0, eps),
and :meth:`NoiseSchedule.training_target` gives the matching regression target.

Sampling (reverse process)
--------------------------
Samplers walk a descending subset of the training timesteps ``t_0 > t_1 > ... ``. A jump from t
to an earlier ``s`` uses the *effective* beta of that jump, ``1 - abar_t / abar_s`` (the respacing
of Nichol & Dhariwal 2021, sec. 4), so the same formulas serve 1000 steps or 20.
- :class:`DDPMSampler` draws from the posterior q(x_s | x_t, x_0) (DDPM eqs. 6-7) with x_0 predicted.
- :class:`DDIMSampler` takes the DDIM update (Song et al. 2021, "Denoising Diffusion Implicit
  Models", eq. 12) with the noise scale sigma(eta) of its eq. 16: eta = 0 is deterministic,
  eta = 1 is DDPM-like.
Both reproduce diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (``clip_sample=False,
set_alpha_to_one=False, steps_offset=0``) to float32 rounding when given the same noise.

Training extras
---------------
- Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy"): :func:`min_snr_weights`, used by :func:`diffusion_loss`.
- Offset noise (N. Guttenberg, "Diffusion With Offset Noise", Crosslabs 2023): a per-(sample,
  channel) constant shift added to the noise so the model can learn to change an image's mean
  brightness: :func:`sample_noise`.
- Classifier-free guidance (Ho & Salimans 2022): :func:`classifier_free_guidance`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from modules.errors import UserError

__all__ = [
    "BETA_SCHEDULES",
    "LOSS_TYPES",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "DDIMSampler",
    "DDPMSampler",
    "NoiseSchedule",
    "classifier_free_guidance",
    "cosine_betas",
    "diffusion_loss",
    "img2img_timesteps",
    "inference_timesteps",
    "min_snr_weights",
    "sample_loop",
    "sample_noise",
    "sample_timesteps",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "l1", "huber")

Timestep = int | torch.Tensor
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; expected one of: {', '.join(allowed)}")


Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def gaussian(shape: Sequence[int], generator: Generators, device: torch.device | str,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) of ``shape`` on ``device``.

    Drawn on the generator's device and then moved, like diffusers' ``randn_tensor``: a CPU
    generator then gives the same numbers whatever device the sample lives on. With a list of B
    generators (``shape[0] == B``), row b is drawn from generator b alone, so a sample does not
    depend on which others share its batch (each image of a batch keeps its own seed).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
        return torch.cat(rows)
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def _gaussian_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """N(0, I) noise of ``x``'s shape, dtype and device (see :func:`gaussian`)."""
    return gaussian(x.shape, generator, x.device, x.dtype)


# --------------------------------------------------------------------------------------------
# Noise schedules and the forward process
# --------------------------------------------------------------------------------------------


def cosine_betas(num_train_timesteps: int, cosine_s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), shape (T,).

    ``abar(u) = cos(((u + s) / (1 + s)) * pi / 2)^2`` on u in [0, 1], discretised as
    ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta)``; the cap keeps the last steps from
    destroying the signal in one jump (beta = 1 would make x_0 unrecoverable). This is
    diffusers' ``squaredcos_cap_v2``; computed in float64, returned in float32 as diffusers does.
    """
    u = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps  # (T+1,)
    abar = torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return betas.to(torch.float32)


class NoiseSchedule:
    """The variance schedule beta_0..beta_{T-1} and the forward (noising) process built on it.

    Args:
        num_train_timesteps: T, the number of discrete noise levels the model is trained on.
        beta_schedule: ``"linear"``: ``linspace(beta_start, beta_end, T)`` (DDPM sec. 4);
            ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``, the
            schedule of Latent/Stable Diffusion (CompVis); ``"cosine"``: :func:`cosine_betas`.
        beta_start, beta_end: end points of the linear schedules (ignored by ``"cosine"``).
        cosine_s, max_beta: offset and cap of the cosine schedule.

    Attributes (float32, shape (T,), like diffusers): ``betas``, ``alphas`` (1 - betas) and
    ``alphas_cumprod`` (abar_t). The cumulative product is taken in float32 exactly as diffusers
    does it, so the tensors are bit-identical to ``DDPMScheduler``'s.

    Timestep arguments ``t`` below are a Python int, a 0-d tensor (one level for the whole batch)
    or a LongTensor of shape (B,) (one level per sample); per-sample coefficients are broadcast
    over the remaining dimensions of ``x`` (B, C, H, W) or any (B, ...).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ) -> None:
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if num_train_timesteps < 1:
            raise UserError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            betas = cosine_betas(num_train_timesteps, cosine_s=cosine_s, max_beta=max_beta)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError(
                f"beta_schedule {beta_schedule!r} with beta_start={beta_start}, beta_end={beta_end} gives betas "
                "outside (0, 1); expected 0 < beta_start <= beta_end < 1"
            )
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """Move the schedule tensors to ``device`` (in place) and return ``self``.

        Optional: every method also moves what it gathers to the device of its inputs.
        """
        self.betas = self.betas.to(device)
        self.alphas = self.alphas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    # -- gathering per-timestep values --------------------------------------------------------

    def _abar(self, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """abar_t in float32 (float64 for float64 ``like``), broadcastable against ``like``.

        A scalar t gives a 0-d tensor, a (B,) t gives shape (B, 1, ..., 1).
        """
        if isinstance(t, torch.Tensor):
            abar = self.alphas_cumprod.to(t.device)[t.long()]
        else:
            abar = self.alphas_cumprod[int(t)]
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        abar = abar.to(device=like.device, dtype=dtype)
        if abar.dim() == 1:
            if abar.shape[0] != like.shape[0]:
                raise ValueError(f"got {abar.shape[0]} timesteps for a batch of {like.shape[0]}")
            abar = abar.reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)
        return abar

    # -- forward process ----------------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """Sample q(x_t | x_0) by reparameterisation (DDPM eq. 4): ``sqrt(abar_t) x0 + sqrt(1-abar_t) noise``.

        Args: ``x0`` clean data (B, ...), ``noise`` N(0, I) of the same shape, ``t`` int or (B,).
        Returns x_t with ``x0``'s shape and dtype.
        """
        abar = self._abar(t, x0)
        return abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The v-prediction target ``sqrt(abar_t) noise - sqrt(1-abar_t) x0`` (Salimans & Ho 2022, sec. 4).

        v is the rate of change of x_t along the circle x_t = cos(phi) x0 + sin(phi) eps with
        phi = arctan(sqrt((1-abar)/abar)); unlike eps it stays informative at both ends of the schedule.
        """
        abar = self._abar(t, x0)
        return abar.sqrt().to(x0.dtype) * noise - (1 - abar).sqrt().to(x0.dtype) * x0

    def snr(self, t: Timestep) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` in float32, shaped like ``t`` and on its device."""
        t = torch.as_tensor(t)
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar / (1 - abar)

    def predict_x0_and_eps(
        self, model_output: torch.Tensor, sample: torch.Tensor, t: Timestep, prediction_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output at x_t = ``sample`` into the implied (x_0, eps), each like ``sample``.

        The three parameterisations (module docstring) are linear in (x_t, output); this inverts
        x_t = sqrt(abar) x_0 + sqrt(1-abar) eps together with the definition of the prediction.
        """
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        abar = self._abar(t, sample)
        sqrt_abar = abar.sqrt().to(sample.dtype)
        sqrt_one_minus_abar = (1 - abar).sqrt().to(sample.dtype)
        if prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - sqrt_one_minus_abar * eps) / sqrt_abar
        elif prediction_type == "v_prediction":
            x0 = sqrt_abar * sample - sqrt_one_minus_abar * model_output
            eps = sqrt_abar * model_output + sqrt_one_minus_abar * sample
        else:  # "sample"
            x0 = model_output
            eps = (sample - sqrt_abar * x0) / sqrt_one_minus_abar
        return x0, eps

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep, prediction_type: str) -> torch.Tensor:
        """What a network of ``prediction_type`` should output at x_t = add_noise(x0, noise, t)."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The descending training timesteps a sampler visits, LongTensor (num_inference_steps,).

    The three spacings of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed", table 2), computed exactly as diffusers does (numpy float arithmetic included):
    - ``"leading"``: ``arange(n) * (T // n) + steps_offset``, reversed. Never visits t = T-1.
    - ``"trailing"``: ``round(arange(T, 0, -T/n)) - 1``. Always starts at t = T-1.
    - ``"linspace"``: ``round(linspace(0, T-1, n))``, reversed. Both ends.
    """
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise UserError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {n}")
    if spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n))[::-1] + steps_offset
    elif spacing == "trailing":
        # numpy's float arange can yield one extra element (a spurious t = -1, e.g. T=1000, n=61);
        # diffusers keeps it, we keep the first n, which are diffusers' values.
        timesteps = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n]
    else:
        timesteps = np.linspace(0, T - 1, n).round()[::-1]
    timesteps = torch.from_numpy(np.ascontiguousarray(timesteps).astype(np.int64))
    if int(timesteps.max()) >= T or int(timesteps.min()) < 0:
        raise UserError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]")
    return timesteps


class _Sampler:
    """What DDPM and DDIM share: the schedule, the timestep grid and the clipped x_0 prediction."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str,
        timestep_spacing: str,
        steps_offset: int,
        clip_sample: bool,
        clip_sample_range: float,
    ) -> None:
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        # Usable right away: one step per training timestep until set_timesteps says otherwise.
        self.set_timesteps(schedule.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the ``num_inference_steps`` timesteps to visit; sets ``.timesteps`` (descending, on CPU)."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = inference_timesteps(
            self.schedule.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )

    def _predict(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = self.schedule.predict_x0_and_eps(model_output, sample, t, self.prediction_type)
        if self.clip_sample:
            # Only x_0 is clipped; eps stays the network's (diffusers' use_clipped_model_output=False).
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps


class DDPMSampler(_Sampler):
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, eqs. 6-7), on any timestep grid.

    From x_t to the next visited timestep s < t (s = -1 after the last one, where abar_s := 1):
        alpha'_t = abar_t / abar_s,  beta'_t = 1 - alpha'_t     (effective alpha, beta of the jump)
        mean     = sqrt(abar_s) beta'_t / (1 - abar_t) * x0_hat
                 + sqrt(alpha'_t) (1 - abar_s) / (1 - abar_t) * x_t                    (eq. 7)
        x_s      = mean + sigma_t z,   z ~ N(0, I), no noise when t = 0
    with sigma_t^2 = (1 - abar_s) / (1 - abar_t) beta'_t (``"fixed_small"``, the posterior variance
    beta-tilde of eq. 7) or beta'_t (``"fixed_large"``), the two choices of DDPM sec. 3.2.

    Args:
        schedule: the training noise schedule.
        prediction_type: what the network outputs (``"epsilon"``, ``"v_prediction"``, ``"sample"``).
        variance_type: ``"fixed_small"`` or ``"fixed_large"``.
        clip_sample, clip_sample_range: clamp x0_hat to [-range, range] (pixel-space models).
        timestep_spacing, steps_offset: see :func:`inference_timesteps`.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ) -> None:
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self.variance_type = variance_type
        super().__init__(schedule, prediction_type, timestep_spacing, steps_offset, clip_sample, clip_sample_range)

    def previous_timestep(self, t: int) -> int:
        """The timestep visited after ``t`` (-1 after the last one)."""
        index = (self.timesteps == t).nonzero()
        if index.numel() == 0:
            raise ValueError(f"timestep {t} is not in this sampler's timesteps; call set_timesteps first")
        index = int(index[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One reverse step from x_t = ``sample`` (B, ...) to x_s; returns x_s with ``sample``'s shape.

        ``noise`` is the N(0, I) draw z to use (same shape as ``sample``); when None it is drawn
        with ``generator``. No noise is drawn or added at t = 0.
        """
        t = int(t)
        s = self.previous_timestep(t)
        abar_t = self.schedule.alphas_cumprod[t]
        abar_s = self.schedule.alphas_cumprod[s] if s >= 0 else torch.ones_like(abar_t)
        alpha_t = abar_t / abar_s  # effective alpha of the jump t -> s
        beta_t = 1 - alpha_t
        x0, _ = self._predict(model_output, t, sample)

        # Posterior mean, DDPM eq. 7.
        x0_coef = abar_s**0.5 * beta_t / (1 - abar_t)
        xt_coef = alpha_t**0.5 * (1 - abar_s) / (1 - abar_t)
        prev = x0_coef * x0 + xt_coef * sample
        if t > 0:
            if self.variance_type == "fixed_small":
                # Clamped because the variance is exactly 0 after the last step of a grid that
                # ends at t > 0 (abar_s = 1), and a log/sqrt of 0 is what the clamp avoids.
                variance = ((1 - abar_s) / (1 - abar_t) * beta_t).clamp(min=1e-20)
            else:
                variance = beta_t
            z = noise if noise is not None else _gaussian_like(model_output, generator)
            prev = prev + variance**0.5 * z
        return prev


class DDIMSampler(_Sampler):
    """Denoising Diffusion Implicit Models (Song et al. 2021), eq. 12 with sigma from eq. 16.

    From x_t to s = t - T // num_inference_steps (abar_s := abar_0, or 1 with ``set_alpha_to_one``,
    when s < 0):
        sigma_t = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)   (eq. 16)
        x_s     = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_t^2) eps_hat + sigma_t z (eq. 12)
    eta = 0 is the deterministic DDIM (an ODE solver); eta = 1 matches DDPM's "fixed_small" noise.

    The step size is the fixed stride T // n, as in diffusers. For "leading" spacing (and
    "trailing" when n divides T) s is exactly the next visited timestep; for "linspace" (and
    uneven "trailing") the stride differs slightly from the grid, a diffusers behaviour kept for parity.

    Args:
        schedule, prediction_type, clip_sample, clip_sample_range, timestep_spacing,
        steps_offset: as for :class:`DDPMSampler`.
        eta: the stochasticity eta of eq. 16, >= 0.
        set_alpha_to_one: use abar = 1 (a clean sample) after the last step instead of abar_0.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        eta: float = 0.0,
        timestep_spacing: str = "leading",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = False,
        steps_offset: int = 0,
    ) -> None:
        if eta < 0:
            raise UserError(f"DDIM eta must be >= 0, got {eta}")
        self.eta = eta
        self.set_alpha_to_one = set_alpha_to_one
        super().__init__(schedule, prediction_type, timestep_spacing, steps_offset, clip_sample, clip_sample_range)

    def previous_timestep(self, t: int) -> int:
        """``t - T // num_inference_steps`` (negative after the last step)."""
        return t - self.schedule.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One DDIM step from x_t = ``sample`` (B, ...) to x_s; returns x_s with ``sample``'s shape.

        ``noise`` is the z of eq. 12 (used only when eta > 0); when None it is drawn with ``generator``.
        """
        t = int(t)
        s = self.previous_timestep(t)
        abar_t = self.schedule.alphas_cumprod[t]
        if s >= 0:
            abar_s = self.schedule.alphas_cumprod[s]
        else:
            abar_s = torch.ones_like(abar_t) if self.set_alpha_to_one else self.schedule.alphas_cumprod[0]
        x0, eps = self._predict(model_output, t, sample)

        variance = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)  # eq. 16 without eta
        sigma = self.eta * variance**0.5
        direction = (1 - abar_s - sigma**2) ** 0.5 * eps  # "direction pointing to x_t"
        prev = abar_s**0.5 * x0 + direction
        if self.eta > 0:
            z = noise if noise is not None else _gaussian_like(model_output, generator)
            prev = prev + sigma * z
        return prev


# --------------------------------------------------------------------------------------------
# Sampling loop, guidance, img2img
# --------------------------------------------------------------------------------------------


def classifier_free_guidance(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): ``uncond + scale * (cond - uncond)``.

    ``scale = 1`` gives the conditional output (up to rounding), 0 the unconditional one; larger
    values push further away from the unconditional one. Works for any prediction type, being
    linear in the outputs.
    """
    return uncond_out + scale * (cond_out - uncond_out)


def img2img_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of ``timesteps`` (descending) that img2img runs for a given ``strength`` in [0, 1].

    As diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``: the first ``n - int(n * strength)``
    timesteps are skipped, so strength 1 runs them all (pure generation) and strength 0 none.
    """
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"img2img strength must be in [0, 1], got {strength}")
    n = len(timesteps)
    kept = min(int(n * strength), n)
    return timesteps[max(n - kept, 0) :]


@torch.no_grad()
def sample_loop(
    model_fn: ModelFn,
    sampler: DDPMSampler | DDIMSampler,
    shape: Sequence[int] | None,
    num_inference_steps: int,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process and return x_0 of shape ``shape`` (B, C, H, W) or ``init.shape``.

    Args:
        model_fn: ``model_fn(x_t, t) -> output`` with x_t (B, ...) and t a LongTensor (B,) on x_t's
            device; the output is what ``sampler.prediction_type`` says. Conditioning and
            classifier-free guidance are closed over by the caller (:func:`classifier_free_guidance`).
        sampler: a :class:`DDPMSampler` or :class:`DDIMSampler`; its timesteps are set here.
        shape: shape of the sample; may be None when ``init`` is given.
        num_inference_steps: number of timesteps on the full grid (img2img runs a tail of it).
        generator: source of every Gaussian draw (initial noise first, then one per stochastic
            step), in the order diffusers' pipelines draw them; or one generator per sample
            (:func:`gaussian`).
        device, dtype: where and in which precision x_t lives.
        init: img2img starting point x_0 (B, ...), e.g. scaled VAE latents of an image. It is
            noised to the first kept timestep (:func:`img2img_timesteps`) and denoised from there.
        strength: img2img strength in [0, 1]; only meaningful with ``init``.
        callback: called as ``callback(i, t, x)`` after each step with the new sample.
    """
    sampler.set_timesteps(num_inference_steps)
    timesteps = sampler.timesteps
    if init is None:
        if shape is None:
            raise UserError("sample_loop needs a shape or an init sample")
        if strength != 1.0:
            raise UserError(f"img2img strength={strength} needs an init image")
        x = gaussian(shape, generator, device, dtype)
    else:
        if shape is not None and tuple(shape) != tuple(init.shape):
            raise UserError(f"sample_loop shape {tuple(shape)} differs from init shape {tuple(init.shape)}")
        init = init.to(device=device, dtype=dtype)
        timesteps = img2img_timesteps(timesteps, strength)
        if len(timesteps) == 0:  # strength so low that no step is left: the image is unchanged
            return init.clone()
        x = sampler.schedule.add_noise(init, _gaussian_like(init, generator), int(timesteps[0]))

    for i, t in enumerate(timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)  # (B,)
        x = sampler.step(model_fn(x, t_batch), t, x, generator=generator)
        if callback is not None:
            callback(i, t, x)
    return x


# --------------------------------------------------------------------------------------------
# Training: noise, timesteps, losses
# --------------------------------------------------------------------------------------------


def sample_noise(
    like: torch.Tensor, generator: torch.Generator | None = None, offset_noise: float = 0.0
) -> torch.Tensor:
    """Training noise eps ~ N(0, I) shaped like ``like`` (B, C, ...), optionally with offset noise.

    With ``offset_noise = o > 0`` (Guttenberg 2023) the noise becomes ``eps + o * delta`` with
    delta ~ N(0, 1) of shape (B, C, 1, ..., 1): one constant per sample and channel. Plain eps
    almost never changes a channel's mean, so a model trained on it cannot make images much
    darker or brighter than average; the shared shift teaches it to.
    """
    noise = _gaussian_like(like, generator)
    if offset_noise:
        offset_shape = (like.shape[0], like.shape[1], *([1] * (like.dim() - 2)))  # (B, C, 1, ..., 1)
        device = generator.device if generator is not None else like.device
        offset = torch.randn(offset_shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
        noise = noise + offset_noise * offset
    return noise


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform training timesteps t ~ U{0, ..., T-1} (DDPM algorithm 1), LongTensor (B,) on ``device``."""
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
    return t.to(device)


def min_snr_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023), same shape as ``snr``.

    The paper weights the x_0 loss by ``min(SNR, gamma)``. An eps loss equals SNR times an x_0
    loss and a v loss (SNR + 1) times one, so the same weighting of those losses is
    ``min(SNR, gamma) / SNR`` and ``min(SNR, gamma) / (SNR + 1)``.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if snr_gamma <= 0:
        raise UserError(f"snr_gamma must be > 0, got {snr_gamma}")
    clipped = snr.clamp(max=snr_gamma)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR -> 1 as SNR -> 0: keep that limit instead of 0/0 at SNR = 0.
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    loss_type: str = "mse",
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
    huber_c: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The denoising regression loss (DDPM eq. 14 and its variants) -> ``(loss, logs)``.

    Args:
        model_output, target: (B, ...) network output and :meth:`NoiseSchedule.training_target`.
        t: LongTensor (B,) of the timesteps the batch was noised to.
        schedule: gives the SNR for the Min-SNR weights.
        loss_type: ``"mse"``; ``"l1"``; ``"huber"``: the pseudo-Huber loss
            ``2c (sqrt(d^2 + c^2) - c)`` with c = ``huber_c``, which is ~ d^2 for |d| << c (like
            MSE) and ~ 2c|d| for |d| >> c (robust to outliers), as in diffusers' training examples.
        snr_gamma: if set, weight each sample by :func:`min_snr_weights` (Hang et al. 2023; 5 in the paper).
        prediction_type: what ``model_output`` predicts (decides the Min-SNR weight form).

    The loss is computed in float32, averaged over all but the batch dimension, weighted per
    sample, then averaged over the batch. ``logs`` holds detached scalars: ``loss`` and, with
    Min-SNR, ``loss_unweighted`` (the plain batch mean) and ``snr_weight_mean``.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    diff = model_output.float() - target.float()
    if loss_type == "mse":
        elementwise = diff**2
    elif loss_type == "l1":
        elementwise = diff.abs()
    else:
        # 2c (sqrt(d^2 + c^2) - c) rewritten as 2c d^2 / (sqrt(d^2 + c^2) + c): the same number
        # without the float32 cancellation that the subtraction suffers for |d| << c.
        squared = diff**2
        elementwise = 2 * huber_c * squared / (torch.sqrt(squared + huber_c**2) + huber_c)
    per_sample = elementwise.flatten(1).mean(dim=1)  # (B,)
    unweighted = per_sample.mean()
    if snr_gamma is None:
        return unweighted, {"loss": unweighted.detach()}
    weights = min_snr_weights(schedule.snr(t).to(per_sample.device), snr_gamma, prediction_type)  # (B,)
    loss = (weights * per_sample).mean()
    logs = {
        "loss": loss.detach(),
        "loss_unweighted": unweighted.detach(),
        "snr_weight_mean": weights.mean().detach(),
    }
    return loss, logs
