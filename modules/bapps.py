"""BAPPS, the Berkeley-Adobe Perceptual Patch Similarity dataset, as it unpacks on disk, and a synthetic stand-in.

Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018, sec. 2.

Layout (``root`` is the folder that holds ``2afc/`` and, optionally, ``jnd/``)::

    root/2afc/{train,val}/<category>/ref/000000.png     reference patch
                                     p0/000000.png      two distorted versions of it
                                     p1/000000.png
                                     judge/000000.npy   fraction of humans who preferred p1, shape (1,)
    root/jnd/val/<category>/p0/000000.png               an image and a distorted version of it
                            p1/000000.png
                            same/000000.npy             fraction of humans who saw no difference, shape (1,)

Files of one category are sorted by name and paired by position (as the lpips data loader does).
Images are read with PIL, converted to RGB (an alpha channel is dropped), resized to
``img_size`` x ``img_size`` with PIL's bilinear filter (torchvision ``Resize`` on a PIL image, as in
lpips) and scaled to [-1, 1] (``minus_one_to_one``) or [0, 1] (``zero_to_one``).

Counts and every judge/same value are validated when a dataset is built (the .npy files are tiny
and their values are kept in memory); images are decoded only when read, and an unreadable one is
a UserError naming the file. Paths are kept in numpy string arrays, not Python lists, so DataLoader
worker processes share them instead of copying them.

:func:`write_synthetic_bapps` writes the same layout with generated images and simulated human
judgements of known strength (see its docstring); the tests and the offline demo use it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from modules.errors import UserError

PathLike = Union[str, os.PathLike]

TWOAFC_CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "train": ("cnn", "mix", "traditional"),
    "val": ("cnn", "color", "deblur", "frameinterp", "superres", "traditional"),
}
JND_CATEGORIES: Dict[str, Tuple[str, ...]] = {"val": ("cnn", "traditional")}
IMG_RANGES = ("minus_one_to_one", "zero_to_one")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_image(path: PathLike, img_size: int, img_range: str = "minus_one_to_one") -> torch.Tensor:
    """One BAPPS image as a (3, img_size, img_size) float tensor in the requested range.

    RGB conversion, PIL bilinear resize and (x/255 - 0.5)/0.5 as lpips' ToTensor+Normalize.
    An unreadable file is a UserError naming it.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {' '.join(str(err).split())}") from err
    if img.size != (img_size, img_size):
        img = img.resize((img_size, img_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3, S, S)
    if img_range == "minus_one_to_one":
        return (x - 0.5) / 0.5
    return x


def read_fraction(path: PathLike) -> float:
    """The single value of a BAPPS judge/same ``.npy`` file; UserError unless it is one number in [0, 1]."""
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"cannot read {path}: {' '.join(str(err).split())}") from err
    if value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise UserError(f"{path} holds a {value.dtype} array of shape {value.shape}, expected one number (shape (1,))")
    number = float(value.reshape(()))
    if not 0.0 <= number <= 1.0:  # also rejects NaN
        raise UserError(f"{path} holds {number}, expected a fraction of humans in [0, 1]")
    return number


def _sorted_files(folder: Path, extensions: Tuple[str, ...]) -> List[str]:
    if not folder.is_dir():
        raise UserError(f"BAPPS folder {folder} does not exist")
    names = [e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(extensions)]
    return [str(folder / name) for name in sorted(names)]


def _check_img_args(img_size: int, img_range: str) -> None:
    if img_range not in IMG_RANGES:
        raise UserError(f"unknown img_range {img_range!r}; expected one of {list(IMG_RANGES)}")
    if img_size <= 0:
        raise UserError(f"img_size must be positive, got {img_size}")


