"""The stage-1 autoencoder objective: reconstruction + LPIPS + KL/codebook + delayed, adaptive GAN.

Following taming-transformers (Esser et al., 2021, Eq. 7) and latent diffusion (Rombach et al.,
2022, App. G), the autoencoder (the "generator") minimises

    L_G = L_nll + w_kl * KL  (or + w_codebook * L_vq)
          + [step >= disc_start] * disc_weight * lambda * L_gan(D(x_hat))

    L_nll  = reduce( |x - x_hat| + w_lpips * LPIPS(x, x_hat) )      (per pixel, LPIPS broadcast)
    lambda = clamp(||grad_{W_last} L_nll|| / (||grad_{W_last} L_gan|| + eps), 0, max).detach()

where W_last is the weight of the decoder's last layer: lambda scales the GAN gradient to the size
of the reconstruction gradient where they meet. The PatchGAN discriminator D minimises (Lim & Ye
2017 / Goodfellow et al. 2014)

    hinge:   0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))
    vanilla: 0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))

Reductions (``loss_reduction``), the part papers leave out and the weights depend on. LPIPS gives
one number per image; like the reference code we count it once per pixel (broadcast over C, H, W).

- ``"ldm"`` (default), exactly the reference implementations, so that their published weights
  (``kl_weight=1e-6``, ``disc_weight=0.5``, ...) carry over:
  KL autoencoder, as LDM's ``LPIPSWithDiscriminator``: L_nll is summed over the C*H*W values of
  each sample and averaged over the batch, i.e. C*H*W * (mean |x - x_hat| + w_lpips * mean LPIPS);
  the KL is summed over each sample's latent elements and averaged over the batch.
  VQ autoencoder, as taming's ``VQLPIPSWithDiscriminator``: L_nll is the plain mean over all
  values (mean |x - x_hat| + w_lpips * mean LPIPS); the codebook loss is the quantizer's mean.
  In both, lambda is measured on that reduced L_nll, as in the references. LDM also divides the
  per-pixel loss by exp(logvar) and adds logvar, a scalar "output log-variance" initialised at 0;
  LDM's autoencoder never gives it to an optimizer, so it stays 0 and is left out here: the two
  losses are equal, with no constant between them.
- ``"mean"``: L_nll averaged per value for the KL autoencoder too (this toolkit's loss before it
  followed LDM, and the tutorial's), the KL still summed per sample. For the same ``kl_weight``
  the KL then weighs C*H*W times more against the reconstruction than in LDM (196,608x for
  256x256 RGB images): q(z|x) is pulled to N(0, I), the latents come out with std near 1 (scale
  factor near 1) and the reconstructions blurrier. The VQ loss is the same under both.

The loss's size follows the reduction (under "ldm" a KL-VAE's nll is C*H*W times the per-value
mean, 196,608x at 256x256): Adam(W) is invariant to a constant scale of the gradient, so learning
rates carry over, but gradient-norm clipping is not (a clip threshold sees the summed loss's
gradient, which is that many times larger).

Other conventions: the generator GAN term is -mean D(x_hat) (hinge) or mean softplus(-D(x_hat))
(vanilla, the non-saturating BCE-with-logits against "real"). The GAN terms switch on at optimizer
step ``disc_start``; before it the discriminator is not evaluated at all and
:meth:`VAELoss.discriminator_loss` returns ``None`` so the trainer skips the discriminator step.
Logged values are detached 0-dim tensors on the loss's device (no host sync here): the caller
gathers them when it logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import UserError

PerceptualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class VAELossConfig:
    """Weights and switches of the stage-1 loss (keys of the ``training_args:`` YAML section).

    reconstruction_loss: "l1" (|x - x_hat|) or "l2" ((x - x_hat)^2) per value, reduced as below.
    loss_reduction:      "ldm" (default): LDM's reductions for the KL autoencoder (nll and KL summed
                         per sample, batch mean) and taming's for the VQ one (nll mean), so that
                         LDM's/taming's published weights mean the same here; "mean": the nll
                         averaged per value for the KL autoencoder as well, which makes the KL
                         C*H*W times stronger than LDM's for the same kl_weight (latents near unit
                         variance, blurrier reconstructions). See the module docstring.
    lpips_weight:        weight of LPIPS, added to every pixel's reconstruction loss (LDM's
                         perceptual_weight).
    kl_weight:           weight of the KL term summed per sample (KL autoencoder).
    codebook_weight:     weight of the quantizer's loss (VQ autoencoder).
    disc_start:          optimizer step from which the GAN terms are on (step >= disc_start).
    disc_weight:         factor on the adaptively weighted generator GAN term; 0 disables the GAN.
    disc_loss:           "hinge" or "vanilla" (softplus / BCE-with-logits).
    use_adaptive_weight: balance the GAN gradient against the reconstruction gradient at the
                         decoder's last layer (taming); False uses lambda = 1.
    adaptive_weight_max: upper clamp of lambda.
    adaptive_weight_eps: added to the GAN gradient norm in lambda's denominator.
    """

    reconstruction_loss: Literal["l1", "l2"] = "l1"
    loss_reduction: Literal["ldm", "mean"] = "ldm"
    lpips_weight: float = 1.0
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    use_adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4
    adaptive_weight_eps: float = 1e-4

    def __post_init__(self) -> None:
        if self.reconstruction_loss not in ("l1", "l2"):
            raise UserError(f"reconstruction_loss must be 'l1' or 'l2', got {self.reconstruction_loss!r}")
        if self.loss_reduction not in ("ldm", "mean"):
            raise UserError(f"loss_reduction must be 'ldm' or 'mean', got {self.loss_reduction!r}")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise UserError(f"disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
        for name in ("lpips_weight", "kl_weight", "codebook_weight", "disc_weight", "adaptive_weight_max"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise UserError(f"{name} must be >= 0, got {value}")
        if self.disc_start < 0:
            raise UserError(f"disc_start must be >= 0, got {self.disc_start}")
        if not self.adaptive_weight_eps > 0:
            raise UserError(f"adaptive_weight_eps must be > 0, got {self.adaptive_weight_eps}")


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_value: float,
    eps: float,
) -> torch.Tensor:
    """Taming's adaptive GAN weight: ||grad_W rec_loss|| / (||grad_W g_loss|| + eps), clamped.

    rec_loss, g_loss: scalar losses whose graphs both reach ``last_layer_weight`` (the weight of
    the decoder's last layer). The graphs are retained for the real backward pass. Returns a
    detached 0-dim tensor in [0, max_value].
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(gan_grad) + eps)
    return weight.clamp(0.0, max_value).detach()


