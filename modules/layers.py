"""Building blocks shared by the autoencoder and the diffusion UNet, defined once.

Every block keeps the parameter names and the numerics of its diffusers counterpart, so weights
of a diffusers ``AutoencoderKL`` (and of the UNet's ResNet blocks) map onto ours key for key:

- :class:`ResBlock`        <-> ``diffusers.models.resnet.ResnetBlock2D`` (output_scale_factor 1)
- :class:`Downsample`      <-> ``Downsample2D(use_conv=True)`` (padding 0: VAE, padding 1: UNet)
- :class:`Upsample`        <-> ``Upsample2D(use_conv=True)`` (on a CPU run as the equivalent transposed conv)
- :class:`SelfAttention2d` <-> ``Attention`` with group norm and a residual connection (VAE mid block)
- :func:`timestep_embedding` <-> ``diffusers.models.embeddings.get_timestep_embedding``

:func:`checkpoint_call` runs any of them under activation checkpointing (the autoencoder's
``gradient_checkpointing``).

The ResNet block is the pre-activation residual unit of He et al. 2016 ("Identity Mappings in
Deep Residual Networks") with GroupNorm (Wu & He 2018), as used by DDPM (Ho et al. 2020) and
Latent Diffusion (Rombach et al. 2022).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TRANSPOSED_UPSAMPLE_MIN_PIXELS",
    "Downsample",
    "ResBlock",
    "SelfAttention2d",
    "TransposedConvChoice",
    "Upsample",
    "checkpoint_call",
    "multihead_attention",
    "nearest_upsample_conv_taps",
    "normalization",
    "timestep_embedding",
    "zero_module",
]


def normalization(channels: int, num_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with learnable affine parameters over ``channels`` channels split in ``num_groups``."""
    if channels % num_groups != 0:
        raise ValueError(f"GroupNorm needs channels ({channels}) divisible by num_groups ({num_groups})")
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=eps, affine=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it.

    Used on the last layer of residual branches so a freshly initialised block starts as the
    identity (Goyal et al. 2017; guided-diffusion does the same on its output convolutions).
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def checkpoint_call(module: nn.Module, use_checkpoint: bool, *args: Optional[torch.Tensor]) -> torch.Tensor:
    """``module(*args)``, or the same under activation checkpointing (Chen et al. 2016, "Training
    Deep Nets with Sublinear Memory Cost"): only ``args`` are kept for backward and the activations
    inside ``module`` are recomputed there, trading one more forward of ``module`` for their memory.

    Non-reentrant (``use_reentrant=False``): gradients reach parameters even when no input requires
    grad, ``torch.autograd.grad`` and ``retain_graph`` work, and the RNG state is replayed, so
    dropout masks are the same in the recomputation.
    """
    if use_checkpoint:
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    max_period: int = 10000,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, "Attention Is All You Need" sec. 3.5.

    Frequencies are ``exp(-ln(max_period) * i / (dim/2 - downscale_freq_shift))`` for
    ``i = 0 .. dim/2 - 1``; the output is ``[cos, sin]`` when ``flip_sin_to_cos`` (the Stable
    Diffusion layout), ``[sin, cos]`` otherwise, zero-padded by one column when ``dim`` is odd.
    Numerically identical to diffusers' ``get_timestep_embedding`` with the same arguments.

    Args:
        timesteps: (B,) tensor of timesteps.
        dim: embedding width.
    Returns:
        (B, dim) float32 tensor.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - downscale_freq_shift)
    freqs = torch.exp(exponent)  # (half,)
    args = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2*half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class ResBlock(nn.Module):
    """Pre-activation residual block with an optional additive time embedding.

    ``h = conv1(SiLU(norm1(x))) [+ time_emb_proj(SiLU(temb))]``;
    ``h = conv2(dropout(SiLU(norm2(h))))``; ``out = shortcut(x) + h``.
    The shortcut is the identity when channel counts agree, else a 1x1 convolution
    (``conv_shortcut=True`` makes it a 3x3 one, the original LDM option). Parameter names match
    diffusers' ``ResnetBlock2D`` (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut).

    Shapes: x (B, C_in, H, W), temb (B, temb_channels) -> (B, C_out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        eps: float = 1e-6,
        conv_shortcut: bool = False,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels

        self.norm1 = normalization(in_channels, num_groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = normalization(out_channels, num_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)

        self.conv_shortcut: nn.Conv2d | None = None
        if in_channels != out_channels:
            k = 3 if conv_shortcut else 1
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResBlock was built with temb_channels and needs a time embedding")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)  # (B, C_out, H, W)
        return skip + h


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """(before, after) padding that keeps the size of a stride-1 convolution with this kernel."""
    total = kernel_size - 1
    return total // 2, total - total // 2


class Downsample(nn.Module):
    """Strided convolution that divides height and width by ``factor``.

    Two padding conventions, both giving ``H / factor`` for ``H`` divisible by ``factor``:

    - ``asymmetric_padding=True`` (the LDM/diffusers VAE): pad ``kernel_size - factor`` zeros on the
      right and bottom only, then convolve with padding 0. For kernel 3 / factor 2 this is exactly
      diffusers' ``Downsample2D(padding=0)`` (``F.pad(x, (0, 1, 0, 1))``).
    - ``asymmetric_padding=False`` (the UNet): symmetric padding ``kernel_size // 2`` for odd
      kernels (diffusers' ``Downsample2D(padding=1)`` for kernel 3), ``(kernel_size - factor) / 2``
      for even ones.

    Shapes: (B, C, H, W) -> (B, C_out, H / factor, W / factor). Parameter name ``conv`` as diffusers.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        asymmetric_padding: bool = False,
        kernel_size: int = 3,
        factor: int = 2,
    ) -> None:
        super().__init__()
        if factor < 1 or kernel_size < factor:
            raise ValueError(
                f"Downsample needs 1 <= factor <= kernel_size, got factor={factor}, kernel_size={kernel_size}"
            )
        out_channels = channels if out_channels is None else out_channels
        self.channels = channels
        self.out_channels = out_channels
        self.asymmetric_padding = asymmetric_padding
        if asymmetric_padding:
            self.pad = (0, kernel_size - factor, 0, kernel_size - factor)  # (left, right, top, bottom)
            padding = 0
        else:
            if kernel_size % 2 == 1:
                padding = kernel_size // 2
            elif (kernel_size - factor) % 2 == 0:
                padding = (kernel_size - factor) // 2
            else:
                raise ValueError(
                    f"symmetric Downsample cannot keep H/factor with even kernel_size={kernel_size} "
                    f"and factor={factor}; "
                    "use an odd kernel or asymmetric_padding"
                )
            self.pad = None
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=kernel_size, stride=factor, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad, mode="constant", value=0.0)  # (B, C, H + p, W + p)
        return self.conv(x)  # (B, C_out, H / factor, W / factor)


