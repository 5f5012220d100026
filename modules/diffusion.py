"""Gaussian diffusion: noise schedules, the forward process, training losses, DDPM/DDIM/Euler/LMS/DPM-Solver samplers.

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
- Sigma-space samplers (Karras et al. 2022, "EDM"), optionally on Karras sigmas (EDM eq. 5):
  :class:`EulerSampler`, :class:`EulerAncestralSampler`, :class:`LMSSampler` integrate the
  probability-flow ODE in the VE variable x = x_t / sqrt(abar); :class:`DPMSolverMultistepSampler`
  is DPM-Solver++(2M) (Lu et al. 2022). They match diffusers' EulerDiscrete /
  EulerAncestralDiscrete / LMSDiscrete / DPMSolverMultistep schedulers; one grid helper,
  :func:`sigma_grid`, lays out all their timesteps and noise levels.

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
    "DPMSolverMultistepSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "LMSSampler",
    "Sampler",
    "NoiseSchedule",
    "classifier_free_guidance",
    "cosine_betas",
    "diffusion_loss",
    "img2img_timesteps",
    "inference_timesteps",
    "karras_sigmas",
    "min_snr_weights",
    "sample_loop",
    "sample_noise",
    "sample_timesteps",
    "sigma_grid",
    "sigma_to_timestep",
    "train_sigmas",
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

    # DDPM/DDIM work on x_t itself: unit initial noise, the network sees the sample as it is.
    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The network input at ``t``: ``sample`` unchanged (the interface of the sigma-space samplers)."""
        return sample

    def start_at(self, step_index: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """img2img: ``x0`` (B, ...) noised to ``timesteps[step_index]`` (q(x_t | x_0), DDPM eq. 4)."""
        return self.schedule.add_noise(x0, noise, int(self.timesteps[step_index]))

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
# Samplers in sigma space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
# Generative Models", EDM): Euler, Euler ancestral, LMS, DPM-Solver++ 2M
# --------------------------------------------------------------------------------------------
#
# A VP sample x_t = sqrt(abar) x_0 + sqrt(1-abar) eps is, divided by sqrt(abar), the VE sample
#     x = x_0 + sigma eps,   sigma = sqrt((1 - abar) / abar)                     (EDM sec. 2)
# and the probability-flow ODE becomes dx/dsigma = (x - x0_hat(x, sigma)) / sigma (EDM eq. 3).
# Euler, Euler ancestral and LMS integrate it in x (so the network sees x / sqrt(sigma^2 + 1) =
# x_t: :meth:`scale_model_input`); DPM-Solver++ works on x_t itself.

SIGMA_TIMESTEP_SPACINGS = TIMESTEP_SPACINGS
KARRAS_RHO = 7.0  # EDM eq. 5's rho, the paper's choice


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """The EDM noise levels (Karras et al. 2022, eq. 5), descending, float64 (n,):

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    rho = 7 spends more of the steps at low noise, where the ODE curves most.
    """
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of every training timestep, ascending, float32 (T,)."""
    abar = schedule.alphas_cumprod.cpu()
    return (((1 - abar) / abar) ** 0.5).numpy()


def sigma_to_timestep(sigmas: np.ndarray, schedule_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timesteps of noise levels ``sigmas``: linear interpolation of t in
    log sigma over the training grid ``schedule_sigmas`` (ascending), clamped to [0, T-1]. float64."""
    log_train = np.log(schedule_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = (np.searchsorted(log_train, log_sigma, side="right") - 1).clip(0, len(log_train) - 2)
    w = ((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1])).clip(0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_grid(
    schedule: NoiseSchedule,
    num_inference_steps: int,
    spacing: str = "linspace",
    use_karras_sigmas: bool = False,
    steps_offset: int = 0,
    solver_grid: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps (n,) and noise levels (n + 1,) a sigma-space sampler visits; the last sigma is 0.

    The one grid helper of :class:`EulerSampler`, :class:`EulerAncestralSampler`, :class:`LMSSampler`
    (``solver_grid=False``) and :class:`DPMSolverMultistepSampler` (``solver_grid=True``), laid out
    as diffusers lays out the grids of the matching schedulers:
    - ``solver_grid=False``: float timesteps; ``"linspace"`` is ``linspace(0, T-1, n)`` (fractional
      for most n), ``"leading"``/``"trailing"`` as in :func:`inference_timesteps`. sigma is
      interpolated linearly in t. Karras sigmas span the grid's own first and last sigma.
    - ``solver_grid=True``: integer timesteps; ``"linspace"`` is ``round(linspace(0, T-1, n+1))``
      without its final 0, ``"leading"`` the stride T // (n+1). Karras sigmas span the whole
      training range, their timesteps rounded (truncated for the cosine schedule, as diffusers).
    With Karras sigmas (EDM eq. 5, :func:`karras_sigmas`) the timesteps are those of the new sigmas
    (:func:`sigma_to_timestep`). Returns (timesteps float64 or int64, sigmas float32).
    """
    _check_choice("timestep_spacing", spacing, SIGMA_TIMESTEP_SPACINGS)
    T, n = schedule.num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise UserError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {n}")
    base = train_sigmas(schedule)
    if spacing == "trailing":
        timesteps = (np.arange(T, 0, -T / n).round() - 1)[:n]
    elif not solver_grid:
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
        else:
            timesteps = (np.arange(n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    else:
        timesteps = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    timesteps = np.ascontiguousarray(timesteps).astype(np.int64 if solver_grid else np.float32)
    if timesteps.max() > T - 1 or timesteps.min() < 0:
        raise UserError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]")
    sigmas = np.interp(timesteps, np.arange(T), base)
    if use_karras_sigmas:
        lo, hi = (float(base[0]), float(base[-1])) if solver_grid else (float(sigmas[-1]), float(sigmas[0]))
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_timestep(sigmas, base)
        if solver_grid and schedule.beta_schedule != "cosine":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64 if solver_grid else np.float32)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return timesteps, sigmas


class _SigmaSampler:
    """What the sigma-space samplers share: the grid, the step counter and x0_hat.

    The samplers are stateful like diffusers' schedulers: :meth:`set_timesteps` resets them, each
    :meth:`step` advances one grid point (the first call finds its place from ``t``, or
    :meth:`start_at` sets it), and multistep methods remember their previous outputs.
    """

    solver_grid = False
    vp_space = False  # True: the sample is x_t (DPM-Solver); False: the VE sample x = x_t / sqrt(abar)

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, SIGMA_TIMESTEP_SPACINGS)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.use_karras_sigmas = use_karras_sigmas
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.set_timesteps(schedule.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the grid (:func:`sigma_grid`): ``.timesteps`` (n,) descending (float32 for the
        Euler/LMS family, int64 for DPM-Solver, on CPU) and ``.sigmas`` (n + 1,) float32; reset the state."""
        timesteps, sigmas = sigma_grid(
            self.schedule, num_inference_steps, self.timestep_spacing, self.use_karras_sigmas,
            self.steps_offset, self.solver_grid,
        )
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps)
        self.sigmas = torch.from_numpy(sigmas)
        self._index: int | None = None
        self._reset_history()

    def _reset_history(self) -> None:
        """Forget the previous steps (one-step methods keep none)."""

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial noise x_T (0-d float32).

        In VE space x_T = x_0 + sigma_max eps has std sqrt(sigma_max^2 + 1); diffusers uses that
        only for "leading" spacing and sigma_max itself otherwise (the 1 is negligible next to
        sigma_max, ~15 for scaled_linear, ~157 for linear, ~2e4 for cosine). Kept for parity.
        """
        if self.vp_space:
            return torch.tensor(1.0)
        sigma_max = self.sigmas.max()
        return sigma_max if self.timestep_spacing != "leading" else (sigma_max**2 + 1) ** 0.5

    def _current(self, t: Timestep) -> int:
        """The grid index of the step about to be taken at timestep ``t``."""
        t = float(t)
        if self._index is None:
            matches = (self.timesteps.double() == t).nonzero()
            if matches.numel() == 0:
                raise ValueError(f"timestep {t} is not in this sampler's timesteps; call set_timesteps first")
            self._index = int(matches[0, 0])
        if self._index >= len(self.timesteps) or float(self.timesteps[self._index]) != t:
            raise ValueError(
                f"{type(self).__name__} expected step {self._index} of its grid, got timestep {t}; "
                "call set_timesteps to restart"
            )
        return self._index

    def start_at(self, step_index: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """img2img (SDEdit): begin at ``timesteps[step_index]`` and return ``x0`` (B, ...) noised to
        that step's level, in this sampler's space: VE ``x0 + sigma noise``, or VP
        ``(x0 + sigma noise) / sqrt(sigma^2 + 1)`` for DPM-Solver (the q(x_t | x_0) sample)."""
        self._index = step_index
        self._reset_history()
        sigma = self.sigmas[step_index]
        if self.vp_space:
            alpha, sigma_vp = self._alpha_sigma(sigma)
            return alpha * x0 + sigma_vp * noise
        return x0 + noise * sigma

    def scale_model_input(self, sample: torch.Tensor, t: Timestep) -> torch.Tensor:
        """What the network sees at ``t``: the VP sample x_t, i.e. ``sample / sqrt(sigma^2 + 1)``
        for VE samplers, ``sample`` itself for DPM-Solver."""
        if self.vp_space:
            return sample
        sigma = self.sigmas[self._current(t)]
        return sample / ((sigma**2 + 1) ** 0.5)

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VE sigma -> the VP pair (sqrt(abar), sqrt(1 - abar)) = (1, sigma) / sqrt(sigma^2 + 1)."""
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def _denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0_hat from the network output at noise level ``sigma`` (the module docstring's conversions,
        with sqrt(abar) = 1 / sqrt(sigma^2 + 1) and, in VE space, x_t = x / sqrt(sigma^2 + 1))."""
        if self.prediction_type == "sample":
            return model_output
        if self.vp_space:
            alpha, sigma_vp = self._alpha_sigma(sigma)
            if self.prediction_type == "epsilon":
                return (sample - sigma_vp * model_output) / alpha
            return alpha * sample - sigma_vp * model_output
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        # v: x0 = sqrt(abar) x_t - sqrt(1-abar) v with x_t = x / sqrt(sigma^2 + 1)
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)


class EulerSampler(_SigmaSampler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, algorithm 1 without
    the 2nd-order correction; k-diffusion's ``sample_euler``):

        d = (x - x0_hat) / sigma_i,    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d

    Deterministic. Matches diffusers' ``EulerDiscreteScheduler`` (defaults: "linspace" spacing,
    no churn) to float32 rounding.

    Args:
        schedule: the training noise schedule.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        use_karras_sigmas: noise levels of EDM eq. 5 (rho = 7) instead of the schedule's own.
        timestep_spacing, steps_offset: see :func:`sigma_grid`.
    """

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One Euler step from the VE sample x_i = ``sample`` (B, ...); ``noise``/``generator`` unused."""
        i = self._current(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        self._index = i + 1
        return sample + derivative * (sigma_next - sigma)


class EulerAncestralSampler(_SigmaSampler):
    """Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``; Song et al. 2021,
    "Score-Based Generative Modeling through SDEs", ancestral sampling in VE form).

    The jump sigma_i -> sigma_{i+1} is split into a deterministic Euler step down to sigma_down
    and fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_{i+1}^2 and
        sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    (the DDPM posterior's variance, in VE units):
        x_{i+1} = x_i + (sigma_down - sigma_i) (x_i - x0_hat) / sigma_i + sigma_up z.
    Matches diffusers' ``EulerAncestralDiscreteScheduler`` (which has no Karras option; with
    ``use_karras_sigmas`` this walks the Karras grid of :class:`EulerSampler`).

    Args: as for :class:`EulerSampler`.
    """

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One ancestral step from x_i = ``sample`` (B, ...). ``noise`` is the z to use; when None it is
        drawn with ``generator`` (at every step, the last included, as diffusers draws it)."""
        i = self._current(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        z = noise if noise is not None else _gaussian_like(model_output, generator)
        self._index = i + 1
        return sample + derivative * (sigma_down - sigma) + z * sigma_up


def _lagrange_integral(nodes: Sequence[float], j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial of ``nodes[j]`` (exact, float64)."""
    others = [x for k, x in enumerate(nodes) if k != j]
    if not others:  # one node: the constant 1
        return b - a
    poly = np.polynomial.Polynomial.fromroots(others) / float(np.prod([nodes[j] - x for x in others]))
    antiderivative = poly.integ()
    return float(antiderivative(b) - antiderivative(a))


class LMSSampler(_SigmaSampler):
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE in sigma (k-diffusion's
    ``sample_lms``; Karras et al. 2022 sec. 3 for the ODE).

    With d_k = (x_k - x0_hat_k) / sigma_k the derivatives of the last m = min(order, steps so far)
    steps, the derivative is extrapolated by the polynomial through (sigma_k, d_k) and integrated:
        x_{i+1} = x_i + sum_{j<m} c_j d_{i-j},   c_j = integral_{sigma_i}^{sigma_{i+1}} l_j(s) ds
    with l_j the Lagrange basis polynomial of node sigma_{i-j} (integrated exactly; diffusers
    integrates numerically, exact for these polynomials). m = 1 is Euler's method.
    Matches diffusers' ``LMSDiscreteScheduler`` (order 4).

    Args: as for :class:`EulerSampler`, plus ``order`` (>= 1; 4 by default).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        order: int = 4,
    ) -> None:
        if order < 1:
            raise UserError(f"LMS order must be >= 1, got {order}")
        self.order = order
        super().__init__(schedule, prediction_type, use_karras_sigmas, timestep_spacing, steps_offset)

    def _reset_history(self) -> None:
        self._derivatives: list[torch.Tensor] = []  # newest last
        self._last_index: int | None = None

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One LMS step from the VE sample x_i = ``sample`` (B, ...); ``noise``/``generator`` unused."""
        i = self._current(t)
        if self._last_index is not None and self._last_index != i - 1:
            self._derivatives = []  # not a continuation of the previous steps
        sigma = self.sigmas[i]
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        self._derivatives = (self._derivatives + [derivative])[-self.order :]
        m = len(self._derivatives)
        nodes = [float(self.sigmas[i - j]) for j in range(m)]
        a, b = float(self.sigmas[i]), float(self.sigmas[i + 1])
        prev = sample
        for j in range(m):
            prev = prev + _lagrange_integral(nodes, j, a, b) * self._derivatives[-1 - j]
        self._last_index = i
        self._index = i + 1
        return prev


class DPMSolverMultistepSampler(_SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", algorithm 2), the multistep 2nd-order solver of the data-prediction ODE.

    Works on the VP sample x_t with alpha = sqrt(abar) = 1 / sqrt(sigma^2 + 1), s = sigma alpha and
    lambda = log(alpha / s) (half the log-SNR). From grid point i to i+1, h = lambda_{i+1} - lambda_i:
        1st order (first step; last step; after a jump):
            x_{i+1} = (s_{i+1} / s_i) x_i - alpha_{i+1} (e^{-h} - 1) x0_i
        2nd order, with r = (lambda_i - lambda_{i-1}) / h:
            D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
            x_{i+1} = (s_{i+1} / s_i) x_i - alpha_{i+1} (e^{-h} - 1) D
    The last step goes to sigma = 0 (lambda = inf) and returns x0_hat. Matches diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` with its other
    defaults ("linspace" spacing, midpoint, lower_order_final, final sigma 0).

    Args: as for :class:`EulerSampler`. ``init_noise_sigma`` is 1 and the network input is the
    sample itself.
    """

    solver_grid = True
    vp_space = True

    def _reset_history(self) -> None:
        self._previous: tuple[int, torch.Tensor] | None = None  # (grid index, x0_hat) of the last step

    def _lambda(self, sigma: torch.Tensor) -> torch.Tensor:
        alpha, sigma_vp = self._alpha_sigma(sigma)
        return torch.log(alpha) - torch.log(sigma_vp)

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One DPM-Solver++ step from x_t = ``sample`` (B, ...); ``noise``/``generator`` unused."""
        i = self._current(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._denoised(model_output, sample, sigma)
        previous = self._previous
        self._previous = (i, x0)
        self._index = i + 1
        if float(sigma_next) == 0.0:
            return x0  # the 1st-order update with s_{i+1} = 0, alpha_{i+1} = 1, e^{-h} = 0
        alpha_next, s_next = self._alpha_sigma(sigma_next)
        _, s_cur = self._alpha_sigma(sigma)
        lam_cur, lam_next = self._lambda(sigma), self._lambda(sigma_next)
        h = lam_next - lam_cur
        if previous is not None and previous[0] == i - 1:
            r = (lam_cur - self._lambda(self.sigmas[i - 1])) / h
            x0 = x0 + (x0 - previous[1]) / (2 * r)
        return (s_next / s_cur) * sample - (alpha_next * (torch.exp(-h) - 1.0)) * x0


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


Sampler = Union[DDPMSampler, DDIMSampler, EulerSampler, EulerAncestralSampler, LMSSampler, DPMSolverMultistepSampler]


@torch.no_grad()
def sample_loop(
    model_fn: ModelFn,
    sampler: "Sampler",
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
            device (float for the Euler/LMS grids); the output is what ``sampler.prediction_type`` says.
            Conditioning and classifier-free guidance are closed over by the caller
            (:func:`classifier_free_guidance`).
        sampler: any sampler of this module; its timesteps are set here. The initial noise is
            scaled by its ``init_noise_sigma`` and the network sees ``scale_model_input(x, t)``.
        shape: shape of the sample; may be None when ``init`` is given.
        num_inference_steps: number of timesteps on the full grid (img2img runs a tail of it).
        generator: source of every Gaussian draw (initial noise first, then one per stochastic
            step), in the order diffusers' pipelines draw them; or one generator per sample
            (:func:`gaussian`).
        device, dtype: where and in which precision x_t lives.
        init: img2img starting point x_0 (B, ...), e.g. scaled VAE latents of an image. It is
            noised to the first kept timestep (:func:`img2img_timesteps`) with the sampler's
            ``start_at`` and denoised from there.
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
        x = x * sampler.init_noise_sigma  # 1 for DDPM/DDIM/DPM-Solver, ~sigma_max for the VE samplers
    else:
        if shape is not None and tuple(shape) != tuple(init.shape):
            raise UserError(f"sample_loop shape {tuple(shape)} differs from init shape {tuple(init.shape)}")
        init = init.to(device=device, dtype=dtype)
        timesteps = img2img_timesteps(timesteps, strength)
        if len(timesteps) == 0:  # strength so low that no step is left: the image is unchanged
            return init.clone()
        # Noised to the first kept grid point, in the sampler's own space (VE samplers: x0 + sigma eps).
        x = sampler.start_at(len(sampler.timesteps) - len(timesteps), init, _gaussian_like(init, generator))

    for i, t in enumerate(timesteps.tolist()):
        # Long timesteps for DDPM/DDIM/DPM-Solver, fractional ones for the Euler/LMS grids.
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=timesteps.dtype)  # (B,)
        x = sampler.step(model_fn(sampler.scale_model_input(x, t), t_batch), t, x, generator=generator)
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
