"""The stage-1 loss (modules.vae_loss) and the PatchGAN (modules.discriminator).

Everything is checked against numbers computed independently here: losses against their
formulas, the adaptive weight against hand-derived gradients, gradient flow against separate
autograd calls.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.config import from_dict
from modules.discriminator import DiscriminatorConfig, NLayerDiscriminator, convert_to_sync_batchnorm
from modules.errors import UserError
from modules.vae_loss import VAELoss, VAELossConfig, adaptive_gan_weight


# ----------------------------------------------------------------------------------------------
# Tiny stand-ins: a KL autoencoder, its posterior, a frozen LPIPS-like metric, a counting D
# ----------------------------------------------------------------------------------------------

class ToyPosterior:
    """Diagonal Gaussian; kl() is per latent element, (B, C, H, W), like a raw KL map."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean, self.logvar = mean, logvar

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar)


class ToyVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)  # -> mean and logvar of 2 latent channels
        self.decoder_in = nn.Conv2d(2, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)  # the decoder's last layer

    def forward(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        recon = self.conv_out(F.silu(self.decoder_in(mean)))  # decode the mode: deterministic
        return recon, ToyPosterior(mean, logvar)


class TinyPerceptual(nn.Module):
    """LPIPS-shaped: channel-normalised conv features, squared difference, mean -> (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.dropout = nn.Dropout(0.5)  # must stay off inside the loss

    def forward(self, x0, x1):
        def feats(x):
            f1 = F.relu(self.conv1(x))
            f2 = F.relu(self.conv2(f1))
            return [f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in (f1, f2)]

        return sum(self.dropout((a - b) ** 2).mean(dim=(1, 2, 3)) for a, b in zip(feats(x0), feats(x1)))


class CountingDiscriminator(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _setup(seed=0, **config):
    torch.manual_seed(seed)
    vae = ToyVAE()
    perceptual = TinyPerceptual()
    disc = CountingDiscriminator(NLayerDiscriminator(start_channels=8, depth=2))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = VAELoss(VAELossConfig(**config), perceptual)
    return vae, perceptual, disc, x, loss


def _manual_nll(x, recon, perceptual, lpips_weight):
    # The default loss_reduction "ldm": LDM sums the per-pixel loss (LPIPS broadcast to every
    # pixel) over each sample's C*H*W values and averages over the batch. (These expectations were
    # per-value means before the loss followed LDM; test_mean_reduction_... keeps that formula.)
    nll = (x - recon).abs().sum(dim=(1, 2, 3)).mean()
    if lpips_weight > 0:
        nll = nll + lpips_weight * x[0].numel() * perceptual(x, recon).mean()
    return nll


def _manual_kl(posterior):
    return posterior.kl().sum(dim=(1, 2, 3)).mean()


# ----------------------------------------------------------------------------------------------
# Generator loss
# ----------------------------------------------------------------------------------------------

def test_lpips_term_reaches_the_autoencoder_gradients():
    grads = {}
    for lpips_weight in (0.0, 1.0):
        vae, perceptual, _, x, loss = _setup(lpips_weight=lpips_weight, kl_weight=1e-3)
        recon, posterior = vae(x)
        total, logs = loss.generator_loss(x, recon, posterior, step=0, discriminator=None, last_layer_weight=None)
        total.backward()
        grads[lpips_weight] = [p.grad.clone() for p in vae.parameters()]
        assert all(p.grad is None for p in perceptual.parameters())  # frozen
        assert not perceptual.training  # eval: no dropout

        # The same gradient from an independent autograd of the formula.
        vae.zero_grad()
        recon, posterior = vae(x)
        expected = _manual_nll(x, recon, perceptual, lpips_weight) + 1e-3 * _manual_kl(posterior)
        expected.backward()
        for p, g in zip(vae.parameters(), grads[lpips_weight]):
            torch.testing.assert_close(g, p.grad)
        assert logs["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    differs = [not torch.allclose(a, b) for a, b in zip(grads[0.0], grads[1.0])]
    assert all(differs)  # the perceptual gradient changes every layer, encoder included


def test_with_the_project_autoencoder_and_lpips():
    # The real pieces at tiny size: AutoencoderKL's posterior.kl() is per sample (B,), our LPIPS
    # (random SqueezeNet trunk, dropout heads) stays frozen and in eval, its gradient reaches the VAE.
    from modules.autoencoder import AutoencoderKL, VAEConfig
    from modules.lpips import LPIPS

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(img_size=32, latent_channels=2, vae_channels_per_block=[8, 16], norm_num_groups=4,
                                  attention_layers=0, residual_layers_per_block=1))
    lpips = LPIPS(backbone="squeeze", pretrained_backbone=False, use_dropout=True, channels_last=False)
    loss = VAELoss(VAELossConfig(lpips_weight=1.0, kl_weight=1e-3, disc_start=0, disc_weight=0.5), lpips).train()
    disc = NLayerDiscriminator(start_channels=8, depth=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, posterior = vae(x, sample_posterior=False)
    total, logs = loss.generator_loss(x, recon, posterior, 0, disc, vae.last_decoder_layer_weight)
    assert not lpips.training
    assert logs["kl"].item() == pytest.approx(posterior.kl().mean().item(), rel=1e-6)
    assert logs["lpips"].item() == pytest.approx(lpips(x, recon).mean().item(), rel=1e-5)
    assert logs["adaptive_weight"].item() > 0
    lpips_grad = torch.autograd.grad(loss.config.lpips_weight * lpips(x, recon).mean(), vae.encoder.conv_in.weight,
                                     retain_graph=True)[0]
    assert lpips_grad.abs().sum() > 0
    total.backward()
    assert all(p.grad is None for p in lpips.parameters()) and all(p.grad is None for p in disc.parameters())


def test_loss_train_mode_keeps_perceptual_in_eval():
    _, perceptual, _, _, loss = _setup()
    loss.train()
    assert loss.training and not perceptual.training
    assert not any(p.requires_grad for p in perceptual.parameters())


def test_gan_term_absent_before_disc_start():
    vae, perceptual, disc, x, loss = _setup(lpips_weight=0.7, kl_weight=1e-2, disc_start=5)
    recon, posterior = vae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=4, discriminator=disc,
                                      last_layer_weight=vae.conv_out.weight)
    rec = (x - recon).abs().mean()
    lp = perceptual(x, recon).mean()
    kl = _manual_kl(posterior)
    torch.testing.assert_close(total, _manual_nll(x, recon, perceptual, 0.7) + 1e-2 * kl)
    assert disc.calls == 0
    assert "g_loss" not in logs and "adaptive_weight" not in logs
    # rec and lpips are logged as per-value / per-image means whatever the reduction.
    assert logs["rec"].item() == pytest.approx(rec.item()) and logs["lpips"].item() == pytest.approx(lp.item())
    assert logs["kl"].item() == pytest.approx(kl.item())
    assert loss.discriminator_loss(x, recon.detach(), step=4, discriminator=disc) == (None, {})
    assert disc.calls == 0


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_gan_term_with_adaptive_weight_after_disc_start(disc_loss):
    vae, perceptual, disc, x, loss = _setup(lpips_weight=0.5, kl_weight=1e-2, disc_start=5, disc_weight=0.8,
                                            disc_loss=disc_loss)
    last = vae.conv_out.weight
    recon, posterior = vae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=5, discriminator=disc, last_layer_weight=last)
    assert disc.calls == 1

    # Expected, independently: lambda = ||d nll / dW|| / (||d g / dW|| + eps), held constant.
    logits_fake = disc(recon)
    g = -logits_fake.mean() if disc_loss == "hinge" else F.softplus(-logits_fake).mean()
    nll = _manual_nll(x, recon, perceptual, 0.5)
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    lam = grad_nll.norm() / (grad_g.norm() + 1e-4)
    assert logs["adaptive_weight"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert logs["g_loss"].item() == pytest.approx(g.item(), rel=1e-6)
    expected = nll + 1e-2 * _manual_kl(posterior) + 0.8 * lam.detach() * g
    torch.testing.assert_close(total, expected)

    # lambda is detached: the loss's gradient is that of the expression with lambda a constant.
    grads = torch.autograd.grad(total, list(vae.parameters()), retain_graph=True)
    expected_grads = torch.autograd.grad(expected, list(vae.parameters()))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fp16_path", [False, True])
def test_adaptive_weight_path_runs_lpips_and_discriminator_backward_once(monkeypatch, fp16_path):
    # The default path backpropagates the nll and the GAN loss once each to recon (lambda from the
    # last layer's gradients, the backward through the decoder only); under fp16 loss scaling the
    # taming path runs instead (a second pass through LPIPS and D). Both give the same lambda, loss
    # and autoencoder gradients.
    import modules.vae_loss as vae_loss_module

    monkeypatch.setattr(vae_loss_module, "_fp16_loss_scaling", lambda recon: fp16_path)
    vae, perceptual, disc, x, loss = _setup(lpips_weight=0.5, kl_weight=1e-2, disc_start=0, disc_weight=0.8)
    passes = {"lpips": 0, "disc": 0}

    def count(name):
        def hook(module, inputs, output):
            output.register_hook(lambda grad: passes.__setitem__(name, passes[name] + 1))
        return hook

    perceptual.register_forward_hook(count("lpips"))
    disc.register_forward_hook(count("disc"))
    last = vae.conv_out.weight
    recon, posterior = vae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=0, discriminator=disc, last_layer_weight=last)
    grads = torch.autograd.grad(total, list(vae.parameters()))
    assert passes == ({"lpips": 2, "disc": 2} if fp16_path else {"lpips": 1, "disc": 1})

    recon, posterior = vae(x)
    nll = _manual_nll(x, recon, perceptual, 0.5)
    g = -disc(recon).mean()
    lam = (torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
           / (torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4))
    expected = nll + 1e-2 * _manual_kl(posterior) + 0.8 * lam.detach() * g
    assert logs["adaptive_weight"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert logs["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(total.detach(), expected.detach())
    # The summed ("ldm") loss has gradients ~C*H*W times the per-value mean's: float32 rounding
    # differences between the two computation orders grow with them, hence rtol 1e-5.
    for a, b in zip(grads, torch.autograd.grad(expected, list(vae.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_adaptive_weight_off_uses_lambda_one():
    vae, perceptual, disc, x, loss = _setup(lpips_weight=0.0, kl_weight=0.0, disc_start=0, disc_weight=0.3,
                                            use_adaptive_weight=False)
    recon, posterior = vae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=0, discriminator=disc, last_layer_weight=None)
    expected = _manual_nll(x, recon, None, 0.0) - 0.3 * disc(recon).mean()  # "ldm": summed per sample
    torch.testing.assert_close(total, expected)
    assert logs["adaptive_weight"].item() == 1.0


def test_adaptive_gan_weight_formula():
    w = torch.tensor([[0.5, -1.0, 2.0], [0.25, 3.0, -0.5]], requires_grad=True)
    c = torch.tensor([[1.0, 2.0, -2.0], [0.5, 0.0, 1.0]])
    rec = (w**2).sum()  # gradient 2w
    g = (c * w).sum()  # gradient c
    expected = (2 * w).norm() / (c.norm() + 1e-4)
    got = adaptive_gan_weight(rec, g, w, max_value=1e4, eps=1e-4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.dim() == 0 and not got.requires_grad
    rec.backward()  # the graphs were retained for the real backward
    # Clamped at max_value when the GAN gradient vanishes.
    tiny = (1e-12 * w).sum()
    assert adaptive_gan_weight((w**2).sum(), tiny, w, max_value=50.0, eps=1e-4).item() == 50.0


def test_l2_reconstruction_and_vq_codebook_term():
    vae, _, _, x, _ = _setup()
    loss = VAELoss(VAELossConfig(reconstruction_loss="l2", lpips_weight=0.0, codebook_weight=0.25), None)
    recon, _ = vae(x)
    vq_loss = recon.pow(2).mean() * 0.1  # any scalar with a graph stands in for the quantizer's loss
    total, logs = loss.generator_loss(x, recon, vq_loss, step=0, discriminator=None, last_layer_weight=None)
    torch.testing.assert_close(total, F.mse_loss(recon, x) + 0.25 * vq_loss)
    assert set(logs) == {"rec", "nll", "codebook", "total"}
    with pytest.raises(ValueError, match="scalar"):
        loss.generator_loss(x, recon, vq_loss.expand(2), step=0, discriminator=None, last_layer_weight=None)
    with pytest.raises(ValueError, match="perceptual"):
        VAELoss(VAELossConfig(lpips_weight=1.0), None)


def _no_host_sync(monkeypatch):
    """Make every tensor -> Python conversion (a device sync on a GPU) raise."""
    def refuse(*args, **kwargs):
        raise AssertionError("the loss must not move values to the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_logs_are_detached_0dim_tensors_and_the_loss_never_syncs(monkeypatch):
    # The trainer gathers the logs at its logging step; the loss itself must not call .item()
    # (a host-device sync per value per step on a GPU).
    vae, perceptual, disc, x, loss = _setup(disc_start=0, kl_weight=1e-2)
    recon, posterior = vae(x)
    with monkeypatch.context() as patch:
        _no_host_sync(patch)
        total, logs = loss.generator_loss(x, recon, posterior, step=1, discriminator=disc,
                                          last_layer_weight=vae.conv_out.weight)
        d_loss, d_logs = loss.discriminator_loss(x, recon.detach(), step=1, discriminator=disc)
    assert set(logs) == {"rec", "lpips", "nll", "kl", "g_loss", "adaptive_weight", "total"}
    assert set(d_logs) == {"d_loss", "logits_real", "logits_fake"}
    for value in [*logs.values(), *d_logs.values()]:
        assert isinstance(value, torch.Tensor) and value.dim() == 0
        assert not value.requires_grad and value.dtype == torch.float32
    assert logs["total"].item() == total.item() and d_logs["d_loss"].item() == d_loss.item()


def test_evaluation_without_grad_leaves_gan_out():
    vae, perceptual, disc, x, loss = _setup(disc_start=0, kl_weight=1e-2)
    with torch.no_grad():
        recon, posterior = vae(x)
        total, logs = loss.generator_loss(x, recon, posterior, step=10, discriminator=disc,
                                          last_layer_weight=vae.conv_out.weight)
    assert logs["adaptive_weight"].item() == 0.0 and "g_loss" in logs
    assert total.item() == pytest.approx((logs["nll"] + 1e-2 * logs["kl"]).item(), rel=1e-6)


@pytest.mark.parametrize("reconstruction_loss", ["l1", "l2"])
def test_mean_reduction_is_the_per_value_average(reconstruction_loss):
    # loss_reduction "mean" (this toolkit's loss before it followed LDM): reconstruction and LPIPS
    # averaged per value, the KL still summed per sample. Against "ldm" only the nll shrinks, by
    # C*H*W (768 here, 196,608 for 256x256 RGB): that much stronger a KL for the same kl_weight.
    vae, perceptual, _, x, _ = _setup()
    totals = {}
    for reduction in ("mean", "ldm"):
        loss = VAELoss(VAELossConfig(loss_reduction=reduction, reconstruction_loss=reconstruction_loss,
                                     lpips_weight=0.5, kl_weight=1e-2), perceptual)
        recon, posterior = vae(x)
        totals[reduction], logs = loss.generator_loss(x, recon, posterior, step=0, discriminator=None,
                                                      last_layer_weight=None)
        error = (x - recon).abs() if reconstruction_loss == "l1" else (x - recon).pow(2)
        nll = error.mean() + 0.5 * perceptual(x, recon).mean()
        if reduction == "ldm":
            nll = nll * x[0].numel()
        torch.testing.assert_close(totals[reduction], nll + 1e-2 * _manual_kl(posterior))
        torch.testing.assert_close(logs["nll"], nll.detach())
        torch.testing.assert_close(logs["rec"], error.mean().detach())  # the same under both
    kl_part = 1e-2 * _manual_kl(posterior)
    ratio = (totals["ldm"] - kl_part) / (totals["mean"] - kl_part)
    assert ratio.item() == pytest.approx(3 * 16 * 16, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# The published formulas: LDM's LPIPSWithDiscriminator (KL) and taming's VQLPIPSWithDiscriminator
# ----------------------------------------------------------------------------------------------
# Written out here from the reference repositories' loss modules (CompVis/latent-diffusion
# ldm/modules/losses/contperceptual.py at a506df5, CompVis/taming-transformers
# taming/modules/losses/vqperceptual.py at 9944179), in their reductions, so that our loss can be
# checked against them term by term. The only free constant of LDM's formula, its output
# log-variance (nll = rec / exp(logvar) + logvar), is an nn.Parameter initialised at 0 that LDM's
# AutoencoderKL.configure_optimizers never gives to an optimizer: it is 0 for the whole run, so the
# two losses agree with no constant at all.

def _published_adaptive_weight(nll, g_loss, last_layer, disc_weight):
    """Both repositories: clamp(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4), detached, times disc_weight."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach() * disc_weight


def ldm_kl_generator_loss(x, recon, posterior, perceptual, disc, last_layer, step, *, kl_weight,
                          perceptual_weight, disc_weight, disc_start):
    """LDM's KL-autoencoder generator loss (optimizer_idx 0), hinge generator term.

    Per pixel: |x - x_hat| + perceptual_weight * LPIPS, the LPIPS of shape (B, 1, 1, 1) broadcast to
    every pixel; nll summed over everything and divided by the batch size; KL summed per sample
    over the latent elements, then the same; the GAN term weighted by the adaptive weight (measured
    on that summed nll) times disc_factor (0 before disc_start, 1 from it on).
    """
    logvar = torch.zeros(())  # LDM's never-optimised output log-variance
    p_loss = perceptual(x, recon).reshape(-1, 1, 1, 1)
    rec_loss = (x - recon).abs() + perceptual_weight * p_loss  # (B, C, H, W)
    nll_map = rec_loss / torch.exp(logvar) + logvar
    nll = torch.sum(nll_map) / nll_map.shape[0]
    kl = posterior.kl().sum(dim=(1, 2, 3))  # LDM's DiagonalGaussianDistribution.kl(): (B,)
    kl = torch.sum(kl) / kl.shape[0]
    g_loss = -torch.mean(disc(recon))
    d_weight = _published_adaptive_weight(nll, g_loss, last_layer, disc_weight)
    disc_factor = 0.0 if step < disc_start else 1.0
    return nll + kl_weight * kl + d_weight * disc_factor * g_loss, d_weight


def taming_vq_generator_loss(x, recon, codebook_loss, perceptual, disc, last_layer, step, *, codebook_weight,
                             perceptual_weight, disc_weight, disc_start):
    """taming's VQ generator loss (optimizer_idx 0): the same per-pixel map, but MEAN-reduced."""
    p_loss = perceptual(x, recon).reshape(-1, 1, 1, 1)
    rec_loss = (x - recon).abs() + perceptual_weight * p_loss
    nll = torch.mean(rec_loss)
    g_loss = -torch.mean(disc(recon))
    d_weight = _published_adaptive_weight(nll, g_loss, last_layer, disc_weight)
    disc_factor = 0.0 if step < disc_start else 1.0
    return nll + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss.mean(), d_weight


class _TinyDecoder(nn.Module):
    """latents (B, 2, 8, 8) -> images (B, 3, 16, 16); ``conv_out`` is the last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(2, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.conv_in(F.interpolate(z, scale_factor=2.0, mode="nearest"))))


def _cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _assert_same_gradient(ours, reference, name):
    # The direction (cosine ~1) and the length: the relative weights of the terms are LDM's and so
    # is the overall scale of the loss (what the learning rate and gradient clipping see).
    assert _cosine(ours, reference) > 1 - 1e-5, name
    assert ours.norm().item() == pytest.approx(reference.norm().item(), rel=1e-4), name


# (kl or codebook weight, perceptual_weight, disc_weight, step, disc_start): LDM's published KL-f8
# values with the GAN on and off, a strong KL where the KL visibly shapes the posterior's
# gradient, and the pixel loss alone.
PUBLISHED_CASES = [
    (1e-6, 1.0, 0.5, 60000, 50001),
    (1e-6, 1.0, 0.5, 10, 50001),
    (1e-2, 0.5, 0.75, 3, 0),
    (1.0, 0.0, 0.0, 3, 0),
]


def _assert_matches_reference(ours_fn, reference_fn, names, gan_on: bool, disc_weight: float):
    """Each fn runs a fresh forward and returns ((loss, logs or LDM's d_weight), tensors to differentiate
    by). Same value, same gradients, and disc_weight x our lambda == the reference's d_weight (which
    includes discriminator_weight; our log is lambda before disc_weight) when the GAN is on."""
    (total, logs), inputs = ours_fn()
    ours = torch.autograd.grad(total, inputs)
    (expected, d_weight), inputs = reference_fn()
    reference = torch.autograd.grad(expected, inputs)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, a, b in zip(names, ours, reference):
        _assert_same_gradient(a, b, name)
    if gan_on:
        assert (disc_weight * logs["adaptive_weight"]).item() == pytest.approx(d_weight.item(), rel=1e-5)
    else:
        assert "adaptive_weight" not in logs
    return ours, reference


@pytest.mark.parametrize("kl_weight, perceptual_weight, disc_weight, step, disc_start", PUBLISHED_CASES)
def test_kl_loss_matches_ldm_lpips_with_discriminator(kl_weight, perceptual_weight, disc_weight, step, disc_start):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    mean = torch.randn(3, 2, 8, 8, requires_grad=True)
    logvar = (torch.randn(3, 2, 8, 8) * 0.5 - 1.0).requires_grad_()
    eps = torch.randn(3, 2, 8, 8)
    decoder, perceptual = _TinyDecoder(), TinyPerceptual().eval().requires_grad_(False)
    disc = NLayerDiscriminator(start_channels=8, depth=2)
    loss = VAELoss(VAELossConfig(kl_weight=kl_weight, lpips_weight=perceptual_weight, disc_weight=disc_weight,
                                 disc_start=disc_start), perceptual)

    def forward():  # a posterior sample through the decoder: the posterior gets the nll's gradient too
        recon = decoder(mean + torch.exp(0.5 * logvar) * eps)
        return recon, ToyPosterior(mean, logvar)

    def ours_fn():
        recon, posterior = forward()
        return loss.generator_loss(x, recon, posterior, step, disc, decoder.conv_out.weight), [recon, mean, logvar]

    def reference_fn():
        recon, posterior = forward()
        return ldm_kl_generator_loss(
            x, recon, posterior, perceptual, disc, decoder.conv_out.weight, step, kl_weight=kl_weight,
            perceptual_weight=perceptual_weight, disc_weight=disc_weight, disc_start=disc_start), [recon, mean, logvar]

    ours, reference = _assert_matches_reference(ours_fn, reference_fn, ("recon", "posterior mean", "posterior logvar"),
                                                gan_on=step >= disc_start and disc_weight > 0, disc_weight=disc_weight)
    _assert_same_gradient(torch.cat([ours[1].flatten(), ours[2].flatten()]),
                          torch.cat([reference[1].flatten(), reference[2].flatten()]), "posterior")


@pytest.mark.parametrize("codebook_weight, perceptual_weight, disc_weight, step, disc_start", PUBLISHED_CASES)
def test_vq_loss_matches_taming_vq_lpips_with_discriminator(codebook_weight, perceptual_weight, disc_weight, step,
                                                            disc_start):
    torch.manual_seed(1)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z_e = torch.randn(3, 2, 8, 8, requires_grad=True)
    codebook = torch.randn(16, 2, requires_grad=True)
    decoder, perceptual = _TinyDecoder(), TinyPerceptual().eval().requires_grad_(False)
    disc = NLayerDiscriminator(start_channels=8, depth=2)
    loss = VAELoss(VAELossConfig(codebook_weight=codebook_weight, lpips_weight=perceptual_weight,
                                 disc_weight=disc_weight, disc_start=disc_start), perceptual)

    def forward():  # nearest code, straight-through estimator, codebook + 0.25 x commitment loss
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)  # (B*8*8, 2)
        e = codebook[torch.cdist(flat, codebook).argmin(dim=1)].reshape(3, 8, 8, 2).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(e, z_e.detach()) + 0.25 * F.mse_loss(z_e, e.detach())
        return decoder(z_e + (e - z_e).detach()), codebook_loss

    def ours_fn():
        recon, codebook_loss = forward()
        return (loss.generator_loss(x, recon, codebook_loss, step, disc, decoder.conv_out.weight),
                [recon, z_e, codebook])

    def reference_fn():
        recon, codebook_loss = forward()
        return taming_vq_generator_loss(
            x, recon, codebook_loss, perceptual, disc, decoder.conv_out.weight, step, codebook_weight=codebook_weight,
            perceptual_weight=perceptual_weight, disc_weight=disc_weight, disc_start=disc_start), [recon, z_e, codebook]

    _assert_matches_reference(ours_fn, reference_fn, ("recon", "encoder output", "codebook"),
                              gan_on=step >= disc_start and disc_weight > 0, disc_weight=disc_weight)


# ----------------------------------------------------------------------------------------------
# Discriminator loss and gradient isolation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_discriminator_loss_formulas(disc_loss):
    torch.manual_seed(1)
    disc = NLayerDiscriminator(start_channels=8, depth=2, norm="none")
    loss = VAELoss(VAELossConfig(lpips_weight=0.0, disc_start=3, disc_loss=disc_loss), None)
    real = torch.rand(3, 3, 16, 16) * 2 - 1
    fake = torch.rand(3, 3, 16, 16) * 2 - 1
    d_loss, logs = loss.discriminator_loss(real, fake, step=3, discriminator=disc)
    lr, lf = disc(real), disc(fake)
    if disc_loss == "hinge":
        expected = 0.5 * (torch.clamp(1 - lr, min=0).mean() + torch.clamp(1 + lf, min=0).mean())
    else:
        # BCE-with-logits: real labelled 1, fake labelled 0.
        expected = 0.5 * (
            F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
            + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        )
    torch.testing.assert_close(d_loss, expected)
    assert logs["logits_real"].item() == pytest.approx(lr.mean().item(), rel=1e-6, abs=1e-7)
    assert logs["logits_fake"].item() == pytest.approx(lf.mean().item(), rel=1e-6, abs=1e-7)
    assert logs["d_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_generator_and_discriminator_steps_do_not_leak_gradients():
    vae, _, disc, x, loss = _setup(disc_start=0, kl_weight=1e-2)
    recon, posterior = vae(x)
    total, _ = loss.generator_loss(x, recon, posterior, step=1, discriminator=disc,
                                   last_layer_weight=vae.conv_out.weight)
    total.backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters())  # D was frozen during the G pass
    assert all(p.requires_grad for p in disc.parameters())  # ... and unfrozen after it
    assert all(p.grad is not None for p in vae.parameters())

    vae.zero_grad(set_to_none=True)
    # Even a reconstruction that still carries its graph is detached by the discriminator loss.
    d_loss, _ = loss.discriminator_loss(x, recon, step=1, discriminator=disc)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in disc.parameters())


@pytest.mark.parametrize("ddp_kwargs", [{}, {"find_unused_parameters": True}, {"static_graph": True}])
def test_generator_loss_through_ddp_wrapped_discriminator(tmp_path, ddp_kwargs):
    # One-process gloo group: the DDP-wrapped discriminator (as accelerate prepares it) must get
    # no generator gradient, and its reducer must not be left waiting for a reduction from the
    # frozen generator pass (that would fail at the next forward).
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        vae, _, _, x, loss = _setup(disc_start=0, lpips_weight=0.0)
        torch.manual_seed(0)
        disc = NLayerDiscriminator(start_channels=8, depth=2)
        ddp_disc = nn.parallel.DistributedDataParallel(disc, **ddp_kwargs)
        opt_d = torch.optim.SGD(ddp_disc.parameters(), lr=0.1)
        for step in range(3):
            opt_d.zero_grad(set_to_none=True)
            recon, posterior = vae(x)
            total, _ = loss.generator_loss(x, recon, posterior, step, ddp_disc, vae.conv_out.weight)
            total.backward()
            assert all(p.grad is None for p in ddp_disc.parameters())
            d_loss, _ = loss.discriminator_loss(x, recon.detach(), step, ddp_disc)
            d_loss.backward()
            assert all(p.grad is not None for p in ddp_disc.parameters())
            opt_d.step()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "key, value, message",
    [
        ("kl_weight", -1.0, "kl_weight must be >= 0, got -1.0"),
        ("lpips_weight", -0.5, "lpips_weight must be >= 0, got -0.5"),
        ("codebook_weight", -2.0, "codebook_weight must be >= 0, got -2.0"),
        ("disc_weight", float("nan"), "disc_weight must be >= 0, got nan"),
        ("disc_start", -1, "disc_start must be >= 0, got -1"),
        ("adaptive_weight_eps", 0.0, "adaptive_weight_eps must be > 0, got 0.0"),
        ("disc_loss", "wgan", "disc_loss must be 'hinge' or 'vanilla', got 'wgan'"),
        ("reconstruction_loss", "l3", "reconstruction_loss must be 'l1' or 'l2', got 'l3'"),
        ("loss_reduction", "sum", "loss_reduction must be 'ldm' or 'mean', got 'sum'"),
    ],
)
def test_config_rejects_bad_values(key, value, message):
    with pytest.raises(UserError) as err:
        VAELossConfig(**{key: value})
    assert str(err.value) == message


def test_config_loads_strictly_from_yaml_mapping():
    assert VAELossConfig().loss_reduction == "ldm"  # LDM's published weights mean what they say
    cfg = from_dict(VAELossConfig, {"kl_weight": 1e-6, "disc_start": 100, "disc_loss": "vanilla",
                                    "loss_reduction": "mean"})
    assert (cfg.kl_weight, cfg.disc_start, cfg.disc_loss, cfg.loss_reduction) == (1e-6, 100, "vanilla", "mean")
    with pytest.raises(UserError, match="kl_weight must be >= 0"):
        from_dict(VAELossConfig, {"kl_weight": -1.0})
    with pytest.raises(UserError, match="disc_loss"):
        from_dict(VAELossConfig, {"disc_loss": "wgan"})
    names = [f.name for f in dataclasses.fields(DiscriminatorConfig)]
    assert names == ["in_channels", "start_channels", "depth", "kernel_size", "leaky_slope", "norm"]
    with pytest.raises(UserError, match="norm must be 'batch' or 'none'"):
        DiscriminatorConfig(norm="instance")


# ----------------------------------------------------------------------------------------------
# PatchGAN
# ----------------------------------------------------------------------------------------------

def test_patchgan_matches_the_published_architecture():
    disc = NLayerDiscriminator()
    # pix2pix's 3-layer PatchGAN with BatchNorm has 2,765,633 parameters.
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3
    # Channels double and stop at 8x.
    deep = NLayerDiscriminator(start_channels=4, depth=5)
    assert [m.out_channels for m in deep.modules() if isinstance(m, nn.Conv2d)] == [4, 8, 16, 32, 32, 32, 1]
    plain = NLayerDiscriminator(norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("size, depth, out", [(64, 3, 6), (256, 3, 30), (32, 1, 14)])
def test_patchgan_output_shape(size, depth, out):
    disc = NLayerDiscriminator(start_channels=4, depth=depth)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, out, out)


def test_patchgan_receptive_field_is_70_pixels():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(start_channels=4).eval()  # eval: BatchNorm does not mix pixels
    image = torch.randn(1, 3, 128, 128, requires_grad=True)
    disc(image)[0, 0, 7, 7].backward()
    rows = image.grad.abs().sum(dim=(0, 1, 3)).nonzero()
    cols = image.grad.abs().sum(dim=(0, 1, 2)).nonzero()
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_patchgan_init_statistics():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    conv_w = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, nn.Conv2d)])
    assert abs(conv_w.mean().item()) < 1e-4
    assert conv_w.std().item() == pytest.approx(0.02, rel=0.01)
    conv_b = [m.bias for m in disc.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert all((b == 0).all() for b in conv_b)
    bn = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_w = torch.cat([m.weight for m in bn])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.002)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.1)
    assert all((m.bias == 0).all() for m in bn)


def test_from_config_and_sync_batchnorm_conversion():
    cfg = DiscriminatorConfig(start_channels=8, depth=2, leaky_slope=0.1)
    torch.manual_seed(0)
    disc = NLayerDiscriminator.from_config(cfg)
    torch.manual_seed(0)
    same = NLayerDiscriminator(start_channels=8, depth=2, leaky_slope=0.1)
    for a, b in zip(disc.state_dict().values(), same.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert all(m.negative_slope == 0.1 for m in disc.modules() if isinstance(m, nn.LeakyReLU))

    before = {k: v.clone() for k, v in disc.state_dict().items()}
    synced = convert_to_sync_batchnorm(disc)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    for key, value in synced.state_dict().items():
        torch.testing.assert_close(value, before[key])
