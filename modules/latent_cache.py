"""Stage-2 training inputs: VAE latents of the dataset, encoded on the fly or cached once.

A latent diffusion model is trained on ``z ~ q(z | x)`` of the frozen first-stage autoencoder
(Rombach et al. 2022, sec. 3.3). Both paths here give the UNet the same distribution:

- on the fly: :class:`FlipAugmented` serves the (possibly flipped) uint8 image, the training step
  converts it (:func:`modules.image_datasets.images_to_model`), encodes it (:func:`vae_moments`)
  and draws ``z = mean + std * eps`` (:func:`sample_latents`);
- cached (``cache_latents: true``): :func:`build_latent_cache` encodes every image once, and,
  with flips on, its mirror image too, storing the posterior's mean and std (not a sample), so
  every epoch still draws a fresh ``z``. :class:`CachedLatentDataset` then serves the moments of
  the orientation the flip rule picks. The encoder is deterministic, so the only difference from
  the on-the-fly path is the storage dtype (``float32`` keeps it to rounding; ``float16``, which
  ``auto`` picks under bf16/fp16 mixed precision, halves the file, :func:`resolve_cache_dtype`).

The cache keeps the text of captioned datasets too, so a cached epoch neither tokenizes nor runs
the text encoder: the token ids and mask (the dataset's own, or tokenized once at build time),
and, with a frozen text encoder (or embeddings the dataset carries, ``prep_cc.py
--pre_encode_text``), each caption's last hidden states trimmed to its L_i real tokens (the
UNet's cross-attention masks the padding, and CLIP's causal attention makes the real tokens'
states independent of it).

Flips are not drawn from a random stream but decided by :func:`flip_decision` from
``(seed, epoch, index)``. Both datasets here take keys ``(epoch, index)`` (from
``modules.data_loading.EpochSampler``), so the epoch travels with every index into the DataLoader
workers (persistent workers never see a ``set_epoch`` made in the main process): the same image
gets the same orientation whichever path serves it, in whichever worker, and a resumed run sees
exactly the flips of an uninterrupted one.

Cache layout (one folder; every process encodes its share of the indices into ``moments.npy``
and part files, the main one assembles captions, labels, tokens and the text offsets, every
process then copies its text rows into place; ``meta.json`` is written last and marks a
complete cache):
    moments.npy           (N, V, 2, C, h, w) memory-mapped, in the cache dtype: V = 2 with flips
                          (original, mirror), [.., 0] = posterior mean, [.., 1] = posterior std
                          (0 for a VQ model)
    labels.npy            (N,) int64 class labels (class datasets)
    captions.bin, caption_offsets.npy   UTF-8 captions back to back and (N + 1,) int64 offsets
    input_ids.npy         (N, L) int32 token ids (captioned datasets with a tokenizer or stored ids)
    attention_mask.npy    (N, L) bool, True on real tokens
    text_embeddings.npy   (T, D) in the cache dtype, T = sum of L_i: caption i's real tokens are
                          rows text_offsets[i] : text_offsets[i + 1]
    text_offsets.npy      (N + 1,) int64
    meta.json             the fingerprint (dataset, size, flips, VAE and text-encoder weights
                          hashes, tokenizer, dtypes), shape, dtype
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
from torch.utils.data import DataLoader, Dataset, Subset

from modules.batching import Collate
from modules.data_loading import epoch_key
from modules.errors import UserError
from modules.image_datasets import images_to_model
from modules.metrics import progress_bar

__all__ = [
    "CACHE_DTYPES",
    "CACHE_DTYPE_CHOICES",
    "CachedLatentDataset",
    "FlipAugmented",
    "build_latent_cache",
    "cache_fingerprint",
    "cache_is_complete",
    "flip_decision",
    "resolve_cache_dtype",
    "sample_latents",
    "text_encoder_fingerprint",
    "vae_fingerprint",
    "vae_moments",
    "weights_fingerprint",
]

logger = logging.getLogger("ldm")

CACHE_DTYPES = {"float32": np.float32, "float16": np.float16}
CACHE_DTYPE_CHOICES = ("auto", *CACHE_DTYPES)
_HALF_PRECISION = ("bf16", "fp16")  # accelerate's mixed_precision values that make "auto" float16
_META = "meta.json"
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------
# Latents of images
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def vae_moments(vae: torch.nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the frozen autoencoder for float images (B, 3, H, W) in [-1, 1].

    Returns two float32 tensors (B, C, H/f, W/f). A KL autoencoder gives its diagonal Gaussian
    q(z|x); a VQ model's (pre-quantization) latent is deterministic, so its std is 0. Images
    are cast to the autoencoder's device and dtype (it may run in bf16/fp16). uint8 images (the
    datasets' output) are a TypeError: convert them with ``images_to_model`` first.
    """
    if not images.is_floating_point():
        raise TypeError(f"vae_moments takes float images in [-1, 1], got {images.dtype}; "
                        "convert the datasets' uint8 images with modules.image_datasets.images_to_model")
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

    Keys are ``(epoch, index)`` (``modules.data_loading.EpochSampler``): the flip of a sample is a
    function of (seed, epoch, index) carried by the key itself, so DataLoader workers (persistent
    ones included) flip by the right epoch. A plain int key is a TypeError. With
    ``enabled=False`` it passes samples through unchanged.
    """

    epoch_keyed = True

    def __init__(self, dataset: Dataset, seed: int, enabled: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.enabled = enabled

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, Any]:
        epoch, index = epoch_key(key)
        sample = dict(self.dataset[index])
        if self.enabled and flip_decision(self.seed, epoch, index):
            sample["image"] = sample["image"].flip(-1)  # (3, H, W), mirrored along W
        return sample


# ----------------------------------------------------------------------------------------
# Fingerprints and dtypes
# ----------------------------------------------------------------------------------------

def resolve_cache_dtype(value: str, mixed_precision: str) -> str:
    """The storage dtype of the latent cache for ``latent_cache_dtype: value``.

    ``auto``: ``float16`` when the trainer's mixed precision (accelerate's ``mixed_precision``)
    is ``bf16`` or ``fp16`` (the frozen VAE then computes in 16 bits anyway, and float16 keeps 3
    more mantissa bits than bfloat16), else ``float32``. ``float32`` / ``float16``: as given.
    """
    if value not in CACHE_DTYPE_CHOICES:
        raise UserError(f"latent_cache_dtype must be one of {', '.join(CACHE_DTYPE_CHOICES)}, got {value!r}")
    if value != "auto":
        return value
    return "float16" if str(mixed_precision) in _HALF_PRECISION else "float32"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A BLAKE2 hash of a module's weights (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """:func:`weights_fingerprint` of the autoencoder: a cache built with other weights is never reused."""
    return weights_fingerprint(vae)


def text_encoder_fingerprint(text_encoder: Any) -> Dict[str, Any]:
    """Name, token length and weights hash of a :class:`modules.text_encoder.TextEncoder`."""
    return {"name": str(text_encoder.model.config.name_or_path), "max_length": int(text_encoder.max_length),
            "weights": weights_fingerprint(text_encoder.model)}


def cache_fingerprint(fingerprint: Mapping[str, Any], cache_dtype: str, text_encoder: Any = None,
                      tokenizer: Any = None) -> Dict[str, Any]:
    """What :func:`build_latent_cache` stores and compares: the caller's ``fingerprint`` (dataset,
    size, flips, VAE, ...) plus the resolved cache dtype, the text encoder
    (:func:`text_encoder_fingerprint`) and the tokenizer (``CaptionTokenizer.fingerprint``)."""
    return {**dict(fingerprint), "cache_dtype": cache_dtype,
            "text_encoder": text_encoder_fingerprint(text_encoder) if text_encoder is not None else None,
            "tokenizer": tokenizer.fingerprint() if tokenizer is not None else None}


def cache_is_complete(cache_dir: Union[str, Path], fingerprint: Mapping[str, Any]) -> bool:
    """True when ``cache_dir`` holds a finished cache built for exactly ``fingerprint`` (as stored:
    :func:`cache_fingerprint`)."""
    meta = Path(cache_dir) / _META
    if not meta.is_file():
        return False
    try:
        stored = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return stored.get("fingerprint") == json.loads(json.dumps(dict(fingerprint)))


# ----------------------------------------------------------------------------------------
# Building the cache
# ----------------------------------------------------------------------------------------

def _part(cache_dir: Path, rank: int, name: str) -> Path:
    return cache_dir / f"part_{rank}_{name}"


def _trimmed_rows(hidden: torch.Tensor, mask: torch.Tensor, dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """(B, L, D) states and their (B, L) mask -> the real tokens of every row back to back
    (sum L_i, D) in ``dtype``, and the lengths (B,). Real tokens are a prefix (right padding)."""
    mask = mask.bool().cpu()
    lengths = mask.sum(dim=1)  # (B,)
    prefix = torch.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not torch.equal(mask, prefix):
        raise UserError("text attention masks must be right-padded (real tokens first)")
    rows = hidden.detach().float().cpu()[prefix]  # (sum L_i, D)
    return rows.numpy().astype(dtype), lengths.numpy().astype(np.int64)


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
    text_encoder: Any = None,
    tokenizer: Any = None,
) -> Path:
    """Encode ``dataset`` once with the frozen ``vae`` into ``cache_dir`` (layout: module docstring).

    Every process encodes the indices ``rank, rank + world, ...``; the main process creates the
    memory map first, assembles the text and writes ``meta.json`` last. A complete cache with
    the same fingerprint (:func:`cache_fingerprint` of ``fingerprint``) is reused as it is.
    Returns ``cache_dir``.

    Args:
        dataset: plain-indexed samples with ``"image"`` uint8 (3, H, W) and optionally
            ``"caption"``, ``"label"``, ``"input_ids"`` / ``"attention_mask"`` and
            ``"text_embeddings"`` (L_i, D).
        latent_shape: (C, h, w) of one latent.
        flips: also store the moments of each mirrored image (V = 2).
        cache_dtype: ``auto`` (:func:`resolve_cache_dtype` with ``accelerator.mixed_precision``),
            ``float32`` or ``float16``: the storage of moments and text embeddings.
        text_encoder: a frozen :class:`modules.text_encoder.TextEncoder`: caption embeddings are
            computed with it and stored (it wins over embeddings the dataset carries). Without
            it, the dataset's own ``text_embeddings`` are stored when it has them.
        tokenizer: a :class:`modules.text_encoder.CaptionTokenizer` for captions without stored
            ``input_ids`` (default: the text encoder's). Without either, only the captions are kept.
    """
    cache_dtype = resolve_cache_dtype(cache_dtype, getattr(accelerator, "mixed_precision", "no"))
    np_dtype = np.dtype(CACHE_DTYPES[cache_dtype])
    if tokenizer is None and text_encoder is not None:
        tokenizer = text_encoder.caption_tokenizer
    full_fingerprint = cache_fingerprint(fingerprint, cache_dtype, text_encoder, tokenizer)
    cache_dir = Path(cache_dir)
    if cache_is_complete(cache_dir, full_fingerprint):
        logger.info("latent cache %s is complete and matches; reusing it", cache_dir)
        return cache_dir
    n, views = len(dataset), 2 if flips else 1
    shape = (n, views, 2, *latent_shape)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True)
        np.lib.format.open_memmap(cache_dir / "moments.npy", mode="w+", dtype=np_dtype, shape=shape).flush()
        logger.info("encoding %d images%s into the latent cache %s (%s)", n,
                    " and their mirror images" if flips else "", cache_dir, cache_dtype)
    accelerator.wait_for_everyone()

    # ---- every process: its share of the images (and text) ----
    moments = np.load(cache_dir / "moments.npy", mmap_mode="r+")
    indices = list(range(rank, n, world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=Collate(tokenizer))
    device = next(vae.parameters()).device
    captions: List[str] = []
    labels: List[int] = []
    token_ids: List[np.ndarray] = []
    token_masks: List[np.ndarray] = []
    text_lengths: List[np.ndarray] = []
    hidden_size: Optional[int] = None
    text_file = _part(cache_dir, rank, "text.bin").open("wb")
    position = 0
    bar = progress_bar(accelerator, total=len(loader), desc="latent cache")
    try:
        for batch in loader:
            images = images_to_model(batch["image"], device)  # (B, 3, H, W) in [-1, 1]
            rows = indices[position:position + images.shape[0]]
            position += images.shape[0]
            hidden = mask = None
            with accelerator.autocast():
                views_out = [vae_moments(vae, images)]
                if flips:
                    views_out.append(vae_moments(vae, images.flip(-1)))
                if text_encoder is not None and "input_ids" in batch:
                    with torch.no_grad():
                        hidden, mask = text_encoder.encode(batch["input_ids"], batch["attention_mask"])  # (B, L, D)
            if hidden is None and "text_embeddings" in batch:
                hidden, mask = batch["text_embeddings"], batch["text_embeddings_mask"]  # (B, L_max, D)
            stacked = torch.stack([torch.stack(v, dim=1) for v in views_out], dim=1)  # (B, V, 2, C, h, w)
            moments[rows] = stacked.cpu().numpy().astype(moments.dtype)
            if "caption" in batch:
                captions.extend(batch["caption"])
            if "label" in batch:
                labels.extend(int(v) for v in batch["label"])
            if "input_ids" in batch:
                token_ids.append(batch["input_ids"].numpy().astype(np.int32))  # (B, L)
                token_masks.append(batch["attention_mask"].numpy().astype(bool))
            if hidden is not None:
                flat, lengths = _trimmed_rows(hidden, mask, np_dtype)  # (sum L_i, D), (B,)
                hidden_size = flat.shape[1]
                text_file.write(flat.tobytes())
                text_lengths.append(lengths)
            bar.update(1)
    finally:
        text_file.close()
        bar.close()
    moments.flush()
    del moments
    if token_ids:
        np.save(_part(cache_dir, rank, "input_ids.npy"), np.concatenate(token_ids))
        np.save(_part(cache_dir, rank, "attention_mask.npy"), np.concatenate(token_masks))
    if text_lengths:
        np.save(_part(cache_dir, rank, "text_lengths.npy"), np.concatenate(text_lengths))
    part = {"indices": indices, "captions": captions if captions else None, "labels": labels if labels else None,
            "tokens": bool(token_ids), "hidden_size": hidden_size}
    _part(cache_dir, rank, "index.json").write_text(json.dumps(part))
    accelerator.wait_for_everyone()

    # ---- main process: captions, labels, tokens, the text file and its offsets ----
    parts = [json.loads(_part(cache_dir, r, "index.json").read_text()) for r in range(world)]
    with_text = [r for r in range(world) if parts[r]["hidden_size"] is not None]
    text_offsets = None
    if with_text:
        all_lengths = np.zeros(n, dtype=np.int64)
        for r in with_text:
            all_lengths[parts[r]["indices"]] = np.load(_part(cache_dir, r, "text_lengths.npy"))
        text_offsets = np.zeros(n + 1, dtype=np.int64)
        text_offsets[1:] = np.cumsum(all_lengths)
        hidden_size = parts[with_text[0]]["hidden_size"]
    if accelerator.is_main_process:
        _assemble(cache_dir, parts, n)
        if text_offsets is not None:
            np.save(cache_dir / "text_offsets.npy", text_offsets)
            np.lib.format.open_memmap(cache_dir / "text_embeddings.npy", mode="w+", dtype=np_dtype,
                                      shape=(int(text_offsets[-1]), hidden_size)).flush()
    accelerator.wait_for_everyone()

    # ---- every process: its text rows into place (in parallel), then its part files go ----
    if text_offsets is not None and parts[rank]["hidden_size"] is not None:
        lengths = np.load(_part(cache_dir, rank, "text_lengths.npy"))
        assert lengths.sum() > 0, "every caption has at least its start and end tokens"
        source = np.memmap(_part(cache_dir, rank, "text.bin"), dtype=np_dtype, mode="r",
                           shape=(int(lengths.sum()), hidden_size))
        target = np.load(cache_dir / "text_embeddings.npy", mmap_mode="r+")
        start = 0
        for index, length in zip(parts[rank]["indices"], lengths.tolist()):
            target[text_offsets[index]:text_offsets[index] + length] = source[start:start + length]
            start += length
        target.flush()
        del source, target
    for name in ("index.json", "text.bin", "text_lengths.npy", "input_ids.npy", "attention_mask.npy"):
        _part(cache_dir, rank, name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        meta = {"fingerprint": full_fingerprint, "shape": list(shape), "dtype": cache_dtype, "flips": flips,
                "text_embeddings": None if text_offsets is None else
                {"num_tokens": int(text_offsets[-1]), "hidden_size": hidden_size, "dtype": cache_dtype}}
        (cache_dir / _META).write_text(json.dumps(meta, indent=2))  # last: marks the cache complete
    accelerator.wait_for_everyone()
    return cache_dir


def _assemble(cache_dir: Path, parts: List[Dict[str, Any]], n: int) -> None:
    """Main process: the per-process captions, labels and tokens, in index order."""
    all_captions: List[Optional[str]] = [None] * n
    all_labels = np.full((n,), -1, dtype=np.int64)
    has_captions = has_labels = False
    ids = mask = None
    for r, part in enumerate(parts):
        if part["captions"] is not None:
            has_captions = True
            for i, caption in zip(part["indices"], part["captions"]):
                all_captions[i] = caption
        if part["labels"] is not None:
            has_labels = True
            all_labels[part["indices"]] = part["labels"]
        if part["tokens"]:
            part_ids = np.load(_part(cache_dir, r, "input_ids.npy"))  # (n_r, L)
            part_mask = np.load(_part(cache_dir, r, "attention_mask.npy"))
            if ids is None:
                ids = np.lib.format.open_memmap(cache_dir / "input_ids.npy", mode="w+", dtype=np.int32,
                                                shape=(n, part_ids.shape[1]))
                mask = np.lib.format.open_memmap(cache_dir / "attention_mask.npy", mode="w+", dtype=bool,
                                                 shape=(n, part_ids.shape[1]))
            ids[part["indices"]] = part_ids
            mask[part["indices"]] = part_mask
    if ids is not None:
        ids.flush()
        mask.flush()
    if has_captions:
        encoded = [(c or "").encode("utf-8") for c in all_captions]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        (cache_dir / "captions.bin").write_bytes(b"".join(encoded))
        np.save(cache_dir / "caption_offsets.npy", offsets)
    if has_labels:
        np.save(cache_dir / "labels.npy", all_labels)


# ----------------------------------------------------------------------------------------
# Reading the cache
# ----------------------------------------------------------------------------------------

class CachedLatentDataset(Dataset):
    """Samples of a finished latent cache, keyed by ``(epoch, index)`` (a plain int is a TypeError).

    Serves ``{"latent_mean", "latent_std"}`` (C, h, w) float32, plus, when cached: ``"caption"``
    (str), ``"label"`` (int), ``"input_ids"`` / ``"attention_mask"`` (int64 (L,)) and
    ``"text_embeddings"`` ((L_i, D) in the cache dtype: the caption's real tokens; batch them
    with :class:`modules.batching.Collate`). With ``random_flip`` the orientation of sample i in
    an epoch is :func:`flip_decision` (``seed``, epoch, i), as :class:`FlipAugmented` picks it.

    Files are memory-mapped on first access in each process (DataLoader workers included).
    """

    epoch_keyed = True
    _FILES = ("_moments", "_captions", "_offsets", "_labels", "_input_ids", "_attention_mask", "_text",
              "_text_offsets")

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
        self.has_captions = (self.cache_dir / "captions.bin").is_file()
        self.has_labels = (self.cache_dir / "labels.npy").is_file()
        self.has_tokens = (self.cache_dir / "input_ids.npy").is_file()
        self.has_text_embeddings = (self.cache_dir / "text_embeddings.npy").is_file()
        for name in self._FILES:
            setattr(self, name, None)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)  # workers map the files themselves
        state.update({name: None for name in self._FILES})
        return state

    def _open(self) -> None:
        folder = self.cache_dir
        self._moments = np.load(folder / "moments.npy", mmap_mode="r")
        if self.has_captions:
            self._captions = np.memmap(folder / "captions.bin", dtype=np.uint8, mode="r") \
                if (folder / "captions.bin").stat().st_size else np.zeros(0, dtype=np.uint8)
            self._offsets = np.load(folder / "caption_offsets.npy", mmap_mode="r")
        if self.has_labels:
            self._labels = np.load(folder / "labels.npy", mmap_mode="r")
        if self.has_tokens:
            self._input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
            self._attention_mask = np.load(folder / "attention_mask.npy", mmap_mode="r")
        if self.has_text_embeddings:
            self._text = np.load(folder / "text_embeddings.npy", mmap_mode="r")
            self._text_offsets = np.load(folder / "text_offsets.npy", mmap_mode="r")

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, Any]:
        epoch, index = epoch_key(key)
        if self._moments is None:
            self._open()
        assert self._moments is not None
        view = 1 if self.random_flip and flip_decision(self.seed, epoch, index) else 0
        moments = torch.from_numpy(np.array(self._moments[index, view], dtype=np.float32))  # (2, C, h, w)
        sample: Dict[str, Any] = {"latent_mean": moments[0], "latent_std": moments[1]}
        if self._offsets is not None and self._captions is not None:
            start, end = int(self._offsets[index]), int(self._offsets[index + 1])
            sample["caption"] = bytes(self._captions[start:end]).decode("utf-8")
        if self._labels is not None:
            sample["label"] = int(self._labels[index])
        if self._input_ids is not None and self._attention_mask is not None:
            sample["input_ids"] = torch.from_numpy(self._input_ids[index].astype(np.int64))  # (L,)
            sample["attention_mask"] = torch.from_numpy(self._attention_mask[index].astype(np.int64))  # (L,)
        if self._text is not None and self._text_offsets is not None:
            start, end = int(self._text_offsets[index]), int(self._text_offsets[index + 1])
            sample["text_embeddings"] = torch.from_numpy(np.array(self._text[start:end]))  # (L_i, D)
        return sample
