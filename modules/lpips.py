"""LPIPS, the learned perceptual image patch similarity, and its BAPPS ranking head.

Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018 (arXiv:1801.03924), eq. (1):

    d(x0, x1) = sum_l  1 / (H_l W_l)  sum_{h,w}  || w_l (.) (f0_hat[l,h,w] - f1_hat[l,h,w]) ||_2^2

where f_hat are the activations of trunk layer l, unit-normalised over channels, and w_l >= 0
is a per-channel weight (the 1x1 "linear head" of layer l). The trunk is a torchvision ImageNet
classifier (VGG16, AlexNet or SqueezeNet 1.1) tapped at the same layers as the `lpips` package
(v0.1, with its input ScalingLayer), so the `lpips` package's weights load into this module and give
the same distances (see :meth:`LPIPS.load_lpips_package_state_dict`).

The three training modes of the paper:
  * "lin"     pretrained_backbone=True,  train_backbone=False  (default: only the heads learn)
  * "tune"    pretrained_backbone=True,  train_backbone=True
  * "scratch" pretrained_backbone=False, train_backbone=True

The heads are trained on BAPPS 2AFC triplets through :class:`RankingHead` (the package's
``BCERankingLoss`` network), which maps the two distances (d0, d1) to the predicted fraction of
humans who preferred p1; :func:`ranking_loss` is the binary cross-entropy against that fraction.
"""
from __future__ import annotations

import importlib.util
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from modules.errors import UserError


# --------------------------------------------------------------------------------------------
# Backbones: which torchvision `features` layers are tapped, as in lpips/pretrained_networks.py
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """A torchvision trunk and where LPIPS taps it.

    ``taps`` are indices into ``torchvision.models.<builder>().features`` whose outputs are the
    LPIPS layers (the last index of each ``sliceN`` of the lpips package); ``channels`` are
    their channel counts; ``weights`` names the torchvision weights enum used for ImageNet weights.
    """

    builder: str
    weights: str
    taps: Tuple[int, ...]
    channels: Tuple[int, ...]


