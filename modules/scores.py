"""Distribution and alignment scores of generated images: FID, KID and CLIP score.

Built on torchmetrics (``FrechetInceptionDistance``, ``KernelInceptionDistance``, ``CLIPScore``)
rather than written here: the numbers people compare against depend on details that are easy to
get subtly wrong by hand (the TF-1.x bilinear resize to 299 px of the original Inception graph,
float64 moment sums, the matrix square root, KID's unbiased polynomial-kernel MMD over subsets),
and torchmetrics reproduces torch-fidelity / the TF reference on them, is maintained by the
Lightning team, and reduces its states over processes. Its Inception is torch-fidelity's port of
the 2015-12-05 TF graph (the one every published FID uses); its CLIP score is
``100 * max(cos(image, text), 0)`` with a ``transformers`` CLIPModel.

Weights: with a network, the standard files download once (torch-fidelity's Inception into the
torch hub cache, ``openai/clip-vit-large-patch14`` into the Hugging Face cache). Offline, pass
local files; a missing file is a one-line :class:`UserError` that says where to get it. For tests
and the offline demo, :func:`write_random_inception` writes an Inception of the same architecture
with random weights (its batch-norm statistics calibrated on noise images): the same code path, but
its scores only compare runs scored with the same file, never published FIDs.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

from modules.errors import UserError

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
INCEPTION_FEATURES = 2048  # pool3, the FID/KID feature of every paper
REFERENCE_FEATURES_KIND = "inception-reference-features"  # marks a --reference_features cache file
logger = logging.getLogger("ldm")


def default_inception_path() -> Path:
    """Where torch.hub caches torch-fidelity's Inception weights (and where we look first)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(INCEPTION_URL).path).name


