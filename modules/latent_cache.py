"""Stage-2 training inputs: VAE latents of the dataset, encoded on the fly or cached once.

A latent diffusion model is trained on ``z ~ q(z | x)`` of the frozen first-stage autoencoder
(Rombach et al. 2022, sec. 3.3). Both paths here give the UNet the same distribution:

- on the fly: :class:`FlipAugmented` serves the (possibly flipped) image, the training step
  encodes it (:func:`vae_moments`) and draws ``z = mean + std * eps`` (:func:`sample_latents`);
- cached (``cache_latents: true``): :func:`build_latent_cache` encodes every image once, and,
  with flips on, its mirror image too, storing the posterior's mean and std (not a sample), so
  every epoch still draws a fresh ``z``. :class:`CachedLatentDataset` then serves the moments of
  the orientation the flip rule picks. The encoder is deterministic, so the only difference from
  the on-the-fly path is the storage dtype (``float32`` keeps it to rounding).

Flips are not drawn from a random stream but decided by :func:`flip_decision` from
``(seed, epoch, index)``: the same image gets the same orientation whichever path serves it, in
whichever DataLoader worker, and a resumed run sees exactly the flips of an uninterrupted one.

Cache layout (one folder; written by every process for its share of the indices, finished by
the main one; ``meta.json`` is written last and marks a complete cache):
    moments.npy           (N, V, 2, C, h, w) memory-mapped: V = 2 with flips (original, mirror),
                          [.., 0] = posterior mean, [.., 1] = posterior std (0 for a VQ model)
    labels.npy            (N,) int64 class labels (class datasets)
    captions.bin, caption_offsets.npy   UTF-8 captions back to back and (N + 1,) offsets
    meta.json             the fingerprint (dataset, size, flips, VAE weights hash, dtypes)
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from modules.errors import UserError
from modules.training import progress_bar

__all__ = [
    "CACHE_DTYPES",
    "CachedLatentDataset",
    "FlipAugmented",
    "build_latent_cache",
    "cache_is_complete",
    "flip_decision",
    "sample_latents",
    "vae_fingerprint",
    "vae_moments",
]

logger = logging.getLogger("ldm")

CACHE_DTYPES = {"float32": np.float32, "float16": np.float16}
_META = "meta.json"
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------
# Latents of images
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def vae_moments(vae: torch.nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the frozen autoencoder for images (B, 3, H, W) in [-1, 1].

    Returns two float32 tensors (B, C, H/f, W/f). A KL autoencoder gives its diagonal Gaussian
    q(z|x); a VQ model's (pre-quantization) latent is deterministic, so its std is 0. Images
    are cast to the autoencoder's device and dtype (it may run in bf16/fp16).
    """
    param = next(vae.parameters())
    encoded = vae.encode(images.to(device=param.device, dtype=param.dtype))
    if isinstance(encoded, torch.Tensor):  # VQModel: z_e
        mean = encoded.float()
        return mean, torch.zeros_like(mean)
    return encoded.mean.float(), encoded.std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Scaled diffusion inputs ``(mean + std * eps - shift) * scale``, eps ~ N(0, I), float32 like ``mean``.

    The reparameterised posterior draw (Kingma & Welling 2014, eq. 10), then the latent scale that
    brings the latents to unit variance (LDM sec. 4.3.2 / app. G).
    """
    draw_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=draw_device, dtype=torch.float32).to(mean.device)
    z = mean.float() + std.float() * eps
    return (z - shift_factor) * scaling_factor


# ----------------------------------------------------------------------------------------
# Flips decided by (seed, epoch, index)
# ----------------------------------------------------------------------------------------

def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is mirrored in ``epoch``: a fair coin that depends only on the three numbers."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return bool(h >> 63)


class FlipAugmented(Dataset):
    """``dataset`` (samples with an ``"image"`` (3, H, W)) with horizontal flips by :func:`flip_decision`.

    Call :meth:`set_epoch` before each epoch (DataLoader workers get a fresh copy per epoch).
    With ``enabled=False`` it passes samples through unchanged.
    """

    def __init__(self, dataset: Dataset, seed: int, enabled: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.enabled = enabled
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = dict(self.dataset[index])
        if self.enabled and flip_decision(self.seed, self.epoch, index):
            sample["image"] = sample["image"].flip(-1)  # (3, H, W), mirrored along W
        return sample


# ----------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------

def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A BLAKE2 hash of the autoencoder's weights (names, shapes, dtypes, bytes): a cache built with
    other weights is never reused."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_is_complete(cache_dir: Union[str, Path], fingerprint: Mapping[str, Any]) -> bool:
    """True when ``cache_dir`` holds a finished cache built for exactly ``fingerprint``."""
    meta = Path(cache_dir) / _META
    if not meta.is_file():
        return False
    try:
        stored = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return stored.get("fingerprint") == json.loads(json.dumps(dict(fingerprint)))


def build_latent_cache(
    accelerator,
    dataset: Dataset,
    vae: torch.nn.Module,
    cache_dir: Union[str, Path],
    fingerprint: Mapping[str, Any],
    latent_shape: Tuple[int, int, int],
    flips: bool,
    cache_dtype: str = "float32",
    batch_size: int = 32,
    num_workers: int = 0,
) -> Path:
    """Encode ``dataset`` once with the frozen ``vae`` into ``cache_dir`` (see the module docstring).

    Every process encodes the indices ``rank, rank + world, ...``; the main process creates the
    memory map first and writes the captions/labels and ``meta.json`` last. A complete cache with
    the same ``fingerprint`` is reused as it is. Returns ``cache_dir``.

    Args:
        dataset: samples with ``"image"`` (3, H, W) and optionally ``"caption"`` / ``"label"``.
        latent_shape: (C, h, w) of one latent.
        flips: also store the moments of each mirrored image (V = 2).
        cache_dtype: ``float32`` or ``float16`` storage.
    """
    if cache_dtype not in CACHE_DTYPES:
        raise UserError(f"latent_cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
    cache_dir = Path(cache_dir)
    if cache_is_complete(cache_dir, fingerprint):
        logger.info("latent cache %s is complete and matches; reusing it", cache_dir)
        return cache_dir
    n, views = len(dataset), 2 if flips else 1
    shape = (n, views, 2, *latent_shape)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True)
        np.lib.format.open_memmap(cache_dir / "moments.npy", mode="w+", dtype=CACHE_DTYPES[cache_dtype],
                                  shape=shape).flush()
        logger.info("encoding %d images%s into the latent cache %s", n, " and their mirror images" if flips else "",
                    cache_dir)
    accelerator.wait_for_everyone()

    moments = np.load(cache_dir / "moments.npy", mmap_mode="r+")
    indices = list(range(rank, n, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    captions: List[str] = []
    labels: List[int] = []
    position = 0
    bar = progress_bar(accelerator, total=len(loader), desc="latent cache")
    for batch in loader:
        images = batch["image"]  # (B, 3, H, W)
        rows = indices[position:position + images.shape[0]]
        position += images.shape[0]
        with accelerator.autocast():
            views_out = [vae_moments(vae, images)]
            if flips:
                views_out.append(vae_moments(vae, images.flip(-1)))
        stacked = torch.stack([torch.stack(v, dim=1) for v in views_out], dim=1)  # (B, V, 2, C, h, w)
        moments[rows] = stacked.cpu().numpy().astype(moments.dtype)
        if "caption" in batch:
            captions.extend(batch["caption"])
        if "label" in batch:
            labels.extend(int(v) for v in batch["label"])
        bar.update(1)
    bar.close()
    moments.flush()
    del moments
    part = {"indices": indices, "captions": captions if captions else None, "labels": labels if labels else None}
    (cache_dir / f"part_{rank}.json").write_text(json.dumps(part))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        all_captions: List[Optional[str]] = [None] * n
        all_labels = np.full((n,), -1, dtype=np.int64)
        has_captions = has_labels = False
        for r in range(world):
            part = json.loads((cache_dir / f"part_{r}.json").read_text())
            if part["captions"] is not None:
                has_captions = True
                for i, caption in zip(part["indices"], part["captions"]):
                    all_captions[i] = caption
            if part["labels"] is not None:
                has_labels = True
                all_labels[part["indices"]] = part["labels"]
            (cache_dir / f"part_{r}.json").unlink()
        if has_captions:
            encoded = [(c or "").encode("utf-8") for c in all_captions]
            offsets = np.zeros(n + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(b) for b in encoded])
            (cache_dir / "captions.bin").write_bytes(b"".join(encoded))
            np.save(cache_dir / "caption_offsets.npy", offsets)
        if has_labels:
            np.save(cache_dir / "labels.npy", all_labels)
        meta = {"fingerprint": dict(fingerprint), "shape": list(shape), "dtype": cache_dtype, "flips": flips}
        (cache_dir / _META).write_text(json.dumps(meta, indent=2))  # last: marks the cache complete
    accelerator.wait_for_everyone()
    return cache_dir


class CachedLatentDataset(Dataset):
    """Samples of a finished latent cache: ``{"latent_mean", "latent_std"}`` (C, h, w) float32, plus
    ``"caption"`` / ``"label"`` when cached. With ``random_flip`` the orientation of sample i in an
    epoch is :func:`flip_decision` (``seed``, epoch, i), as :class:`FlipAugmented` picks it.

    Files are memory-mapped on first access in each process (DataLoader workers included).
    """

    def __init__(self, cache_dir: Union[str, Path], seed: int, random_flip: bool) -> None:
        self.cache_dir = Path(cache_dir)
        meta_file = self.cache_dir / _META
        if not meta_file.is_file():
            raise UserError(f"{self.cache_dir} is not a finished latent cache (no {_META})")
        meta = json.loads(meta_file.read_text())
        self.shape = tuple(meta["shape"])
        if random_flip and not meta["flips"]:
            raise UserError(f"{self.cache_dir} was built without mirror images; rebuild it with random_flip on")
        self.seed = seed
        self.random_flip = random_flip
        self.epoch = 0
        self.has_captions = (self.cache_dir / "captions.bin").is_file()
        self.has_labels = (self.cache_dir / "labels.npy").is_file()
        self._moments: Optional[np.ndarray] = None
        self._captions: Optional[np.ndarray] = None
        self._offsets: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)  # workers map the files themselves
        state.update(_moments=None, _captions=None, _offsets=None, _labels=None)
        return state

    def _open(self) -> None:
        self._moments = np.load(self.cache_dir / "moments.npy", mmap_mode="r")
        if self.has_captions:
            self._captions = np.memmap(self.cache_dir / "captions.bin", dtype=np.uint8, mode="r") \
                if (self.cache_dir / "captions.bin").stat().st_size else np.zeros(0, dtype=np.uint8)
            self._offsets = np.load(self.cache_dir / "caption_offsets.npy")
        if self.has_labels:
            self._labels = np.load(self.cache_dir / "labels.npy", mmap_mode="r")

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if self._moments is None:
            self._open()
        assert self._moments is not None
        view = 1 if self.random_flip and flip_decision(self.seed, self.epoch, index) else 0
        moments = torch.from_numpy(np.array(self._moments[index, view], dtype=np.float32))  # (2, C, h, w)
        sample: Dict[str, Any] = {"latent_mean": moments[0], "latent_std": moments[1]}
        if self._offsets is not None and self._captions is not None:
            start, end = int(self._offsets[index]), int(self._offsets[index + 1])
            sample["caption"] = bytes(self._captions[start:end]).decode("utf-8")
        if self._labels is not None:
            sample["label"] = int(self._labels[index])
        return sample
