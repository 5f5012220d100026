"""modules/latent_cache.py: epoch-keyed flips (also in persistent DataLoader workers), the cache's
16-bit moments, its text (tokens and trimmed text-encoder states), its fingerprint, and a cache
built by two processes equal to one built by one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from modules.autoencoder import VAEConfig, build_autoencoder
from modules.batching import Collate
from modules.data_loading import EpochSampler
from modules.errors import UserError
from modules.image_datasets import ClassFolderDataset, ShapesDataset, build_dataset, images_to_model
from modules.latent_cache import (
    CachedLatentDataset,
    FlipAugmented,
    build_latent_cache,
    cache_fingerprint,
    cache_is_complete,
    flip_decision,
    resolve_cache_dtype,
    vae_moments,
)
from modules.shapes import COLOR_NAMES, SHAPE_NAMES, render_shape, sample_specs
from modules.text_encoder import TextEncoder, build_tiny_clip

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
IMG = 16  # the VAE halves it: (4, 8, 8) latents
LATENT = (4, 8, 8)
CLIP_LEN = 16


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = VAEConfig(img_size=IMG, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                           residual_layers_per_block=1, attention_layers=0)
        return build_autoencoder(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    words = list(COLOR_NAMES) + list(SHAPE_NAMES) + ["a", "on", "background"]
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), [" ".join(words)], hidden_size=32, layers=1, heads=2,
                           max_position_embeddings=CLIP_LEN)


@pytest.fixture(scope="module")
def encoder(clip) -> TextEncoder:
    return TextEncoder(clip)


def build(tmp_path: Path, dataset, name: str = "cache", mixed_precision: str = "no", **kwargs) -> Path:
    from accelerate.state import AcceleratorState

    options = dict(flips=True, cache_dtype="float32", batch_size=2)
    options.update(kwargs)
    AcceleratorState._reset_state(reset_partial_state=True)  # each build may use another mixed precision
    return build_latent_cache(Accelerator(cpu=True, mixed_precision=mixed_precision), dataset, tiny_vae(),
                              tmp_path / name, {"dataset": "test"}, LATENT, **options)


# ----------------------------------------------------------------------------------------
# Flips keyed by (epoch, index)
# ----------------------------------------------------------------------------------------

def test_flip_decision_is_a_fair_coin_redrawn_every_epoch():
    flips = [flip_decision(7, e, i) for e in range(4) for i in range(500)]
    assert 0.45 < np.mean(flips) < 0.55
    assert flips[:500] != flips[500:1000]


def test_flip_augmented_takes_epoch_index_keys_only():
    base = ShapesDataset(num_images=6, img_size=IMG, seed=1)
    wrapped = FlipAugmented(base, seed=7)
    assert not hasattr(wrapped, "set_epoch") and not hasattr(wrapped, "epoch") and wrapped.epoch_keyed
    for epoch in range(3):
        for i in range(6):
            plain, item = base[i]["image"], wrapped[(epoch, i)]["image"]
            assert item.dtype == torch.uint8
            assert torch.equal(item, plain.flip(-1) if flip_decision(7, epoch, i) else plain)
    assert torch.equal(wrapped[[2, 3]]["image"], wrapped[(2, 3)]["image"])  # a list pair too
    with pytest.raises(TypeError, match=r"\(epoch, index\)"):
        wrapped[3]
    assert torch.equal(FlipAugmented(base, seed=7, enabled=False)[(0, 1)]["image"], base[1]["image"])


def test_flips_follow_the_epoch_in_persistent_workers():
    """The defect: persistent workers kept the epoch they were forked with, so every epoch
    repeated epoch 0's flips. With the epoch in each key they follow the sampler."""
    base = ShapesDataset(num_images=8, img_size=IMG, seed=2)
    wrapped = FlipAugmented(base, seed=11)
    sampler = EpochSampler(len(base), seed=0, shuffle=False)
    loader = DataLoader(wrapped, batch_size=4, sampler=sampler, num_workers=2, persistent_workers=True,
                        collate_fn=Collate())
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        images = torch.cat([batch["image"] for batch in loader])  # (8, 3, H, W)
        mirrored = [torch.equal(images[i], base[i]["image"].flip(-1)) for i in range(8)]
        assert mirrored == [flip_decision(11, epoch, i) for i in range(8)]
        seen.append(mirrored)
    assert seen[0] != seen[1] or seen[1] != seen[2]