def adaptive_gan_weight_at_output(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    output: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_value: float,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same lambda as :func:`adaptive_gan_weight`, plus both losses' gradients at ``output``.

    output: the decoder's output (B, C, H, W) (the reconstruction); rec_loss and g_loss reach
    ``last_layer_weight`` only through it. Each loss is backpropagated once, through its own head
    (LPIPS, the discriminator), to ``output``; the gradients at ``last_layer_weight`` then cost
    only the last layer's backward (the chain rule: grad_W L = (d output / d W)^T grad_output L).
    The graphs above ``output`` are freed; the one below it is kept for the real backward.

    Returns (lambda, grad_output rec_loss, grad_output g_loss): lambda a detached 0-dim tensor in
    [0, max_value], the gradients detached, shaped like ``output``.
    """
    rec_out = torch.autograd.grad(rec_loss, output)[0]
    gan_out = torch.autograd.grad(g_loss, output)[0]
    rec_grad = torch.autograd.grad(output, last_layer_weight, rec_out, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(output, last_layer_weight, gan_out, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(gan_grad) + eps)
    return weight.clamp(0.0, max_value).detach(), rec_out, gan_out


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) (Lim & Ye, 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (BCE(D(x), real) + BCE(D(x_hat), fake)) written with softplus (Goodfellow et al., 2014)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class VAELoss(nn.Module):
    """Stage-1 loss: :meth:`generator_loss` for the autoencoder step, :meth:`discriminator_loss` for D's.

    perceptual: a callable (x0, x1) -> per-sample distances (B,) (or (B, 1, 1, 1), as the ``lpips``
    package returns) on images in [-1, 1], e.g. :class:`modules.lpips.LPIPS`. Its gradient flows
    back to the reconstruction (it is never run under ``no_grad``); when it is an ``nn.Module``
    it is registered here, frozen (``requires_grad_(False)``) and kept in eval mode even when
    ``VAELoss.train()`` is called, so its dropout never fires. It may be None only when
    ``config.lpips_weight == 0``.

    The discriminator is passed to each call rather than owned, so the trainer keeps it, its
    optimizer and its DDP wrapper.
    """

    def __init__(self, config: VAELossConfig, perceptual: Optional[PerceptualFn]) -> None:
        super().__init__()
        if perceptual is None and config.lpips_weight > 0:
            raise ValueError(f"lpips_weight is {config.lpips_weight} but no perceptual network was given")
        self.config = config
        if isinstance(perceptual, nn.Module):
            perceptual.eval().requires_grad_(False)
        self.perceptual = perceptual

    def train(self, mode: bool = True) -> "VAELoss":
        super().train(mode)
        if isinstance(self.perceptual, nn.Module):
            self.perceptual.eval()
        return self

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms (and the discriminator step) are on at optimizer step ``step``."""
        return step >= self.config.disc_start and self.config.disc_weight > 0

    def _gan_generator_loss(self, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.config.disc_loss == "hinge":
            return -logits_fake.mean()
        return F.softplus(-logits_fake).mean()

    def generator_loss(
        self,
        inputs: torch.Tensor,
        recon: torch.Tensor,
        posterior_or_vq_loss: Union[object, torch.Tensor],
        step: int,
        discriminator: Optional[nn.Module],
        last_layer_weight: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The autoencoder's loss for one batch.

        inputs, recon: (B, C, H, W) images in [-1, 1]; ``recon`` carries the autoencoder's graph.
        posterior_or_vq_loss: for a KL autoencoder the posterior, whose ``kl()`` gives KL(q || N(0, I))
            per sample as (B,) or per latent element as (B, ...) (summed over non-batch dims here);
            for a VQ autoencoder the quantizer's scalar (0-dim) loss.
        step: the optimizer step (switches the GAN term on at ``disc_start``).
        discriminator: the PatchGAN (plain or DDP-wrapped); only run when the GAN is on. Its
            parameters get no gradient from this loss (they are frozen during its forward), so
            the trainer need not zero them before the discriminator step.
        last_layer_weight: the decoder's last layer weight, for the adaptive weight.

        Returns (loss, logs): ``loss`` a scalar with graph, reduced as ``loss_reduction`` says;
        ``logs`` detached 0-dim float32 tensors: rec (mean per value, whatever the reduction),
        lpips (batch mean, when lpips_weight > 0), nll (as reduced into the loss), kl (summed per
        sample, batch mean) or codebook, and when the GAN is on g_loss, adaptive_weight (lambda,
        before disc_weight); always total.

        Measuring lambda needs the nll's and the GAN loss's gradients, so when it is measured (GAN
        on, adaptive weight, a graph, not fp16) both are backpropagated here, once each, to
        ``recon`` (:func:`adaptive_gan_weight_at_output`); ``loss`` then carries them into the
        autoencoder's graph: same value, same gradient, and ``loss.backward()`` runs through the
        autoencoder only, not through LPIPS and D a second time as taming's two extra
        ``autograd.grad`` calls do.
        """
        cfg = self.config
        is_vq = isinstance(posterior_or_vq_loss, torch.Tensor)
        if is_vq and posterior_or_vq_loss.dim() != 0:
            raise ValueError(
                "a tensor regularizer must be the VQ quantizer's scalar loss, got shape "
                f"{tuple(posterior_or_vq_loss.shape)}; pass the posterior itself for a KL autoencoder"
            )
        if not is_vq and not callable(getattr(posterior_or_vq_loss, "kl", None)):
            raise TypeError(
                "posterior_or_vq_loss must be a posterior with .kl() or a 0-dim VQ loss tensor, got "
                f"{type(posterior_or_vq_loss).__name__}"
            )
        logs: Dict[str, torch.Tensor] = {}

        # Per-value means, in fp32: the "ldm" sum below multiplies them by C*H*W (~2e5), past fp16's range.
        error = inputs - recon
        error = error.abs() if cfg.reconstruction_loss == "l1" else error.pow(2)
        rec = error.mean(dtype=torch.float32)
        logs["rec"] = rec.detach()
        nll = rec
        if cfg.lpips_weight > 0:
            perceptual = self.perceptual(inputs, recon).mean(dtype=torch.float32)
            logs["lpips"] = perceptual.detach()
            nll = nll + cfg.lpips_weight * perceptual
        if cfg.loss_reduction == "ldm" and not is_vq:
            # LDM: sum over each sample's C*H*W values (LPIPS broadcast to all of them), batch mean.
            nll = nll * inputs[0].numel()
        logs["nll"] = nll.detach()

        if is_vq:
            logs["codebook"] = posterior_or_vq_loss.detach().float()
            regularizer = cfg.codebook_weight * posterior_or_vq_loss.float()
        else:
            kl = posterior_or_vq_loss.kl().float()
            kl = kl.reshape(kl.shape[0], -1).sum(dim=1).mean()  # sum over latent elements, mean over batch
            logs["kl"] = kl.detach()
            regularizer = cfg.kl_weight * kl
        total = nll + regularizer

        if self.gan_active(step):
            if discriminator is None:
                raise ValueError(f"step {step} >= disc_start {cfg.disc_start} but no discriminator was given")
            g_loss = self._gan_generator_loss(_frozen_forward(discriminator, recon)).float()
            measurable = torch.is_grad_enabled() and nll.requires_grad
            if cfg.use_adaptive_weight and measurable and last_layer_weight is None:
                raise ValueError("use_adaptive_weight needs the decoder's last_layer_weight")
            if cfg.use_adaptive_weight and measurable and not _fp16_loss_scaling(recon):
                adaptive, nll_out, gan_out = adaptive_gan_weight_at_output(
                    nll, g_loss, recon, last_layer_weight, cfg.adaptive_weight_max, cfg.adaptive_weight_eps
                )
                # A loss with the value of nll + regularizer + disc_weight * lambda * L_gan and its
                # gradient (lambda constant), in which the nll and GAN parts enter through their
                # gradients at recon, already computed: backward does not run LPIPS and D again.
                value = total.detach() + cfg.disc_weight * adaptive * g_loss.detach()
                surrogate = (recon * (nll_out + cfg.disc_weight * adaptive * gan_out)).sum() + regularizer
                total = surrogate + (value - surrogate).detach()
            else:
                if not cfg.use_adaptive_weight:
                    adaptive = torch.ones((), device=g_loss.device, dtype=g_loss.dtype)
                elif measurable:
                    # fp16 with a GradScaler: the LPIPS and D backward must run inside the scaled
                    # backward (unscaled fp16 gradients underflow), so lambda is measured as taming
                    # does, at the cost of a second pass through LPIPS and D.
                    adaptive = adaptive_gan_weight(
                        nll, g_loss, last_layer_weight, cfg.adaptive_weight_max, cfg.adaptive_weight_eps
                    )
                else:
                    # Without a graph (evaluation under no_grad) lambda cannot be measured; as in
                    # taming the GAN term is then left out of the total but still logged.
                    adaptive = torch.zeros((), device=g_loss.device, dtype=g_loss.dtype)
                total = total + cfg.disc_weight * adaptive * g_loss
            logs["g_loss"] = g_loss.detach()
            logs["adaptive_weight"] = adaptive.detach()

        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        recon_detached: torch.Tensor,
        step: int,
        discriminator: nn.Module,
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """The discriminator's loss for one batch, or (None, {}) before ``disc_start``.

        inputs, recon_detached: (B, C, H, W) real and reconstructed images in [-1, 1]. The
        reconstruction is detached here as well, so this loss never reaches the autoencoder.
        Real and fake go through D in separate calls (separate BatchNorm statistics, as taming).
        Returns (loss, logs) with logs d_loss, logits_real, logits_fake (mean logits) as detached
        0-dim float32 tensors.
        """
        if not self.gan_active(step):
            return None, {}
        logits_real = discriminator(inputs.detach())
        logits_fake = discriminator(recon_detached.detach())
        if self.config.disc_loss == "hinge":
            loss = hinge_d_loss(logits_real, logits_fake)
        else:
            loss = vanilla_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": loss.detach().float(),
            "logits_real": logits_real.detach().mean(dtype=torch.float32),
            "logits_fake": logits_fake.detach().mean(dtype=torch.float32),
        }
        return loss, logs


def _fp16_loss_scaling(recon: torch.Tensor) -> bool:
    """Whether the generator loss runs in fp16 (where the trainer's backward is loss-scaled)."""
    device = recon.device.type
    autocast_fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    return recon.dtype == torch.float16 or autocast_fp16


def _frozen_forward(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """module(inputs) with the module's parameters frozen, so gradients reach only ``inputs``.

    Freezing (and restoring the flags afterwards) keeps the generator's backward from writing
    stale gradients into the discriminator, without the trainer having to zero them.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        return module(inputs)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
