"""The built-in captioned dataset ``shapes``: one filled shape of one color on a plain background.

Every image holds a single ``circle``, ``square`` or ``triangle`` (pointing up: apex at the top,
base horizontal) of one palette color on a background of another palette color. The shape's
bounding box is a square whose side is 30%-60% of the image side, placed fully inside the image
(a circle's diameter, a square's side, a triangle's base and height all equal that side). The
caption reads ``a <color> <shape> on a <background> background``.

Everything is seeded: the spec of image ``i`` depends only on ``(seed, i)`` (a numpy
``SeedSequence`` of the two), so image ``i`` can be rendered on its own, any dataset size is a
prefix of a larger one, and the same seed gives the same pixels and the same encoded bytes
(fixed JPEG/PNG encoder settings).

Writers:
- :func:`write_shapes_parquet` writes the layout ``img2dataset --output_format parquet`` writes
  (``NNNNN.parquet`` shards with the same columns, types, order, keys and row groups, plus
  ``NNNNN_stats.json``), so ``prep_cc.py`` runs on it unchanged;
- :func:`write_shapes_folder` writes a plain folder of PNG images with same-stem ``.txt`` captions.

Readers of generated samples: :func:`dominant_colors` and :func:`describe_image` recover
(color, shape, background) from pixels, and :func:`caption_accuracy` scores them against
:func:`parse_caption` of the prompts, to measure how well a text-conditional model follows them.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from modules.errors import UserError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle")

CAPTION_TEMPLATE = "a {color} {shape} on a {background} background"
_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")

# The columns img2dataset (1.47, writer.ParquetSampleWriter + downloader.Downloader) writes for an
# input with a caption column, EXIF extraction on and compute_hash="sha256" (its defaults): the
# input columns (caption, then url, as Reader.column_list orders them), the downloader's own
# columns, then the image bytes under the encode format's name, appended last by the writer.
IMG2DATASET_PARQUET_SCHEMA = pa.schema(
    [
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("exif", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("jpg", pa.binary()),
    ]
)
# img2dataset's exif column for an image without EXIF tags: json.dumps of exifread's empty dict.
_NO_EXIF = json.dumps({})

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Specs and rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """One image, independent of resolution: geometry is in fractions of the image side.

    ``size`` is the side of the shape's square bounding box; ``x``, ``y`` its left and top edge,
    with ``x + size <= 1`` and ``y + size <= 1`` so the shape lies fully inside.
    """

    shape: str
    color: str
    background: str
    size: float
    x: float
    y: float

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(color=self.color, shape=self.shape, background=self.background)


def _check_seed(seed: int) -> None:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"shapes seed must be a non-negative integer, got {seed!r}")


def sample_spec(seed: int, index: int, min_size: float = 0.3, max_size: float = 0.6) -> ShapeSpec:
    """The spec of image ``index`` of the dataset with ``seed``: uniform shape, uniform color,
    uniform background among the other colors, size uniform in [min_size, max_size], position
    uniform among those that keep the shape inside."""
    _check_seed(seed)
    if not 0.0 < min_size <= max_size <= 1.0:
        raise UserError(f"shapes sizes need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
    # One independent stream per (seed, index): random access and prefix-stable datasets.
    rng = np.random.default_rng([int(seed), int(index)])
    shape = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
    color_id = int(rng.integers(len(COLOR_NAMES)))
    # Draw among the 7 other colors, so the background never equals the shape color.
    background_id = int(rng.integers(len(COLOR_NAMES) - 1))
    background_id += int(background_id >= color_id)
    size = float(rng.uniform(min_size, max_size))
    x = float(rng.uniform(0.0, 1.0 - size))
    y = float(rng.uniform(0.0, 1.0 - size))
    return ShapeSpec(shape, COLOR_NAMES[color_id], COLOR_NAMES[background_id], size, x, y)


def sample_specs(n: int, seed: int, min_size: float = 0.3, max_size: float = 0.6) -> list[ShapeSpec]:
    """Specs of images 0..n-1 of the dataset with ``seed`` (see :func:`sample_spec`)."""
    return [sample_spec(seed, i, min_size, max_size) for i in range(n)]


def shape_box(spec: ShapeSpec, side: int) -> tuple[int, int, int, int]:
    """The shape's bounding box on a ``side`` x ``side`` canvas, integer (left, top, right, bottom),
    right/bottom exclusive, always inside the canvas."""
    extent = max(1, round(spec.size * side))
    # Independent rounding of position and size could overshoot by one pixel: clamp inside.
    left = min(round(spec.x * side), side - extent)
    top = min(round(spec.y * side), side - extent)
    return left, top, left + extent, top + extent


def render_shape(spec: ShapeSpec, size: int, supersample: int = 4) -> Image.Image:
    """Render ``spec`` as a ``size`` x ``size`` RGB image.

    Anti-aliasing: the shape is drawn at ``supersample`` times the resolution and box-filtered
    down, so only edge pixels mix the two colors and every interior pixel keeps the exact
    palette value (what :func:`dominant_colors` measures).
    """
    if size < 1 or supersample < 1:
        raise UserError(f"render_shape needs size >= 1 and supersample >= 1, got {size}, {supersample}")
    if spec.shape not in SHAPE_NAMES or spec.color not in PALETTE or spec.background not in PALETTE:
        raise UserError(f"unknown shape/color in {spec}; shapes {SHAPE_NAMES}, colors {COLOR_NAMES}")
    side = size * supersample
    canvas = Image.new("RGB", (side, side), PALETTE[spec.background])
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = shape_box(spec, side)
    fill = PALETTE[spec.color]
    # PIL's drawing boxes include their last row/column, hence the -1.
    if spec.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:  # triangle pointing up: apex centred on the top edge, base on the bottom edge
        draw.polygon([((left + right - 1) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=fill)
    if supersample == 1:
        return canvas
    return canvas.resize((size, size), Image.Resampling.BOX)


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    """Deterministic JPEG bytes: fixed quality, 4:4:4 chroma (no color bleeding at the shape's
    edges), baseline, no optimisation pass, no metadata."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    return buffer.getvalue()


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
    """Deterministic, lossless PNG bytes (fixed zlib level, no metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level, optimize=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _check_counts(num_images: int, img_size: int) -> None:
    if num_images < 1:
        raise UserError(f"shapes num_images must be >= 1, got {num_images}")
    if img_size < 8:
        raise UserError(f"shapes img_size must be >= 8 pixels, got {img_size}")


def _prepare_out_dir(out_dir: Path, pattern: re.Pattern, overwrite: bool) -> None:
    """Create ``out_dir``; refuse to mix with an earlier run unless ``overwrite`` (then remove the
    earlier run's files, so no stale shard survives from a larger one)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"shapes output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))
    if earlier and not overwrite:
        raise UserError(f"shapes output {out_dir} already holds {len(earlier)} files of an earlier run "
                        f"(e.g. {earlier[0].name}); choose an empty folder or pass overwrite")
    for path in earlier:
        path.unlink()


def img2dataset_key(index: int, shard_id: int, shard_size: int, oom_shard_count: int) -> str:
    """img2dataset's sample key (downloader.compute_key): shard id then the index in the shard,
    zero-padded to ceil(log10(shard_size)) + oom_shard_count digits."""
    oom_sample_per_shard = math.ceil(math.log10(shard_size))
    true_key = (10**oom_sample_per_shard) * shard_id + index
    return f"{true_key:0{oom_sample_per_shard + oom_shard_count}d}"


def write_shapes_parquet(
    out_dir: Union[str, Path],
    num_images: int,
    img_size: int,
    seed: int,
    shard_size: int = 10000,
    jpeg_quality: int = 95,
    oom_shard_count: int = 5,
    row_group_size: int = 100,
    min_size: float = 0.3,
    max_size: float = 0.6,
    supersample: int = 4,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``num_images`` shapes as img2dataset writes ``--output_format parquet``; return the shards.

    Layout: ``{shard_id:0{oom_shard_count}d}.parquet`` with :data:`IMG2DATASET_PARQUET_SCHEMA`
    (row groups of ``row_group_size`` rows, img2dataset's write buffer) and, next to each,
    ``..._stats.json`` with img2dataset's fields. Every row is a success: ``width``/``height``
    and the original ones are ``img_size``, ``exif`` is ``"{}"`` (no EXIF tags), ``sha256`` the
    hex digest of the stored bytes, ``url`` is ``shapes://<seed>/<index>``.

    The parquet bytes depend only on the arguments (same seed, same bytes); the stats files also
    carry img2dataset's wall-clock ``start_time``/``end_time``/``duration`` fields.
    """
    _check_counts(num_images, img_size)
    _check_seed(seed)
    if shard_size < 1 or row_group_size < 1 or oom_shard_count < 1:
        raise UserError(f"shard_size, row_group_size and oom_shard_count must be >= 1, "
                        f"got {shard_size}, {row_group_size}, {oom_shard_count}")
    num_shards = math.ceil(num_images / shard_size)
    if num_shards > 10**oom_shard_count:
        raise UserError(f"{num_shards} shards do not fit in {oom_shard_count}-digit shard names")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, re.compile(r"\d+(\.parquet|_stats\.json)"), overwrite)

    shard_paths = []
    for shard_id in range(num_shards):
        start_time = time.time()
        first = shard_id * shard_size
        count = min(shard_size, num_images - first)
        shard_name = f"{shard_id:0{oom_shard_count}d}"
        shard_path = out_dir / f"{shard_name}.parquet"
        with pq.ParquetWriter(shard_path, IMG2DATASET_PARQUET_SCHEMA) as writer:
            for group_start in range(0, count, row_group_size):
                rows = {name: [] for name in IMG2DATASET_PARQUET_SCHEMA.names}
                for in_shard in range(group_start, min(count, group_start + row_group_size)):
                    index = first + in_shard
                    spec = sample_spec(seed, index, min_size, max_size)
                    data = encode_jpeg(render_shape(spec, img_size, supersample), jpeg_quality)
                    row = {
                        "caption": spec.caption,
                        "url": f"shapes://{seed}/{index}",
                        "key": img2dataset_key(in_shard, shard_id, shard_size, oom_shard_count),
                        "status": "success",
                        "error_message": None,
                        "width": img_size,
                        "height": img_size,
                        "original_width": img_size,
                        "original_height": img_size,
                        "exif": _NO_EXIF,
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "jpg": data,
                    }
                    for name, value in row.items():
                        rows[name].append(value)
                writer.write_table(pa.Table.from_pydict(rows, IMG2DATASET_PARQUET_SCHEMA))
        end_time = time.time()
        stats = {
            "count": count,
            "successes": count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": end_time - start_time,
            "start_time": start_time,
            "end_time": end_time,
            "status_dict": {"success": count},
        }
        with open(out_dir / f"{shard_name}_stats.json", "w") as f:
            json.dump(stats, f, indent=4)
        shard_paths.append(shard_path)
    return shard_paths


def write_shapes_folder(
    out_dir: Union[str, Path],
    num_images: int,
    img_size: int,
    seed: int,
    min_size: float = 0.3,
    max_size: float = 0.6,
    supersample: int = 4,
    png_compress_level: int = 6,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``num_images`` shapes as ``<index>.png`` + ``<index>.txt`` (the caption, no newline)
    in one flat folder; names are zero-padded (at least 5 digits) so they sort in index order.
    Returns the image paths. Same seed, same bytes."""
    _check_counts(num_images, img_size)
    _check_seed(seed)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, re.compile(r"\d+\.(png|txt)"), overwrite)
    width = max(5, len(str(num_images - 1)))
    paths = []
    for index in range(num_images):
        spec = sample_spec(seed, index, min_size, max_size)
        stem = f"{index:0{width}d}"
        image_path = out_dir / f"{stem}.png"
        image_path.write_bytes(encode_png(render_shape(spec, img_size, supersample), png_compress_level))
        (out_dir / f"{stem}.txt").write_text(spec.caption)
        paths.append(image_path)
    return paths


# ---------------------------------------------------------------------------------------------
# Reading shapes back from pixels (prompt adherence of generated samples)
# ---------------------------------------------------------------------------------------------


def parse_caption(caption: str) -> tuple[str, str, str]:
    """``"a red circle on a blue background"`` -> ``("red", "circle", "blue")``."""
    match = _CAPTION_RE.match(caption.strip())
    if match is None or match.group(1) not in PALETTE or match.group(2) not in SHAPE_NAMES \
            or match.group(3) not in PALETTE:
        raise UserError(f"not a shapes caption: {caption!r}; expected {CAPTION_TEMPLATE!r} with colors "
                        f"{COLOR_NAMES} and shapes {SHAPE_NAMES}")
    return match.group(1), match.group(2), match.group(3)


def _to_rgb_array(img: ImageLike) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) tensor in [-1, 1] -> (H, W, 3) float64 in [0, 255]."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float64)
    if isinstance(img, torch.Tensor):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor in [-1, 1], got shape {tuple(img.shape)}")
        arr = (img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
        return arr.permute(1, 2, 0).numpy().astype(np.float64)
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {arr.shape}")
    return arr.astype(np.float64)


def _palette_labels(arr: np.ndarray, max_distance: float) -> np.ndarray:
    """Nearest palette color per pixel, (H, W) int; -1 where no color is within ``max_distance``
    (anti-aliased edges, off-palette noise)."""
    palette = np.array([PALETTE[name] for name in COLOR_NAMES], dtype=np.float64)  # (K, 3)
    dist = np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, K)
    labels = dist.argmin(axis=-1)
    labels[dist.min(axis=-1) > max_distance] = -1
    return labels


def _dominant_labels(labels: np.ndarray, min_shape_fraction: float) -> tuple[int, int]:
    """(shape, background) palette indices from per-pixel labels, -1 where absent."""
    counts = np.bincount(labels[labels >= 0], minlength=len(COLOR_NAMES))
    if counts.sum() == 0:
        return -1, -1
    background = int(counts.argmax())  # the background covers >= 64% of a shapes image
    counts[background] = 0
    shape = int(counts.argmax())
    if counts[shape] < min_shape_fraction * labels.size:
        shape = -1
    return shape, background


def _color_name(index: int) -> Optional[str]:
    return None if index < 0 else COLOR_NAMES[index]


def _shape_templates(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Each shape of the same area and centroid as ``mask`` (H, W) bool, as (H, W) bool masks.

    Sizes from the area A: square side sqrt(A), circle radius sqrt(A / pi), up-pointing triangle
    with base = height = sqrt(2 A), whose centroid lies 2/3 of the height below the apex.
    """
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    area = float(rows.size)
    cy, cx = rows.mean() + 0.5, cols.mean() + 0.5  # pixel centres sit at i + 0.5
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    half = math.sqrt(area) / 2
    radius = math.sqrt(area / math.pi)
    side = math.sqrt(2 * area)
    apex = cy - 2 * side / 3
    return {
        "circle": (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2,
        "square": (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half),
        "triangle": (yy >= apex) & (yy <= apex + side) & (np.abs(xx - cx) <= (yy - apex) / 2),
    }


def _shape_from_mask(mask: np.ndarray) -> str:
    """The template (see :func:`_shape_templates`) with the highest IoU with ``mask``."""
    ious = {name: (mask & tmpl).sum() / max(1, (mask | tmpl).sum()) for name, tmpl in _shape_templates(mask).items()}
    return max(SHAPE_NAMES, key=lambda name: ious[name])


def dominant_colors(
    img: ImageLike, max_distance: float = 60.0, min_shape_fraction: float = 0.01
) -> tuple[Optional[str], Optional[str]]:
    """(shape_color_name, background_color_name) of a shapes-style image.

    Each pixel takes the nearest palette color (Euclidean RGB) if one is within ``max_distance``;
    the most frequent color is the background, the next most frequent the shape's color. The
    shape color is ``None`` when it covers less than ``min_shape_fraction`` of the pixels (the
    smallest triangle covers 4.5%), both are ``None`` when no pixel is near the palette.
    """
    labels = _palette_labels(_to_rgb_array(img), max_distance)
    shape, background = _dominant_labels(labels, min_shape_fraction)
    return _color_name(shape), _color_name(background)


def describe_image(
    img: ImageLike, max_distance: float = 60.0, min_shape_fraction: float = 0.01
) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(color, shape, background) read from the pixels, comparable with :func:`parse_caption`.

    Colors as in :func:`dominant_colors`. The shape is the one whose template, placed at the
    centroid of the shape-colored pixels with their area (a circle, a square, an up-pointing
    triangle), overlaps them best (IoU): robust to a few stray pixels, unlike a bounding box.
    ``None`` where a part is not found.
    """
    labels = _palette_labels(_to_rgb_array(img), max_distance)
    shape_color, background = _dominant_labels(labels, min_shape_fraction)
    shape = None if shape_color < 0 else _shape_from_mask(labels == shape_color)
    return _color_name(shape_color), shape, _color_name(background)


def caption_accuracy(images: Sequence[ImageLike], captions: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose color, shape, background (and all three) match their captions,
    read with :func:`describe_image` at its defaults."""
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"need as many images as captions (>0), got {len(images)} and {len(captions)}")
    hits = np.zeros(4)
    for img, caption in zip(images, captions):
        match = [got == want for got, want in zip(describe_image(img), parse_caption(caption))]
        hits += np.array(match + [all(match)], dtype=np.float64)
    hits /= len(images)
    return {"color": float(hits[0]), "shape": float(hits[1]), "background": float(hits[2]), "all": float(hits[3])}