def test_cached_and_on_the_fly_flips_agree(tmp_path):
    """Both paths mirror the same images in the same epochs (flip_decision of seed, epoch, index)."""
    for c, name in enumerate(["cat", "dog"]):
        for i in range(3):
            path = tmp_path / "classes" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render_shape(sample_specs(i + 1, 2 + c)[i], IMG).save(path)
    base = build_dataset("imagenet", tmp_path / "classes", IMG)
    assert isinstance(base, ClassFolderDataset)
    wrapped = FlipAugmented(base, seed=7)
    moments = np.zeros((len(base), 2, 2, 1, 1, 1), dtype=np.float32)
    moments[:, 1] = 1.0  # view 1 (mirror) marked by ones
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "moments.npy", moments)
    np.save(cache / "labels.npy", np.array([base[i]["label"] for i in range(len(base))]))
    (cache / "meta.json").write_text(json.dumps({"shape": list(moments.shape), "flips": True}))
    cached = CachedLatentDataset(cache, seed=7, random_flip=True)
    assert not hasattr(cached, "set_epoch") and not hasattr(cached, "epoch") and cached.epoch_keyed
    for epoch in range(3):
        for i in range(len(base)):
            plain, item = base[i]["image"], wrapped[(epoch, i)]["image"]
            mirrored = torch.equal(item, plain.flip(-1)) and not torch.equal(item, plain)
            assert mirrored == bool(cached[(epoch, i)]["latent_mean"].item()) == flip_decision(7, epoch, i)
            assert cached[(epoch, i)]["label"] == base[i]["label"]
    with pytest.raises(TypeError, match=r"\(epoch, index\)"):
        cached[0]


# ----------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------

def test_resolve_cache_dtype():
    assert resolve_cache_dtype("auto", "bf16") == "float16"
    assert resolve_cache_dtype("auto", "fp16") == "float16"
    assert resolve_cache_dtype("auto", "no") == "float32"
    assert resolve_cache_dtype("float32", "bf16") == "float32"
    assert resolve_cache_dtype("float16", "no") == "float16"
    with pytest.raises(UserError, match="latent_cache_dtype must be one of auto, float32, float16"):
        resolve_cache_dtype("bfloat16", "bf16")


def test_auto_stores_16_bit_moments_under_mixed_precision(tmp_path):
    dataset = ShapesDataset(num_images=3, img_size=IMG, seed=4)
    full = build(tmp_path, dataset, "full", cache_dtype="auto", mixed_precision="no")
    half = build(tmp_path, dataset, "half", cache_dtype="auto", mixed_precision="bf16")
    assert np.load(full / "moments.npy").dtype == np.float32
    assert np.load(half / "moments.npy").dtype == np.float16
    assert (half / "moments.npy").stat().st_size < 0.6 * (full / "moments.npy").stat().st_size
    assert json.loads((half / "meta.json").read_text())["fingerprint"]["cache_dtype"] == "float16"
    sample = CachedLatentDataset(half, seed=0, random_flip=True)[(0, 1)]
    assert sample["latent_mean"].dtype == torch.float32  # served as float32 whatever the storage


def test_vae_moments_refuses_uint8_images():
    image = ShapesDataset(num_images=1, img_size=IMG, seed=0)[0]["image"][None]  # uint8
    with pytest.raises(TypeError, match="images_to_model"):
        vae_moments(tiny_vae(), image)
    mean, std = vae_moments(tiny_vae(), images_to_model(image, "cpu"))
    assert mean.shape == (1, *LATENT) and bool((std > 0).all())


# ----------------------------------------------------------------------------------------
# Text in the cache
# ----------------------------------------------------------------------------------------

