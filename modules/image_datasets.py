"""Image datasets shared by stage 1 (VAE) and stage 2 (diffusion), and the ``--dataset`` registry.

Every dataset returns a dict per sample:

- ``"image"``: uint8 tensor (3, H, W), 0..255: a quarter of the bytes of float32 through the
  DataLoader workers, pinned memory and the host-to-device copy. The training step converts a
  batch on the device with :func:`images_to_model` (to [-1, 1], bit for bit the floats the old
  float32 transform produced);
- ``"caption"``: str, for captioned datasets (``conceptual_captions``, ``shapes``);
- ``"label"``: int, for class folders (``imagenet``);
- ``"input_ids"``, ``"attention_mask"`` (int64, (L,)) and ``"text_embeddings"`` ((L_i, D), the
  caption's L_i real tokens, in the stored dtype: float32, float16 or bfloat16) when a
  ``prep_cc.py`` output carries pre-tokenized / pre-encoded captions.

Batches of these samples are made by :class:`modules.batching.Collate`.

Datasets stay on disk (file lists, memory-mapped Arrow, parquet row groups read on demand), so
millions of images never need to fit in memory.

Unreadable images in folders are handled lazily, because verifying 1M headers up front costs
minutes on every start and every rank, and still misses files truncated after the header: the
constructor only walks the folder and decodes files from the first one until one succeeds (so a
folder of nothing but broken files fails at once, with a clear error); ``__getitem__`` decodes,
and an index whose file fails is served by the next readable file (wrapping around), recorded in
``failed_files`` and reported by a single ``logging.warning`` per process (at the first failure,
with the count so far and the first names).
"""
from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from modules.errors import UserError
from modules.shapes import render_shape, sample_spec

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
DATASET_NAMES: tuple[str, ...] = ("celebahq", "ffhq", "celeba", "imagenet", "conceptual_captions", "shapes")
_CONDITIONING = {
    "celebahq": "none",
    "ffhq": "none",
    "celeba": "none",
    "imagenet": "class",
    "conceptual_captions": "text",
    "shapes": "text",
}
CROP_MODES: tuple[str, ...] = ("center", "random_resized")
# Errors PIL raises on files that are not (whole) images: truncated or garbage data (OSError,
# incl. UnidentifiedImageError), malformed chunks (SyntaxError, ValueError), early end (EOFError),
# absurd sizes (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_REPORTED_NAMES = 5

Transform = Callable[[Image.Image], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


class ToUint8Tensor:
    """PIL image -> contiguous uint8 tensor (3, H, W), RGB, values 0..255 (one copy)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def images_to_model(images: torch.Tensor, device: Union[str, torch.device],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (B, 3, H, W) (any shape) -> ``dtype`` in [-1, 1] on ``device``.

    The uint8 tensor is moved first (``non_blocking=True``: a quarter of the bytes of float32,
    overlapping with compute from pinned memory), then converted on the device. The arithmetic
    is torchvision's ``ToDtype(scale=True)`` + ``Normalize(0.5, 0.5)``, op for op in float32
    (``x * (1/255)``, ``- 0.5``, ``/ 0.5``), so the result is bit for bit what the datasets
    returned when they produced floats (``x / 127.5 - 1`` differs from it by one ulp on 111 of
    the 256 values); other dtypes are cast from that float32 result.

    A float input is a ``TypeError``: images are converted exactly once.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images_to_model takes uint8 images (the datasets' output), got {got}; "
                        "they are converted to [-1, 1] exactly once")
    x = images.to(device, non_blocking=True).to(torch.float32)
    x = x.mul_(1.0 / 255.0).sub_(0.5).div_(0.5)
    return x if dtype == torch.float32 else x.to(dtype)


def model_to_images(images: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`images_to_model`: images in [-1, 1] (any shape) -> uint8 on the CPU,
    rounded as torchvision's ``save_image`` rounds (``x * 255 + 0.5``, clamped), so a PNG written
    from them and read back gives the same bytes."""
    return (images.float() * 0.5 + 0.5).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).cpu()


