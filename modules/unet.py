"""The latent diffusion UNet: ResNet blocks + spatial transformers with cross-attention.

The noise-prediction network eps_theta(z_t, t, c) of Latent Diffusion (Rombach et al. 2022,
sec. 3.3, eq. 3), laid out as Stable Diffusion 1.x: a UNet (Ronneberger et al. 2015) whose levels
hold pre-activation ResNet blocks (from :mod:`modules.layers`) that receive the timestep embedding,
each followed, on the attention levels, by a *spatial transformer*: the feature map becomes a
sequence of H*W tokens that goes through transformer blocks of self-attention, cross-attention to
the text tokens (Vaswani et al. 2017) and a GEGLU feed-forward (Shazeer 2020).

Reading order, each block defined before the one that uses it:
``TimestepEmbedder -> ClassEmbedder -> SelfAttention -> CrossAttention -> FeedForward ->
BasicTransformerBlock -> SpatialTransformer -> DownBlock -> MidBlock -> UpBlock -> UNet``.

Three conditionings, switched in :class:`UNetConfig`:
- text (``text_conditioning``): ``context`` (B, L, text_embed_dim) from a text encoder enters
  every cross-attention; ``context_mask`` (B, L) marks the real tokens, padding is masked out so it
  cannot change the output;
- class (``class_conditioning``): a learned class embedding is added to the time embedding; the
  extra index ``num_classes`` is the "null" class of classifier-free guidance (Ho & Salimans 2022);
- none: the attention levels keep self-attention only.

The architecture is exactly diffusers' ``UNet2DConditionModel`` with ``use_linear_projection=True``
(same parameter count; tests/test_unet.py loads its weights and matches its output), written
leaner: fused q/k/v and k/v projections, SDPA, no per-call processor dispatch or no-op rescaling,
and cross-attention to the batch's longest caption only when a padding mask is given.
``benchmarks/bench_unet.py`` compares one training step of the two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules.layers import Downsample, ResBlock, Upsample, multihead_attention, normalization, timestep_embedding, zero_module

__all__ = [
    "BasicTransformerBlock",
    "ClassEmbedder",
    "CrossAttention",
    "DownBlock",
    "FeedForward",
    "MidBlock",
    "SelfAttention",
    "SpatialTransformer",
    "TimestepEmbedder",
    "UNet",
    "UNetConfig",
    "UpBlock",
    "trim_padding",
]

DOWN_BLOCK_TYPES = ("AttnDown", "Down")
UP_BLOCK_TYPES = ("AttnUp", "Up")
MID_BLOCK_TYPES = ("AttnMid", "Mid", "None")


@dataclass
class UNetConfig:
    """The ``unet:`` section of ``configs/ldm.yaml`` (the tutorial's keys; defaults = SD 1.x).

    Block structure:
        down_block_types / up_block_types: one entry per level, ``AttnDown``/``Down`` and
            ``AttnUp``/``Up``; ``Attn`` levels add a spatial transformer after every ResNet block.
            Up level i mirrors down level ``len - 1 - i``.
        mid_block_type: ``AttnMid`` (ResBlock, transformer, ResBlock), ``Mid`` (two ResBlocks) or
            ``None`` (no middle block, as the tutorial's trained model).
        unet_channels_per_block: channels of each level (SD: 320, 640, 1280, 1280).
        unet_residual_layers_per_block: ResNet blocks per down level (up levels get one more).
        unet_up_down_factor / unet_up_down_kernel_size: resampling factor and conv kernel.
        transformer_blocks_per_layer: transformer blocks in each spatial transformer.
        transformer_dim_mult: GEGLU hidden width = mult * channels.
        attention_bias: bias on the q/k/v projections (SD: False).
        num_attention_heads: heads of every attention layer; head width = channels / heads (SD: 8;
            diffusers' SD config calls this number ``attention_head_dim``).
    Time embedding:
        time_embed_start_dim: width of the sinusoidal embedding (SD: 320);
        time_embed_proj_dim: width after the MLP, fed to every ResBlock (SD: 1280);
        flip_sin_to_cos, freq_shift: sinusoid layout (SD: cos first, shift 0).
    Conditioning:
        text_conditioning, text_embed_dim (768 for CLIP ViT-L/14), text_conditioning_hf_model (the
        text encoder's name, used by the scripts), pre_encoded_text (the dataset holds encoded text);
        class_conditioning, num_classes, class_embed_dim.
    General: groupnorm_groups, norm_eps (all GroupNorm/LayerNorm), dropout (ResBlocks, attention
        output, feed-forward), gradient_checkpointing (recompute activations in backward).
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: List[str] = field(default_factory=lambda: ["AttnDown", "AttnDown", "AttnDown", "Down"])
    mid_block_type: str = "AttnMid"
    up_block_types: List[str] = field(default_factory=lambda: ["Up", "AttnUp", "AttnUp", "AttnUp"])
    unet_channels_per_block: List[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    unet_residual_layers_per_block: int = 2
    unet_up_down_factor: int = 2
    unet_up_down_kernel_size: int = 3
    transformer_blocks_per_layer: int = 1
    transformer_dim_mult: int = 4
    attention_bias: bool = False
    num_attention_heads: int = 8
    time_embed_start_dim: int = 320
    time_embed_proj_dim: int = 1280
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    text_conditioning: bool = False
    text_conditioning_hf_model: str = "openai/clip-vit-large-patch14"
    text_embed_dim: int = 768
    pre_encoded_text: bool = False
    class_conditioning: bool = False
    num_classes: int = 1000
    class_embed_dim: int = 512
    groupnorm_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        levels = len(self.unet_channels_per_block)
        if levels < 1:
            raise ValueError("unet_channels_per_block needs at least one level")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) and "
                f"unet_channels_per_block ({levels}) must have one entry per level"
            )
        for key, values, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
            ("mid_block_type", [self.mid_block_type], MID_BLOCK_TYPES),
        ):
            for value in values:
                if value not in allowed:
                    raise ValueError(f"{key}: unknown block type {value!r}; allowed: {', '.join(allowed)}")
        for key in ("in_channels", "out_channels", "unet_residual_layers_per_block", "transformer_blocks_per_layer",
                    "transformer_dim_mult", "num_attention_heads", "time_embed_start_dim", "time_embed_proj_dim",
                    "text_embed_dim", "num_classes", "class_embed_dim", "groupnorm_groups", "unet_up_down_factor",
                    "unet_up_down_kernel_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for ch in self.unet_channels_per_block:
            if ch % self.groupnorm_groups != 0:
                raise ValueError(f"unet_channels_per_block: {ch} is not divisible by groupnorm_groups={self.groupnorm_groups}")
            if self.has_attention and ch % self.num_attention_heads != 0:
                raise ValueError(
                    f"unet_channels_per_block: {ch} is not divisible by num_attention_heads={self.num_attention_heads}"
                )
        if self.text_conditioning and not self.has_attention:
            raise ValueError("text_conditioning needs at least one AttnDown/AttnUp block or mid_block_type AttnMid")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def has_attention(self) -> bool:
        """True when some level or the middle block holds a spatial transformer."""
        return (
            "AttnDown" in self.down_block_types or "AttnUp" in self.up_block_types or self.mid_block_type == "AttnMid"
        )


def _call(module: nn.Module, use_checkpoint: bool, *args: Optional[torch.Tensor]) -> torch.Tensor:
    """``module(*args)``, or the same under activation checkpointing (Chen et al. 2016): the
    activations inside ``module`` are recomputed in backward instead of stored."""
    if use_checkpoint:
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# ----------------------------------------------------------------------------------------
# Conditioning embeddings
# ----------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Timesteps -> sinusoidal features (DDPM, Ho et al. 2020, app. B) -> 2-layer SiLU MLP.

    Shapes: t (B,) int or float -> (B, proj_dim). Parameter names as diffusers' TimestepEmbedding.
    """

    def __init__(self, start_dim: int, proj_dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.linear_1 = nn.Linear(start_dim, proj_dim)
        self.linear_2 = nn.Linear(proj_dim, proj_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(
            t, self.start_dim, flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift
        )  # (B, start_dim) float32
        freqs = freqs.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(freqs)))  # (B, proj_dim)


class ClassEmbedder(nn.Module):
    """Class labels -> learned embedding -> 2-layer SiLU MLP, added to the time embedding.

    Label ``num_classes`` is the extra "null" class: training replaces a fraction of the labels by it
    (classifier-free guidance dropout) and sampling uses it for the unconditional prediction.
    Shapes: labels (B,) long in [0, num_classes] -> (B, proj_dim).
    """

    def __init__(self, num_classes: int, embed_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.null_label = num_classes
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.linear_1 = nn.Linear(embed_dim, proj_dim)
        self.linear_2 = nn.Linear(proj_dim, proj_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(self.embedding(labels))))  # (B, proj_dim)


# ----------------------------------------------------------------------------------------
# Attention and the transformer block
# ----------------------------------------------------------------------------------------

def key_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool mask (True = real token) -> additive attention bias (B, 1, 1, L).

    Masked keys get the most negative finite value of ``dtype``: their softmax weight is exactly 0
    whenever the row has one real key, and a row with none attends uniformly instead of turning
    into NaN as a -inf bias would.
    """
    keys = mask.bool().unflatten(1, (1, 1, -1))  # (B, 1, 1, L): broadcast over heads and queries
    # Built in its 4-d shape: indexing a (B, L) bias with [:, None, None, :] makes torch.compile's
    # inductor fail on a varying caption length L ("cannot determine truth value of 1 < L").
    return torch.zeros(keys.shape, dtype=dtype, device=mask.device).masked_fill(~keys, torch.finfo(dtype).min)


def trim_padding(
    context: torch.Tensor, context_mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Drop the trailing context positions that are padding in every row, and a mask that masks nothing.

    CLIP captions are padded to 77 tokens but are mostly much shorter; a masked key gets softmax
    weight exactly 0, so cutting the columns that no row attends to changes no output while every
    cross-attention then projects and attends to the longest caption of the batch only. When every
    remaining position is real the mask is dropped (SDPA then takes its unmasked path). A row with no
    real token at all keeps the whole, untrimmed context (it attends uniformly, see
    :func:`key_padding_bias`).

    The UNet does not call it: finding the length reads the mask on the host, a sync that would
    stall every training step. Training batches arrive cut to a length bucket by
    :class:`modules.batching.Collate` (on the CPU, in the workers); generation calls this once per
    batch of prompts, before the sampling loop.

    Shapes: context (B, L, D), context_mask (B, L) bool or None -> (B, L', D), (B, L') or None.
    """
    if context_mask is None:
        return context, None
    mask = context_mask.bool()
    if mask.shape != context.shape[:2]:
        raise ValueError(f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(mask.shape)}")
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # (L,) 1-based
    counts = mask.sum(dim=1)  # (B,) real tokens per row
    length = (mask.any(dim=0) * positions).max()  # last position real in some row
    # Every real token lies in the first ``length`` positions, so a row with ``length`` of them is all real.
    fewest, length, all_real = torch.stack([counts.min(), length, (counts == length).all()]).tolist()
    if fewest == 0:
        return context, mask  # a row with no real token: keep its uniform attention over all L
    return context[:, :length], (None if all_real else mask[:, :length])


class SelfAttention(nn.Module):
    """Multi-head self-attention over a token sequence with one fused q/k/v projection.

    Shapes: x (B, N, C) -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)  # one GEMM instead of three
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # 3 x (B, N, C) strided views
        out = multihead_attention(q, k, v, self.num_heads)  # (B, N, C)
        return self.dropout(self.to_out(out))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to context tokens (keys/values).

    ``context_mask`` (B, L) bool marks the real context tokens; the others are excluded from the
    softmax, so padding, whatever its hidden states, never changes the output.
    Shapes: x (B, N, C), context (B, L, D) -> (B, N, C).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=bias)  # one GEMM for keys and values
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        q = self.to_q(x)  # (B, N, C)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # 2 x (B, L, C) strided views
        bias = None if context_mask is None else key_padding_bias(context_mask, q.dtype)  # (B, 1, 1, L)
        out = multihead_attention(q, k, v, self.num_heads, attn_mask=bias)  # (B, N, C)
        return self.dropout(self.to_out(out))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): ``W2 (a * GELU(g))`` with ``[a, g] = W1 x``.

    Shapes: (B, N, C) -> (B, N, C); hidden width ``mult * C``.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = mult * dim
        self.proj_in = nn.Linear(dim, 2 * inner)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)  # 2 x (B, N, inner)
        return self.proj_out(self.dropout(a * F.gelu(gate)))  # (B, N, C)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention (when ``context_dim``), GEGLU.

    ``x += SelfAttn(LN(x)); x += CrossAttn(LN(x), context); x += FF(LN(x))``.
    Shapes: x (B, N, C), context (B, L, context_dim) -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: Optional[int] = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        attention_bias: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = SelfAttention(dim, num_heads, bias=attention_bias, dropout=dropout)
        self.norm2: Optional[nn.LayerNorm] = None
        self.attn2: Optional[CrossAttention] = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.attn2 = CrossAttention(dim, context_dim, num_heads, bias=attention_bias, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            if context is None:
                raise ValueError("this transformer block cross-attends and needs a context")
            x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A transformer over the H*W positions of a feature map, with a residual connection.

    GroupNorm, linear projection in, ``depth`` transformer blocks, zero-initialised linear projection
    out (so a new block starts as the identity), residual add.
    Shapes: x (B, C, H, W), context (B, L, context_dim) -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        depth: int = 1,
        context_dim: Optional[int] = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        attention_bias: bool = False,
        num_groups: int = 32,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm = normalization(channels, num_groups, eps)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(channels, num_heads, context_dim, ff_mult, dropout, attention_bias, eps)
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C); free for channels_last
        tokens = self.proj_in(tokens)
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)  # (B, HW, C)
        tokens = self.proj_out(tokens)
        out = tokens.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W) with channels_last strides
        if not _is_channels_last(x):
            out = out.contiguous()  # keep x's layout: convolutions are slow on mixed layouts
        return x + out