# Below this many input pixels (H * W) the transposed-convolution form of Upsample is not used:
# there the per-call kernel transform and the transposed convolution's set-up cost more than the
# saved multiply-adds (measured on CPU/oneDNN; both forms give the same numbers up to rounding).
TRANSPOSED_UPSAMPLE_MIN_PIXELS = 64

# How Upsample computes "nearest upsample, then convolve" (see Upsample): "auto" | True | False.
TransposedConvChoice = Union[bool, Literal["auto"]]


def nearest_upsample_conv_taps(kernel_size: int, factor: int, pad_before: int) -> tuple[torch.Tensor, int, int] | None:
    """How "nearest upsampling by ``factor``, then a stride-1 convolution" becomes one transposed convolution.

    The convolution (kernel ``kernel_size``, ``pad_before`` zeros before and
    ``kernel_size - 1 - pad_before`` after) sees each input pixel up to ``factor`` times per tap
    row, so output row ``factor * m + r`` is ``sum_d w[d] x[m + floor((r + d - pad_before) / factor)]``.
    Collecting the taps that land on the same input row gives a stride-``factor`` transposed
    convolution with kernel ``T[k] = sum_d M[k, d] w[d]`` per spatial axis: the same products,
    with ``K_t^2`` instead of ``factor^2 * kernel_size^2`` multiply-adds per input pixel (16 vs 36
    for kernel 3, factor 2) and without materialising the upsampled map.

    Returns (M of shape (K_t, kernel_size) with 0/1 entries, padding, output_padding) of
    ``conv_transpose2d``, or None when no such transposed convolution gives the same size.
    """
    taps = [(d, r - factor * ((r + d - pad_before) // factor)) for r in range(factor) for d in range(kernel_size)]
    low = min(k for _, k in taps)
    size = max(k for _, k in taps) - low + 1
    padding = -low
    output_padding = factor - size + 2 * padding
    if not 0 <= output_padding < factor:
        return None
    taps_matrix = torch.zeros(size, kernel_size)
    for d, k in taps:
        taps_matrix[k - low, d] = 1.0  # k fixes the phase r, so each (k, d) pair occurs once
    return taps_matrix, padding, output_padding


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by ``factor`` followed by a size-preserving convolution.

    Matches diffusers' ``Upsample2D(use_conv=True)`` for kernel 3 / factor 2. Even kernels get the
    extra padding column on the right/bottom. ``output_size`` forces the interpolated size (the UNet
    uses it when a skip connection has an odd size).

    The same map can be computed as one transposed convolution (:func:`nearest_upsample_conv_taps`)
    when the output is exactly ``factor`` times the input: 2.25x fewer multiply-adds for kernel 3 /
    factor 2 and no 4x-sized intermediate, the same result up to float rounding. That pays on a CPU
    (measured with oneDNN) but is unmeasured on GPUs, where cuDNN's plain convolution is the
    tuned path; ``transposed_conv`` decides:

    - ``"auto"`` (default): the transposed form for CPU tensors of at least
      ``TRANSPOSED_UPSAMPLE_MIN_PIXELS`` input pixels, the plain one (diffusers') on any other
      device. Decided per call from ``x.device``, with no host-device sync.
    - ``True``: the transposed form whenever it gives the output size, on any device and size (to
      measure it on a GPU).
    - ``False``: always nearest upsampling, then the convolution.

    Either way the parameters are those of the convolution (``conv.weight`` (C_out, C, k, k)), so
    weights load the same.

    Shapes: (B, C, H, W) -> (B, C_out, H * factor, W * factor). Parameter name ``conv`` as diffusers.
    """

    def __init__(self, channels: int, out_channels: int | None = None, kernel_size: int = 3, factor: int = 2,
                 transposed_conv: TransposedConvChoice = "auto") -> None:
        super().__init__()
        if not (isinstance(transposed_conv, bool) or transposed_conv == "auto"):
            raise ValueError(f"transposed_conv must be 'auto', True or False, got {transposed_conv!r}")
        out_channels = channels if out_channels is None else out_channels
        self.channels = channels
        self.out_channels = out_channels
        self.factor = factor
        self.transposed_conv = transposed_conv
        before, after = _same_padding(kernel_size)
        # Symmetric padding goes into the conv (cheaper); only uneven padding needs an explicit F.pad.
        self.pad = None if before == after else (before, after, before, after)
        padding = before if before == after else 0
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=kernel_size, stride=1, padding=padding)

        transposed = nearest_upsample_conv_taps(kernel_size, factor, before) if transposed_conv is not False else None
        self.transposed_kernel_size = self.transposed_padding = self.transposed_output_padding = 0
        if transposed is None:
            self.register_buffer("transposed_taps", None, persistent=False)
        else:
            taps, self.transposed_padding, self.transposed_output_padding = transposed
            self.transposed_kernel_size = taps.shape[0]
            # (k*k, K_t*K_t): conv tap (dy, dx) -> transposed tap (ky, kx), both axes at once. Not
            # persistent: the state dict stays diffusers' (conv.weight, conv.bias).
            self.register_buffer("transposed_taps", torch.kron(taps, taps).t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if self._runs_transposed(x, output_size):
            return F.conv_transpose2d(x, self._transposed_weight(), self.conv.bias, stride=self.factor,
                                      padding=self.transposed_padding, output_padding=self.transposed_output_padding)
        if output_size is None:
            x = F.interpolate(x, scale_factor=float(self.factor), mode="nearest")  # (B, C, fH, fW)
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")  # (B, C, *output_size)
        if self.pad is not None:
            x = F.pad(x, self.pad, mode="constant", value=0.0)
        return self.conv(x)  # (B, C_out, fH, fW)

    def _runs_transposed(self, x: torch.Tensor, output_size: tuple[int, int] | None) -> bool:
        """Whether this call takes the transposed-convolution form (see the class docstring)."""
        h, w = x.shape[-2:]
        if self.transposed_taps is None:
            return False
        if output_size is not None and tuple(output_size) != (h * self.factor, w * self.factor):
            return False
        if self.transposed_conv == "auto":
            return x.device.type == "cpu" and h * w >= TRANSPOSED_UPSAMPLE_MIN_PIXELS
        return True

    def _transposed_weight(self) -> torch.Tensor:
        """conv.weight (C_out, C, k, k) -> the transposed convolution's weight (C, C_out, K_t, K_t)."""
        weight = self.conv.weight
        c_out, c_in, k, _ = weight.shape
        size = self.transposed_kernel_size
        # Full precision under autocast: the sums of taps are part of the weights, not activations.
        with torch.autocast(weight.device.type, enabled=False):
            merged = weight.transpose(0, 1).reshape(c_in * c_out, k * k) @ self.transposed_taps.to(weight.dtype)
        return merged.view(c_in, c_out, size, size)  # one GEMM; its backward maps the gradient back to conv.weight


def multihead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) over ``num_heads`` heads.

    Splits the channel axis into heads, runs ``F.scaled_dot_product_attention`` (softmax(QK^T/sqrt(d))V)
    and merges the heads back, as diffusers' ``AttnProcessor2_0`` does.

    Args:
        q: (B, Lq, C) queries; k, v: (B, Lk, C) keys and values; C divisible by ``num_heads``.
        attn_mask: optional mask broadcastable to (B, num_heads, Lq, Lk): bool (True = attend) or additive float.
    Returns:
        (B, Lq, C).
    """
    b, lq, c = q.shape
    if c % num_heads != 0:
        raise ValueError(f"channels ({c}) must be divisible by num_heads ({num_heads})")
    hd = c // num_heads
    q = q.view(b, lq, num_heads, hd).transpose(1, 2)  # (B, nh, Lq, hd)
    k = k.view(b, -1, num_heads, hd).transpose(1, 2)  # (B, nh, Lk, hd)
    v = v.view(b, -1, num_heads, hd).transpose(1, 2)  # (B, nh, Lk, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)  # (B, nh, Lq, hd)
    return out.transpose(1, 2).reshape(b, lq, c)  # (B, Lq, C)


class SelfAttention2d(nn.Module):
    """Spatial self-attention over the H*W positions of a feature map, with a residual connection.

    ``out = x + to_out(Attention(norm(x)))``: GroupNorm, linear q/k/v projections with bias, multi-head
    scaled dot-product attention, linear output projection. Parameter names follow diffusers'
    ``Attention`` (group_norm, to_q, to_k, to_v, to_out.0), so a diffusers VAE mid-block attention
    loads 1:1. Give either ``num_heads`` or ``head_dim`` (default: one head, as the VAE).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int | None = None,
        head_dim: int | None = None,
        num_groups: int = 32,
        eps: float = 1e-6,
        residual: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads is not None and head_dim is not None:
            raise ValueError("give num_heads or head_dim, not both")
        if head_dim is not None:
            if channels % head_dim != 0:
                raise ValueError(f"channels ({channels}) must be divisible by head_dim ({head_dim})")
            num_heads = channels // head_dim
        num_heads = 1 if num_heads is None else num_heads
        if channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels = channels
        self.num_heads = num_heads
        self.residual = residual
        self.group_norm = normalization(channels, num_groups, eps)
        self.to_q = nn.Linear(channels, channels, bias=True)
        self.to_k = nn.Linear(channels, channels, bias=True)
        self.to_v = nn.Linear(channels, channels, bias=True)
        self.to_out = nn.Sequential(nn.Linear(channels, channels, bias=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hs = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = multihead_attention(self.to_q(hs), self.to_k(hs), self.to_v(hs), self.num_heads)  # (B, HW, C)
        out = self.to_out(out)  # (B, HW, C)
        out = out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out if self.residual else out
