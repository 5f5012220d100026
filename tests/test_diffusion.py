"""modules/diffusion.py against diffusers' DDPM/DDIM/DPMSolverMultistep/Euler/EulerAncestral/LMS schedulers
and against the papers' formulas.

Samplers are compared over whole multi-step trajectories driven by a fixed random "denoiser"
and the same Gaussian draws on both sides (diffusers' DDIM takes them as ``variance_noise``;
for DDPM the ``randn_tensor`` its module calls is patched to hand them out).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete
from diffusers.training_utils import compute_snr

from modules.diffusion import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    EulerAncestralSampler,
    EulerSampler,
    LMSSampler,
    NoiseSchedule,
    classifier_free_guidance,
    diffusion_loss,
    img2img_timesteps,
    inference_timesteps,
    karras_sigmas,
    min_snr_weights,
    sample_loop,
    sample_noise,
    sample_timesteps,
    sigma_grid,
)
from modules.errors import UserError

TOL = dict(rtol=1e-5, atol=1e-5)
SHAPE = (2, 4, 6, 6)  # (B, C, H, W)

# Our schedule name -> (diffusers name, beta_start, beta_end): the values each family is used with.
SCHEDULE_ARGS = {
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
}


def make_pair(beta_schedule: str, T: int = 1000) -> tuple[NoiseSchedule, dict]:
    name, b0, b1 = SCHEDULE_ARGS[beta_schedule]
    ours = NoiseSchedule(T, beta_schedule, beta_start=b0, beta_end=b1)
    ref_kwargs = dict(num_train_timesteps=T, beta_schedule=name, beta_start=b0, beta_end=b1, clip_sample=False)
    return ours, ref_kwargs


def make_model(prediction_type: str, alphas_cumprod: torch.Tensor, seed: int = 0):
    """A fixed random denoiser: guesses x0 = 0.8 tanh(W x) and outputs what ``prediction_type`` implies.

    Written from diffusers' alphas_cumprod and the textbook formulas, not from our module, and
    behaves like a real denoiser so trajectories stay bounded and 1e-5 is a meaningful tolerance.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(SHAPE[1], SHAPE[1], generator=g) / SHAPE[1] ** 0.5

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = 0.8 * torch.tanh(torch.einsum("ij,bjhw->bihw", W, x))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return x0

    return model_fn