BACKBONES: Dict[str, BackboneSpec] = {
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    "vgg": BackboneSpec("vgg16", "VGG16_Weights.IMAGENET1K_V1", (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
    # relu1 .. relu5
    "alex": BackboneSpec("alexnet", "AlexNet_Weights.IMAGENET1K_V1", (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    # relu1, fire3, fire5, fire7, fire8, fire9, fire10 (torchvision indices 1, 4, 7, 9, 10, 11, 12)
    "squeeze": BackboneSpec(
        "squeezenet1_1", "SqueezeNet1_1_Weights.IMAGENET1K_V1", (1, 4, 7, 9, 10, 11, 12), (64, 128, 256, 384, 384, 512, 512)
    ),
}

# The v0.1 ScalingLayer of the lpips package: maps [-1, 1] images to (roughly) ImageNet-normalised
# inputs, x' = (x - shift) / scale. These are properties of the released metric, not tunables.
LPIPS_V01_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_V01_SCALE = (0.458, 0.448, 0.450)

# Errors torchvision/torch.hub raise when the cached file is missing and the download fails
# (urllib's URLError is an OSError), or when a cached file is truncated or not a state dict.
_WEIGHT_LOAD_ERRORS = (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError)


def torchvision_weights_path(backbone: str) -> Path:
    """Where torch.hub caches (and torchvision looks for) the ImageNet weights of ``backbone``.

    ``<torch.hub.get_dir()>/checkpoints/<file name of the weights URL>``, e.g.
    ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``.
    """
    spec = _backbone_spec(backbone)
    url = torchvision.models.get_weight(spec.weights).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def lpips_package_weights_path(backbone: str, version: str = "0.1") -> Path:
    """Path of the linear-head weights shipped inside the installed ``lpips`` package.

    ``<site-packages>/lpips/weights/v<version>/<backbone>.pth``; UserError when ``lpips`` is
    not installed or the file is not there.
    """
    _backbone_spec(backbone)
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise UserError(
            f"the `lpips` package is not installed, so its shipped v{version} {backbone} linear weights "
            "cannot be loaded; `pip install lpips==0.1.4` or train the heads from scratch"
        )
    path = Path(spec.origin).parent / "weights" / f"v{version}" / f"{backbone}.pth"
    if not path.is_file():
        raise UserError(f"the lpips package has no linear weights file {path} (expected backbone in {sorted(BACKBONES)})")
    return path


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise a feature map over channels, x / (||x||_2 + eps), as ``lpips.normalize_tensor``.

    x: (B, C, H, W) -> (B, C, H, W). Multiplies by the reciprocal of the (B, 1, H, W) norm map
    rather than dividing by it: one full-size operation fewer forward and backward (a training
    loss backpropagates through this at every tap), the same numbers to within an ulp.
    """
    return x * (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps).reciprocal()


def _backbone_spec(backbone: str) -> BackboneSpec:
    if backbone not in BACKBONES:
        raise UserError(f"unknown LPIPS backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[backbone]


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def build_trunk_features(backbone: str, pretrained: bool) -> nn.Sequential:
    """The torchvision ``features`` of ``backbone``, cut after the last LPIPS tap.

    pretrained=True loads the IMAGENET1K_V1 weights through torchvision (from the torch.hub cache,
    see :func:`torchvision_weights_path`, which torchvision fills by downloading when it can).
    When that fails this raises UserError naming the expected file; it never falls back to a
    random trunk. pretrained=False keeps torchvision's own random initialisation.
    """
    spec = _backbone_spec(backbone)
    builder = getattr(torchvision.models, spec.builder)
    if not pretrained:
        model = builder(weights=None)
    else:
        expected = torchvision_weights_path(backbone)
        try:
            model = builder(weights=torchvision.models.get_weight(spec.weights))
        except _WEIGHT_LOAD_ERRORS as err:
            if expected.is_file():
                reason = f"pretrained {spec.builder} weights in {expected} could not be read ({_one_line(err)})"
                fix = "replace the file with the one from torchvision"
            else:
                reason = (
                    f"pretrained {spec.builder} weights not found in {expected} and could not be downloaded "
                    f"({_one_line(err)})"
                )
                fix = "put the file there"
            raise UserError(f"{reason}; pass pretrained_backbone=False (--no-pretrained_backbone) or {fix}") from err
    return model.features[: spec.taps[-1] + 1]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class ScalingLayer(nn.Module):
    """LPIPS v0.1 input scaling, x' = (x - shift) / scale per RGB channel. (B, 3, H, W) -> same."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_V01_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_V01_SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class LinearHead(nn.Module):
    """The per-layer weight w_l of eq. (1): optional dropout, then a bias-free 1x1 conv to one channel.

    The lpips package's ``NetLinLayer``. ``forward`` gives the (B, 1, H, W) weighted map;
    ``pooled`` gives its spatial mean, (B,), computed as w . mean_hw(diff) (the same number, since
    the conv is linear, without materialising the map).
    """

    def __init__(self, channels: int, use_dropout: bool = True, dropout_p: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout_p) if use_dropout else nn.Identity()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1, bias=False)

    def forward(self, diff: torch.Tensor) -> torch.Tensor:
        return self.conv(self.dropout(diff))  # (B, 1, H, W)

    def pooled(self, diff: torch.Tensor) -> torch.Tensor:
        mean_diff = self.dropout(diff).mean(dim=(2, 3))  # (B, C)
        return F.linear(mean_diff, self.conv.weight.flatten(1)).squeeze(1)  # (B,)


class Trunk(nn.Module):
    """A torchvision ``features`` stack that returns the activations at the LPIPS taps.

    Layer names are torchvision's (``features.<i>``), so a torchvision state dict loads directly.
    x: (B, 3, H, W) -> list of (B, C_l, H_l, W_l), one per tap.
    """

    def __init__(self, features: nn.Sequential, taps: Tuple[int, ...]) -> None:
        super().__init__()
        self.features = features
        self.taps = frozenset(taps)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outs.append(x)
        return outs


# --------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------
class LPIPS(nn.Module):
    """Learned perceptual distance between two batches of images in [-1, 1].

    Args:
        backbone: "vgg", "alex" or "squeeze" (torchvision vgg16 / alexnet / squeezenet1_1).
        pretrained_backbone: load the trunk's ImageNet weights (torch.hub cache or download; a
            failure is a UserError, never a random trunk). False: torchvision's random init.
        use_dropout: dropout before each linear head, as the paper trains the heads.
        spatial: return per-pixel distance maps (B, 1, H, W) instead of (B,) distances.
        train_backbone: the trunk gets gradients ("tune"/"scratch"); False freezes it in eval mode ("lin").
        linear_heads: learned per-channel weights (LPIPS); False is the paper's unweighted
            baseline (channel sum of the squared normalised differences).
        dropout_p: dropout probability of the heads (0.5 in the package).
        eps: added to the channel norm when unit-normalising features (1e-10 in the package).
        channels_last: run the trunk in channels_last memory format (faster convolutions on CPU
            with oneDNN and on GPUs with cuDNN; the numbers agree to float rounding).
    """

    def __init__(
        self,
        backbone: str = "vgg",
        pretrained_backbone: bool = True,
        use_dropout: bool = True,
        spatial: bool = False,
        train_backbone: bool = False,
        linear_heads: bool = True,
        dropout_p: float = 0.5,
        eps: float = 1e-10,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        spec = _backbone_spec(backbone)
        self.backbone = backbone
        self.pretrained_backbone = pretrained_backbone
        self.use_dropout = use_dropout
        self.spatial = spatial
        self.train_backbone = train_backbone
        self.linear_heads = linear_heads
        self.dropout_p = dropout_p
        self.eps = eps
        self.channels_last = channels_last
        self.channels = spec.channels

        self.scaling = ScalingLayer()
        self.trunk = Trunk(build_trunk_features(backbone, pretrained_backbone), spec.taps)
        if channels_last:
            self.trunk.to(memory_format=torch.channels_last)
        self.heads = nn.ModuleList(
            [LinearHead(c, use_dropout=use_dropout, dropout_p=dropout_p) for c in spec.channels] if linear_heads else []
        )
        if not train_backbone:
            self.trunk.eval().requires_grad_(False)

    # ---- modes -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LPIPS":
        """Like nn.Module.train, but a frozen trunk stays in eval mode."""
        super().train(mode)
        if not self.train_backbone:
            self.trunk.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer should update: the heads, plus the trunk when train_backbone."""
        yield from self.heads.parameters()
        if self.train_backbone:
            yield from self.trunk.parameters()

    @torch.no_grad()
    def clamp_linear_weights_(self) -> None:
        """Project the head weights onto w >= 0 (call after each optimizer step, as the paper does).

        Only the LPIPS heads are clamped; unlike the package's trainer, SqueezeNet's own 1x1
        convolutions are left alone.
        """
        for head in self.heads:
            head.conv.weight.clamp_(min=0)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Distances between x0 and x1, both (B, 3, H, W) in [-1, 1].

        Returns (B,) distances, or (B, 1, H, W) maps when ``spatial`` (each layer's map upsampled
        bilinearly to (H, W) before summing, as the package does).
        """
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        return self._distance(self._normalized_features(x0, x1), x0.shape[2:])

    def triplet_distances(self, ref: torch.Tensor, p0: torch.Tensor,
                          p1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(d(ref, p0), d(ref, p1)) for BAPPS 2AFC triplets, all (B, 3, H, W) in [-1, 1].

        The same numbers as two ``forward`` calls, from one trunk call on the 3B images (ref, p0,
        p1) instead of 4B (ref's features are computed once): the inner loop of stage-0 training.
        """
        if not ref.shape == p0.shape == p1.shape:
            raise ValueError(f"LPIPS triplet inputs differ in shape: {tuple(ref.shape)}, {tuple(p0.shape)}, "
                             f"{tuple(p1.shape)}")
        batch = ref.shape[0]
        feats = self._features(torch.cat([ref, p0, p1], dim=0))  # each (3B, C_l, h, w)
        d0 = self._distance([(f[:batch], f[batch:2 * batch]) for f in feats], ref.shape[2:])
        d1 = self._distance([(f[:batch], f[2 * batch:]) for f in feats], ref.shape[2:])
        return d0, d1

    def _distance(self, pairs: List[Tuple[torch.Tensor, torch.Tensor]], size: torch.Size) -> torch.Tensor:
        """Eq. (1) from the normalised features of both images at every tap, [((B, C_l, h, w), same)].

        Returns (B,), or (B, 1, *size) maps when ``spatial``.
        """
        total: Optional[torch.Tensor] = None
        for index, (feat0, feat1) in enumerate(pairs):
            diff = (feat0 - feat1).square()  # (B, C, h, w)
            if self.spatial:
                layer_map = self.heads[index](diff) if self.linear_heads else diff.sum(dim=1, keepdim=True)
                value = F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False)
            elif self.linear_heads:
                value = self.heads[index].pooled(diff)  # (B,)
            else:
                value = diff.mean(dim=(2, 3)).sum(dim=1)  # (B,)
            total = value if total is None else total + value
        assert total is not None
        return total

    def _features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Unit-normalised trunk activations at the taps: (N, 3, H, W) -> [(N, C_l, h, w)]."""
        x = self.scaling(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Normalise in float32: under fp16 autocast eps=1e-10 would round to zero.
        return [normalize_channels(feat.float(), self.eps) for feat in self.trunk(x)]

    def _normalized_features(self, x0: torch.Tensor, x1: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Normalised activations of x0 and x1 at each tap: [((B, C_l, h, w), (B, C_l, h, w))].

        Usually one trunk call on both images (2B, 3, H, W): fewer, larger convolutions. As a
        training loss only one side carries a graph (the reconstruction, not the target); in one
        batched call the backward would still compute the input gradient of the whole 2B batch
        through every trunk convolution, so the side without a graph runs separately under
        no_grad instead. That holds only while the trunk is frozen (a trained trunk needs both).
        """
        one_sided = (
            torch.is_grad_enabled()
            and x0.requires_grad != x1.requires_grad
            and not any(p.requires_grad for p in self.trunk.parameters())
        )
        if not one_sided:
            batch = x0.shape[0]
            feats = self._features(torch.cat([x0, x1], dim=0))  # each (2B, C_l, h, w)
            return [(f[:batch], f[batch:]) for f in feats]
        with torch.no_grad():
            fixed = self._features(x1 if x0.requires_grad else x0)
        live = self._features(x0 if x0.requires_grad else x1)
        return list(zip(live, fixed)) if x0.requires_grad else list(zip(fixed, live))

    # ---- weights from the lpips package --------------------------------------------------------
    def load_lpips_package_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the state dict of an ``lpips.LPIPS(net=<same backbone>)`` into this module.

        Maps ``scaling_layer.{shift,scale}`` -> ``scaling.*``, ``net.sliceK.<i>.*`` ->
        ``trunk.features.<i>.*`` (the package keeps torchvision's layer indices) and
        ``linK.model.<j>.weight`` / ``lins.K.model.<j>.weight`` -> ``heads.K.conv.weight``.
        Missing or unexpected keys, or shapes of another backbone, are a UserError.
        """
        mapped: Dict[str, torch.Tensor] = {}
        unknown: List[str] = []
        for key, value in state_dict.items():
            trunk_key = re.fullmatch(r"net\.slice\d+\.(\d+\..+)", key)
            head_key = re.fullmatch(r"(?:lin|lins\.)(\d+)\.model\.\d+\.weight", key)
            if key.startswith("scaling_layer."):
                mapped["scaling." + key[len("scaling_layer.") :]] = value
            elif trunk_key:
                mapped["trunk.features." + trunk_key.group(1)] = value
            elif head_key:
                mapped[f"heads.{head_key.group(1)}.conv.weight"] = value
            else:
                unknown.append(key)
        if unknown:
            raise UserError(f"not an lpips.LPIPS state dict for backbone {self.backbone!r}: unexpected keys {unknown[:5]}")
        self._load_strict(mapped, f"lpips.LPIPS(net={self.backbone!r}) state dict")

    def load_lpips_package_linear_weights(self, version: str = "0.1") -> None:
        """Initialise the heads from the weights shipped in the ``lpips`` package (v0.1 by default).

        Reads ``lpips/weights/v<version>/<backbone>.pth`` of the installed package; the trunk is
        untouched. UserError when the package is not installed or this model has no heads.
        """
        if not self.linear_heads:
            raise UserError("cannot load lpips linear weights into an LPIPS built with linear_heads=False")
        path = lpips_package_weights_path(self.backbone, version)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        mapped = {}
        for key, value in state_dict.items():
            head_key = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key)
            if head_key is None:
                raise UserError(f"unexpected key {key!r} in lpips linear weights {path}")
            mapped[f"heads.{head_key.group(1)}.conv.weight"] = value
        expected = {f"heads.{k}.conv.weight" for k in range(len(self.heads))}
        if set(mapped) != expected:
            raise UserError(f"lpips linear weights {path} hold {sorted(mapped)}, expected {sorted(expected)}")
        with torch.no_grad():
            for key, value in mapped.items():
                self.get_parameter(key).copy_(value)

    def _load_strict(self, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise UserError(f"{what} does not fit LPIPS({self.backbone!r}): missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, value in state_dict.items():
            if own[key].shape != value.shape:
                raise UserError(
                    f"{what} does not fit LPIPS({self.backbone!r}): {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(own[key].shape)}"
                )
        self.load_state_dict(state_dict, strict=True)

    # ---- self-description for checkpoints -------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """The constructor arguments, enough (with the state dict) to rebuild this module."""
        return {
            "backbone": self.backbone,
            "pretrained_backbone": self.pretrained_backbone,
            "use_dropout": self.use_dropout,
            "spatial": self.spatial,
            "train_backbone": self.train_backbone,
            "linear_heads": self.linear_heads,
            "dropout_p": self.dropout_p,
            "eps": self.eps,
            "channels_last": self.channels_last,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], load_pretrained_backbone: bool = False) -> "LPIPS":
        """Rebuild from :meth:`config`'s dict (e.g. stored in a checkpoint).

        The checkpoint's state dict carries every weight, so by default the trunk is NOT loaded
        from ImageNet weights (no cache or network needed): load the state dict afterwards.
        ``load_pretrained_backbone=True`` honours the stored ``pretrained_backbone`` instead.
        Unknown keys or wrongly typed values are a UserError naming the allowed keys.
        """
        types = {
            "backbone": str,
            "pretrained_backbone": bool,
            "use_dropout": bool,
            "spatial": bool,
            "train_backbone": bool,
            "linear_heads": bool,
            "dropout_p": (float, int),
            "eps": (float, int),
            "channels_last": bool,
        }
        unknown = sorted(set(config) - set(types))
        if unknown:
            raise UserError(f"unknown LPIPS config keys {unknown}; allowed: {sorted(types)}")
        for key, value in config.items():
            expected = types[key]
            is_number = isinstance(value, (float, int)) and not isinstance(value, bool)
            if (expected is str or expected is bool) and not isinstance(value, expected):
                raise UserError(f"LPIPS config {key}={value!r}: expected a {expected.__name__}")
            if isinstance(expected, tuple) and not is_number:
                raise UserError(f"LPIPS config {key}={value!r}: expected a number")
        kwargs = dict(config)
        if not load_pretrained_backbone:
            kwargs["pretrained_backbone"] = False
        model = cls(**kwargs)
        model.pretrained_backbone = bool(config.get("pretrained_backbone", True))
        return model


# --------------------------------------------------------------------------------------------
# BAPPS 2AFC ranking head and loss
# --------------------------------------------------------------------------------------------
class RankingHead(nn.Module):
    """Maps two distances to the predicted probability that humans prefer p1 (lpips ``Dist2LogitLayer``).

    Input features per sample: [d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], then
    conv1x1(5 -> mid), LeakyReLU, conv1x1(mid -> mid), LeakyReLU, conv1x1(mid -> 1), sigmoid.
    Parameter names (``model.0/2/4``) equal the package's, so its ``BCERankingLoss().net``
    state dict loads directly.
    d0, d1: (B,) or (B, 1, 1, 1) -> (B,).
    """

    def __init__(self, middle_channels: int = 32, eps: float = 0.1, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.eps = eps
        self.model = nn.Sequential(
            nn.Conv2d(5, middle_channels, kernel_size=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(middle_channels, middle_channels, kernel_size=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(middle_channels, 1, kernel_size=1),
        )

    def logits(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores, (B,)."""
        d0 = d0.reshape(d0.shape[0], 1, 1, 1)
        d1 = d1.reshape(d1.shape[0], 1, 1, 1)
        x = torch.cat([d0, d1, d0 - d1, d0 / (d1 + self.eps), d1 / (d0 + self.eps)], dim=1)  # (B, 5, 1, 1)
        return self.model(x).flatten()  # (B,)

    def forward(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        """Predicted fraction of humans preferring p1, (B,) in (0, 1)."""
        return torch.sigmoid(self.logits(d0, d1))


def two_afc_score(d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
    """Per-triplet BAPPS 2AFC agreement with humans (the package's ``score_2afc_dataset``).

    judge is the fraction of humans who preferred p1. The metric "chooses" p1 when d1 < d0 and
    scores judge, p0 when d0 < d1 and scores 1 - judge, and 0.5 on a tie. All (B,) -> (B,).
    """
    d0, d1, judge = d0.flatten(), d1.flatten(), judge.flatten().to(d0.dtype)
    return (d1 < d0) * judge + (d0 < d1) * (1 - judge) + (d0 == d1) * 0.5


def ranking_loss(
    head: RankingHead, d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Binary cross-entropy between ``head(d0, d1)`` and the human judgement (the package's BCERankingLoss).

    d0, d1: (B,) distances ref<->p0 and ref<->p1; judge: (B,) fraction preferring p1, in [0, 1].
    Computed from logits in float32 (autocast-safe; equals BCE of the sigmoid output).
    Returns (loss, logs) with logs {"loss", "accuracy" (mean 2AFC score of d0, d1)} as detached 0-dim tensors
    (read back to the host only when the trainer logs them).
    """
    judge = judge.flatten().float()
    logits = head.logits(d0.float(), d1.float())
    loss = F.binary_cross_entropy_with_logits(logits.float(), judge)
    logs = {"loss": loss.detach(), "accuracy": two_afc_score(d0.detach(), d1.detach(), judge).mean()}
    return loss, logs


# --------------------------------------------------------------------------------------------
# JND evaluation
# --------------------------------------------------------------------------------------------
def jnd_average_precision(distances: torch.Tensor, same: torch.Tensor) -> float:
    """BAPPS JND score: average precision of ranking pairs by distance for "same" judgements.

    Pairs sorted by increasing distance should list the ones humans called the same first.
    ``same`` is the fraction of humans who judged each pair identical (a soft label), so true
    and false positives accumulate fractions, as in the package's ``score_jnd_dataset``; AP is
    the VOC area under the interpolated precision-recall curve. Unlike the reference code, the
    distances are flattened first: its (N, 1, 1, 1) array is "sorted" along a length-1 axis,
    which leaves the pairs in dataset order.
    distances, same: (N,) (any shape is flattened). Returns a float in [0, 1].
    """
    d = distances.detach().flatten().double().cpu()
    s = same.detach().flatten().double().cpu()
    if d.numel() != s.numel() or d.numel() == 0:
        raise ValueError(f"need as many distances as labels (> 0), got {d.numel()} and {s.numel()}")
    order = torch.argsort(d, stable=True)
    s_sorted = s[order]
    tp = torch.cumsum(s_sorted, 0)
    fp = torch.cumsum(1.0 - s_sorted, 0)
    fn = s.sum() - tp
    precision = tp / (tp + fp).clamp_min(1e-12)
    recall = tp / (tp + fn).clamp_min(1e-12)
    # VOC AP: precision made monotone from the right, integrated over the recall steps.
    mrec = torch.cat([torch.zeros(1, dtype=torch.float64), recall, torch.ones(1, dtype=torch.float64)])
    mpre = torch.cat([torch.zeros(1, dtype=torch.float64), precision, torch.zeros(1, dtype=torch.float64)])
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])
    steps = torch.nonzero(mrec[1:] != mrec[:-1]).flatten()
    return float(((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]).sum())


# --------------------------------------------------------------------------------------------
# The trained metric on disk (stage 0 writes it, stage 1 reads it)
# --------------------------------------------------------------------------------------------
def save_lpips_export(metric: LPIPS, path: Path, ranking_head: Optional[RankingHead] = None,
                      metadata: Optional[Mapping[str, Any]] = None) -> Tuple[Path, Path]:
    """Write the trained metric twice: ``path`` (a torch file with config, weights, ranking head
    and metadata) and ``path`` with suffix ``.safetensors`` (the metric alone, config in its
    metadata), which is what stage 1's ``lpips_checkpoint`` usually names. Both hold every weight,
    trunk included, so loading needs neither a cache nor a network."""
    from modules.export import export_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in metric.state_dict().items()}
    payload = {
        "config": metric.config(),
        "state_dict": state,
        "ranking_head": None if ranking_head is None else {k: v.detach().cpu() for k, v in ranking_head.state_dict().items()},
        # Plain JSON types only: load_lpips_export reads with weights_only=True, which refuses
        # str subclasses such as torch.__version__ (a TorchVersion).
        "metadata": json.loads(json.dumps(dict(metadata or {}))),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    st_path = path.with_suffix(".safetensors")
    export_safetensors(state, st_path, kind="lpips", metadata={"config": metric.config(), **dict(metadata or {})})
    return path, st_path


def load_lpips_export(path: Path) -> Tuple[LPIPS, Dict[str, Any]]:
    """Rebuild a metric written by :func:`save_lpips_export` from either file.

    Returns (metric in eval mode with every parameter frozen, metadata). A missing file, a file
    of another kind or weights that do not fit the stored config are UserErrors naming the file.
    """
    from modules.export import read_export

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: LPIPS checkpoint not found (train one with stage0_lpips_trainer.py)")
    if path.suffix == ".safetensors":
        state, metadata = read_export(path, expected_kind="lpips")
        config = metadata.get("config")
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise UserError(f"{path}: not a readable LPIPS checkpoint ({str(err).splitlines()[0][:160]})") from None
        if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
            raise UserError(f"{path}: not an LPIPS checkpoint written by stage0_lpips_trainer.py")
        state, config, metadata = payload["state_dict"], payload["config"], dict(payload.get("metadata") or {})
    if not isinstance(config, dict):
        raise UserError(f"{path}: no LPIPS config in the file's metadata")
    metric = LPIPS.from_config(config)
    result = metric.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path}: weights do not fit the stored LPIPS config "
                        f"(missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})")
    return metric.eval().requires_grad_(False), metadata
