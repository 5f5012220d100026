"""Compute the latent scale factor of a trained VAE: 1 / std of its latents on a dataset.

Latent diffusion trains the UNet on ``z * scaling_factor`` so that the latents have unit
variance, like the noise they are mixed with (Rombach et al. 2022, sec. 4.3.2 and App. G: "we
rescale the latents by the component-wise standard deviation"; Stable Diffusion's 0.18215 is this
number for its VAE on its data). It depends on the VAE *and* the data, so it is computed here
rather than hard-coded.

Usage (the tutorial's command):

    python compute_vae_scaling.py --path_to_pretrained_weights <VAE.safetensors> \\
      --dataset "celebahq" --path_to_dataset "<DATA>"

  or under ``accelerate launch`` to share the encoding between processes (same result).

- ``--path_to_pretrained_weights``: a stage-1 export (``<working_directory>/model.safetensors``)
  or a diffusers AutoencoderKL folder (``config.json`` + weights, or a pipeline folder with ``vae/``).
- The statistics are over every latent element of ``--num_samples`` images (default: the whole
  dataset), resized by the short side to the VAE's ``img_size`` and center-cropped: posterior
  *samples* for a KL-VAE (what stage 2 trains on), pre-quantization latents for a VQ-VAE. Each
  image's posterior noise is drawn from its own generator seeded by (``--seed``, image index), and
  the per-image moments are gathered (duplicates that pad the last batch across processes are
  dropped) and combined exactly in float64, so any number of processes and any ``--batch_size``
  give the same factor.
- Prints the mean and std of the latents before and after scaling, and stores the factor as the
  ``<dataset>`` entry of ``scaling_factors`` in the export's metadata (our exports; a diffusers
  folder is left as it is). The factor depends on the data, so an export keeps one per dataset:
  running this for another dataset adds its entry and keeps the others (an export written
  before, with a single ``scaling_factor`` + ``scaling_dataset``, is converted to the mapping).
  Stage 2 uses the entry of the dataset it trains on. ``--write_to_config`` also sets
  ``scaling_constants.<dataset>`` in ``--model_config`` (default configs/ldm.yaml), editing only
  that line of the file (its comments stay).

The VAE's network comes from the export's metadata (or the diffusers config.json); a bare
safetensors state dict without that metadata is read with ``--model_config``'s ``vae:`` section,
and weights that do not fit it are an error naming the tensors.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from modules.autoencoder import VQModel
from modules.cli import run_main
from modules.config import dump_yaml, find_config_file, load_yaml, parse_yaml_text
from modules.errors import OneLineArgumentParser, UserError
from modules.image_datasets import build_dataset, dataset_conditioning, images_to_model
from modules.model_config import ldm_config_from_dict, load_ldm_config
from modules.accelerator import build_accelerator
from modules.cli import positive_int
from modules.data_loading import build_dataloader
from modules.export import check_export_kind, read_export_metadata
from modules.metrics import progress_bar
from modules.paths import check_writable_file
from modules.vae_io import (
    LEGACY_SCALING_KEYS,
    SCALING_FACTORS_KEY,
    VAE_EXPORT_KIND,
    load_vae,
    scaling_factors_from_metadata,
    set_export_metadata,
    vae_config_from_metadata,
)

logger = logging.getLogger("ldm")

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_CONFIG = "configs/ldm.yaml"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_pretrained_weights", required=True,
                        help="stage-1 model.safetensors, or a diffusers AutoencoderKL folder")
    parser.add_argument("--dataset", required=True, help="dataset name (celebahq, conceptual_captions, shapes, ...)")
    parser.add_argument("--path_to_dataset", default=None, help="the dataset's folder (optional only for shapes)")
    parser.add_argument("--num_samples", type=positive_int, default=None,
                        help="encode this many images, a seeded random subset (default: all of them)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="images per process per batch")
    parser.add_argument("--img_size", type=positive_int, default=None,
                        help="image side to encode at (default: the VAE config's img_size)")
    parser.add_argument("--write_to_config", action="store_true",
                        help="also store the factor as scaling_constants.<dataset> in --model_config")
    parser.add_argument("--model_config", default=DEFAULT_MODEL_CONFIG,
                        help="model YAML: where --write_to_config writes; its vae: section describes weights "
                             "that carry no config of their own")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior noise and of the --num_samples subset")
    parser.add_argument("--num_workers", type=int, default=4, help="data-loader worker processes per process")
    args = parser.parse_args(argv)
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {args.num_workers}")
    return args



# ----------------------------------------------------------------------------------------
# Latents and their moments
# ----------------------------------------------------------------------------------------

class IndexedImages(Dataset):
    """(index, uint8 image (3, H, W)) pairs of a dataset, so each image's posterior noise can be
    seeded by its index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, torch.Tensor]:
        return index, self.dataset[index]["image"]


