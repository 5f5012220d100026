"""Tiny stage-2 exports for the tests of the tools that read them (inference, the web page, scores).

Written with ``modules.ldm_io.save_ldm_export`` from random networks; the UNet's weights are
perturbed away from its zero initialisation (an untrained UNet predicts 0 for every input, which
would make every prompt and seed give the same image).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from modules.autoencoder import VAEConfig, build_autoencoder
from modules.ldm_io import save_ldm_export, text_encoder_export
from modules.model_config import LDMConfig
from modules.text_encoder import TextEncoder, build_tiny_clip
from modules.unet import UNet, UNetConfig

IMG = 16
WORDS = ["a red blue green circle square on background"]


def perturbed(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module


def tiny_clip(folder: Path, vision_image_size: Optional[int] = None) -> Path:
    """A 1-layer CLIP text model (with ``vision_image_size``, a whole CLIPModel) over WORDS."""
    return build_tiny_clip(folder, WORDS, hidden_size=32, layers=1, heads=2, max_position_embeddings=16,
                           vision_image_size=vision_image_size)


def tiny_export(path: Path, conditioning: str, clip: Optional[Path], img_size: int = IMG, **metadata) -> Path:
    """A ``conditioning`` ("text" | "class" | "none") export of ``img_size`` images; ``metadata`` is added
    to the file's (e.g. ``training_config={"guidance_scale": 4.0}``)."""
    torch.manual_seed(0)
    vae_cfg = VAEConfig(img_size=img_size, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                        residual_layers_per_block=1, attention_layers=0)
    unet_cfg = UNetConfig(unet_channels_per_block=[16, 32], down_block_types=["AttnDown", "Down"],
                          up_block_types=["Up", "AttnUp"], mid_block_type="None", unet_residual_layers_per_block=1,
                          groupnorm_groups=4, num_attention_heads=2, time_embed_start_dim=16, time_embed_proj_dim=32,
                          transformer_dim_mult=2, text_conditioning=conditioning == "text", text_embed_dim=32,
                          text_conditioning_hf_model=str(clip), class_conditioning=conditioning == "class",
                          num_classes=3, class_embed_dim=16)
    unet = perturbed(UNet(unet_cfg), 1)
    vae = build_autoencoder(vae_cfg)
    text = text_encoder_export(TextEncoder(clip), str(clip), embed=True) if conditioning == "text" else None
    return save_ldm_export(path, unet.state_dict(), vae.state_dict(), LDMConfig(vae=vae_cfg, unet=unet_cfg), 0.7, 0.0,
                           conditioning, "shapes" if conditioning == "text" else "imagenet", img_size,
                           text_encoder=text, class_names=["cat", "dog", "fox"] if conditioning == "class" else None,
                           metadata={"step": 0, **metadata})
