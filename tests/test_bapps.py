"""modules.bapps: the synthetic generator's layout and judgements, dataset reading, and every bad-input error."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.bapps import (
    JND_CATEGORIES,
    SYNTHETIC_DISTORTIONS,
    TWOAFC_CATEGORIES,
    JNDDataset,
    TwoAFCDataset,
    write_synthetic_bapps,
)
from modules.errors import UserError

SIZE = 24


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("bapps")
    samples = write_synthetic_bapps(root, num_train_per_category=2, num_val_per_category=12,
                                    num_jnd_per_category=3, img_size=SIZE, seed=7)
    return root, samples


@pytest.fixture
def copy_of(synthetic, tmp_path):
    """A private copy of the synthetic dataset that a test may break."""
    root = tmp_path / "bapps"
    shutil.copytree(synthetic[0], root)
    return root


def save_png(path: Path, rgba: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba.astype(np.uint8), mode="RGBA").save(path)


def save_judge(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([value], dtype=np.float32))


# ---- generator -------------------------------------------------------------------------------------
def test_generator_writes_bapps_layout(synthetic):
    root, samples = synthetic
    assert sorted(p.name for p in root.iterdir()) == ["2afc", "jnd"]
    for split, categories in TWOAFC_CATEGORIES.items():
        assert sorted(p.name for p in (root / "2afc" / split).iterdir()) == sorted(categories)
    assert sorted(p.name for p in (root / "jnd" / "val").iterdir()) == sorted(JND_CATEGORIES["val"])

    counts = {"train": 2, "val": 12}
    for split, categories in TWOAFC_CATEGORIES.items():
        for category in categories:
            folder = root / "2afc" / split / category
            assert sorted(p.name for p in folder.iterdir()) == ["judge", "p0", "p1", "ref"]
            stems = [f"{i:06d}" for i in range(counts[split])]
            for role in ("ref", "p0", "p1"):
                assert sorted(p.name for p in (folder / role).iterdir()) == [s + ".png" for s in stems]
            assert sorted(p.name for p in (folder / "judge").iterdir()) == [s + ".npy" for s in stems]
    jnd = root / "jnd" / "val" / "cnn"
    assert sorted(p.name for p in jnd.iterdir()) == ["p0", "p1", "same"]
    assert sorted(p.name for p in (jnd / "same").iterdir()) == ["000000.npy", "000001.npy", "000002.npy"]

    with Image.open(root / "2afc" / "val" / "color" / "p1" / "000003.png") as img:
        assert img.mode == "RGBA" and img.size == (SIZE, SIZE)
        assert np.all(np.asarray(img)[..., 3] == 255)
    judge = np.load(root / "2afc" / "train" / "mix" / "judge" / "000001.npy")
    assert judge.dtype == np.float32 and judge.shape == (1,)
    assert len(samples) == 3 * 2 + 6 * 12 + 2 * 3


def test_generator_judgements_follow_the_perceptual_model(synthetic):
    _, samples = synthetic
    for sample in samples:
        stored = float(np.load(sample.files["judge" if sample.subset == "2afc" else "same"])[0])
        assert stored == sample.value
        num_judges = {("2afc", "train"): 2, ("2afc", "val"): 5, ("jnd", "val"): 3}[(sample.subset, sample.split)]
        assert math.isclose(sample.value * num_judges, round(sample.value * num_judges), abs_tol=1e-6)
        # "Known strength": D is the sum of weight * strength of the distortions applied.
        for applied, distance in zip(sample.distortions, sample.distances):
            assert math.isclose(distance, sum(SYNTHETIC_DISTORTIONS[n].weight * s for n, s in applied), abs_tol=1e-9)
            assert len(applied) == (0 if sample.subset == "jnd" and distance == 0 else 2 if sample.category == "mix" else 1)
        d0, d1 = sample.distances
        if sample.subset == "2afc":
            assert math.isclose(sample.probability, 1 / (1 + math.exp(-(d0 - d1) / 0.1)), rel_tol=1e-9)
    # Over the validation triplets, humans side with the perceptually closer image.
    val = [s for s in samples if s.subset == "2afc" and s.split == "val"]
    agree = [(s.value - 0.5) * (s.distances[0] - s.distances[1]) > 0 for s in val if s.value != 0.5]
    assert np.mean(agree) > 0.75


def test_generator_is_deterministic_per_seed(tmp_path):
    args = dict(num_train_per_category=1, num_val_per_category=1, num_jnd_per_category=1, img_size=16)
    write_synthetic_bapps(tmp_path / "a", seed=3, **args)
    write_synthetic_bapps(tmp_path / "b", seed=3, **args)
    write_synthetic_bapps(tmp_path / "c", seed=4, **args)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 * 4 + 6 * 4 + 2 * 3
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


# ---- reading ---------------------------------------------------------------------------------------
def test_two_afc_dataset_reads_synthetic(synthetic):
    root, samples = synthetic
    dataset = TwoAFCDataset(root, "val", img_size=16)
    assert len(dataset) == 6 * 12 and dataset.categories == TWOAFC_CATEGORIES["val"]
    item = dataset[12 * 2 + 5]  # third category ("deblur"), sixth triplet
    assert item["category"] == 2
    assert item["ref"].shape == item["p0"].shape == item["p1"].shape == (3, 16, 16)
    assert item["judge"].dtype == torch.float32 and item["judge"].shape == ()
    expected = next(s for s in samples if s.subset == "2afc" and s.split == "val" and s.category == "deblur" and s.index == 5)
    assert item["judge"].item() == expected.value
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["ref"].shape == (4, 3, 16, 16) and batch["judge"].shape == (4,) and batch["category"].shape == (4,)
    assert np.array_equal(dataset.category_indices(), np.repeat(np.arange(6), 12))

    subset = TwoAFCDataset(root, "train", categories=["mix"], img_size=SIZE)
    assert len(subset) == 2 and subset[1]["category"] == 0


def test_jnd_dataset_reads_synthetic(synthetic):
    root, samples = synthetic
    dataset = JNDDataset(root, img_size=SIZE, img_range="zero_to_one")
    assert len(dataset) == 6
    item = dataset[4]  # "traditional", index 1
    assert set(item) == {"p0", "p1", "same", "category"} and item["category"] == 1
    expected = next(s for s in samples if s.subset == "jnd" and s.category == "traditional" and s.index == 1)
    assert item["same"].item() == expected.value
    with Image.open(expected.files["p0"]) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    assert torch.allclose(item["p0"], torch.from_numpy(rgb).permute(2, 0, 1))


def test_pairs_by_sorted_index_drops_alpha_and_scales(tmp_path):
    category = tmp_path / "2afc" / "train" / "cnn"
    # Different names per folder: files pair by their position in sorted order, not by name.
    for i, (ref_name, p0_name) in enumerate([("b.png", "x2.png"), ("a.png", "x1.png")]):
        value = 200 if ref_name == "b.png" else 100
        rgba = np.zeros((8, 8, 4))
        rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = value, 0, 255, 0  # fully transparent
        save_png(category / "ref" / ref_name, rgba)
        save_png(category / "p0" / p0_name, rgba)
        save_png(category / "p1" / f"{i}.png", rgba)
        save_judge(category / "judge" / f"{1 - i}.npy", 0.25 if ref_name == "a.png" else 1.0)
    dataset = TwoAFCDataset(tmp_path, "train", categories=["cnn"], img_size=8, img_range="minus_one_to_one")
    first = dataset[0]  # a.png, x1.png, 0.png, 0.npy
    assert first["ref"].shape == (3, 8, 8)
    assert torch.allclose(first["ref"][0], torch.full((8, 8), 100 / 255 * 2 - 1))
    assert torch.allclose(first["ref"][1], torch.full((8, 8), -1.0))  # the RGB values, alpha ignored
    assert torch.allclose(first["ref"][2], torch.full((8, 8), 1.0))
    assert torch.equal(first["p0"], first["ref"])
    assert first["judge"].item() == 0.25
    second = dataset[1]
    assert torch.allclose(second["ref"][0], torch.full((8, 8), 200 / 255 * 2 - 1))
    assert second["judge"].item() == 1.0
    zero_one = TwoAFCDataset(tmp_path, "train", categories=["cnn"], img_size=8, img_range="zero_to_one")
    assert torch.allclose(zero_one[1]["ref"][0], torch.full((8, 8), 200 / 255))


def test_resize_is_pil_bilinear(synthetic):
    root, _ = synthetic
    path = root / "2afc" / "val" / "cnn" / "ref" / "000000.png"
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB").resize((10, 10), Image.BILINEAR), dtype=np.float32) / 255.0
    item = TwoAFCDataset(root, "val", categories=["cnn"], img_size=10, img_range="zero_to_one")[0]
    assert torch.allclose(item["ref"], torch.from_numpy(expected).permute(2, 0, 1))


# ---- bad inputs: one-line UserErrors naming the path -----------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nowhere")):
        TwoAFCDataset(tmp_path / "nowhere")


def test_root_without_2afc(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path}.*2afc"):
        TwoAFCDataset(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path}.*jnd"):
        JNDDataset(tmp_path)


def test_missing_split_and_category(copy_of):
    shutil.rmtree(copy_of / "2afc" / "val")
    with pytest.raises(UserError, match=str(copy_of / "2afc" / "val")):
        TwoAFCDataset(copy_of, "val")
    with pytest.raises(UserError, match=str(copy_of / "2afc" / "train" / "superres")):
        TwoAFCDataset(copy_of, "train", categories=["superres"])
    with pytest.raises(UserError, match="unknown BAPPS 2afc split"):
        TwoAFCDataset(copy_of, "test")


def test_count_mismatch_names_the_counts(copy_of):
    (copy_of / "2afc" / "train" / "cnn" / "p1" / "000001.png").unlink()
    with pytest.raises(UserError, match=rf"{copy_of / '2afc' / 'train' / 'cnn'}.*ref=2, p0=2, p1=1, judge=2"):
        TwoAFCDataset(copy_of, "train")
    shutil.rmtree(copy_of / "2afc" / "train" / "cnn" / "judge")
    with pytest.raises(UserError, match=str(copy_of / "2afc" / "train" / "cnn" / "judge")):
        TwoAFCDataset(copy_of, "train")


def test_unreadable_png_names_the_file_when_read(copy_of):
    broken = copy_of / "2afc" / "train" / "traditional" / "p0" / "000001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = TwoAFCDataset(copy_of, "train", img_size=SIZE)  # counts are fine: built
    dataset[len(dataset) - 2]  # the other traditional triplet reads
    with pytest.raises(UserError, match=f"cannot read image {broken}") as info:
        dataset[len(dataset) - 1]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_judge_outside_unit_interval(copy_of, value):
    bad = copy_of / "2afc" / "val" / "superres" / "judge" / "000004.npy"
    save_judge(bad, value)
    with pytest.raises(UserError, match=f"{bad}.*expected a fraction"):
        TwoAFCDataset(copy_of, "val")


def test_judge_of_wrong_shape_or_unreadable(copy_of):
    bad = copy_of / "2afc" / "val" / "cnn" / "judge" / "000000.npy"
    np.save(bad, np.array([0.5, 0.5], dtype=np.float32))
    with pytest.raises(UserError, match=f"{bad}.*shape"):
        TwoAFCDataset(copy_of, "val")
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"cannot read {bad}"):
        TwoAFCDataset(copy_of, "val")


def test_bad_same_in_jnd(copy_of):
    bad = copy_of / "jnd" / "val" / "cnn" / "same" / "000002.npy"
    save_judge(bad, 2.0)
    with pytest.raises(UserError, match=str(bad)):
        JNDDataset(copy_of)


def test_bad_img_range_and_size(synthetic):
    root, _ = synthetic
    with pytest.raises(UserError, match="img_range"):
        TwoAFCDataset(root, "val", img_range="zero_to_255")
    with pytest.raises(UserError, match="img_size"):
        TwoAFCDataset(root, "val", img_size=0)