def assert_same_trajectory(ours, ref, model_fn, noises, ref_step) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both samplers from the same x_T over their (equal) timesteps, asserting equal timesteps and
    equal samples after every step (to TOL); return both final samples."""
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_ours = x_ref = noises[-1]
    for i, t in enumerate(ours.timesteps.tolist()):
        t_batch = torch.full((SHAPE[0],), t)
        x_ref = ref_step(ref, model_fn(x_ref, t_batch), t, x_ref, noises[i])
        x_ours = ours.step(model_fn(x_ours, t_batch), t, x_ours, noise=noises[i])
        torch.testing.assert_close(x_ours, x_ref, **TOL)
    return x_ours, x_ref


def ddpm_ref_step(monkeypatch):
    def step(ref, out, t, x, z):
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z)
        return ref.step(out, t, x).prev_sample

    return step


def ddim_ref_step(eta):
    return lambda ref, out, t, x, z: ref.step(out, t, x, eta=eta, variance_noise=z).prev_sample


def draws(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n + 1, *SHAPE, generator=torch.Generator().manual_seed(seed))  # n step draws + x_T


# --------------------------------------------------------------------------------------------
# Schedules and the forward process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_schedule_tensors_equal_diffusers(beta_schedule):
    ours, kw = make_pair(beta_schedule)
    ref = DDPMScheduler(**kw)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_add_noise_velocity_snr_equal_diffusers(beta_schedule):
    ours, kw = make_pair(beta_schedule)
    ref = DDPMScheduler(**kw)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 8, *SHAPE[1:], generator=g)
    t = torch.tensor([0, 1, 250, 500, 750, 998, 999, 999 // 3])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.snr(t), compute_snr(ref, t), rtol=1e-5, atol=0)
    # A Python int is one timestep for the whole batch.
    torch.testing.assert_close(ours.add_noise(x0, noise, 250), ref.add_noise(x0, noise, torch.full((8,), 250)))
    # Lower precision stays lower precision.
    assert ours.add_noise(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.bfloat16


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_target_and_predict_x0_and_eps_are_inverse(prediction_type):
    schedule = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, *SHAPE[1:], generator=g)
    t = torch.tensor([10, 300, 600, 900])
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(x0, noise, t, prediction_type)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": schedule.velocity(x0, noise, t)}[prediction_type]
    assert torch.equal(target, expected)
    # The perfect prediction gives back the x0 and the noise the sample was made from.
    x0_hat, eps_hat = schedule.predict_x0_and_eps(target, x_t, t, prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=2e-4)


def test_velocity_is_the_textbook_formula():
    schedule = NoiseSchedule(1000, "linear")
    x0, noise = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 400, 999])
    a = schedule.alphas_cumprod[t].view(-1, 1)
    torch.testing.assert_close(schedule.velocity(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(schedule.snr(t), a.flatten() / (1 - a.flatten()))


# --------------------------------------------------------------------------------------------
# Timestep grids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 10, 48, 50, 333, 1000])
def test_timesteps_equal_diffusers(spacing, n):
    ref = DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(n)
    ours = inference_timesteps(1000, n, spacing)
    assert ours.dtype == torch.long and torch.equal(ours, ref.timesteps)
    ddpm = DDPMScheduler(timestep_spacing=spacing)
    ddpm.set_timesteps(n)
    assert torch.equal(ours, ddpm.timesteps)


def test_timesteps_steps_offset_and_trailing_float_quirk():
    ref = DDIMScheduler(steps_offset=1)
    ref.set_timesteps(50)
    assert torch.equal(inference_timesteps(1000, 50, "leading", steps_offset=1), ref.timesteps)
    # numpy's float arange gives diffusers a 62nd, negative timestep for n=61; we keep exactly 61.
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    ours = inference_timesteps(1000, 61, "trailing")
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    assert torch.equal(ours, ref.timesteps[:61]) and int(ours.min()) >= 0
    with pytest.raises(UserError, match="num_inference_steps"):
        inference_timesteps(1000, 1001, "leading")
    with pytest.raises(UserError, match="num_inference_steps"):
        inference_timesteps(1000, 0, "leading")


# --------------------------------------------------------------------------------------------
# Samplers: full trajectories against diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_trajectory_equals_diffusers(beta_schedule, prediction_type, spacing, monkeypatch):
    schedule, kw = make_pair(beta_schedule)
    ref = DDPMScheduler(**kw, prediction_type=prediction_type, timestep_spacing=spacing)
    ours = DDPMSampler(schedule, prediction_type=prediction_type, timestep_spacing=spacing)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    model_fn = make_model(prediction_type, ref.alphas_cumprod)
    x_ours, _ = assert_same_trajectory(ours, ref, model_fn, draws(10), ddpm_ref_step(monkeypatch))
    assert x_ours.abs().max() < 10  # the denoiser-like model keeps the chain bounded


@pytest.mark.parametrize(
    "variance_type, clip_sample, n", [("fixed_large", False, 25), ("fixed_small", True, 1000)]
)
def test_ddpm_variants_equal_diffusers(variance_type, clip_sample, n, monkeypatch):
    schedule, kw = make_pair("linear")
    kw["clip_sample"] = clip_sample
    ref = DDPMScheduler(**kw, variance_type=variance_type)
    ours = DDPMSampler(schedule, variance_type=variance_type, clip_sample=clip_sample)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert_same_trajectory(ours, ref, make_model("epsilon", ref.alphas_cumprod), draws(n), ddpm_ref_step(monkeypatch))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddim_trajectory_equals_diffusers(beta_schedule, prediction_type, spacing, eta):
    schedule, kw = make_pair(beta_schedule)
    ref = DDIMScheduler(**kw, prediction_type=prediction_type, timestep_spacing=spacing, set_alpha_to_one=False)
    ours = DDIMSampler(schedule, prediction_type=prediction_type, eta=eta, timestep_spacing=spacing)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    model_fn = make_model(prediction_type, ref.alphas_cumprod)
    x_ours, _ = assert_same_trajectory(ours, ref, model_fn, draws(10), ddim_ref_step(eta))
    assert x_ours.abs().max() < 10


@pytest.mark.parametrize(
    "spacing, n, eta, set_alpha_to_one, clip_sample",
    [("trailing", 48, 0.5, False, False), ("leading", 7, 0.0, True, False), ("leading", 20, 1.0, False, True)],
)
def test_ddim_variants_equal_diffusers(spacing, n, eta, set_alpha_to_one, clip_sample):
    schedule, kw = make_pair("scaled_linear")
    kw["clip_sample"] = clip_sample
    ref = DDIMScheduler(**kw, timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one)
    ours = DDIMSampler(
        schedule, eta=eta, timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample
    )
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert_same_trajectory(ours, ref, make_model("v_prediction", ref.alphas_cumprod), draws(n), ddim_ref_step(eta))


def test_ddpm_and_ddim_eta1_draw_noise_from_the_generator_like_diffusers():
    schedule, kw = make_pair("linear")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    for ours, ref, extra in [
        (DDPMSampler(schedule), DDPMScheduler(**kw), {}),
        (DDIMSampler(schedule, eta=1.0), DDIMScheduler(**kw, set_alpha_to_one=False), {"eta": 1.0}),
    ]:
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        got = ours.step(out, 500, x, generator=torch.Generator().manual_seed(5))
        want = ref.step(out, 500, x, generator=torch.Generator().manual_seed(5), **extra).prev_sample
        torch.testing.assert_close(got, want, **TOL)


def test_ddpm_adds_no_noise_at_t0_and_ddim_eta0_is_deterministic():
    schedule = NoiseSchedule(1000, "linear")
    x, out, z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    ddpm = DDPMSampler(schedule)
    ddpm.set_timesteps(10)
    assert torch.equal(ddpm.step(out, 0, x, noise=z), ddpm.step(out, 0, x, noise=torch.zeros_like(z)))
    ddim = DDIMSampler(schedule, eta=0.0)
    ddim.set_timesteps(10)
    assert torch.equal(ddim.step(out, 500, x, noise=z), ddim.step(out, 500, x, noise=torch.zeros_like(z)))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_with_eta_1_is_the_ddpm_posterior_step(prediction_type):
    """Song et al. 2021 sec. 4.1: eta = 1 makes the DDIM update the DDPM ancestral step."""
    schedule = NoiseSchedule(1000, "cosine")
    x, out, z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    ddpm = DDPMSampler(schedule, prediction_type=prediction_type)
    ddim = DDIMSampler(schedule, prediction_type=prediction_type, eta=1.0)
    ddpm.set_timesteps(20)
    ddim.set_timesteps(20)
    for t in (950, 500, 50):
        assert ddpm.previous_timestep(t) == ddim.previous_timestep(t)
        torch.testing.assert_close(ddim.step(out, t, x, noise=z), ddpm.step(out, t, x, noise=z), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Sampling loop, img2img, guidance
# --------------------------------------------------------------------------------------------


def test_sample_loop_equals_a_diffusers_pipeline_loop():
    """Same seed -> same initial latents and same per-step draws, in diffusers' order."""
    schedule, kw = make_pair("scaled_linear")
    ref = DDPMScheduler(**kw)
    model_fn = make_model("epsilon", ref.alphas_cumprod)

    g = torch.Generator().manual_seed(7)
    ref.set_timesteps(10)
    x = torch.randn(SHAPE, generator=g)  # what randn_tensor does with a CPU generator
    for t in ref.timesteps.tolist():
        x = ref.step(model_fn(x, torch.full((SHAPE[0],), t)), t, x, generator=g).prev_sample

    seen = []
    got = sample_loop(
        model_fn, DDPMSampler(schedule), SHAPE, 10, generator=torch.Generator().manual_seed(7),
        callback=lambda i, t, x_: seen.append((i, t)),
    )
    torch.testing.assert_close(got, x, **TOL)
    assert seen == list(enumerate(ref.timesteps.tolist()))


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.3, 0.75, 0.8, 1.0])
@pytest.mark.parametrize("n", [10, 50])
def test_img2img_timesteps_equal_diffusers_get_timesteps(strength, n):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        StableDiffusionImg2ImgPipeline,
    )

    ref = DDIMScheduler()
    ref.set_timesteps(n)
    fake_pipe = types.SimpleNamespace(scheduler=ref)
    want, _ = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, n, strength, "cpu")
    assert torch.equal(img2img_timesteps(ref.timesteps, strength), want)


