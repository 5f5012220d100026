"""Full-reference image quality metrics: PSNR and SSIM, per image.

SSIM follows Wang, Bovik, Sheikh & Simoncelli (2004), "Image Quality Assessment: From Error
Visibility to Structural Similarity", Eq. 13, with their 11x11 Gaussian window (sigma 1.5) and
constants K1 = 0.01, K2 = 0.03. Local statistics are population (biased) moments, the window is
applied only where it fits inside the image ("valid"), and the map is averaged over positions
and channels. This is exactly scikit-image's ``structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=L, channel_axis=...)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two (B, C, H, W) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # Integer images (uint8) and half precision would lose the small differences PSNR measures.
    return x if x.dtype == torch.float64 else x.float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE), MSE over (C, H, W).

    x, y: (B, C, H, W); data_range: max - min of the value range (1 for [0, 1], 2 for [-1, 1],
    255 for uint8). Returns (B,); identical images give +inf.
    """
    _check_pair(x, y)
    mse = (_as_float(x) - _as_float(y)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(window_size: int, sigma: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps exp(-d^2 / (2 sigma^2)), d = -(n-1)/2 .. (n-1)/2, shape (n,)."""
    offsets = torch.arange(window_size, dtype=dtype, device=device) - (window_size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al., 2004, Eq. 13).

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    with C1 = (k1 L)^2, C2 = (k2 L)^2, L = data_range, and local moments taken with a separable
    Gaussian window (``window_size`` taps, std ``sigma``) at every position where it fits.

    x, y: (B, C, H, W) with H, W >= window_size. Returns (B,): the map averaged over channels
    and positions; identical images give 1.
    """
    _check_pair(x, y)
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd number, got {window_size}")
    if min(x.shape[-2:]) < window_size:
        size = tuple(x.shape[-2:])
        raise ValueError(f"images of size {size} are smaller than the {window_size}x{window_size} SSIM window")
    x, y = _as_float(x), _as_float(y)
    batch, channels = x.shape[:2]
    taps = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)

    # Filter the five moment images in one grouped conv: (B, 5C, H, W), one group per map.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    groups = stacked.shape[1]
    stacked = F.conv2d(stacked, taps.view(1, 1, 1, -1).expand(groups, 1, 1, window_size), groups=groups)
    stacked = F.conv2d(stacked, taps.view(1, 1, -1, 1).expand(groups, 1, window_size, 1), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = stacked.split(channels, dim=1)  # each (B, C, H', W')

    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.reshape(batch, -1).mean(dim=1)
