"""First-stage autoencoders of Latent Diffusion (Rombach et al. 2022, sec. 3.1 and App. G).

An encoder maps an image x (B, C, H, W) to a latent map of spatial size H/f x W/f,
f = vae_up_down_factor ** (len(vae_channels_per_block) - 1); a decoder maps it back. Two
regularisations of the latent space:

- :class:`AutoencoderKL`: the encoder predicts a diagonal Gaussian posterior q(z|x) and a small
  KL(q(z|x) || N(0, I)) keeps the latents near a standard normal (Kingma & Welling 2014).
- :class:`VQModel`: the decoder sees the nearest codebook vectors of the encoder outputs
  (van den Oord et al. 2017; see :mod:`modules.quantizer`).

The network is the Stable Diffusion / diffusers one, with the same parameter names
(``encoder.down_blocks.0.resnets.0.conv1.weight``, ``quant_conv``, ...), so a diffusers
``AutoencoderKL`` folder loads into :class:`AutoencoderKL` key for key
(:func:`load_diffusers_vae`) and ours exports back (:func:`export_diffusers_vae`):

    Encoder: conv_in -> [ResBlock x residual_layers_per_block (+ Downsample but the last)] per level
             -> mid (ResBlock, [SelfAttention, ResBlock] x attention_layers) -> GroupNorm, SiLU, conv_out
    Decoder: conv_in -> mid -> [ResBlock x (residual_layers_per_block + 1) (+ Upsample but the last)]
             per level, channels reversed -> GroupNorm, SiLU, conv_out

``vae.gradient_checkpointing`` recomputes the activations of every encoder and decoder layer
(ResBlocks, attention, resampling; mid blocks included) in backward instead of storing them, so
stage 1 fits larger batches; ``vae.upsample_transposed_conv`` picks how the decoder's upsampling
is computed (see :class:`modules.layers.Upsample`). Neither changes the weights or the results.

Files are read only by :func:`load_diffusers_vae` and written only by :func:`export_diffusers_vae`,
the two explicit conversion entry points.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import UserError
from modules.layers import (Downsample, ResBlock, SelfAttention2d, TransposedConvChoice, Upsample, checkpoint_call,
                            normalization)
from modules.quantizer import VectorQuantizer

__all__ = [
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "VAEConfig",
    "VQModel",
    "build_autoencoder",
    "export_diffusers_vae",
    "load_diffusers_vae",
    "load_vae_state_dict_strict",
]


# ---------------------------------------------------------------------------------------- config
@dataclass
class VAEConfig:
    """The ``vae:`` section of ``configs/ldm.yaml`` (the tutorial's keys first, then extensions).

    attention_layers: number of (self-attention, ResBlock) pairs in the mid blocks after their
        first ResBlock; 0 means no attention (diffusers' ``mid_block_add_attention=False``). The
        tutorial writes ``attention_layers: 1``, which is the Stable Diffusion layout.
    attention_residual_connections: add the attention input to its output.
    post_encoder_latent_proj / pre_decoder_latent_proj: the 1x1 ``quant_conv`` after the encoder /
        ``post_quant_conv`` before the decoder. In a VQ model they also map between
        ``latent_channels`` and ``vq_embed_dim``, so they are always present when those differ.
    quantize: build a :class:`VQModel` instead of an :class:`AutoencoderKL`.
    commitment_beta: weight of the commitment term, ||z_e - sg[e]||^2 (VQ-VAE eq. 3).
    logvar_min / logvar_max: clamp of the posterior log-variance (keeps exp() finite).
    vq_*: see :class:`modules.quantizer.VectorQuantizer`.
    gradient_checkpointing: recompute the encoder's and decoder's activations in backward instead
        of storing them (training only; the same outputs and gradients, one more forward of each).
    upsample_transposed_conv: how the decoder's Upsample layers compute nearest upsampling +
        convolution: "auto" (the equivalent transposed convolution on a CPU, the plain form
        elsewhere), true (transposed everywhere) or false (plain everywhere); see
        :class:`modules.layers.Upsample`.
    """

    img_size: int = 256
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    residual_layers_per_block: int = 2
    attention_layers: int = 1
    attention_residual_connections: bool = True
    post_encoder_latent_proj: bool = True
    pre_decoder_latent_proj: bool = True
    vae_channels_per_block: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    vae_up_down_factor: int = 2
    vae_up_down_kernel_size: int = 3
    quantize: bool = False
    codebook_size: int = 16384
    vq_embed_dim: int = 4
    commitment_beta: float = 0.25
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    vq_l2_normalize: bool = False
    vq_usage_window: int = 100
    vq_dead_code_restart_steps: int = 0
    vq_dead_code_threshold: int = 1
    gradient_checkpointing: bool = False
    upsample_transposed_conv: Union[bool, Literal["auto"]] = "auto"

    def __post_init__(self) -> None:
        self.vae_channels_per_block = list(self.vae_channels_per_block)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UserError` naming the ``vae.<key>`` that cannot build a network."""

        def bad(key: str, expected: str) -> UserError:
            return UserError(f"vae.{key}={getattr(self, key)!r}: expected {expected}")

        for key in ("img_size", "in_channels", "out_channels", "latent_channels", "vae_up_down_factor",
                    "vae_up_down_kernel_size", "norm_num_groups", "codebook_size", "vq_embed_dim", "vq_usage_window"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer")
        for key in ("residual_layers_per_block", "attention_layers", "vq_dead_code_restart_steps"):
            if getattr(self, key) < 0:
                raise bad(key, "a non-negative integer")
        if self.residual_layers_per_block < 1:
            raise bad("residual_layers_per_block", "at least 1")
        if not self.vae_channels_per_block:
            raise bad("vae_channels_per_block", "a non-empty list of channel counts")
        for c in self.vae_channels_per_block:
            if c < 1 or c % self.norm_num_groups != 0:
                raise bad("vae_channels_per_block",
                          f"positive channel counts divisible by norm_num_groups={self.norm_num_groups}")
        if self.vae_up_down_kernel_size < self.vae_up_down_factor:
            raise bad("vae_up_down_kernel_size", f">= vae_up_down_factor ({self.vae_up_down_factor})")
        if self.img_size % self.downsample_factor != 0:
            raise bad("img_size", f"a multiple of the total downsampling factor {self.downsample_factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a probability in [0, 1)")
        if self.logvar_min >= self.logvar_max:
            raise bad("logvar_min", f"< logvar_max ({self.logvar_max})")
        if self.commitment_beta < 0:
            raise bad("commitment_beta", "a non-negative weight")
        if not (isinstance(self.upsample_transposed_conv, bool) or self.upsample_transposed_conv == "auto"):
            raise bad("upsample_transposed_conv", "'auto', true or false")

    @property
    def downsample_factor(self) -> int:
        """Ratio of image size to latent size."""
        return self.vae_up_down_factor ** (len(self.vae_channels_per_block) - 1)

    @property
    def latent_size(self) -> int:
        """Spatial size of the latents of an ``img_size`` image."""
        return self.img_size // self.downsample_factor


# ------------------------------------------------------------------------------------- blocks
class MidBlock(nn.Module):
    """ResBlock, then ``num_attention_layers`` x (SelfAttention2d, ResBlock); diffusers' UNetMidBlock2D.

    With 0 attention layers it is two ResBlocks (diffusers ``add_attention=False``).
    ``use_checkpoint`` runs each layer under activation checkpointing (:func:`checkpoint_call`).
    Shapes: (B, C, h, w) -> (B, C, h, w).
    """

    def __init__(self, channels: int, num_attention_layers: int, attention_residual: bool,
                 num_groups: int, eps: float, dropout: float) -> None:
        super().__init__()
        num_resnets = 1 + max(num_attention_layers, 1)
        self.resnets = nn.ModuleList(
            [ResBlock(channels, channels, dropout=dropout, num_groups=num_groups, eps=eps) for _ in range(num_resnets)]
        )
        # Single-head attention over all channels, as in the LDM/SD autoencoder.
        self.attentions = nn.ModuleList(
            [SelfAttention2d(channels, num_heads=1, num_groups=num_groups, eps=eps, residual=attention_residual)
             for _ in range(num_attention_layers)]
        )

    def forward(self, x: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        x = checkpoint_call(self.resnets[0], use_checkpoint, x)
        for i, resnet in enumerate(self.resnets[1:]):
            if i < len(self.attentions):
                x = checkpoint_call(self.attentions[i], use_checkpoint, x)
            x = checkpoint_call(resnet, use_checkpoint, x)
        return x


class EncoderBlock(nn.Module):
    """``num_layers`` ResBlocks then an optional Downsample; diffusers' DownEncoderBlock2D.

    ``use_checkpoint`` runs each layer under activation checkpointing (:func:`checkpoint_call`).
    Shapes: (B, C_in, h, w) -> (B, C_out, h/f, w/f) (h, w when ``add_downsample`` is False).
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool,
                 num_groups: int, eps: float, dropout: float, factor: int, kernel_size: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResBlock(in_channels if i == 0 else out_channels, out_channels, dropout=dropout,
                      num_groups=num_groups, eps=eps) for i in range(num_layers)]
        )
        # A ModuleList of 0 or 1 keeps diffusers' key names (downsamplers.0.conv).
        self.downsamplers = nn.ModuleList(
            [Downsample(out_channels, asymmetric_padding=True, kernel_size=kernel_size, factor=factor)]
            if add_downsample else []
        )

    def forward(self, x: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        for resnet in self.resnets:
            x = checkpoint_call(resnet, use_checkpoint, x)
        for down in self.downsamplers:
            x = checkpoint_call(down, use_checkpoint, x)
        return x


class DecoderBlock(nn.Module):
    """``num_layers`` ResBlocks then an optional Upsample; diffusers' UpDecoderBlock2D.

    ``use_checkpoint`` runs each layer under activation checkpointing (:func:`checkpoint_call`);
    ``transposed_conv``: see :class:`modules.layers.Upsample`.
    Shapes: (B, C_in, h, w) -> (B, C_out, h*f, w*f) (h, w when ``add_upsample`` is False).
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool,
                 num_groups: int, eps: float, dropout: float, factor: int, kernel_size: int,
                 transposed_conv: TransposedConvChoice = "auto") -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResBlock(in_channels if i == 0 else out_channels, out_channels, dropout=dropout,
                      num_groups=num_groups, eps=eps) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList(
            [Upsample(out_channels, kernel_size=kernel_size, factor=factor, transposed_conv=transposed_conv)]
            if add_upsample else []
        )

    def forward(self, x: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        for resnet in self.resnets:
            x = checkpoint_call(resnet, use_checkpoint, x)
        for up in self.upsamplers:
            x = checkpoint_call(up, use_checkpoint, x)
        return x


class Encoder(nn.Module):
    """Image -> latent statistics. (B, in_channels, H, W) -> (B, z_channels, H/f, W/f).

    ``z_channels`` is 2 * latent_channels (mean and log-variance) for the KL autoencoder and
    latent_channels for the VQ one. ``gradient_checkpointing`` (from the config, may be changed
    later) checkpoints every layer of the blocks and the mid block in training mode with grad on.
    """

    def __init__(self, config: VAEConfig, z_channels: int) -> None:
        super().__init__()
        ch = config.vae_channels_per_block
        g, eps, p = config.norm_num_groups, config.norm_eps, config.dropout
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList(
            [EncoderBlock(ch[max(i - 1, 0)], ch[i], config.residual_layers_per_block, i < len(ch) - 1,
                          g, eps, p, config.vae_up_down_factor, config.vae_up_down_kernel_size)
             for i in range(len(ch))]
        )
        self.mid_block = MidBlock(ch[-1], config.attention_layers, config.attention_residual_connections, g, eps, p)
        self.conv_norm_out = normalization(ch[-1], g, eps)
        self.conv_out = nn.Conv2d(ch[-1], z_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = self.conv_in(x)  # (B, ch0, H, W)
        for block in self.down_blocks:
            h = block(h, use_checkpoint)  # (B, ch_i, H/f^i, W/f^i)
        h = self.mid_block(h, use_checkpoint)  # (B, ch_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent -> image. (B, latent_channels, h, w) -> (B, out_channels, h*f, w*f).

    ``gradient_checkpointing`` as in :class:`Encoder`; ``config.upsample_transposed_conv`` picks how
    the Upsample layers compute (:class:`modules.layers.Upsample`).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch = list(reversed(config.vae_channels_per_block))
        g, eps, p = config.norm_num_groups, config.norm_eps, config.dropout
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], kernel_size=3, stride=1, padding=1)
        self.mid_block = MidBlock(ch[0], config.attention_layers, config.attention_residual_connections, g, eps, p)
        # One ResBlock more per level than the encoder, as in LDM/SD.
        self.up_blocks = nn.ModuleList(
            [DecoderBlock(ch[max(i - 1, 0)], ch[i], config.residual_layers_per_block + 1, i < len(ch) - 1,
                          g, eps, p, config.vae_up_down_factor, config.vae_up_down_kernel_size,
                          config.upsample_transposed_conv)
             for i in range(len(ch))]
        )
        self.conv_norm_out = normalization(ch[-1], g, eps)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = self.conv_in(z)  # (B, ch_last, h, w)
        h = self.mid_block(h, use_checkpoint)
        for block in self.up_blocks:
            h = block(h, use_checkpoint)  # (B, ch_i, h*f^i, w*f^i)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)


# ------------------------------------------------------------------------------- KL posterior
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar))) from the encoder's output.

    Args:
        parameters: (B, 2C, h, w): mean in the first C channels, log-variance in the last C.
        logvar_min / logvar_max: clamp of the log-variance (diffusers: -30, 20).
    """

    def __init__(self, parameters: torch.Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, logvar_min, logvar_max)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps (Kingma & Welling 2014, eq. 10), (B, C, h, w).

        With a CPU generator and parameters on another device, eps is drawn on the CPU and moved,
        so the same seed gives the same latents on any device (diffusers' ``randn_tensor`` rule).
        """
        device = self.parameters.device
        draw_device = generator.device if generator is not None else device
        eps = torch.randn(self.mean.shape, generator=generator, device=draw_device, dtype=self.parameters.dtype)
        return self.mean + self.std * eps.to(device)

    def mode(self) -> torch.Tensor:
        """The posterior's mode (its mean), (B, C, h, w)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) summed over latent elements, (B,); ``other`` defaults to N(0, I).

        KL(N(m, s^2) || N(0, 1)) = 0.5 * (m^2 + s^2 - 1 - log s^2) per element (Kingma & Welling, App. B).
        """
        # Summed in float32 even under autocast: a sum over 16k latent elements overflows fp16 and
        # loses digits in bf16.
        if other is None:
            mean, logvar = self.mean.float(), self.logvar.float()
            return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under the posterior, summed over ``dims``: (B,)."""
        log_two_pi = float(np.log(2.0 * np.pi))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


# --------------------------------------------------------------------------------- autoencoders
class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM's "KL-f8" family); diffusers' AutoencoderKL layout.

    Attributes:
        scaling_factor: latent scale (1/std of the latents) when known, e.g. from a diffusers folder;
            None for a freshly built model (compute it with compute_vae_scaling.py).
        shift_factor: latent shift of some diffusers VAEs (z_scaled = (z - shift) * scale), else None.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if config.quantize:
            raise ValueError("AutoencoderKL needs quantize=False; build_autoencoder() picks VQModel for quantize=True")
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config, z_channels=2 * c)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1) if config.post_encoder_latent_proj else None
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1) if config.pre_decoder_latent_proj else None
        self.scaling_factor: float | None = None
        self.shift_factor: float | None = None

    @property
    def latent_channels(self) -> int:
        """Channels of the latents ``decode`` takes."""
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_decoder_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last convolution, for the adaptive GAN weight (LDM/VQGAN eq. 7)."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, in_channels, H, W) -> posterior over latents (B, latent_channels, H/f, W/f)."""
        moments = self.encoder(x)  # (B, 2C, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments, self.config.logvar_min, self.config.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` through a posterior sample (or its mode): returns (recon, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(nn.Module):
    """Vector-quantized autoencoder (LDM's "VQ-f4/f8"); diffusers' VQModel layout.

    encoder -> quant_conv (latent_channels -> vq_embed_dim) -> quantize -> post_quant_conv
    (vq_embed_dim -> latent_channels) -> decoder. As in diffusers (and LDM's VQ models, where the
    diffusion model works on pre-quantization latents), ``encode`` stops *before* the quantizer and
    ``decode`` quantizes unless told not to.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if not config.quantize:
            raise ValueError("VQModel needs quantize=True; build_autoencoder() picks AutoencoderKL for quantize=False")
        self.config = config
        c, d = config.latent_channels, config.vq_embed_dim
        self.encoder = Encoder(config, z_channels=c)
        self.quant_conv = nn.Conv2d(c, d, kernel_size=1) if (config.post_encoder_latent_proj or c != d) else None
        self.quantize = VectorQuantizer(
            codebook_size=config.codebook_size,
            embed_dim=d,
            beta=config.commitment_beta,
            l2_normalize=config.vq_l2_normalize,
            usage_window=config.vq_usage_window,
            dead_code_restart_steps=config.vq_dead_code_restart_steps,
            dead_code_threshold=config.vq_dead_code_threshold,
        )
        self.post_quant_conv = nn.Conv2d(d, c, kernel_size=1) if (config.pre_decoder_latent_proj or c != d) else None
        self.decoder = Decoder(config)
        self.scaling_factor: float | None = None
        self.shift_factor: float | None = None

    @property
    def latent_channels(self) -> int:
        """Channels of the latents ``encode`` returns and ``decode`` takes (the code dimension)."""
        return self.config.vq_embed_dim

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_decoder_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last convolution, for the adaptive GAN weight."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) -> pre-quantization latents z_e (B, vq_embed_dim, H/f, W/f)."""
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Latents (B, vq_embed_dim, h, w) -> images; quantizes first unless ``force_not_quantize``."""
        if not force_not_quantize:
            h, _, _ = self.quantize(h)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct ``x``: returns (recon, vq_loss (scalar), quantizer logs)."""
        z_q, vq_loss, logs = self.quantize(self.encode(x))
        return self.decode(z_q, force_not_quantize=True), vq_loss, logs