def test_img2img_sample_loop_starts_from_noised_init():
    schedule, kw = make_pair("linear")
    ref = DDIMScheduler(**kw, set_alpha_to_one=False)
    model_fn = make_model("epsilon", ref.alphas_cumprod)
    init = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9)) * 2 - 1

    # diffusers' img2img recipe: keep the tail of the grid, noise init to its first timestep.
    g = torch.Generator().manual_seed(11)
    ref.set_timesteps(20)
    timesteps = ref.timesteps[20 - int(20 * 0.6) :]
    x = ref.add_noise(init, torch.randn(SHAPE, generator=g), timesteps[:1].repeat(SHAPE[0]))
    for t in timesteps.tolist():
        x = ref.step(model_fn(x, torch.full((SHAPE[0],), t)), t, x).prev_sample

    got = sample_loop(
        model_fn, DDIMSampler(schedule), None, 20, generator=torch.Generator().manual_seed(11), init=init, strength=0.6
    )
    torch.testing.assert_close(got, x, **TOL)
    # Strength 0 leaves the image alone; strength without an image is a mistake.
    assert torch.equal(sample_loop(model_fn, DDIMSampler(schedule), None, 20, init=init, strength=0.0), init)
    with pytest.raises(UserError, match="strength"):
        sample_loop(model_fn, DDIMSampler(schedule), SHAPE, 20, strength=0.5)
    with pytest.raises(UserError, match="strength"):
        img2img_timesteps(ref.timesteps, 1.5)