class RandomSquareResizedCrop(torch.nn.Module):
    """A random square crop resized to ``size`` x ``size``: never squashes, whatever the aspect.

    The crop's area is a fraction ``u ~ U(scale)`` of the largest square that fits (the short
    side squared), so its side is ``sqrt(u) * short_side``; its position is uniform over the
    whole image (along the long side too). ``scale=(1, 1)`` is "resize the short side, then a
    random crop". Randomness comes from torch's global generator, which DataLoader seeds per
    worker. Unlike torchvision's RandomResizedCrop with ratio (1, 1), whose area fraction is of
    the whole image and so cannot be met on wide images (it then falls back to a center crop).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.8, 1.0)) -> None:
        super().__init__()
        self.size = size
        self.scale = scale

    def forward(self, img: Image.Image) -> Image.Image:
        height, width = TF.get_size(img)
        short = min(height, width)
        fraction = torch.empty(()).uniform_(self.scale[0], self.scale[1]).item()
        side = max(1, min(short, round(short * math.sqrt(fraction))))
        top = int(torch.randint(0, height - side + 1, ()).item())
        left = int(torch.randint(0, width - side + 1, ()).item())
        return TF.resized_crop(img, top, left, side, side, [self.size, self.size], antialias=True)


def build_image_transform(
    img_size: int,
    crop: str = "center",
    random_flip: bool = False,
    random_resized_crop_scale: Sequence[float] = (0.8, 1.0),
) -> v2.Compose:
    """PIL image -> (3, img_size, img_size) uint8 tensor, aspect ratio preserved.

    ``crop="center"``: resize the short side to ``img_size`` (antialiased bilinear), center crop.
    ``crop="random_resized"``: :class:`RandomSquareResizedCrop` with ``random_resized_crop_scale``.
    ``random_flip``: horizontal flip with probability 1/2.
    Crops and flips run on the PIL image; :func:`images_to_model` makes the floats later.
    """
    if crop not in CROP_MODES:
        raise UserError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if img_size < 1:
        raise UserError(f"img_size must be >= 1, got {img_size}")
    lo, hi = (float(v) for v in random_resized_crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise UserError(f"random_resized_crop_scale needs 0 < low <= high <= 1, got {tuple(random_resized_crop_scale)}")
    if crop == "center":
        steps: list[Any] = [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    else:
        steps = [RandomSquareResizedCrop(img_size, (lo, hi))]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps.append(ToUint8Tensor())
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_files(root: Path) -> list[str]:
    """Paths of the files under ``root``, relative to it, recursive (following links), sorted;
    hidden files and folders (``.name``, e.g. macOS ``._x.jpg`` resource forks) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        found.extend(name if rel == "." else os.path.join(rel, name) for name in filenames if not name.startswith("."))
    return sorted(found)


def _walk_images(root: Path) -> list[str]:
    return [p for p in _walk_files(root) if _is_image_name(os.path.basename(p))]


def _caption_path(relpath: str) -> str:
    return os.path.splitext(relpath)[0] + ".txt"


def _check_folder(root: Union[str, Path], what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} folder {root} does not exist or is not a folder")
    return root