def resolve_inception_weights(path: Optional[Union[str, Path]]) -> Path:
    """A local Inception weights file: ``path``, else the torch hub cache, downloading it there once.

    UserError when ``path`` is missing, or when nothing is cached and the download fails (offline).
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--inception_weights {path}: file not found (torch-fidelity's {INCEPTION_URL})")
        return path
    cached = default_inception_path()
    if cached.is_file():
        return cached
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"no Inception weights at {cached} and this run is offline (HF_HUB_OFFLINE=1): "
                        f"download {INCEPTION_URL} there or pass --inception_weights FILE")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except OSError as err:  # URLError is an OSError
        raise UserError(f"no Inception weights at {cached} and the download of {INCEPTION_URL} failed "
                        f"({err}); download it by hand or pass --inception_weights FILE") from None
    return cached


def _load_inception(path: Path) -> nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        # antialias=False: torch-fidelity's TF-1.x-compatible bilinear resize, as the reference FID code.
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                  feature_extractor_weights_path=str(path), antialias=False)
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"--inception_weights {path}: not torch-fidelity Inception-v3 weights "
                        f"({str(err).splitlines()[0][:200]})") from None


class _SharedFeatures(nn.Module):
    """One Inception forward per batch for both FID and KID: the second metric's call with the same
    tensor object returns the first's features (the reference keeps the tensor alive, so identity is exact).

    A float (B, 2048) tensor is features already (:meth:`InceptionScores.add_real_features`, a cache
    replayed through the metrics' own ``update``); images are uint8 (B, 3, H, W), so the two never mix.
    """

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception
        self.num_features = INCEPTION_FEATURES
        self._last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point() and images.dim() == 2 and images.shape[1] == self.num_features:
            return images
        if self._last is None or self._last[0] is not images:
            self._last = (images, self.inception(images))
        return self._last[1]


class InceptionScores:
    """FID and KID between "real" and "fake" uint8 image batches (B, 3, H, W), any size.

    ``update(images, real)`` as torchmetrics; :meth:`compute` gives ``{"fid", "kid", "kid_std"}``
    (KID in absolute units; papers often print it x1000). KID's subset size is
    ``min(kid_subset_size, images of the smaller side)``. ``reset_fake()`` keeps the real
    statistics, so one reference set scores several image sets. :meth:`real_features` gives the real
    images' features (KID keeps them anyway) for :func:`save_reference_features`;
    :meth:`add_real_features` adds saved ones without running Inception again.
    """

    def __init__(self, weights: Optional[Union[str, Path]] = None, kid_subset_size: int = 1000,
                 kid_subsets: int = 100, device: Union[str, torch.device] = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.weights = resolve_inception_weights(weights)
        self.features = _SharedFeatures(_load_inception(self.weights))
        self.fid = FrechetInceptionDistance(feature=self.features, reset_real_features=False).to(device)
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.kid = KernelInceptionDistance(feature=self.features, subsets=kid_subsets, subset_size=kid_subset_size,
                                           reset_real_features=False).to(device)
        self.device = torch.device(device)
        self.counts = {True: 0, False: 0}

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self._add(images.to(self.device), real)

    @torch.no_grad()
    def add_real_features(self, features: torch.Tensor) -> None:
        """Add real images by their Inception features (N, 2048), e.g. from :func:`load_reference_features`."""
        if features.dim() != 2 or features.shape[1] != INCEPTION_FEATURES:
            raise ValueError(f"expected ({INCEPTION_FEATURES},)-feature rows, got {tuple(features.shape)}")
        self._add(features.float().to(self.device), True)

    def _add(self, batch: torch.Tensor, real: bool) -> None:
        """uint8 images or float features (:class:`_SharedFeatures` tells them apart) into both metrics."""
        self.fid.update(batch, real=real)
        self.kid.update(batch, real=real)
        self.counts[real] += batch.shape[0]

    def real_features(self) -> torch.Tensor:
        """The real images' Inception features so far (N, 2048), float32 on the CPU: KID's own state."""
        return torch.cat(list(self.kid.real_features)).float().cpu()

    def reset_fake(self) -> None:
        self.fid.reset()  # reset_real_features=False: the real statistics stay
        self.kid.reset()
        self.counts[False] = 0

    @torch.no_grad()
    def compute(self) -> dict:
        smaller = min(self.counts.values())
        if smaller < 2:
            raise UserError(f"FID/KID need at least 2 real and 2 generated images, got {self.counts[True]} "
                            f"and {self.counts[False]}")
        self.kid.subset_size = min(self.kid_subset_size, smaller)
        kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                "kid_subset_size": self.kid.subset_size, "real_images": self.counts[True],
                "fake_images": self.counts[False]}


# ----------------------------------------------------------------------------------------
# A cache of the reference images' features
# ----------------------------------------------------------------------------------------

def load_reference_features(path: Union[str, Path], key: Dict[str, object]) -> Optional[torch.Tensor]:
    """The cached (N, 2048) features at ``path`` when they were made for ``key`` (the Inception weights'
    digest and the reference images: dataset, folder, split, count, size); None when there is no file
    or it holds another key (then :func:`save_reference_features` replaces it). UserError when
    ``path`` is some other file: a cache never overwrites what it did not write."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: not ours
        raise UserError(f"--reference_features {path}: not a reference-features file ({str(err).splitlines()[0][:120]}); "
                        "pass a new path") from None
    if not isinstance(saved, dict) or saved.get("kind") != REFERENCE_FEATURES_KIND:
        raise UserError(f"--reference_features {path}: not a reference-features file; pass a new path")
    if saved.get("key") != key:
        logger.info("%s was made for other reference images or Inception weights: computing them again", path)
        return None
    return saved["features"]


def save_reference_features(path: Union[str, Path], key: Dict[str, object], features: torch.Tensor) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": REFERENCE_FEATURES_KIND, "key": key, "features": features.float().cpu()}, path)
    return path


class _ProjectedFeatures(nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected embedding
    tensors. transformers 5 returns a ``BaseModelOutputWithPooling`` (the embeddings in its
    ``pooler_output``) where torchmetrics 1.9's CLIPScore expects the tensor of transformers 4."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip_scorer(name_or_path: str, cache_dir: Optional[str] = None,
                     device: Union[str, torch.device] = "cpu"):
    """A torchmetrics ``CLIPScore`` over the CLIP model ``name_or_path`` (hub name or local folder
    holding a full CLIPModel: text and vision towers, plus its processor files).

    UserError when it cannot be loaded (offline without a cached copy, a text-only folder, ...).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoConfig, CLIPModel, CLIPProcessor

    local = Path(name_or_path).is_dir()

    def load() -> tuple:
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, local_files_only=local or None)
        if getattr(config, "model_type", None) != "clip":  # e.g. a text-only CLIP: its towers would be random
            raise ValueError(f"its config is a {config.model_type!r}, not a whole 'clip' model")
        model, info = CLIPModel.from_pretrained(name_or_path, cache_dir=cache_dir, local_files_only=local or None,
                                                output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(f"its weights lack {len(info['missing_keys'])} tensors ({sorted(info['missing_keys'])[0]}, ...)")
        return _ProjectedFeatures(model.eval()), CLIPProcessor.from_pretrained(name_or_path, cache_dir=cache_dir, local_files_only=local or None)

    try:
        return CLIPScore(model_name_or_path=load).to(device)
    except (OSError, ValueError, KeyError, TypeError) as err:
        hint = ("it needs a full CLIP model (text and vision towers) and its processor files"
                if local else "offline it needs a copy in the Hugging Face cache or a local folder")
        raise UserError(f"--clip_model {name_or_path}: cannot load a CLIP model for the CLIP score "
                        f"({str(err).splitlines()[0][:200]}); {hint}") from None


# ----------------------------------------------------------------------------------------
# Offline stand-in weights
# ----------------------------------------------------------------------------------------

def write_random_inception(path: Union[str, Path], seed: int = 0, calibration_images: int = 64) -> Path:
    """Write random Inception-v3 weights in torch-fidelity's layout to ``path`` (a ``.pth``).

    torchvision's InceptionV3 initialisation (seeded; its layer names are torch-fidelity's), with a
    1008-way head, and batch-norm running statistics measured on ``calibration_images`` smooth noise
    images at 299 px (with the identity statistics of an untrained network the pool3 features
    overflow). Same seed -> same file contents; the global RNG is untouched.
    """
    import torchvision

    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        net.fc = nn.Linear(2048, 1008)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(max(1, calibration_images // 16)):
            low = torch.rand(16, 3, 8, 8, generator=generator) * 2 - 1  # smooth colour fields in [-1, 1]
            images = nn.functional.interpolate(low, size=(299, 299), mode="bicubic", align_corners=False)
            images = images + 0.1 * torch.randn(images.shape, generator=generator)
            net(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