def test_classifier_free_guidance():
    cond, uncond = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond))


# --------------------------------------------------------------------------------------------
# Training: noise, timesteps, losses
# --------------------------------------------------------------------------------------------


def test_offset_noise_is_a_per_sample_per_channel_constant():
    like = torch.zeros(4, 3, 16, 16)
    plain = sample_noise(like, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(like.shape, generator=torch.Generator().manual_seed(0)))
    offset = sample_noise(like, torch.Generator().manual_seed(0), offset_noise=0.1)
    shift = offset - plain  # (B, C, H, W), constant over H, W
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    torch.randn(like.shape, generator=g)
    torch.testing.assert_close(shift[:, :, 0, 0], 0.1 * torch.randn(4, 3, generator=g), rtol=0, atol=1e-6)
    assert shift[:, :, 0, 0].unique().numel() == 12  # one draw per (sample, channel)


def test_sample_timesteps():
    t = sample_timesteps(4096, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4096,) and int(t.min()) >= 0 and int(t.max()) <= 999
    assert t.unique().numel() > 900  # covers the range
    assert torch.equal(t, sample_timesteps(4096, 1000, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_equal_formula_and_diffusers_recipe(prediction_type):
    schedule, kw = make_pair("linear")
    t = torch.arange(0, 1000, 37)
    snr = schedule.snr(t)
    w = min_snr_weights(snr, 5.0, prediction_type)
    expected = {
        "epsilon": torch.minimum(snr, torch.tensor(5.0)) / snr,
        "v_prediction": torch.minimum(snr, torch.tensor(5.0)) / (snr + 1),
        "sample": torch.minimum(snr, torch.tensor(5.0)),
    }[prediction_type]
    torch.testing.assert_close(w, expected, rtol=0, atol=0)
    if prediction_type != "sample":  # diffusers' train_text_to_image.py has the eps and v cases
        ref_snr = compute_snr(DDPMScheduler(**kw), t)
        ref_w = torch.stack([ref_snr, 5.0 * torch.ones_like(ref_snr)], dim=1).min(dim=1)[0]
        ref_w = ref_w / ref_snr if prediction_type == "epsilon" else ref_w / (ref_snr + 1)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=0)
    # eps-weights keep their limit 1 where SNR is 0 instead of 0/0.
    assert min_snr_weights(torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0


@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber"])
def test_diffusion_loss(loss_type):
    schedule = NoiseSchedule(1000, "linear")
    pred, target = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 900])
    d = pred - target
    elementwise = {"mse": d**2, "l1": d.abs(), "huber": 2 * 0.3 * ((d**2 + 0.09).sqrt() - 0.3)}[loss_type]
    per_sample = elementwise.mean(dim=(1, 2, 3))

    loss, logs = diffusion_loss(pred, target, t, schedule, loss_type=loss_type, huber_c=0.3)
    torch.testing.assert_close(loss, per_sample.mean())
    assert set(logs) == {"loss"} and not logs["loss"].requires_grad
    if loss_type == "mse":
        torch.testing.assert_close(loss, F.mse_loss(pred, target))

    pred.requires_grad_(True)
    loss, logs = diffusion_loss(pred, target, t, schedule, loss_type=loss_type, snr_gamma=5.0,
                                prediction_type="v_prediction", huber_c=0.3)
    w = min_snr_weights(schedule.snr(t), 5.0, "v_prediction")
    torch.testing.assert_close(loss, (w * per_sample).mean())
    torch.testing.assert_close(logs["loss_unweighted"], per_sample.mean())
    assert loss.requires_grad and all(not v.requires_grad and v.dim() == 0 for v in logs.values())


