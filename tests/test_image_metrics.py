"""PSNR and SSIM against their formulas, hand-computed cases and independent numpy references.

scikit-image is not a dependency; the references below re-implement its
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: once by
brute force over every window in float64, once the way scikit-image itself does it (scipy's
Gaussian filter with truncate=3.5, then cropping the border).
"""
import math

import numpy as np
import pytest
import torch

from modules.image_metrics import gaussian_window, psnr, ssim

K1, K2 = 0.01, 0.03


def ssim_brute_force(x: np.ndarray, y: np.ndarray, data_range: float, window_size: int = 11, sigma: float = 1.5):
    """(B, C, H, W) float64 -> (B,), an explicit weighted sum over every full window."""
    half = (window_size - 1) / 2
    taps = np.exp(-((np.arange(window_size) - half) ** 2) / (2 * sigma**2))
    weights = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    out = []
    for xb, yb in zip(x, y):
        maps = []
        for xc, yc in zip(xb, yb):
            wx = np.lib.stride_tricks.sliding_window_view(xc, (window_size, window_size))
            wy = np.lib.stride_tricks.sliding_window_view(yc, (window_size, window_size))
            mx = (wx * weights).sum(axis=(-1, -2))
            my = (wy * weights).sum(axis=(-1, -2))
            vx = (wx**2 * weights).sum(axis=(-1, -2)) - mx**2
            vy = (wy**2 * weights).sum(axis=(-1, -2)) - my**2
            cxy = (wx * wy * weights).sum(axis=(-1, -2)) - mx * my
            maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        out.append(np.mean(maps))
    return np.array(out)


def ssim_skimage_algorithm(x: np.ndarray, y: np.ndarray, data_range: float, sigma: float = 1.5):
    """scikit-image's algorithm: full-image Gaussian filtering (reflect), crop the border, average."""
    ndimage = pytest.importorskip("scipy.ndimage")
    truncate = 3.5
    pad = int(truncate * sigma + 0.5)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    out = []
    for xb, yb in zip(x, y):
        per_channel = []
        for xc, yc in zip(xb, yb):
            def filt(image):
                return ndimage.gaussian_filter(image, sigma=sigma, truncate=truncate, mode="reflect")

            mx, my = filt(xc), filt(yc)
            vx, vy, cxy = filt(xc * xc) - mx * mx, filt(yc * yc) - my * my, filt(xc * yc) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            per_channel.append(s[pad:-pad, pad:-pad].mean())
        out.append(np.mean(per_channel))
    return np.array(out)


