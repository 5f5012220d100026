"""PatchGAN discriminator for the stage-1 autoencoder.

The "N-layer" PatchGAN of pix2pix (Isola et al., 2017, "Image-to-Image Translation with
Conditional Adversarial Networks", Sec. 3.2.2) as used by taming-transformers (Esser et al.,
2021) and latent diffusion (Rombach et al., 2022) to sharpen VAE reconstructions. Instead of
one real/fake score per image it outputs a grid of logits, each judging one overlapping patch
(a 70x70 receptive field for the default ``depth=3``, ``kernel_size=4``):

    conv k4 s2 -> LeakyReLU                                   (C)
    depth-1 x [conv k4 s2 -> BatchNorm -> LeakyReLU]          (2C, 4C, ... capped at 8C)
    conv k4 s1 -> BatchNorm -> LeakyReLU                      (min(2^depth, 8) C)
    conv k4 s1 -> 1 logit per patch

A 256x256 image gives (B, 1, 30, 30) logits; a 64x64 image (B, 1, 6, 6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modules.errors import UserError

# Channel growth stops at this multiple of ``start_channels`` (pix2pix/taming).
MAX_CHANNEL_MULTIPLIER = 8
# DCGAN initialisation (Radford et al., 2016), kept by pix2pix and taming.
INIT_STD = 0.02

NormName = Literal["batch", "none"]


@dataclass
class DiscriminatorConfig:
    """Hyper-parameters of :class:`NLayerDiscriminator` (a ``discriminator:`` YAML section)."""

    in_channels: int = 3
    start_channels: int = 64
    depth: int = 3
    kernel_size: int = 4
    leaky_slope: float = 0.2
    norm: NormName = "batch"

    def __post_init__(self) -> None:
        _check_discriminator_args(
            self.in_channels, self.start_channels, self.depth, self.kernel_size, self.leaky_slope, self.norm
        )


def _check_discriminator_args(
    in_channels: int, start_channels: int, depth: int, kernel_size: int, leaky_slope: float, norm: str
) -> None:
    for name, value in (("in_channels", in_channels), ("start_channels", start_channels), ("depth", depth),
                        ("kernel_size", kernel_size)):
        if value < 1:
            raise UserError(f"discriminator {name} must be >= 1, got {value}")
    if leaky_slope < 0:
        raise UserError(f"discriminator leaky_slope must be >= 0, got {leaky_slope}")
    if norm not in ("batch", "none"):
        raise UserError(f"discriminator norm must be 'batch' or 'none', got {norm!r}")


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: images (B, in_channels, H, W) -> patch logits (B, 1, H', W').

    With ``kernel_size=4`` (padding 1) each stride-2 conv halves H and W and each stride-1 conv
    shrinks them by one, so H' = H / 2^depth - 2. The logits are raw (no sigmoid); the losses in
    :mod:`modules.vae_loss` apply hinge or softplus themselves.

    ``norm="batch"`` is the published model (convs before a BatchNorm carry no bias, it would be
    cancelled); ``norm="none"`` drops the norms (and keeps the biases), e.g. for tiny batches.
    """

    def __init__(
        self,
        in_channels: int = 3,
        start_channels: int = 64,
        depth: int = 3,
        kernel_size: int = 4,
        leaky_slope: float = 0.2,
        norm: NormName = "batch",
    ) -> None:
        super().__init__()
        _check_discriminator_args(in_channels, start_channels, depth, kernel_size, leaky_slope, norm)
        use_norm = norm == "batch"
        # (k - 1) // 2 gives pix2pix's padding of 1 for k = 4.
        padding = (kernel_size - 1) // 2

        def block(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
            layers: list[nn.Module] = [
                nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=not use_norm)
            ]
            if use_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.LeakyReLU(leaky_slope, inplace=True))
            return layers

        # The first layer is never normalised (pix2pix: normalising raw pixels hurts).
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, start_channels, kernel_size, stride=2, padding=padding),
            nn.LeakyReLU(leaky_slope, inplace=True),
        ]
        channels = start_channels
        for level in range(1, depth):
            out_channels = start_channels * min(2**level, MAX_CHANNEL_MULTIPLIER)
            layers += block(channels, out_channels, stride=2)
            channels = out_channels
        out_channels = start_channels * min(2**depth, MAX_CHANNEL_MULTIPLIER)
        layers += block(channels, out_channels, stride=1)
        layers.append(nn.Conv2d(out_channels, 1, kernel_size, stride=1, padding=padding))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: DiscriminatorConfig) -> "NLayerDiscriminator":
        return cls(
            in_channels=config.in_channels,
            start_channels=config.start_channels,
            depth=config.depth,
            kernel_size=config.kernel_size,
            leaky_slope=config.leaky_slope,
            norm=config.norm,
        )

    def reset_parameters(self) -> None:
        """DCGAN init: conv weights ~ N(0, 0.02), conv biases 0; BatchNorm scale ~ N(1, 0.02), shift 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 1, H', W') patch logits."""
        return self.layers(images)


def convert_to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm of ``model`` by a SyncBatchNorm (statistics over all processes).

    Call it before wrapping the model for DDP when training with more than one process, so
    the discriminator's batch statistics are those of the global batch, as on one device.
    Weights, buffers and ``requires_grad`` flags are carried over; a model without BatchNorm
    comes back unchanged.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