def test_huber_loss_limits():
    schedule = NoiseSchedule(1000, "linear")
    t = torch.tensor([10])
    small = torch.full((1, 1, 2, 2), 1e-3)
    big = torch.full((1, 1, 2, 2), 100.0)
    zero = torch.zeros_like(small)
    huber_small, _ = diffusion_loss(small, zero, t, schedule, loss_type="huber", huber_c=1.0)
    huber_big, _ = diffusion_loss(big, zero, t, schedule, loss_type="huber", huber_c=1.0)
    assert abs(huber_small.item() - 1e-6) < 1e-9  # ~ d^2 near zero, like MSE
    assert abs(huber_big.item() / (2 * 100.0) - 1) < 0.01  # ~ 2c|d| far away, like L1


# --------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------


def test_unknown_names_are_user_errors_listing_the_choices():
    schedule = NoiseSchedule(1000, "linear")
    with pytest.raises(UserError, match="beta_schedule 'sigmoid'.*linear, scaled_linear, cosine"):
        NoiseSchedule(1000, "sigmoid")
    with pytest.raises(UserError, match="prediction_type 'eps'.*epsilon, v_prediction, sample"):
        DDPMSampler(schedule, prediction_type="eps")
    with pytest.raises(UserError, match="prediction_type"):
        DDIMSampler(schedule, prediction_type="x0")
    with pytest.raises(UserError, match="prediction_type"):
        schedule.training_target(torch.zeros(1), torch.zeros(1), 0, "noise")
    with pytest.raises(UserError, match="timestep_spacing 'even'.*leading, trailing, linspace"):
        DDIMSampler(schedule, timestep_spacing="even")
    with pytest.raises(UserError, match="variance_type 'learned'.*fixed_small, fixed_large"):
        DDPMSampler(schedule, variance_type="learned")
    with pytest.raises(UserError, match="loss_type 'l2'.*mse, l1, huber"):
        diffusion_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), schedule, "l2")
    with pytest.raises(UserError, match="eta"):
        DDIMSampler(schedule, eta=-1.0)
    with pytest.raises(UserError, match="betas"):
        NoiseSchedule(1000, "linear", beta_start=0.0)


# --------------------------------------------------------------------------------------------
# Sigma-space samplers (DPM-Solver++ 2M, Euler, Euler ancestral, LMS) against diffusers
# --------------------------------------------------------------------------------------------