def build_autoencoder(config: VAEConfig) -> AutoencoderKL | VQModel:
    """The autoencoder ``config`` describes: a VQModel when ``quantize`` is set, else an AutoencoderKL."""
    return VQModel(config) if config.quantize else AutoencoderKL(config)


# ---------------------------------------------------------------------------- strict loading
def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_vae_state_dict_strict(
    model: AutoencoderKL | VQModel, state_dict: Mapping[str, torch.Tensor], source_name: str
) -> None:
    """Load ``state_dict`` into ``model``; any mismatch is a :class:`UserError` naming the tensors.

    Recognises the common mistakes first: VQ weights (a codebook, or a ``quant_conv`` /
    encoder output of VQ width) given to a KL config and the reverse, and keys carrying a
    ``module.`` / ``_orig_mod.`` wrapper prefix (DDP / torch.compile saved without unwrapping).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(dict(state_dict), strict=True)
        return

    has_codebook = any(k.startswith("quantize.") for k in state_dict)
    quant_conv = state_dict.get("quant_conv.weight")  # (out, in, 1, 1)
    # A KL quant_conv maps the 2C moments onto themselves (square); a VQ one maps C -> vq_embed_dim.
    vq_projection = quant_conv is not None and quant_conv.ndim == 4 and quant_conv.shape[0] != quant_conv.shape[1]
    if isinstance(model, AutoencoderKL) and (has_codebook or vq_projection):
        evidence = "a codebook 'quantize.embedding.weight'" if has_codebook else (
            f"a non-square quant_conv {tuple(quant_conv.shape)}, i.e. latent_channels -> vq_embed_dim")
        raise UserError(
            f"{source_name}: these are VQ-VAE weights ({evidence}) but the model config has vae.quantize: false; "
            "set vae.quantize: true with the matching codebook_size / vq_embed_dim to load them"
        )
    if isinstance(model, VQModel) and not has_codebook and any(k.startswith("encoder.") for k in state_dict):
        raise UserError(
            f"{source_name}: these weights have no codebook ('quantize.embedding.weight'), so they are KL-VAE "
            "weights, but the model config has vae.quantize: true; set vae.quantize: false to load them"
        )
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            raise UserError(
                f"{source_name}: every key starts with {prefix!r} (weights saved from a wrapped model without "
                "unwrapping it); save the unwrapped model's state_dict"
            )
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_first(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatch {len(mismatched)}: {_first(mismatched)}")
    raise UserError(
        f"{source_name}: weights do not fit the autoencoder config ({'; '.join(parts)}); "
        "check that the vae: section matches the one the weights were trained with"
    )


# ------------------------------------------------------------------------ diffusers conversion
_DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# Attention names of diffusers checkpoints written before the Attention refactor (still on the Hub).
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def _resolve_diffusers_folder(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: diffusers VAE folder not found")
    if not path.is_dir():
        raise UserError(f"{path}: expected a diffusers AutoencoderKL folder (config.json + weights), got a file")
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():  # a whole pipeline folder: use its VAE
        return path / "vae"
    raise UserError(f"{path}: no config.json (nor vae/config.json); expected a diffusers AutoencoderKL folder")


def _config_from_diffusers(cfg: Mapping[str, Any], source: str) -> VAEConfig:
    def unsupported(key: str, value: Any, expected: str) -> UserError:
        return UserError(f"{source}: {key}={value!r} is not supported (expected {expected})")

    class_name = cfg.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise unsupported("_class_name", class_name, "'AutoencoderKL'")
    channels = list(cfg.get("block_out_channels", [64]))
    n = len(channels)
    down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
    if down != ["DownEncoderBlock2D"] * n:
        raise unsupported("down_block_types", down, f"{n} x 'DownEncoderBlock2D'")
    if up != ["UpDecoderBlock2D"] * n:
        raise unsupported("up_block_types", up, f"{n} x 'UpDecoderBlock2D'")
    if cfg.get("act_fn", "silu") != "silu":
        raise unsupported("act_fn", cfg["act_fn"], "'silu'")
    if cfg.get("norm_type", "group") != "group":
        raise unsupported("norm_type", cfg["norm_type"], "'group'")
    sample_size = cfg.get("sample_size", 32)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    factor = 2 ** (n - 1)
    try:
        return VAEConfig(
            img_size=max(int(sample_size) // factor, 1) * factor,
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            residual_layers_per_block=int(cfg.get("layers_per_block", 1)),
            attention_layers=1 if cfg.get("mid_block_add_attention", True) else 0,
            attention_residual_connections=True,
            post_encoder_latent_proj=bool(cfg.get("use_quant_conv", True)),
            pre_decoder_latent_proj=bool(cfg.get("use_post_quant_conv", True)),
            vae_channels_per_block=[int(c) for c in channels],
            vae_up_down_factor=2,
            vae_up_down_kernel_size=3,
            quantize=False,
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=1e-6,  # hard-coded in diffusers' Encoder/Decoder
            dropout=0.0,
        )
    except UserError as err:
        raise UserError(f"{source}: {err}") from None


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in _DIFFUSERS_WEIGHT_FILES:
        file = folder / name
        if file.is_file():
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(file))
            return torch.load(str(file), map_location="cpu", weights_only=True)
    raise UserError(f"{folder}: no weights file (looked for {', '.join(_DIFFUSERS_WEIGHT_FILES)})")


def load_diffusers_vae(path: str | Path) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` from a diffusers ``AutoencoderKL`` folder.

    ``path`` holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``), as
    ``AutoencoderKL.save_pretrained`` writes; a pipeline folder with a ``vae/`` subfolder works too.
    The model comes back in eval mode, float32, with ``scaling_factor`` / ``shift_factor`` from the
    config attached; it matches diffusers' encode (mean, mode, sample with the same generator)
    and decode to float rounding.
    """
    folder = _resolve_diffusers_folder(Path(path))
    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file}: cannot read JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: expected a JSON object")
    model = AutoencoderKL(_config_from_diffusers(raw, str(config_file)))

    state = _read_diffusers_weights(folder)
    renamed = {
        _LEGACY_ATTENTION_KEY.sub(lambda m: m.group(1) + _LEGACY_ATTENTION_NAMES[m.group(2)] + ".", key): value.float()
        for key, value in state.items()
    }
    load_vae_state_dict_strict(model, renamed, str(folder))
    scaling = raw.get("scaling_factor")
    shift = raw.get("shift_factor")
    model.scaling_factor = None if scaling is None else float(scaling)
    model.shift_factor = None if shift is None else float(shift)
    return model.eval()