def _is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-D tensor is stored channels_last (and not also plain contiguous, as C=1 or H=W=1 is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# ----------------------------------------------------------------------------------------
# UNet levels
# ----------------------------------------------------------------------------------------

class DownBlock(nn.Module):
    """One encoder level: ``num_layers`` x (ResBlock [+ SpatialTransformer]) [+ Downsample].

    Returns the output and every intermediate feature map, which become the skip connections.
    Shapes: (B, C_in, H, W) -> (B, C_out, H', W') and a list of (B, C_out, ., .).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        config: UNetConfig,
        attention: bool,
        downsample: bool,
        context_dim: Optional[int],
    ) -> None:
        super().__init__()
        layers = config.unet_residual_layers_per_block
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, config.time_embed_proj_dim,
                     config.dropout, config.groupnorm_groups, config.norm_eps)
            for i in range(layers)
        )
        self.attentions = _transformers(out_channels, layers, config, context_dim) if attention else None
        self.downsample = (
            Downsample(out_channels, out_channels, asymmetric_padding=False,
                       kernel_size=config.unet_up_down_kernel_size, factor=config.unet_up_down_factor)
            if downsample else None
        )

    def forward(
        self,
        h: torch.Tensor,
        temb: torch.Tensor,
        context: Optional[torch.Tensor],
        context_mask: Optional[torch.Tensor],
        use_checkpoint: bool,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = _call(resnet, use_checkpoint, h, temb)
            if self.attentions is not None:
                h = _call(self.attentions[i], use_checkpoint, h, context, context_mask)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """The bottleneck: ResBlock, [SpatialTransformer,] ResBlock. Shapes: (B, C, H, W) -> same."""

    def __init__(self, channels: int, config: UNetConfig, attention: bool, context_dim: Optional[int]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(channels, channels, config.time_embed_proj_dim, config.dropout, config.groupnorm_groups,
                     config.norm_eps)
            for _ in range(2)
        )
        self.attention = _transformers(channels, 1, config, context_dim)[0] if attention else None

    def forward(
        self,
        h: torch.Tensor,
        temb: torch.Tensor,
        context: Optional[torch.Tensor],
        context_mask: Optional[torch.Tensor],
        use_checkpoint: bool,
    ) -> torch.Tensor:
        h = _call(self.resnets[0], use_checkpoint, h, temb)
        if self.attention is not None:
            h = _call(self.attention, use_checkpoint, h, context, context_mask)
        return _call(self.resnets[1], use_checkpoint, h, temb)


class UpBlock(nn.Module):
    """One decoder level: ``len(skip_channels)`` x (concat skip, ResBlock [+ SpatialTransformer]) [+ Upsample].

    ``skip_channels`` are the channels of the skips it consumes, in the order it pops them.
    Shapes: (B, C_prev, H, W) + skips -> (B, C_out, H'', W'').
    """

    def __init__(
        self,
        prev_channels: int,
        out_channels: int,
        skip_channels: Sequence[int],
        config: UNetConfig,
        attention: bool,
        upsample: bool,
        context_dim: Optional[int],
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock((prev_channels if i == 0 else out_channels) + skip, out_channels, config.time_embed_proj_dim,
                     config.dropout, config.groupnorm_groups, config.norm_eps)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = _transformers(out_channels, len(skip_channels), config, context_dim) if attention else None
        self.upsample = (
            Upsample(out_channels, out_channels, kernel_size=config.unet_up_down_kernel_size,
                     factor=config.unet_up_down_factor)
            if upsample else None
        )

    def forward(
        self,
        h: torch.Tensor,
        skips: List[torch.Tensor],
        temb: torch.Tensor,
        context: Optional[torch.Tensor],
        context_mask: Optional[torch.Tensor],
        use_checkpoint: bool,
    ) -> torch.Tensor:
        """Pops its skips off the end of ``skips`` (the encoder's stack), in place."""
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            h = _call(resnet, use_checkpoint, h, temb)
            if self.attentions is not None:
                h = _call(self.attentions[i], use_checkpoint, h, context, context_mask)
        if self.upsample is not None:
            # The next skip fixes the size, so odd encoder sizes (5 -> 3 -> 5) round-trip.
            h = self.upsample(h, output_size=tuple(skips[-1].shape[-2:]) if skips else None)
        return h


def _transformers(channels: int, count: int, config: UNetConfig, context_dim: Optional[int]) -> nn.ModuleList:
    return nn.ModuleList(
        SpatialTransformer(channels, config.num_attention_heads, config.transformer_blocks_per_layer, context_dim,
                           config.transformer_dim_mult, config.dropout, config.attention_bias,
                           config.groupnorm_groups, config.norm_eps)
        for _ in range(count)
    )


# ----------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------

class UNet(nn.Module):
    """eps_theta(x_t, t, c): the latent diffusion UNet of :class:`UNetConfig`.

    Initialisation as the LDM reference code: the last conv of every ResBlock, the output
    projection of every spatial transformer and the output conv start at zero, so the untrained
    network is a chain of identities and predicts 0.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = list(config.unet_channels_per_block)
        context_dim = config.text_embed_dim if config.text_conditioning else None
        levels = len(channels)

        self.time_embed = TimestepEmbedder(
            config.time_embed_start_dim, config.time_embed_proj_dim, config.flip_sin_to_cos, config.freq_shift
        )
        self.class_embed = (
            ClassEmbedder(config.num_classes, config.class_embed_dim, config.time_embed_proj_dim)
            if config.class_conditioning else None
        )
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)

        skip_channels = [channels[0]]  # conv_in output is the first skip
        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for i, (ch, kind) in enumerate(zip(channels, config.down_block_types)):
            last = i == levels - 1
            self.down_blocks.append(DownBlock(prev, ch, config, kind == "AttnDown", not last, context_dim))
            skip_channels += [ch] * (config.unet_residual_layers_per_block + (0 if last else 1))
            prev = ch

        self.mid_block = (
            MidBlock(prev, config, config.mid_block_type == "AttnMid", context_dim)
            if config.mid_block_type != "None" else None
        )

        self.up_blocks = nn.ModuleList()
        per_up = config.unet_residual_layers_per_block + 1
        for i, (ch, kind) in enumerate(zip(reversed(channels), config.up_block_types)):
            skips = [skip_channels.pop() for _ in range(per_up)]
            self.up_blocks.append(UpBlock(prev, ch, skips, config, kind == "AttnUp", i < levels - 1, context_dim))
            prev = ch

        self.norm_out = normalization(channels[0], config.groupnorm_groups, config.norm_eps)
        self.conv_out = zero_module(nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1))
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_module(module.conv2)
        self.gradient_checkpointing = config.gradient_checkpointing

    @property
    def null_class_label(self) -> int:
        """The class index that means "no class" (classifier-free guidance)."""
        if self.class_embed is None:
            raise ValueError("this UNet is not class-conditional")
        return self.class_embed.null_label

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict the model output (noise, velocity or x0, as trained) for noisy latents.

        Args:
            x: (B, in_channels, H, W) noisy latents.
            t: (B,) timesteps (long or float), or a scalar for the whole batch.
            context: (B, L, text_embed_dim) text hidden states; required iff text-conditional.
            context_mask: (B, L) bool, True on real tokens (None: all tokens are real).
            class_labels: (B,) long in [0, num_classes], ``num_classes`` = null class; required iff
                class-conditional.
        Returns:
            (B, out_channels, H, W).
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)  # (B,)
        if cfg.text_conditioning != (context is not None):
            raise ValueError(
                "this UNet is text-conditional and needs a context" if cfg.text_conditioning
                else "this UNet is not text-conditional; pass context=None"
            )
        if cfg.class_conditioning != (class_labels is not None):
            raise ValueError(
                "this UNet is class-conditional and needs class_labels (null class: num_classes)" if cfg.class_conditioning
                else "this UNet is not class-conditional; pass class_labels=None"
            )
        if context is None and context_mask is not None:
            raise ValueError("context_mask given without a context")

        dtype = self.conv_in.weight.dtype
        emb = self.time_embed(t)  # (B, time_embed_proj_dim)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)  # (B, time_embed_proj_dim)
        if context is not None:
            context = context.to(dtype)  # used at its length: callers trim padding (see trim_padding)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        h = self.conv_in(x.to(dtype))  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, context_mask, use_checkpoint)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context, context_mask, use_checkpoint)
        for block in self.up_blocks:
            h = block(h, skips, emb, context, context_mask, use_checkpoint)  # pops its skips
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)