# name -> (ours, diffusers' scheduler, the diffusers arguments that select the method)
SIGMA_SAMPLERS = {
    "dpmpp_2m": (DPMSolverMultistepSampler, DPMSolverMultistepScheduler,
                 {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerSampler, EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralSampler, EulerAncestralDiscreteScheduler, {}),
    "lms": (LMSSampler, LMSDiscreteScheduler, {}),
}


def make_sigma_pair(name: str, beta_schedule: str, prediction_type: str, karras: bool, n: int, **grid):
    """(ours, diffusers') for sampler ``name``, both with ``set_timesteps(n)`` called.

    diffusers' EulerAncestralDiscreteScheduler has no Karras option: with ``karras`` it gets the
    Karras grid of EulerDiscreteScheduler(use_karras_sigmas=True), which is what ours walks.
    ``set_begin_index(0)``: diffusers otherwise starts a grid whose first timestep repeats (DPM-Solver,
    Karras, cosine: 998, 998, ...) at its second copy and runs off the end.
    """
    schedule, kw = make_pair(beta_schedule)
    del kw["clip_sample"]
    ours_cls, ref_cls, method = SIGMA_SAMPLERS[name]
    ours = ours_cls(schedule, prediction_type=prediction_type, use_karras_sigmas=karras, **grid)
    karras_kw = {} if name == "euler_a" else {"use_karras_sigmas": karras}
    ref = ref_cls(**kw, prediction_type=prediction_type, **method, **karras_kw, **grid)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    if name == "euler_a" and karras:
        grid_ref = EulerDiscreteScheduler(**kw, use_karras_sigmas=True, **grid)
        grid_ref.set_timesteps(n)
        ref.sigmas, ref.timesteps = grid_ref.sigmas, grid_ref.timesteps
    ref.set_begin_index(0)
    return ours, ref


def make_float_t_model(prediction_type: str, alphas_cumprod: torch.Tensor, seed: int = 0):
    """:func:`make_model` for fractional timesteps too (Euler/LMS grids): abar interpolated linearly in t."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(SHAPE[1], SHAPE[1], generator=g) / SHAPE[1] ** 0.5
    T = len(alphas_cumprod)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double().clamp(0, T - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=T - 1)
        w = (t - lo.double()).float()
        a = (alphas_cumprod[lo] + w * (alphas_cumprod[hi] - alphas_cumprod[lo])).view(-1, 1, 1, 1)
        x0 = 0.8 * torch.tanh(torch.einsum("ij,bjhw->bihw", W, x))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return x0

    return model_fn


def vp(sampler, x: torch.Tensor, i: int) -> torch.Tensor:
    """A sample after step i in VP units x_t (O(1) at every noise level), where a VE sample of the
    Euler/LMS family, x_t * sqrt(sigma^2 + 1), is up to ~2e4 and float32 rounds it to ~1e-3."""
    if isinstance(sampler, DPMSolverMultistepSampler):
        return x
    return x / (sampler.sigmas[i + 1] ** 2 + 1) ** 0.5


def assert_same_sigma_trajectory(ours, ref, model_fn, noises, monkeypatch) -> torch.Tensor:
    """Both samplers, pipeline-style (scale_model_input, model, step), from the same x_T and draws:
    equal grids, and after every step equal samples (TOL on the raw sample, 1e-5 abs in VP units)."""
    assert ours.timesteps.dtype == ref.timesteps.dtype and torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)
    x_ours = x_ref = noises[-1] * ref.init_noise_sigma
    for i, t in enumerate(ours.timesteps.tolist()):
        t_batch = torch.full((SHAPE[0],), t, dtype=ours.timesteps.dtype)
        t_ref = ref.timesteps[i]
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, z=noises[i], **k: z)
        x_ref = ref.step(model_fn(ref.scale_model_input(x_ref, t_ref), t_batch), t_ref, x_ref).prev_sample
        x_ours = ours.step(model_fn(ours.scale_model_input(x_ours, t), t_batch), t, x_ours, noise=noises[i])
        torch.testing.assert_close(x_ours, x_ref, **TOL)
        torch.testing.assert_close(vp(ours, x_ours, i), vp(ours, x_ref, i), rtol=0, atol=1e-5)
    return x_ours


@pytest.mark.parametrize("karras", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("name", list(SIGMA_SAMPLERS))
def test_sigma_sampler_trajectory_equals_diffusers(name, beta_schedule, prediction_type, karras, monkeypatch):
    """Default grids (linspace spacing), 12 steps: every step's sample equals diffusers'."""
    ours, ref = make_sigma_pair(name, beta_schedule, prediction_type, karras, 12)
    model_fn = make_float_t_model(prediction_type, ref.alphas_cumprod)
    x = assert_same_sigma_trajectory(ours, ref, model_fn, draws(12), monkeypatch)
    assert torch.isfinite(x).all() and x.abs().max() < 10  # the last step lands at sigma = 0: x0-like


@pytest.mark.parametrize(
    "name, spacing, n", [("euler", "leading", 7), ("euler_a", "trailing", 10), ("lms", "leading", 20),
                         ("dpmpp_2m", "leading", 7), ("dpmpp_2m", "trailing", 20)],
)
def test_sigma_sampler_other_spacings_equal_diffusers(name, spacing, n, monkeypatch):
    ours, ref = make_sigma_pair(name, "scaled_linear", "epsilon", False, n, timestep_spacing=spacing)
    assert_same_sigma_trajectory(ours, ref, make_float_t_model("epsilon", ref.alphas_cumprod), draws(n), monkeypatch)


def test_karras_sigmas_are_eq5_and_the_grid_ends_at_zero():
    s = karras_sigmas(0.03, 80.0, 9)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.03)
    steps = np.diff(s ** (1 / 7.0))  # equally spaced in sigma^(1/rho), rho = 7
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    schedule = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012)
    for solver_grid in (False, True):
        timesteps, sigmas = sigma_grid(schedule, 10, use_karras_sigmas=True, solver_grid=solver_grid)
        assert len(timesteps) == 10 and len(sigmas) == 11 and sigmas[-1] == 0
        assert (np.diff(sigmas) < 0).all() and (np.diff(timesteps) <= 0).all()


@pytest.mark.parametrize("name", list(SIGMA_SAMPLERS))
def test_sample_loop_with_sigma_samplers_equals_a_diffusers_pipeline_loop(name):
    """init_noise_sigma, scale_model_input and the generator's draws in diffusers' order."""
    ours, ref = make_sigma_pair(name, "scaled_linear", "v_prediction", False, 10)
    model_fn = make_float_t_model("v_prediction", ref.alphas_cumprod)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=g) * ref.init_noise_sigma
    extra = {} if name == "lms" else {"generator": g}  # diffusers' LMS step takes none
    for t in ref.timesteps:
        t_batch = torch.full((SHAPE[0],), float(t), dtype=ref.timesteps.dtype)
        x = ref.step(model_fn(ref.scale_model_input(x, t), t_batch), t, x, **extra).prev_sample
    got = sample_loop(model_fn, ours, SHAPE, 10, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, x, **TOL)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler", "euler_a"])
def test_img2img_with_sigma_samplers_equals_the_diffusers_recipe(name):
    """diffusers' img2img: tail of the grid, set_begin_index, add_noise at the first kept step."""
    ours, ref = make_sigma_pair(name, "linear", "epsilon", True, 20)
    model_fn = make_float_t_model("epsilon", ref.alphas_cumprod)
    init = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9)) * 2 - 1
    g = torch.Generator().manual_seed(11)
    start = 20 - int(20 * 0.6)
    timesteps = ref.timesteps[start:]
    ref.set_begin_index(start)
    x = ref.add_noise(init, torch.randn(SHAPE, generator=g), timesteps[:1].repeat(SHAPE[0]))
    for t in timesteps:
        t_batch = torch.full((SHAPE[0],), float(t), dtype=ref.timesteps.dtype)
        x = ref.step(model_fn(ref.scale_model_input(x, t), t_batch), t, x, generator=g).prev_sample
    got = sample_loop(model_fn, ours, None, 20, generator=torch.Generator().manual_seed(11), init=init, strength=0.6)
    torch.testing.assert_close(got, x, **TOL)