class _LazyImageFiles(Dataset):
    """Sorted image files under a root, decoded on access; unreadable ones are skipped (see the
    module docstring). Paths are kept as one numpy bytes array, not a list of Python strings, so
    forked DataLoader workers do not copy them page by page through reference counting."""

    def __init__(self, root: Path, relpaths: Sequence[str], transform: Optional[Transform]) -> None:
        self.root = root
        self._relpaths = np.array([p.encode("utf-8") for p in relpaths], dtype=np.bytes_)
        self.transform = transform if transform is not None else ToUint8Tensor()
        self._broken: set[int] = set()
        self.failed_files: list[str] = []
        self._warned = False
        # Decode from the first file until one works: an all-broken folder fails here, at once.
        for index in range(len(self._relpaths)):
            if self._try_open(index) is not None:
                break
        else:
            raise UserError(f"no readable images in {root}: {len(self._relpaths)} files failed to decode, "
                            f"e.g. {self.failed_files[:_REPORTED_NAMES]}")

    def __len__(self) -> int:
        return len(self._relpaths)

    @property
    def num_failed(self) -> int:
        """How many distinct unreadable files this process has met so far."""
        return len(self.failed_files)

    def relpath(self, index: int) -> str:
        return self._relpaths[index].decode("utf-8")

    def _try_open(self, index: int) -> Optional[Image.Image]:
        if index in self._broken:
            return None
        try:
            with Image.open(self.root / self.relpath(index)) as img:
                return img.convert("RGB")  # forces the full decode inside the try
        except _DECODE_ERRORS as err:
            self._broken.add(index)
            self.failed_files.append(self.relpath(index))
            if not self._warned:
                self._warned = True
                logger.warning(
                    "%s: skipping unreadable image files (%d so far, e.g. %s; first error: %s); each is "
                    "replaced by the next readable file, and later ones are only counted (failed_files)",
                    self.root, self.num_failed, self.failed_files[:_REPORTED_NAMES], err)
            return None

    def _load(self, index: int) -> tuple[int, Image.Image]:
        """(index actually served, RGB image): ``index`` or the next readable one, wrapping."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for offset in range(n):
            candidate = (index + offset) % n
            img = self._try_open(candidate)
            if img is not None:
                return candidate, img
        raise UserError(f"no readable images in {self.root}: {self.num_failed} files failed to decode, "
                        f"e.g. {self.failed_files[:_REPORTED_NAMES]}")


class ImageFolderDataset(_LazyImageFiles):
    """All images under ``root`` (recursive; .jpg/.jpeg/.png/.webp in any case; sorted by path),
    for unconditional data (celebahq, ffhq, celeba). Returns ``{"image": (3, H, W) uint8}``.

    ``captions=True`` also returns ``"caption"`` read from each image's same-stem ``.txt`` file
    (``write_shapes_folder``'s and img2dataset's ``files`` layout); an image without one is an
    error at construction.
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Transform] = None, captions: bool = False) -> None:
        root = _check_folder(root, "image")
        files = _walk_files(root)
        relpaths = [p for p in files if _is_image_name(os.path.basename(p))]
        if not relpaths:
            raise UserError(f"no images in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)")
        self.captions = captions
        if captions:
            present = set(files)  # checked against the walk: no stat per image
            missing = [p for p in relpaths if _caption_path(p) not in present]
            if missing:
                raise UserError(f"{len(missing)} images in {root} have no same-stem .txt caption, e.g. "
                                f"{missing[:_REPORTED_NAMES]}")
        super().__init__(root, relpaths, transform)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, img = self._load(index)
        sample: dict[str, Any] = {"image": self.transform(img)}
        if self.captions:
            sample["caption"] = (self.root / _caption_path(self.relpath(index))).read_text(encoding="utf-8").strip()
        return sample


class ClassFolderDataset(_LazyImageFiles):
    """ImageNet-style ``root/<class>/**/<image>``: labels are class folder indices sorted by
    name (``classes[label]`` is the folder name). Returns ``{"image", "label": int}``."""

    def __init__(self, root: Union[str, Path], transform: Optional[Transform] = None) -> None:
        root = _check_folder(root, "class")
        loose = sorted(p.name for p in root.iterdir() if p.is_file() and _is_image_name(p.name))
        if loose:
            raise UserError(f"{root} holds {len(loose)} images directly (e.g. {loose[:_REPORTED_NAMES]}); "
                            "a class-folder dataset (imagenet) needs root/<class>/<image>; a folder of unlabelled "
                            "images is an unconditional dataset (celebahq, ffhq, celeba)")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise UserError(f"no class folders in {root}; expected root/<class>/<image>")
        relpaths, labels = [], []
        for label, name in enumerate(self.classes):
            files = _walk_images(root / name)
            if not files:
                raise UserError(f"class folder {root / name} holds no images "
                                f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
            relpaths.extend(os.path.join(name, f) for f in files)
            labels.extend([label] * len(files))
        self._labels = np.array(labels, dtype=np.int64)
        super().__init__(root, relpaths, transform)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, img = self._load(index)
        return {"image": self.transform(img), "label": int(self._labels[index])}


# ---------------------------------------------------------------------------------------------
# prep_cc.py output (Hugging Face datasets on disk)
# ---------------------------------------------------------------------------------------------


def _is_saved_hf_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


# How prep_cc.py stores text embeddings: Arrow has no bfloat16, so those are its raw bits in uint16.
STORED_TEXT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                              "uint16": torch.bfloat16}
PREP_CC_SUMMARY = "prep_cc_summary.json"


def _row_values(column: Any) -> np.ndarray:
    """The values of the single row of an Arrow list column (``List``, ``Sequence`` or ``ArrayXD``,
    nested lists flattened) as a 1-D numpy array, read from the memory map without Python lists."""
    import pyarrow as pa

    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or \
            pa.types.is_fixed_size_list(array.type):
        array = array.flatten()  # respects the row's offsets
    return array.to_numpy(zero_copy_only=False)


