"""modules/diffusion.py against diffusers' DDPMScheduler / DDIMScheduler and against the papers' formulas.

Samplers are compared over whole multi-step trajectories driven by a fixed random "denoiser"
and the same Gaussian draws on both sides (diffusers' DDIM takes them as ``variance_noise``;
for DDPM the ``randn_tensor`` its module calls is patched to hand them out).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from diffusers.training_utils import compute_snr

from modules.diffusion import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    classifier_free_guidance,
    diffusion_loss,
    img2img_timesteps,
    inference_timesteps,
    min_snr_weights,
    sample_loop,
    sample_noise,
    sample_timesteps,
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