def test_lms_img2img_starts_with_an_euler_step_and_sigma_noising_is_q_xt_x0():
    """LMS has no history at the first kept step, so it takes an Euler step (diffusers' LMS would use
    order-4 coefficients with one derivative there); and the VE start x0 + sigma eps is q(x_t | x_0)
    times 1 / sqrt(abar)."""
    schedule = NoiseSchedule(1000, "linear")
    model_fn = make_float_t_model("epsilon", schedule.alphas_cumprod)
    init, noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    lms, euler = LMSSampler(schedule), EulerSampler(schedule)
    for s in (lms, euler):
        s.set_timesteps(20)
    x_lms, x_euler = lms.start_at(8, init, noise), euler.start_at(8, init, noise)
    t = float(lms.timesteps[8])
    t_batch = torch.full((SHAPE[0],), t)
    out = model_fn(lms.scale_model_input(x_lms, t), t_batch)
    assert torch.equal(lms.step(out, t, x_lms), euler.step(out, t, x_euler))
    abar = float(np.interp(t, np.arange(1000), schedule.alphas_cumprod.double().numpy()))
    sigma = float(lms.sigmas[8])
    assert sigma == pytest.approx(((1 - abar) / abar) ** 0.5, rel=1e-3)  # sigma interpolated, abar too
    # DDPM/DDIM keep their q(x_t | x_0) start.
    ddim = DDIMSampler(schedule)
    ddim.set_timesteps(20)
    t_ddim = int(ddim.timesteps[8])
    assert torch.equal(ddim.start_at(8, init, noise), schedule.add_noise(init, noise, t_ddim))