def noise_for(indices: torch.Tensor, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal noise (B, *shape), row i drawn from a generator seeded by (seed, indices[i]).

    The draw of an image depends on nothing else (not the batch, not the process), which makes
    the statistics independent of how the data is split.
    """
    rows = []
    for index in indices.tolist():
        state = int(np.random.SeedSequence([seed, int(index)]).generate_state(1, dtype=np.uint64)[0])
        generator = torch.Generator().manual_seed(state)
        rows.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(rows)


@torch.no_grad()
def encode_latents(model: torch.nn.Module, images: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """The latents the diffusion model would see, (B, C, h, w) float32, of float images in [-1, 1].

    KL: a posterior sample, mean + std * eps (Kingma & Welling 2014, eq. 10) with eps from
    :func:`noise_for`. VQ: the pre-quantization latents (the encoder's output after quant_conv).
    """
    if isinstance(model, VQModel):
        return model.encode(images).float()
    return latent_sample(model.encode(images), indices, seed)


def latent_sample(posterior, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """mean + std * eps of a KL posterior, eps from :func:`noise_for` (image i's draw depends on (seed, i) only)."""
    eps = noise_for(indices, posterior.mean.shape[1:], seed).to(posterior.mean.device, posterior.mean.dtype)
    return (posterior.mean + posterior.std * eps).float()


def per_sample_moments(latents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum of squared deviations from that mean) of each sample's elements, both (B,) float64."""
    flat = latents.double().flatten(1)
    mean = flat.mean(dim=1)
    m2 = (flat - mean[:, None]).square().sum(dim=1)
    return mean, m2


def combine_moments(means: torch.Tensor, m2s: torch.Tensor, elements_per_sample: int) -> Tuple[float, float]:
    """Mean and (population) std of all elements from per-sample moments, exactly (Chan et al. 1979):
    M2 = sum_i M2_i + n sum_i (mean_i - mean)^2, with n elements per sample."""
    mean = means.mean()
    m2 = m2s.sum() + elements_per_sample * (means - mean).square().sum()
    variance = m2 / (elements_per_sample * means.numel())
    return float(mean), float(variance.sqrt())


# ----------------------------------------------------------------------------------------
# Writing the factor into a model config, keeping the file as the user wrote it
# ----------------------------------------------------------------------------------------

def _format_factor(value: float) -> str:
    return repr(float(value))


def set_scaling_constant_text(text: str, dataset: str, value: float) -> Optional[str]:
    """``text`` (a model YAML) with ``scaling_constants.<dataset>`` set to ``value``, every other
    line untouched (a trailing comment on the edited line is kept). None when the section is not
    in block style (``scaling_constants: {...}``): the caller then rewrites the whole file."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^scaling_constants\s*:\s*(#.*)?$", line.rstrip("\r\n"))),
                 None)
    if start is None:
        if re.search(r"^scaling_constants\s*:", text, flags=re.M):
            return None  # flow style on one line
        tail = "" if text.endswith("\n") or not text else "\n"
        return text + f"{tail}scaling_constants:\n  {dataset}: {_format_factor(value)}\n"
    indent: Optional[int] = None
    insert_at = start + 1
    key = re.compile(rf"^(?P<indent>[ ]+){re.escape(dataset)}(?P<sep>\s*:\s*)(?P<value>[^#\r\n]*?)(?P<comment>\s*#.*)?(?P<eol>\r?\n)?$")
    for j in range(start + 1, len(lines)):
        line = lines[j]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        lead = len(line) - len(line.lstrip(" "))
        if lead == 0:
            break  # the next top-level key
        indent = lead if indent is None else indent
        match = key.match(line)
        if match and len(match.group("indent")) == indent:
            lines[j] = (f"{match.group('indent')}{dataset}{match.group('sep')}{_format_factor(value)}"
                        f"{match.group('comment') or ''}{match.group('eol') or ''}")
            return "".join(lines)
        insert_at = j + 1
    if insert_at > 0 and not lines[insert_at - 1].endswith("\n"):
        lines[insert_at - 1] += "\n"
    lines.insert(insert_at, f"{' ' * (indent or 2)}{dataset}: {_format_factor(value)}\n")
    return "".join(lines)


def write_scaling_constant(path: Path, dataset: str, value: float) -> None:
    """Set ``scaling_constants.<dataset>`` in the model YAML at ``path`` (atomically).

    The file is edited in place (one line changed or added) and the result is checked to parse
    to exactly the old content plus the new value; where that cannot be done (flow-style
    section), the file is rewritten from its parsed content and the loss of comments is logged.
    """
    text = path.read_text(encoding="utf-8")
    before = parse_yaml_text(text, str(path)) or {}
    expected = dict(before)
    expected["scaling_constants"] = {**(before.get("scaling_constants") or {}), dataset: float(value)}
    ldm_config_from_dict(expected, str(path))  # the result must still be a valid model config
    edited = set_scaling_constant_text(text, dataset, value)
    tmp = path.with_name(path.name + ".tmp")
    if edited is not None and parse_yaml_text(edited, str(path)) == expected:
        tmp.write_text(edited, encoding="utf-8")
    else:
        logger.warning("%s: scaling_constants is not a block mapping; rewriting the file from its parsed content "
                       "(its comments are not kept)", path)
        dump_yaml(expected, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> float:
    args = parse_args(argv)

    # -- config -----------------------------------------------------------------------
    dataset_conditioning(args.dataset)  # unknown names fail here, listing the known ones
    weights = Path(args.path_to_pretrained_weights)
    model_config_path = find_config_file(args.model_config, REPO_ROOT)
    # The export's own config describes its network; a weights file without one (a bare state
    # dict) is read with the model config's vae: section, and must fit it.
    fallback_vae = None
    if weights.is_file():
        check_writable_file(weights, "--path_to_pretrained_weights")  # its metadata is rewritten at the end
        export_metadata = read_export_metadata(weights)
        check_export_kind(export_metadata, weights, VAE_EXPORT_KIND, "--path_to_pretrained_weights")
        scaling_factors_from_metadata(export_metadata, weights)  # a broken entry fails now, not after encoding
        if vae_config_from_metadata(export_metadata, weights) is None:
            fallback_vae = load_ldm_config(model_config_path).vae
    if args.write_to_config:  # fail before the long encoding, not after it
        load_yaml(model_config_path)
        check_writable_file(model_config_path, "--model_config")

    # -- accelerator ------------------------------------------------------------------
    accelerator = build_accelerator("no", 1, args.seed)

    # -- model --------------------------------------------------------------------------
    model, vae_config, metadata = load_vae(weights, fallback_vae)
    model = model.to(accelerator.device).eval().requires_grad_(False)
    img_size = args.img_size or vae_config.img_size
    if img_size % vae_config.downsample_factor != 0:
        raise UserError(f"--img_size {img_size} is not a multiple of the VAE's downsampling factor "
                        f"{vae_config.downsample_factor}")

    # -- data ---------------------------------------------------------------------------
    dataset: Dataset = build_dataset(args.dataset, args.path_to_dataset, img_size, crop="center", random_flip=False)
    if args.num_samples is not None and args.num_samples < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
        dataset = Subset(dataset, order[: args.num_samples].sort().values.tolist())
    loader = build_dataloader(IndexedImages(dataset), args.batch_size, shuffle=False, num_workers=args.num_workers,
                              drop_last=False, seed=args.seed)
    loader = accelerator.prepare(loader)

    # -- encode -------------------------------------------------------------------------
    means: List[torch.Tensor] = []
    m2s: List[torch.Tensor] = []
    latent_shape: Optional[Tuple[int, ...]] = None
    bar = progress_bar(accelerator, len(loader), desc="encode")
    for indices, images in loader:
        images = images_to_model(images, accelerator.device)  # uint8 (B, 3, H, W) -> [-1, 1] on the device
        latents = encode_latents(model, images, indices, args.seed)
        latent_shape = tuple(latents.shape[1:])
        mean, m2 = per_sample_moments(latents)
        # gather_for_metrics drops the samples that pad the last batch of the last processes.
        means.append(accelerator.gather_for_metrics(mean).cpu())
        m2s.append(accelerator.gather_for_metrics(m2).cpu())
        bar.update(1)
    bar.close()
    assert latent_shape is not None
    all_means, all_m2s = torch.cat(means), torch.cat(m2s)
    elements = math.prod(latent_shape)
    mean, std = combine_moments(all_means, all_m2s, elements)
    if not std > 0:
        raise UserError(f"{weights}: the latents of {args.dataset} have std {std}; the VAE's encoder is degenerate")
    factor = 1.0 / std

    # -- report and write ------------------------------------------------------------------
    if accelerator.is_main_process:
        kind = "pre-quantization latents" if isinstance(model, VQModel) else "posterior samples"
        print(f"{weights} on {args.dataset}: {len(all_means)} images at {img_size}px, latents "
              f"{' x '.join(map(str, latent_shape))} ({kind})")
        print(f"  before scaling: mean {mean:.6f}  std {std:.6f}")
        print(f"  scaling_factor = 1 / std = {factor:.8g}")
        print(f"  after scaling:  mean {mean * factor:.6f}  std {std * factor:.6f}")
        if weights.is_file():
            # Read again now: another run may have added its dataset's entry while this one encoded.
            factors = scaling_factors_from_metadata(read_export_metadata(weights), weights)
            factors[args.dataset] = factor
            set_export_metadata(weights, {SCALING_FACTORS_KEY: factors}, remove=LEGACY_SCALING_KEYS)
            print(f"  wrote scaling_factors.{args.dataset} into the metadata of {weights} "
                  f"(it has factors for {', '.join(sorted(factors))})")
        else:
            shipped = metadata.get("scaling_factor")
            print(f"  (a diffusers folder is not modified; its config.json says scaling_factor {shipped})")
        if args.write_to_config:
            write_scaling_constant(model_config_path, args.dataset, factor)
            print(f"  wrote scaling_constants.{args.dataset}: {factor:.8g} into {model_config_path}")
    accelerator.wait_for_everyone()
    return factor


if __name__ == "__main__":
    run_main(main)