def export_diffusers_vae(model: AutoencoderKL, path: str | Path, scaling_factor: float | None = None) -> None:
    """Write ``model`` as a diffusers ``AutoencoderKL`` folder (config.json + safetensors weights).

    ``scaling_factor`` (default: the model's own ``scaling_factor``, else 1.0 meaning "unscaled")
    goes into the config, where diffusers pipelines read it. Only what diffusers' AutoencoderKL can
    express is exported: KL models with factor-2 / kernel-3 resampling, 0 or 1 residual attention
    layers and GroupNorm eps 1e-6; anything else is a :class:`UserError`.
    """
    if not isinstance(model, AutoencoderKL):
        raise UserError(f"{path}: only KL autoencoders (vae.quantize: false) export to a diffusers AutoencoderKL")
    cfg = model.config
    checks = [
        ("vae_up_down_factor", cfg.vae_up_down_factor == 2, "2"),
        ("vae_up_down_kernel_size", cfg.vae_up_down_kernel_size == 3, "3"),
        ("attention_layers", cfg.attention_layers in (0, 1), "0 or 1"),
        ("attention_residual_connections", cfg.attention_residual_connections, "true"),
        ("norm_eps", cfg.norm_eps == 1e-6, "1e-6"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise UserError(
                f"{path}: vae.{key}={getattr(cfg, key)!r} cannot be expressed as a diffusers AutoencoderKL "
                f"(needs {expected})"
            )
    if scaling_factor is None:
        scaling_factor = model.scaling_factor if model.scaling_factor is not None else 1.0
    n = len(cfg.vae_channels_per_block)
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.vae_channels_per_block),
        "layers_per_block": cfg.residual_layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.img_size,
        "scaling_factor": float(scaling_factor),
        "shift_factor": model.shift_factor,
        "force_upcast": True,
        "use_quant_conv": model.quant_conv is not None,
        "use_post_quant_conv": model.post_quant_conv is not None,
        "mid_block_add_attention": cfg.attention_layers == 1,
    }
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