def test_cache_keeps_tokens_and_trimmed_text_encoder_states(tmp_path, encoder):
    dataset = ShapesDataset(num_images=5, img_size=IMG, seed=3)
    captions = [dataset[i]["caption"] for i in range(5)]
    cache = build(tmp_path, dataset, cache_dtype="float16", text_encoder=encoder)
    names = sorted(p.name for p in cache.iterdir())
    assert names == ["attention_mask.npy", "caption_offsets.npy", "captions.bin", "input_ids.npy", "meta.json",
                     "moments.npy", "text_embeddings.npy", "text_offsets.npy"]
    tokens = encoder.tokenize(captions)
    lengths = tokens.attention_mask.sum(dim=1)
    assert np.array_equal(np.load(cache / "input_ids.npy"), tokens.input_ids.numpy())
    assert np.array_equal(np.load(cache / "attention_mask.npy"), tokens.attention_mask.bool().numpy())
    offsets = np.load(cache / "text_offsets.npy")
    assert offsets.tolist() == [0] + np.cumsum(lengths.numpy()).tolist()
    text = np.load(cache / "text_embeddings.npy")
    assert text.dtype == np.float16 and text.shape == (int(lengths.sum()), 32)  # real tokens only, 16-bit
    with torch.no_grad():
        hidden, _ = encoder(captions)  # (5, L, 32)
    cached = CachedLatentDataset(cache, seed=0, random_flip=True)
    for i in range(5):
        sample = cached[(1, i)]
        assert sample["caption"] == captions[i]
        assert torch.equal(sample["input_ids"], tokens.input_ids[i])
        assert sample["input_ids"].dtype == sample["attention_mask"].dtype == torch.int64
        states = sample["text_embeddings"]
        assert states.dtype == torch.float16 and states.shape == (int(lengths[i]), 32)
        torch.testing.assert_close(states.float(), hidden[i, : int(lengths[i])], atol=2e-3, rtol=1e-3)
    batch = Collate()([cached[(0, i)] for i in range(5)])
    assert batch["text_embeddings"].shape == (5, int(lengths.max()), 32)
    assert torch.equal(batch["text_embeddings_mask"], tokens.attention_mask.bool()[:, : int(lengths.max())])
    assert batch["latent_mean"].shape == (5, *LATENT) and batch["attention_mask"].dtype == torch.bool


def test_cache_tokenizes_once_at_build_time_without_an_encoder(tmp_path, encoder):
    dataset = ShapesDataset(num_images=3, img_size=IMG, seed=3)
    cache = build(tmp_path, dataset, tokenizer=encoder.caption_tokenizer, flips=False)
    assert (cache / "input_ids.npy").is_file() and not (cache / "text_embeddings.npy").exists()
    sample = CachedLatentDataset(cache, seed=0, random_flip=False)[(0, 2)]
    assert torch.equal(sample["input_ids"], encoder.tokenize([dataset[2]["caption"]]).input_ids[0])
    assert "text_embeddings" not in sample
    # Neither tokenizer nor encoder: the captions only, as before.
    plain = build(tmp_path, dataset, "plain", flips=False)
    assert sorted(p.name for p in plain.iterdir()) == ["caption_offsets.npy", "captions.bin", "meta.json",
                                                       "moments.npy"]