def _pair(seed: int = 0, shape=(3, 3, 24, 20)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    # y: a smoothed, noisy version of x, so the SSIM values are spread out and far from 0 and 1.
    y = (0.7 * x + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


# ----------------------------------------------------------------------------------------------
# PSNR
# ----------------------------------------------------------------------------------------------

def test_psnr_known_mse():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full((2, 3, 8, 8), 0.1)
    y[1] = 0.01  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(x, y, data_range=1.0), torch.tensor([20.0, 40.0]), atol=1e-4, rtol=0)
    # The same errors on a [-1, 1] scale (data_range 2) are 20 log10(2) dB higher.
    torch.testing.assert_close(
        psnr(x, y, data_range=2.0), torch.tensor([20.0, 40.0]) + 20 * math.log10(2), atol=1e-4, rtol=0
    )


def test_psnr_matches_formula_and_is_symmetric():
    x, y = _pair()
    mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(1)
    expected = 10 * torch.log10(1.0 / mse)
    torch.testing.assert_close(psnr(x, y, data_range=1.0), expected, rtol=1e-12, atol=1e-12)
    # PSNR depends only on the error relative to the range: scaling both by 255 changes nothing.
    torch.testing.assert_close(psnr(x * 255, y * 255, data_range=255.0), expected, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(psnr(x, y, 1.0), psnr(y, x, 1.0))


def test_psnr_identical_images_is_inf_and_uint8_is_supported():
    x = torch.randint(0, 256, (1, 3, 5, 5), dtype=torch.uint8)
    assert torch.isinf(psnr(x, x, 255.0)).all()
    y = x.clone()
    y[0, 0, 0, 0] = (int(y[0, 0, 0, 0]) + 10) % 256  # one pixel off by 10 (or by 246 when wrapping)
    err = float(int(y[0, 0, 0, 0]) - int(x[0, 0, 0, 0]))
    expected = 10 * math.log10(255.0**2 / (err**2 / 75))
    assert psnr(x, y, 255.0).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# SSIM
# ----------------------------------------------------------------------------------------------

def test_gaussian_window_matches_scipy_taps():
    taps = gaussian_window(11, 1.5, dtype=torch.float64)
    d = np.arange(-5, 6)
    expected = np.exp(-(d**2) / (2 * 1.5**2))
    np.testing.assert_allclose(taps.numpy(), expected / expected.sum(), rtol=1e-12)
    assert taps.sum().item() == pytest.approx(1.0)


def test_ssim_of_identical_images_is_one():
    x, _ = _pair()
    torch.testing.assert_close(ssim(x, x, 1.0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ssim(x.float(), x.float(), 1.0), torch.ones(3), atol=1e-6, rtol=0)


def test_ssim_is_symmetric_and_per_image():
    x, y = _pair(1)
    both = ssim(x, y, 1.0)
    torch.testing.assert_close(both, ssim(y, x, 1.0))
    for i in range(x.shape[0]):
        torch.testing.assert_close(both[i : i + 1], ssim(x[i : i + 1], y[i : i + 1], 1.0))
    assert ((both > 0.2) & (both < 0.95)).all()  # a real, non-degenerate case


def test_ssim_of_constant_images_hand_computed():
    # Constant images: mu = a, b and zero (co)variances, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    c1 = (K1 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # 0.2401 / 0.4001
    x = torch.full((1, 2, 13, 13), a, dtype=torch.float64)
    y = torch.full((1, 2, 13, 13), b, dtype=torch.float64)
    assert ssim(x, y, 1.0).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.60009997500625, rel=1e-12)


def test_ssim_with_one_pixel_window_is_the_luminance_term_per_pixel():
    # A 1x1 window has zero local variance, so each pixel contributes (2xy + C1) / (x^2 + y^2 + C1).
    x = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]], dtype=torch.float64)
    y = torch.tensor([[[[0.5, 0.5], [0.0, 0.75]]]], dtype=torch.float64)
    c1 = 1e-4
    per_pixel = [(2 * a * b + c1) / (a * a + b * b + c1) for a, b in [(0, 0.5), (0.5, 0.5), (1, 0), (0.25, 0.75)]]
    assert ssim(x, y, 1.0, window_size=1).item() == pytest.approx(sum(per_pixel) / 4, rel=1e-12)


def test_ssim_matches_brute_force_reference():
    x, y = _pair(2)
    expected = ssim_brute_force(x.numpy(), y.numpy(), data_range=1.0)
    np.testing.assert_allclose(ssim(x, y, 1.0).numpy(), expected, rtol=1e-10)
    # float32 inputs on a [-1, 1] scale (data_range 2), as the VAE's images. (SSIM's luminance
    # term is not shift invariant, so the reference is recomputed on the shifted images.)
    x2, y2 = x * 2 - 1, y * 2 - 1
    expected_2 = ssim_brute_force(x2.numpy(), y2.numpy(), data_range=2.0)
    np.testing.assert_allclose(ssim(x2.float(), y2.float(), data_range=2.0).numpy(), expected_2, atol=2e-6)
    # A non-default window.
    expected_7 = ssim_brute_force(x.numpy(), y.numpy(), 1.0, window_size=7, sigma=1.0)
    np.testing.assert_allclose(ssim(x, y, 1.0, window_size=7, sigma=1.0).numpy(), expected_7, rtol=1e-10)


def test_ssim_matches_scikit_image_algorithm():
    x, y = _pair(3, shape=(2, 3, 32, 27))
    expected = ssim_skimage_algorithm(x.numpy(), y.numpy(), data_range=1.0)
    np.testing.assert_allclose(ssim(x, y, 1.0).numpy(), expected, rtol=1e-10)


def test_ssim_rejects_bad_shapes():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim(x, x, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 15), 1.0)
    with pytest.raises(ValueError, match="odd"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 1.0, window_size=4)
