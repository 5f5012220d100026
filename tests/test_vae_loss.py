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
    return (x - recon).abs().mean() + lpips_weight * perceptual(x, recon).mean()


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
        assert logs["total"] == pytest.approx(expected.item(), rel=1e-6)
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
    assert logs["kl"] == pytest.approx(posterior.kl().mean().item(), rel=1e-6)
    assert logs["lpips"] == pytest.approx(lpips(x, recon).mean().item(), rel=1e-5)
    assert logs["adaptive_weight"] > 0
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
    torch.testing.assert_close(total, rec + 0.7 * lp + 1e-2 * kl)
    assert disc.calls == 0
    assert "g_loss" not in logs and "adaptive_weight" not in logs
    assert logs["rec"] == pytest.approx(rec.item()) and logs["lpips"] == pytest.approx(lp.item())
    assert logs["kl"] == pytest.approx(kl.item())
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
    assert logs["adaptive_weight"] == pytest.approx(lam.item(), rel=1e-5)
    assert logs["g_loss"] == pytest.approx(g.item(), rel=1e-6)
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
    assert logs["adaptive_weight"] == pytest.approx(lam.item(), rel=1e-5)
    assert logs["total"] == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(total.detach(), expected.detach())
    for a, b in zip(grads, torch.autograd.grad(expected, list(vae.parameters()))):
        torch.testing.assert_close(a, b)


def test_adaptive_weight_off_uses_lambda_one():
    vae, perceptual, disc, x, loss = _setup(lpips_weight=0.0, kl_weight=0.0, disc_start=0, disc_weight=0.3,
                                            use_adaptive_weight=False)
    recon, posterior = vae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=0, discriminator=disc, last_layer_weight=None)
    expected = (x - recon).abs().mean() - 0.3 * disc(recon).mean()
    torch.testing.assert_close(total, expected)
    assert logs["adaptive_weight"] == 1.0


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


def test_logs_are_python_floats_and_evaluation_without_grad_leaves_gan_out():
    vae, perceptual, disc, x, loss = _setup(disc_start=0, kl_weight=1e-2)
    with torch.no_grad():
        recon, posterior = vae(x)
        total, logs = loss.generator_loss(x, recon, posterior, step=10, discriminator=disc,
                                          last_layer_weight=vae.conv_out.weight)
    assert all(type(v) is float for v in logs.values())
    assert logs["adaptive_weight"] == 0.0 and "g_loss" in logs
    assert total.item() == pytest.approx(logs["nll"] + 1e-2 * logs["kl"], rel=1e-6)


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
    assert logs["logits_real"] == pytest.approx(lr.mean().item(), rel=1e-6, abs=1e-7)
    assert logs["logits_fake"] == pytest.approx(lf.mean().item(), rel=1e-6, abs=1e-7)
    assert logs["d_loss"] == pytest.approx(expected.item(), rel=1e-6)


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
    ],
)
def test_config_rejects_bad_values(key, value, message):
    with pytest.raises(UserError) as err:
        VAELossConfig(**{key: value})
    assert str(err.value) == message


def test_config_loads_strictly_from_yaml_mapping():
    cfg = from_dict(VAELossConfig, {"kl_weight": 1e-6, "disc_start": 100, "disc_loss": "vanilla"})
    assert (cfg.kl_weight, cfg.disc_start, cfg.disc_loss) == (1e-6, 100, "vanilla")
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