def available_categories(root: PathLike, subset: str, split: str) -> List[str]:
    """Category folders present in ``root/<subset>/<split>/`` (the known ones first, in the paper's
    order, then any others sorted); empty when that folder does not exist (e.g. no ``jnd/``)."""
    split_dir = Path(root) / subset / split
    if not split_dir.is_dir():
        return []
    present = {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    known = TWOAFC_CATEGORIES if subset == "2afc" else JND_CATEGORIES
    ordered = [c for c in known.get(split, ()) if c in present]
    return ordered + sorted(present - set(ordered))


class _BappsSplit(Dataset):
    """Shared indexing of ``root/<subset>/<split>/<category>/<role>/``: image roles + one fraction role."""

    subset = ""
    image_roles: Tuple[str, ...] = ()
    fraction_role = ""
    known_categories: Dict[str, Tuple[str, ...]] = {}

    def __init__(
        self, root: PathLike, split: str, categories: Optional[Sequence[str]], img_size: int, img_range: str
    ) -> None:
        _check_img_args(img_size, img_range)
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"BAPPS root {root} does not exist (expected the folder that holds 2afc/ and optionally jnd/)")
        subset_dir = root / self.subset
        if not subset_dir.is_dir():
            raise UserError(f"BAPPS root {root} has no {self.subset}/ folder (expected {subset_dir})")
        if split not in self.known_categories:
            raise UserError(f"unknown BAPPS {self.subset} split {split!r}; expected one of {sorted(self.known_categories)}")
        split_dir = subset_dir / split
        if not split_dir.is_dir():
            raise UserError(f"BAPPS split folder {split_dir} does not exist")
        self.root, self.split, self.img_size, self.img_range = root, split, img_size, img_range
        self.categories: Tuple[str, ...] = tuple(categories) if categories is not None else self.known_categories[split]
        if not self.categories:
            raise UserError(f"no BAPPS categories selected in {split_dir}")

        paths: Dict[str, List[str]] = {role: [] for role in self.image_roles}
        fractions: List[float] = []
        category_index: List[int] = []
        for index, category in enumerate(self.categories):
            category_dir = split_dir / category
            if not category_dir.is_dir():
                found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
                raise UserError(f"BAPPS category folder {category_dir} does not exist; found {found}")
            files = {role: _sorted_files(category_dir / role, IMAGE_EXTENSIONS) for role in self.image_roles}
            files[self.fraction_role] = _sorted_files(category_dir / self.fraction_role, (".npy",))
            counts = {role: len(names) for role, names in files.items()}
            if len(set(counts.values())) != 1:
                listed = ", ".join(f"{role}={count}" for role, count in counts.items())
                raise UserError(f"BAPPS category {category_dir} has mismatched file counts: {listed}")
            if counts[self.fraction_role] == 0:
                raise UserError(f"BAPPS category {category_dir} is empty")
            for role in self.image_roles:
                paths[role].extend(files[role])
            fractions.extend(read_fraction(path) for path in files[self.fraction_role])
            category_index.extend([index] * counts[self.fraction_role])
        self._paths = {role: np.array(names) for role, names in paths.items()}
        self._fractions = np.array(fractions, dtype=np.float32)
        self._category_index = np.array(category_index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._fractions)

    def _item(self, index: int) -> Dict[str, object]:
        item: Dict[str, object] = {
            role: read_image(str(self._paths[role][index]), self.img_size, self.img_range) for role in self.image_roles
        }
        item[self.fraction_role] = torch.tensor(self._fractions[index])  # float32, shape ()
        item["category"] = int(self._category_index[index])
        return item

    def category_indices(self) -> np.ndarray:
        """Category index (into ``self.categories``) of every sample, (N,) int64; for per-category scores."""
        return self._category_index.copy()


class TwoAFCDataset(_BappsSplit):
    """BAPPS two-alternative forced choice triplets.

    Item: {"ref", "p0", "p1": (3, S, S) float, "judge": float32 () fraction preferring p1,
    "category": int index into ``self.categories``}.
    """

    subset = "2afc"
    image_roles = ("ref", "p0", "p1")
    fraction_role = "judge"
    known_categories = TWOAFC_CATEGORIES

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        categories: Optional[Sequence[str]] = None,
        img_size: int = 64,
        img_range: str = "minus_one_to_one",
    ) -> None:
        super().__init__(root, split, categories, img_size, img_range)

    def __getitem__(self, index: int) -> Dict[str, object]:
        return self._item(index)