def test_cache_keeps_the_datasets_pre_encoded_text(tmp_path, encoder):
    """A prep_cc.py output with bfloat16 trimmed embeddings: stored ids and states go into the cache."""
    import datasets

    from modules.image_datasets import CaptionedArrowDataset
    from prep_cc import build_features, stored_text_rows

    specs = sample_specs(4, 6)
    captions = [s.caption for s in specs]
    tokens = encoder.tokenize(captions)
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    with torch.no_grad():
        hidden, _ = encoder.encode(tokens.input_ids, tokens.attention_mask)
    hidden = hidden.bfloat16()
    rows = {"image": [render_shape(s, IMG) for s in specs], "caption": captions,
            "input_ids": tokens.input_ids.int().tolist(), "attention_mask": tokens.attention_mask.tolist(),
            "text_embeddings": stored_text_rows(hidden, lengths),
            "key": [str(i) for i in range(4)], "url": [""] * 4, "width": [IMG] * 4, "height": [IMG] * 4}
    datasets.Dataset.from_dict(rows, features=build_features(CLIP_LEN, 32, "bfloat16")).save_to_disk(
        str(tmp_path / "cc"))
    dataset = CaptionedArrowDataset(tmp_path / "cc")
    cache = build(tmp_path, dataset, cache_dtype="float32")
    cached = CachedLatentDataset(cache, seed=0, random_flip=True)
    for i in range(4):
        sample = cached[(0, i)]
        assert torch.equal(sample["input_ids"], tokens.input_ids[i])
        assert torch.equal(sample["text_embeddings"], hidden[i, : lengths[i]].float())  # bf16 -> float32 exactly


def test_fingerprint_includes_the_text_encoder_and_tokenizer(tmp_path, encoder, clip):
    dataset = ShapesDataset(num_images=2, img_size=IMG, seed=3)
    cache = build(tmp_path, dataset, text_encoder=encoder, flips=False)
    stored = json.loads((cache / "meta.json").read_text())["fingerprint"]
    assert stored == json.loads(json.dumps(cache_fingerprint({"dataset": "test"}, "float32", encoder,
                                                             encoder.caption_tokenizer)))
    assert stored["text_encoder"]["name"] == str(clip) and len(stored["text_encoder"]["weights"]) == 32
    assert cache_is_complete(cache, stored)
    other = TextEncoder(build_tiny_clip(tmp_path / "other_clip", ["a red circle"], hidden_size=32, layers=1, heads=2,
                                        max_position_embeddings=CLIP_LEN, seed=1))
    assert not cache_is_complete(cache, cache_fingerprint({"dataset": "test"}, "float32", other,
                                                          other.caption_tokenizer))
    # A build with another text encoder replaces the cache instead of reusing it.
    text_before = np.load(cache / "text_embeddings.npy")
    build(tmp_path, dataset, text_encoder=other, flips=False)
    assert not np.array_equal(np.load(cache / "text_embeddings.npy"), text_before)


# ----------------------------------------------------------------------------------------
# Two processes build what one builds
# ----------------------------------------------------------------------------------------

BUILD_SCRIPT = """
import sys
import torch
from accelerate import Accelerator
from modules.autoencoder import VAEConfig, build_autoencoder
from modules.image_datasets import ShapesDataset
from modules.latent_cache import build_latent_cache
from modules.text_encoder import TextEncoder

out, clip, vae_path = sys.argv[1:4]
config = VAEConfig(img_size=16, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                   residual_layers_per_block=1, attention_layers=0)
vae = build_autoencoder(config)
vae.load_state_dict(torch.load(vae_path))
vae.eval().requires_grad_(False)
build_latent_cache(Accelerator(cpu=True), ShapesDataset(5, 16, seed=3), vae, out, {"dataset": "shapes"}, (4, 8, 8),
                   flips=True, cache_dtype="float16", batch_size=2, text_encoder=TextEncoder(clip))
"""


def test_two_processes_build_the_cache_one_process_builds(tmp_path, clip):
    script = tmp_path / "build_cache.py"
    script.write_text(BUILD_SCRIPT)
    torch.save(tiny_vae().state_dict(), tmp_path / "vae.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(clip), str(tmp_path / "vae.pt")]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          str(script), str(tmp_path / "two"), *args], cwd=REPO, env={**env, "ACCELERATE_USE_CPU": "1"},
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())  # no part files left behind
    assert "text_embeddings.npy" in names and "input_ids.npy" in names
    for name in names:
        a, b = tmp_path / "one" / name, tmp_path / "two" / name
        if name in ("moments.npy", "text_embeddings.npy"):  # other batches: equal up to float rounding
            x, y = np.load(a), np.load(b)
            assert x.dtype == y.dtype == np.float16 and x.shape == y.shape
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3, rtol=2e-3)
        else:
            assert a.read_bytes() == b.read_bytes(), name