class CaptionedArrowDataset(Dataset):
    """A ``datasets.load_from_disk`` folder as ``prep_cc.py`` writes it, memory-mapped.

    Columns: ``image`` (datasets ``Image``), ``caption`` (str); optional ``input_ids``,
    ``attention_mask`` (returned as int64 tensors (L,)) and ``text_embeddings``
    (``datasets.Array2D(shape=(None, D))``: each caption's L_i real tokens; outputs of older
    versions hold all L rows), returned as a tensor (L_i, D) of the stored dtype: float32,
    float16, or bfloat16, which is stored as its raw bits in uint16 (``stored_dtype: bfloat16``
    in ``prep_cc_summary.json``) and viewed back here. Arrays are read from the memory map
    without Python lists and without upcasting. A saved ``DatasetDict`` is indexed by ``split``.
    """

    ARRAY_COLUMNS = ("input_ids", "attention_mask", "text_embeddings")

    def __init__(self, path: Union[str, Path], transform: Optional[Transform] = None, split: str = "train") -> None:
        import datasets  # heavy import, only for users of this dataset

        path = Path(path)
        if not path.is_dir() or not _is_saved_hf_dataset(path):
            hint = " (it holds parquet shards: run prep_cc.py on it first)" if path.is_dir() and any(
                path.glob("*.parquet")) else ""
            raise UserError(f"{path} is not a dataset saved by prep_cc.py / datasets.save_to_disk{hint}")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path} has no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        elif split != "train":
            raise UserError(f"{path} is a single dataset without splits; asked for split {split!r} "
                            "(take validation images with split_holdout)")
        missing = [c for c in ("image", "caption") if c not in loaded.column_names]
        if missing:
            raise UserError(f"{path} lacks columns {missing}; it has {loaded.column_names}")
        self.path = path
        self.transform = transform if transform is not None else ToUint8Tensor()
        self._rows = loaded.select_columns(["image", "caption"])
        self.array_columns = [c for c in self.ARRAY_COLUMNS if c in loaded.column_names]
        self.text_embeddings_dtype: Optional[torch.dtype] = None
        self.hidden_size: Optional[int] = None
        if "text_embeddings" in self.array_columns:
            self.text_embeddings_dtype, self.hidden_size = self._embedding_layout(path, loaded.features)
        # An Arrow-formatted view of the same memory map: each row's arrays without Python lists.
        self._arrays = loaded.select_columns(self.array_columns).with_format("arrow") if self.array_columns else None

    @staticmethod
    def _embedding_layout(path: Path, features: Any) -> tuple[torch.dtype, int]:
        feature = features["text_embeddings"]
        arrow_dtype, shape = getattr(feature, "dtype", None), getattr(feature, "shape", None)
        if arrow_dtype not in STORED_TEXT_DTYPES or not shape or len(shape) != 2:
            raise UserError(f"{path}: text_embeddings column of type {feature} is not understood; expected "
                            f"datasets.Array2D of {', '.join(STORED_TEXT_DTYPES)} (re-run prep_cc.py)")
        dtype = STORED_TEXT_DTYPES[arrow_dtype]
        summary_file = path / PREP_CC_SUMMARY
        if summary_file.is_file():
            import json

            entry = (json.loads(summary_file.read_text()).get("text_embeddings") or {})
            stored = entry.get("stored_dtype")
            if stored is not None and getattr(torch, stored, None) != dtype:
                raise UserError(f"{summary_file} says the text embeddings are stored as {stored}, but the column "
                                f"holds {arrow_dtype}; the folder was changed after prep_cc.py wrote it")
        return dtype, int(shape[1])

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._rows[index]
        sample: dict[str, Any] = {"image": self.transform(row["image"].convert("RGB")), "caption": row["caption"]}
        if self._arrays is not None:
            table = self._arrays[index]  # a one-row pyarrow Table
            for name in self.array_columns:
                values = _row_values(table.column(name))
                if name != "text_embeddings":
                    sample[name] = torch.from_numpy(values.astype(np.int64))  # (L,)
                    continue
                values = values.reshape(-1, self.hidden_size)  # (L_i, D), still in the memory map
                if self.text_embeddings_dtype == torch.bfloat16:  # raw bits: view, don't convert
                    sample[name] = torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16)
                else:
                    sample[name] = torch.from_numpy(values.copy())
        return sample


# ---------------------------------------------------------------------------------------------
# Shapes: img2dataset parquet shards, or rendered on the fly
# ---------------------------------------------------------------------------------------------