def test_sigma_samplers_are_stateful_and_say_so():
    schedule = NoiseSchedule(1000, "linear")
    euler = EulerSampler(schedule)
    euler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="not in this sampler's timesteps"):
        euler.step(x, 500.5, x)
    t0, t1, t2 = euler.timesteps[:3].tolist()
    euler.step(x, t0, x)
    with pytest.raises(ValueError, match="expected step 1"):
        euler.step(x, t2, x)
    euler.step(x, t1, x)  # the right one still works
    euler.set_timesteps(10)  # and set_timesteps restarts
    euler.step(x, t0, x)
    with pytest.raises(UserError, match="order"):
        LMSSampler(schedule, order=0)
    with pytest.raises(UserError, match="timestep_spacing 'even'"):
        EulerSampler(schedule, timestep_spacing="even")
    with pytest.raises(UserError, match="prediction_type"):
        DPMSolverMultistepSampler(schedule, prediction_type="eps")
    # The ancestral step draws its noise from the generator when none is given, like diffusers.
    ea, ref = make_sigma_pair("euler_a", "linear", "epsilon", False, 10)
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    t = ref.timesteps[0]
    got = ea.step(out, float(t), x, generator=torch.Generator().manual_seed(5))
    want = ref.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------
# build_sampler and LatentDiffusion.generate with every sampler
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ldm():
    from modules.autoencoder import VAEConfig, build_autoencoder
    from modules.ldm_io import LatentDiffusion
    from modules.model_config import LDMConfig
    from modules.unet import UNet, UNetConfig

    torch.manual_seed(0)
    vae_cfg = VAEConfig(img_size=16, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                        residual_layers_per_block=1, attention_layers=0)
    unet_cfg = UNetConfig(unet_channels_per_block=[16, 32], down_block_types=["Down", "Down"],
                          up_block_types=["Up", "Up"], mid_block_type="None", unet_residual_layers_per_block=1,
                          groupnorm_groups=4, num_attention_heads=2, time_embed_start_dim=16, time_embed_proj_dim=32,
                          text_conditioning=False, class_conditioning=False)
    unet = UNet(unet_cfg)
    with torch.no_grad():  # a zero-initialised output layer would make every sampler's job trivial
        for p in unet.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest on a busy machine
    yield LatentDiffusion(unet=unet.eval(), vae=build_autoencoder(vae_cfg).eval(), text_encoder=None,
                          config=LDMConfig(vae=vae_cfg, unet=unet_cfg), scaling_factor=0.7, shift_factor=0.0,
                          conditioning="none", img_size=16)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_a", "lms"])
def test_generate_with_every_sampler_gives_finite_seeded_images(tiny_ldm, sampler, karras):
    if karras and sampler in ("ddpm", "ddim"):
        with pytest.raises(UserError, match="karras_sigmas works with the samplers dpmpp_2m, euler, euler_a, lms"):
            tiny_ldm.generate(1, sampler=sampler, karras_sigmas=True)
        return
    kw = dict(sampler=sampler, num_inference_steps=4, karras_sigmas=karras)
    images = tiny_ldm.generate(2, generator=torch.Generator().manual_seed(0), **kw)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert not torch.equal(images[0], images[1])
    assert torch.equal(images, tiny_ldm.generate(2, generator=torch.Generator().manual_seed(0), **kw))
    edited = tiny_ldm.generate(2, generator=torch.Generator().manual_seed(1), init_images=images.flip(-1),
                               strength=0.5, **kw)
    assert edited.shape == images.shape and torch.isfinite(edited).all()


def test_build_sampler_names_spacing_defaults_and_errors():
    from modules.ldm_io import SAMPLERS, build_sampler
    from modules.model_config import DiffusionConfig

    cfg = DiffusionConfig(prediction_type="v_prediction")
    assert SAMPLERS == ("ddim", "ddpm", "dpmpp_2m", "euler", "euler_a", "lms")
    built = {name: build_sampler(cfg, name) for name in SAMPLERS}
    assert [type(s).__name__ for s in built.values()] == [
        "DDIMSampler", "DDPMSampler", "DPMSolverMultistepSampler", "EulerSampler", "EulerAncestralSampler",
        "LMSSampler"]
    assert {n: s.timestep_spacing for n, s in built.items()} == {
        "ddim": "leading", "ddpm": "leading", "dpmpp_2m": "linspace", "euler": "linspace", "euler_a": "linspace",
        "lms": "linspace"}
    assert all(s.prediction_type == "v_prediction" for s in built.values())
    assert build_sampler(cfg, "euler", timestep_spacing="trailing", karras_sigmas=True).use_karras_sigmas
    assert build_sampler(cfg, "ddim", eta=0.5).eta == 0.5
    with pytest.raises(UserError, match="unknown sampler 'heun'; expected one of: ddim, ddpm, dpmpp_2m, euler, "
                                        "euler_a, lms"):
        build_sampler(cfg, "heun")