class JNDDataset(_BappsSplit):
    """BAPPS just-noticeable-difference pairs (validation only).

    Item: {"p0", "p1": (3, S, S) float, "same": float32 () fraction of humans who saw no
    difference, "category": int}.
    """

    subset = "jnd"
    image_roles = ("p0", "p1")
    fraction_role = "same"
    known_categories = JND_CATEGORIES

    def __init__(
        self,
        root: PathLike,
        split: str = "val",
        categories: Optional[Sequence[str]] = None,
        img_size: int = 64,
        img_range: str = "minus_one_to_one",
    ) -> None:
        super().__init__(root, split, categories, img_size, img_range)

    def __getitem__(self, index: int) -> Dict[str, object]:
        return self._item(index)


# --------------------------------------------------------------------------------------------
# Synthetic BAPPS
# --------------------------------------------------------------------------------------------
# An image inside the generator: float32 (H, W, 3) in [0, 1]. A distortion maps
# (image, strength in [0, 1], rng) -> image. All sizes are fractions of the image side, so the
# same seed gives the same picture at any img_size.
Distortion = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def _from_pil(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _blur(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    radius = strength * img.shape[0] / 40.0
    return _from_pil(_to_pil(img).filter(ImageFilter.GaussianBlur(radius)))


def _gaussian_noise(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return img + rng.normal(0.0, 0.15 * strength, size=img.shape).astype(np.float32)


def _jpeg(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _to_pil(img).save(buffer, format="JPEG", quality=int(round(90 - 85 * strength)))
    return _from_pil(Image.open(buffer))


def _translate(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    # Edge-replicating translation: no wrap-around seam (which would be a visible artefact).
    size_y, size_x = img.shape[:2]
    padded = np.pad(img, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    return padded[abs(dy) - dy : abs(dy) - dy + size_y, abs(dx) - dx : abs(dx) - dx + size_x]


def _shift(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    pixels = max(1, int(round(strength * img.shape[0] / 16.0))) if strength > 0 else 0
    angle = rng.uniform(0, 2 * np.pi)
    return _translate(img, int(round(pixels * np.sin(angle))), int(round(pixels * np.cos(angle))))


def _brightness(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return img + rng.choice([-1.0, 1.0]) * 0.25 * strength


def _contrast(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    factor = 1.0 + rng.choice([-1.0, 1.0]) * 0.6 * strength
    return (img - img.mean()) * factor + img.mean()


def _local_corruption(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    # A few small solid squares of random colour: few pixels change (small L2), yet very visible.
    out = img.copy()
    size = img.shape[0]
    side = max(1, int(round(size * (0.03 + 0.05 * strength))))
    for _ in range(1 + int(round(4 * strength))):
        y, x = rng.integers(0, size - side + 1, size=2)
        out[y : y + side, x : x + side] = rng.uniform(0, 1, size=3)
    return out


def _checkerboard(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    # The checkerboard pattern of strided transposed convolutions (CNN generators).
    cell = max(1, img.shape[0] // 64)  # side of one square, in pixels
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    pattern = ((yy // cell + xx // cell) % 2) * 2.0 - 1.0
    return img + 0.12 * strength * pattern[..., None].astype(np.float32)


def _down_up(img: np.ndarray, strength: float, rng: np.random.Generator, resample: int) -> np.ndarray:
    size = img.shape[0]
    small = max(2, int(round(size / (1.0 + 5.0 * strength))))
    pil = _to_pil(img).resize((small, small), Image.BILINEAR)
    return _from_pil(pil.resize((size, size), resample))


def _down_up_nearest(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return _down_up(img, strength, rng, Image.NEAREST)


def _down_up_bilinear(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return _down_up(img, strength, rng, Image.BILINEAR)


def _color_cast(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    gains = 1.0 + 0.35 * strength * rng.uniform(-1, 1, size=3)
    return img * gains.astype(np.float32)


def _saturation(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    gray = img.mean(axis=2, keepdims=True)
    factor = 1.0 + rng.choice([-1.0, 1.0]) * 0.8 * strength
    return gray + (img - gray) * factor


def _hue_shift(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    # Rotate chroma around the gray axis by up to 90 degrees (Rodrigues' rotation about (1,1,1)/sqrt(3)).
    theta = rng.choice([-1.0, 1.0]) * strength * np.pi / 2
    axis = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross
    return img @ rotation.T.astype(np.float32)


def _sharpen(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    # Unsharp masking: over-shoot and halos at edges, like an over-eager deblurring. The mask is
    # blurred by 1/64 of the side (1 px at 64 px): a finer one would leave the image unchanged.
    blurred = _from_pil(_to_pil(img).filter(ImageFilter.GaussianBlur(img.shape[0] / 64.0)))
    return img + 2.5 * strength * (img - blurred)


def _ghosting(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    # A faint copy of the image displaced a little: the double edges of a bad frame interpolation.
    pixels = max(1, img.shape[0] // 20)
    angle = rng.uniform(0, 2 * np.pi)
    ghost = _translate(img, int(round(pixels * np.sin(angle))), int(round(pixels * np.cos(angle))))
    alpha = 0.5 * strength
    return (1 - alpha) * img + alpha * ghost


def _smooth_warp(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    # A smooth random displacement field (a few pixels): large in L2, hardly visible.
    size = img.shape[0]
    coarse = torch.from_numpy(rng.normal(0, 1, size=(1, 2, 4, 4)).astype(np.float32))
    flow = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)  # (1, 2, S, S)
    flow = flow / flow.abs().amax().clamp_min(1e-6) * strength * (size / 24.0) * (2.0 / size)
    lin = torch.linspace(-1, 1, size)
    grid_y, grid_x = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1)[None] + flow.permute(0, 2, 3, 1)  # (1, S, S, 2)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped[0].permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class SyntheticDistortion:
    """A distortion and its perceptual weight: perceived distance = weight * strength."""

    fn: Distortion
    weight: float


# Perceptual weights: the ground truth the simulated humans use. They follow the split of SSIM
# (Wang et al., 2004) into luminance, contrast and structure, and the observation behind LPIPS:
# people judge changes of *structure* (edges, texture, detail: blur, noise, blocking, ringing,
# checkerboards, corruptions) far more than changes of *contrast* (global contrast, colour
# saturation), which move many pixels but leave every edge where it was. Brightness and colour
# shifts weigh little, small geometric changes (shift, smooth warp) in between. So L2 is misled
# by construction (a contrast change of the same L2 size as a blur weighs a tenth as much), while
# a metric of unit-normalised (contrast-invariant) deep features, weighted by what it learns from
# the judgements, can follow the humans.
SYNTHETIC_DISTORTIONS: Dict[str, SyntheticDistortion] = {
    "blur": SyntheticDistortion(_blur, 1.0),
    "gaussian_noise": SyntheticDistortion(_gaussian_noise, 1.0),
    "jpeg": SyntheticDistortion(_jpeg, 1.0),
    "shift": SyntheticDistortion(_shift, 0.8),
    "brightness": SyntheticDistortion(_brightness, 0.3),
    "contrast": SyntheticDistortion(_contrast, 0.1),
    "local_corruption": SyntheticDistortion(_local_corruption, 1.0),
    "checkerboard": SyntheticDistortion(_checkerboard, 1.0),
    "down_up_nearest": SyntheticDistortion(_down_up_nearest, 1.0),
    "down_up_bilinear": SyntheticDistortion(_down_up_bilinear, 1.0),
    "color_cast": SyntheticDistortion(_color_cast, 0.3),
    "saturation": SyntheticDistortion(_saturation, 0.1),
    "hue_shift": SyntheticDistortion(_hue_shift, 0.5),
    "sharpen": SyntheticDistortion(_sharpen, 0.8),
    "ghosting": SyntheticDistortion(_ghosting, 0.8),
    "smooth_warp": SyntheticDistortion(_smooth_warp, 0.6),
}

# Which distortions each category draws from ("mix" composes two of traditional+cnn). Every
# category mixes structural damage with contrast changes, so that 2AFC triplets often pit a
# contrast change (large in L2, small to humans) against structural damage (the reverse).
_TRADITIONAL = ("contrast", "saturation", "brightness", "shift", "gaussian_noise", "blur", "jpeg", "local_corruption")
_CNN = ("contrast", "saturation", "smooth_warp", "checkerboard", "down_up_nearest", "sharpen")
SYNTHETIC_CATEGORY_DISTORTIONS: Dict[str, Tuple[str, ...]] = {
    "traditional": _TRADITIONAL,
    "cnn": _CNN,
    "mix": tuple(sorted(set(_TRADITIONAL + _CNN))),
    "color": ("contrast", "saturation", "color_cast", "hue_shift", "brightness", "gaussian_noise"),
    "deblur": ("contrast", "blur", "sharpen", "gaussian_noise"),
    "frameinterp": ("contrast", "ghosting", "blur", "shift", "smooth_warp"),
    "superres": ("saturation", "down_up_bilinear", "down_up_nearest", "sharpen", "shift"),
}


def render_reference(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random structured image, (size, size, 3) float32 in [0, 1].

    A two-colour gradient, soft colour blobs, a patch of sinusoidal grating (fine structure
    that blur removes and shifts move), and a few hard-edged rectangles and discs.
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size  # (S, S) in [0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    c0, c1 = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    img = c0 + (c1 - c0) * np.clip(ramp, 0, 1)[..., None]
    for _ in range(rng.integers(2, 6)):  # soft blobs
        cy, cx = rng.uniform(0, 1, size=2)
        radius = rng.uniform(0.08, 0.3)
        mask = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[..., None]
        img = img * (1 - 0.8 * mask) + 0.8 * mask * rng.uniform(0, 1, size=3).astype(np.float32)
    # grating: 8-20 cycles per image, inside a random rectangle
    freq = rng.uniform(8, 20)
    theta = rng.uniform(0, np.pi)
    grating = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    y0, x0 = rng.uniform(0, 0.5, size=2)
    y1, x1 = y0 + rng.uniform(0.3, 0.5), x0 + rng.uniform(0.3, 0.5)
    inside = ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1))[..., None]
    color = rng.uniform(0, 1, size=3).astype(np.float32)
    img = np.where(inside, img * (1 - 0.6 * grating[..., None]) + 0.6 * grating[..., None] * color, img)
    for _ in range(rng.integers(1, 4)):  # hard-edged shapes
        color = rng.uniform(0, 1, size=3).astype(np.float32)
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        half = rng.uniform(0.05, 0.15)
        if rng.uniform() < 0.5:
            mask = (np.abs(yy - cy) < half) & (np.abs(xx - cx) < half)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < half**2
        img = np.where(mask[..., None], color, img)
    return np.clip(img, 0, 1).astype(np.float32)


def _distort(
    img: np.ndarray, category: str, rng: np.random.Generator
) -> Tuple[np.ndarray, List[Tuple[str, float]], float]:
    """Distort ``img`` with one (two for "mix") distortions of ``category``; returns (image, [(name, s)], D)."""
    names = SYNTHETIC_CATEGORY_DISTORTIONS[category]
    count = 2 if category == "mix" else 1
    chosen = [names[i] for i in rng.choice(len(names), size=count, replace=False)]
    applied, distance = [], 0.0
    for name in chosen:
        strength = float(rng.uniform(0, 1))
        img = np.clip(SYNTHETIC_DISTORTIONS[name].fn(img, strength, rng), 0, 1).astype(np.float32)
        applied.append((name, strength))
        distance += SYNTHETIC_DISTORTIONS[name].weight * strength
    return img, applied, distance


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class SyntheticSample:
    """What the generator did for one written sample (returned, not written: the layout stays BAPPS').

    2afc: ``distortions[0]``/``[1]`` made p0/p1, ``distances`` are their perceived distances D0, D1,
    ``probability`` = P(a human prefers p1) and ``value`` the written judge.
    jnd: ``distortions[1]`` made p1 from p0 (``distortions[0]`` is empty), ``distances`` = (0, D),
    ``probability`` = P(a human says "same") and ``value`` the written same fraction.
    """

    subset: str
    split: str
    category: str
    index: int
    distortions: Tuple[Tuple[Tuple[str, float], ...], Tuple[Tuple[str, float], ...]]
    distances: Tuple[float, float]
    probability: float
    value: float
    files: Dict[str, str] = field(default_factory=dict)


def _save_rgba(img: np.ndarray, path: Path) -> None:
    rgb = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)  # BAPPS PNGs carry an opaque alpha
    # zlib level 1: several times faster to write than the default 6, files a little larger.
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(path, compress_level=1)


def _save_fraction(value: float, path: Path) -> None:
    np.save(path, np.array([value], dtype=np.float32))


def write_synthetic_bapps(
    root: PathLike,
    num_train_per_category: int = 64,
    num_val_per_category: int = 32,
    num_jnd_per_category: int = 32,
    img_size: int = 256,
    seed: int = 0,
    num_judges_train: int = 2,
    num_judges_val: int = 5,
    num_judges_jnd: int = 3,
    judge_temperature: float = 0.1,
    jnd_threshold: float = 0.2,
    jnd_temperature: float = 0.05,
) -> List[SyntheticSample]:
    """Write a BAPPS-layout dataset whose human judgements follow a known perceptual model.

    Each reference (:func:`render_reference`) is distorted twice. A distortion has a strength
    s ~ U(0, 1) and a perceptual weight w (``SYNTHETIC_DISTORTIONS``); its "known strength" is the
    perceived distance D = w * s (summed over the two distortions of "mix"). Simulated humans
    prefer p1 with probability P = sigmoid((D0 - D1) / judge_temperature), and the judge file holds
    the fraction of ``num_judges_*`` such humans who did (BAPPS had 2 per training triplet and 5 per
    validation triplet), so judge -> 1 when p1 is the perceptually closer one. The weights make
    L2 a poor predictor (contrast and saturation changes: big L2, small D; blur, noise, blocking,
    corruptions: small L2, big D), so a learned metric can beat it.

    JND pairs: p0 is a reference, p1 a distortion of it with distance D; the "same" file holds the
    fraction of ``num_judges_jnd`` humans who saw no difference, each with probability
    sigmoid((jnd_threshold - D) / jnd_temperature).

    Categories: 2afc train cnn/mix/traditional, 2afc val the six of BAPPS, jnd val cnn/traditional;
    each draws from its own distortions (``SYNTHETIC_CATEGORY_DISTORTIONS``). Images are
    img_size x img_size RGBA PNGs, values float32 arrays of shape (1,), names 000000.png/.npy.
    Deterministic: every sample has its own generator seeded by (seed, subset, split, category,
    index), so the same arguments write the same bytes. Returns one :class:`SyntheticSample` per
    written sample.
    """
    if img_size < 16:
        raise UserError(f"synthetic BAPPS img_size must be at least 16, got {img_size}")
    plan = [("2afc", "train", c, num_train_per_category, num_judges_train) for c in TWOAFC_CATEGORIES["train"]]
    plan += [("2afc", "val", c, num_val_per_category, num_judges_val) for c in TWOAFC_CATEGORIES["val"]]
    plan += [("jnd", "val", c, num_jnd_per_category, num_judges_jnd) for c in JND_CATEGORIES["val"]]
    subset_ids, split_ids = {"2afc": 0, "jnd": 1}, {"train": 0, "val": 1}
    category_ids = {name: i for i, name in enumerate(SYNTHETIC_CATEGORY_DISTORTIONS)}

    root = Path(root)
    samples: List[SyntheticSample] = []
    for subset, split, category, count, num_judges in plan:
        if count <= 0:
            continue
        category_dir = root / subset / split / category
        roles = ("ref", "p0", "p1", "judge") if subset == "2afc" else ("p0", "p1", "same")
        for role in roles:
            (category_dir / role).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, subset_ids[subset], split_ids[split], category_ids[category], index])
            ref = render_reference(rng, img_size)
            stem = f"{index:06d}"
            files = {role: str(category_dir / role / (stem + (".npy" if role in ("judge", "same") else ".png")))
                     for role in roles}
            if subset == "2afc":
                p0, applied0, d0 = _distort(ref, category, rng)
                p1, applied1, d1 = _distort(ref, category, rng)
                probability = _sigmoid((d0 - d1) / judge_temperature)
                distances = (d0, d1)
                _save_rgba(ref, Path(files["ref"]))
                _save_rgba(p0, Path(files["p0"]))
            else:
                p1, applied1, d1 = _distort(ref, category, rng)
                applied0, distances = [], (0.0, d1)
                probability = _sigmoid((jnd_threshold - d1) / jnd_temperature)
                _save_rgba(ref, Path(files["p0"]))
            _save_rgba(p1, Path(files["p1"]))
            value = float(np.float32(rng.binomial(num_judges, probability) / num_judges))  # as stored
            _save_fraction(value, Path(files["judge" if subset == "2afc" else "same"]))
            samples.append(
                SyntheticSample(subset, split, category, index, (tuple(applied0), tuple(applied1)), distances,
                                probability, value, files)
            )
    return samples