class ShapesParquetDataset(Dataset):
    """Rows with ``status == "success"`` of img2dataset parquet shards (``write_shapes_parquet``'s
    output, or any img2dataset ``--output_format parquet`` folder), read with pyarrow.

    The constructor reads only the ``status`` column and the row-group layout; ``__getitem__``
    reads the row group holding the sample (img2dataset writes groups of 100 rows) and keeps the
    last one, so sequential reads decode each group once. Returns ``{"image", "caption"}``.
    """

    IMAGE_COLUMNS = ("jpg", "png", "webp")

    def __init__(self, path: Union[str, Path], transform: Optional[Transform] = None) -> None:
        path = _check_folder(path, "parquet shard")
        self.shards = sorted(path.glob("*.parquet"))
        if not self.shards:
            raise UserError(f"no *.parquet shards in {path} (expected img2dataset --output_format parquet output)")
        self.transform = transform if transform is not None else ToUint8Tensor()
        locations = []  # (shard, row group, row in group) per successful sample
        image_columns = []
        for shard_index, shard in enumerate(self.shards):
            meta = pq.ParquetFile(shard)
            names = meta.schema_arrow.names
            found = [c for c in self.IMAGE_COLUMNS if c in names]
            if "caption" not in names or "status" not in names or not found:
                raise UserError(f"{shard} is not an img2dataset parquet shard with captions: columns {names}, "
                                f"expected caption, status and one of {self.IMAGE_COLUMNS}")
            image_columns.append(found[0])
            for group in range(meta.num_row_groups):
                status = meta.read_row_group(group, columns=["status"]).column("status").to_numpy(zero_copy_only=False)
                locations.extend((shard_index, group, int(row)) for row in np.nonzero(status == "success")[0])
        if not locations:
            raise UserError(f"no rows with status 'success' in the {len(self.shards)} shards of {path}")
        self._locations = np.array(locations, dtype=np.int64)  # (N, 3)
        self._image_columns = image_columns
        self._cache_key: Optional[tuple[int, int]] = None
        self._cache: Optional[dict[str, list]] = None

    def __len__(self) -> int:
        return len(self._locations)

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes start with an empty cache rather than a pickled row group.
        state = dict(self.__dict__)
        state["_cache_key"], state["_cache"] = None, None
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, group, row = (int(v) for v in self._locations[index])
        if self._cache_key != (shard, group):
            column = self._image_columns[shard]
            table = pq.ParquetFile(self.shards[shard]).read_row_group(group, columns=["caption", column])
            self._cache = {"caption": table.column("caption").to_pylist(), "image": table.column(column).to_pylist()}
            self._cache_key = (shard, group)
        assert self._cache is not None
        with Image.open(io.BytesIO(self._cache["image"][row])) as img:
            image = img.convert("RGB")
        return {"image": self.transform(image), "caption": self._cache["caption"][row]}


class ShapesDataset(Dataset):
    """``num_images`` shapes (see :mod:`modules.shapes`) rendered on the fly at ``img_size``:
    image ``i`` depends only on ``(seed, i)``, nothing is stored. Returns ``{"image", "caption"}``."""

    def __init__(self, num_images: int, img_size: int, seed: int, transform: Optional[Transform] = None,
                 min_size: float = 0.3, max_size: float = 0.6, supersample: int = 4) -> None:
        if num_images < 1 or img_size < 8:
            raise UserError(f"shapes needs num_images >= 1 and img_size >= 8, got {num_images}, {img_size}")
        sample_spec(seed, 0, min_size, max_size)  # validates seed and sizes now, not in a worker
        self.num_images = num_images
        self.img_size = img_size
        self.seed = seed
        self.min_size = min_size
        self.max_size = max_size
        self.supersample = supersample
        self.transform = transform if transform is not None else ToUint8Tensor()

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        spec = sample_spec(self.seed, index % self.num_images, self.min_size, self.max_size)
        image = render_shape(spec, self.img_size, self.supersample)
        return {"image": self.transform(image), "caption": spec.caption}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")


def dataset_conditioning(name: str) -> str:
    """What a dataset conditions on: ``"none"``, ``"class"`` or ``"text"``."""
    _check_name(name)
    return _CONDITIONING[name]


def _split_folder(path: Path, split: str) -> Path:
    """``path/<split>`` when it exists (``celeba_hq/train``, ``imagenet/train``), else ``path``
    itself for the training split."""
    if (path / split).is_dir():
        return path / split
    if split == "train":
        return path
    raise UserError(f"{path} has no {split!r} subfolder (take validation images with split_holdout)")


def build_dataset(
    name: str,
    path: Optional[Union[str, Path]],
    img_size: int,
    crop: str = "center",
    random_flip: bool = False,
    split: str = "train",
    random_resized_crop_scale: Sequence[float] = (0.8, 1.0),
    shapes_num_images: int = 10000,
    shapes_seed: int = 0,
) -> Dataset:
    """The dataset for ``--dataset name --path_to_dataset path`` at ``img_size``.

    - ``celebahq``, ``ffhq``, ``celeba``: :class:`ImageFolderDataset` of ``path[/split]``;
    - ``imagenet``: :class:`ClassFolderDataset` of ``path[/split]``;
    - ``conceptual_captions``: :class:`CaptionedArrowDataset` of the ``prep_cc.py`` output;
    - ``shapes``: without a path, :class:`ShapesDataset` (``shapes_num_images`` images of
      ``shapes_seed`` rendered at ``img_size``); with one, whatever it holds: img2dataset parquet
      shards (:class:`ShapesParquetDataset`), a ``prep_cc.py`` output, or a captioned image folder.

    ``split`` picks a subfolder or a saved DatasetDict's split; without those only ``"train"``
    exists, and :func:`split_holdout` makes validation images.
    """
    _check_name(name)
    transform = build_image_transform(img_size, crop, random_flip, random_resized_crop_scale)
    if name == "shapes" and path is None:
        if split != "train":
            raise UserError(f"on-the-fly shapes have only the 'train' split, asked for {split!r} "
                            "(take validation images with split_holdout)")
        return ShapesDataset(shapes_num_images, img_size, shapes_seed, transform)
    if path is None:
        raise UserError(f"dataset {name!r} needs a path to its data (path_to_dataset)")
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset path {path} does not exist")
    if name in ("celebahq", "ffhq", "celeba", "imagenet"):
        _refuse_captioned_data(name, path)
        folder = _split_folder(path, split)
        _refuse_captioned_data(name, folder)
        if name == "imagenet":
            return ClassFolderDataset(folder, transform)
        return ImageFolderDataset(folder, transform)
    if name == "conceptual_captions":
        return CaptionedArrowDataset(path, transform, split)
    # shapes from disk
    if path.is_dir() and _is_saved_hf_dataset(path):
        return CaptionedArrowDataset(path, transform, split)
    folder = _split_folder(path, split)
    if any(folder.glob("*.parquet")):
        return ShapesParquetDataset(folder, transform)
    return ImageFolderDataset(folder, transform, captions=True)


def _refuse_captioned_data(name: str, path: Path) -> None:
    """An image-folder dataset given a prep_cc.py output or img2dataset shards: say what the folder
    holds and which dataset name reads it, rather than "no images in ..." (or, worse, images found
    somewhere below and trained on without their captions)."""
    if not path.is_dir():
        return
    expected = "class folders of images (root/<class>/<image>)" if name == "imagenet" else "a folder of images"
    if _is_saved_hf_dataset(path):
        raise UserError(f"dataset {name!r} expects {expected}, but {path} is a saved Hugging Face dataset "
                        "(a prep_cc.py output); train on it as dataset conceptual_captions (or shapes)")
    shards = sorted(path.glob("*.parquet"))
    if shards:
        raise UserError(f"dataset {name!r} expects {expected}, but {path} holds parquet shards ({shards[0].name}, ...: "
                        "e.g. img2dataset output); run prep_cc.py on it and train as dataset conceptual_captions, "
                        "or as dataset shapes")


def split_holdout(dataset: Dataset, num_holdout: int, seed: int) -> tuple[Subset, Subset]:
    """(train, holdout) subsets: ``num_holdout`` indices drawn without replacement by a
    ``torch.Generator`` seeded with ``seed`` (same on every rank and run), the rest for training.
    Both keep their indices in ascending order."""
    n = len(dataset)
    if not 0 <= num_holdout < n:
        raise UserError(f"num_holdout must be in [0, {n}) for a dataset of {n} samples, got {num_holdout}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    holdout = order[:num_holdout].sort().values.tolist()
    train = order[num_holdout:].sort().values.tolist()
    return Subset(dataset, train), Subset(dataset, holdout)
