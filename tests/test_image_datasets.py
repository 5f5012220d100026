"""Datasets shared by stage 1 and 2: folders (recursion, extensions, broken files), class
folders, prep_cc.py's Arrow output, shapes (parquet and on the fly), the aspect-preserving
transforms, uint8 images and their one conversion (images_to_model), the ``--dataset`` registry
and the held-out split."""
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import json

import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from modules.errors import UserError
from modules.image_datasets import (
    DATASET_NAMES,
    CaptionedArrowDataset,
    ClassFolderDataset,
    ImageFolderDataset,
    ShapesDataset,
    ShapesParquetDataset,
    ToUint8Tensor,
    build_dataset,
    build_image_transform,
    dataset_conditioning,
    images_to_model,
    split_holdout,
)
from modules.batching import Collate
from modules.shapes import (
    IMG2DATASET_PARQUET_SCHEMA,
    render_shape,
    sample_specs,
    write_shapes_folder,
    write_shapes_parquet,
)

LOGGER = "modules.image_datasets"


def solid(path, color, size=(8, 8), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def expected_pixel(color):
    return torch.tensor(color, dtype=torch.float32) / 127.5 - 1


def floats(image):
    """A dataset's uint8 image (3, H, W) as the model sees it: float32 in [-1, 1]."""
    return images_to_model(image, "cpu")


def center_pixel(sample):
    image = floats(sample["image"])
    return image[:, image.shape[1] // 2, image.shape[2] // 2]


def old_float_transform():
    """What the datasets returned before images became uint8: torchvision's float conversion."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------


def test_image_folder_is_recursive_sorted_and_reads_the_listed_extensions(tmp_path):
    solid(tmp_path / "b.JPG", (255, 0, 0), fmt="JPEG")
    solid(tmp_path / "a.png", (0, 0, 255))
    solid(tmp_path / "sub" / "c.jpeg", (0, 255, 0), fmt="JPEG")
    solid(tmp_path / "sub" / "deeper" / "d.WebP", (255, 255, 255), fmt="WEBP")
    solid(tmp_path / "e.gif", (0, 0, 0))  # not a listed extension
    solid(tmp_path / ".hidden.png", (0, 0, 0))  # hidden files are not images (macOS ._ forks)
    solid(tmp_path / ".cache" / "x.png", (0, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 4
    assert [ds.relpath(i) for i in range(4)] == ["a.png", "b.JPG", "sub/c.jpeg", "sub/deeper/d.WebP"]
    colors = [(0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 255, 255)]
    for i, color in enumerate(colors):
        sample = ds[i]
        assert set(sample) == {"image"}
        assert sample["image"].shape == (3, 8, 8) and sample["image"].dtype == torch.uint8
        assert sample["image"].is_contiguous()
        tol = 0 if i == 0 else 0.05  # PNG is lossless, JPEG/WebP nearly
        assert torch.allclose(center_pixel(sample), expected_pixel(color), atol=tol + 1e-6)
    assert ds[-1]["image"].shape == (3, 8, 8)
    with pytest.raises(IndexError):
        ds[4]


def test_broken_files_are_skipped_counted_and_reported_once(tmp_path, caplog):
    solid(tmp_path / "a.png", (10, 10, 10))
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
    solid(tmp_path / "c.png", (30, 30, 30))
    good = (tmp_path / "c.png").read_bytes()
    (tmp_path / "d.png").write_bytes(good[: len(good) // 2])  # truncated: header fine, data cut
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageFolderDataset(tmp_path)
        assert len(ds) == 4 and ds.num_failed == 0  # only a.png was decoded to check the folder
        served = [center_pixel(ds[i]) for i in range(4)]
        for _ in range(2):  # a second epoch neither recounts nor warns again
            [ds[i] for i in range(4)]
    # a broken index is served by the next readable file, wrapping around at the end
    for got, color in zip(served, [(10,) * 3, (30,) * 3, (30,) * 3, (10,) * 3]):
        assert torch.allclose(got, expected_pixel(color))
    assert ds.num_failed == 2 and ds.failed_files == ["b.jpg", "d.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(warnings) == 1
    assert "b.jpg" in warnings[0].getMessage() and "1 so far" in warnings[0].getMessage()


def test_empty_and_all_broken_folders_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match=r"no images in .*empty.*\.jpg.*\.webp"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("x.jpg", "y.png", "z.webp"):
        (broken / name).write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"no readable images in .*broken: 3 files failed to decode, e\.g\. .*x\.jpg"):
        ImageFolderDataset(broken)


def test_captioned_folder_needs_a_caption_per_image(tmp_path):
    write_shapes_folder(tmp_path / "shapes", num_images=3, img_size=16, seed=0)
    ds = ImageFolderDataset(tmp_path / "shapes", captions=True)
    specs = sample_specs(3, seed=0)
    assert [ds[i]["caption"] for i in range(3)] == [s.caption for s in specs]
    (tmp_path / "shapes" / "00001.txt").unlink()
    with pytest.raises(UserError, match=r"1 images .* no same-stem \.txt caption.*00001\.png"):
        ImageFolderDataset(tmp_path / "shapes", captions=True)


def test_class_folders_give_sorted_labels(tmp_path):
    solid(tmp_path / "dog" / "y.png", (0, 0, 200))
    solid(tmp_path / "dog" / "sub" / "z.png", (0, 0, 210))
    solid(tmp_path / "cat" / "x.png", (0, 100, 0))
    solid(tmp_path / "ant" / "w.png", (50, 0, 0))
    ds = ClassFolderDataset(tmp_path)
    assert ds.classes == ["ant", "cat", "dog"] and ds.num_classes == 3
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 1, 2, 2]
    assert [ds.relpath(i) for i in range(len(ds))] == ["ant/w.png", "cat/x.png", "dog/sub/z.png", "dog/y.png"]
    assert torch.allclose(center_pixel(ds[2]), expected_pixel((0, 0, 210)))
    (tmp_path / "emu").mkdir()
    with pytest.raises(UserError, match="emu holds no images"):
        ClassFolderDataset(tmp_path)
    (tmp_path / "emu").rmdir()
    solid(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(UserError, match="holds 1 images directly"):
        ClassFolderDataset(tmp_path)


def test_class_label_follows_the_image_actually_served(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"nope")
    solid(tmp_path / "a" / "ok.png", (1, 2, 3))
    solid(tmp_path / "b" / "ok.png", (4, 5, 6))
    ds = ClassFolderDataset(tmp_path)
    assert ds.num_failed == 1  # found while probing for the first readable file
    assert ds[0]["label"] == 0 and ds[1]["label"] == 0 and ds[2]["label"] == 1


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------


def circle_image(width, height, diameter):
    img = Image.new("RGB", (width, height), (255, 255, 255))
    cx, cy, r = width / 2, height / 2, diameter / 2
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=(0, 0, 0))
    return img


def dark_extent(image):
    """(height, width) in pixels of the dark region of a (3, H, W) tensor in [-1, 1]."""
    dark = image.mean(dim=0) < 0
    rows, cols = torch.nonzero(dark, as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("width,height", [(128, 64), (64, 128)])
def test_center_crop_resizes_the_short_side_and_keeps_circles_round(width, height):
    transform = build_image_transform(32, crop="center", random_flip=False)
    out = transform(circle_image(width, height, 48))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    out = floats(out)
    h, w = dark_extent(out)
    assert abs(h - w) <= 1 and abs(h - 24) <= 1  # 48 * 32 / 64; a squash would give 12 x 24
    # centred: the circle's centre stays at the image centre
    dark = torch.nonzero(out.mean(dim=0) < 0).float().mean(dim=0)
    assert torch.allclose(dark, torch.tensor([15.5, 15.5]), atol=0.5)


def test_random_resized_crop_never_squashes():
    torch.manual_seed(0)
    transform = build_image_transform(32, crop="random_resized", random_resized_crop_scale=(0.5, 1.0))
    whole = 0
    for _ in range(40):
        out = transform(circle_image(192, 96, 40))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        out = floats(out)
        dark = out.mean(dim=0) < 0
        if not dark.any() or dark[0].any() or dark[-1].any() or dark[:, 0].any() or dark[:, -1].any():
            continue  # the crop missed or cut the circle
        whole += 1
        h, w = dark_extent(out)
        # a square crop of side s in [sqrt(0.5), 1] * 96, scaled to 32: still round, 40 * 32 / s across
        assert abs(h - w) <= 1
        assert 40 * 32 / 96 - 1 <= h <= 40 * 32 / (96 * 0.5**0.5) + 1
    assert whole >= 10
    # scale (1, 1) on a square image is the whole image, as the center crop
    transform = build_image_transform(32, crop="random_resized", random_resized_crop_scale=(1.0, 1.0))
    assert torch.allclose(floats(transform(circle_image(64, 64, 48))),
                          floats(build_image_transform(32)(circle_image(64, 64, 48))), atol=0.02)


def test_random_flip_flips_half_of_the_time():
    img = Image.new("RGB", (16, 16), (0, 0, 0))
    ImageDraw.Draw(img).rectangle((0, 0, 3, 15), fill=(255, 255, 255))  # a white stripe on the left
    torch.manual_seed(0)
    flipped = build_image_transform(16, random_flip=True)
    lefts = [bool(flipped(img)[0, 8, 0] > 127) for _ in range(200)]
    assert 70 < sum(lefts) < 130
    assert all(bool(build_image_transform(16)(img)[0, 8, 0] > 127) for _ in range(5))


def test_images_to_model_is_bit_identical_to_the_old_float_transform():
    """uint8 datasets + images_to_model give exactly the floats the float32 datasets gave, so
    validation and quality numbers do not move."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ramp = Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1))
    uint8 = ToUint8Tensor()(ramp)
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 16, 16)
    old = old_float_transform()(ramp)
    assert torch.equal(images_to_model(uint8, "cpu"), old)  # all 256 values, bit for bit
    # ... which the shorter formula x / 127.5 - 1 would not be (one ulp off on 111 of the 256 values).
    assert not torch.equal(uint8.float() / 127.5 - 1, old)
    # The same through the crop: the geometry runs on the PIL image, as it did.
    photo = render_shape(sample_specs(1, seed=3)[0], 40).resize((48, 40))
    new = images_to_model(build_image_transform(24)(photo).unsqueeze(0), "cpu")  # (1, 3, 24, 24)
    reference = v2.Compose([v2.Resize(24, antialias=True), v2.CenterCrop(24), old_float_transform()])(photo)
    assert new.shape == (1, 3, 24, 24) and torch.equal(new[0], reference)
    # Other dtypes are cast from those floats.
    half = images_to_model(uint8[None], "cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half[0], old.to(torch.bfloat16))


def test_images_to_model_takes_only_uint8():
    with pytest.raises(TypeError, match="uint8"):
        images_to_model(torch.zeros(1, 3, 4, 4), "cpu")  # already float: converting twice is a bug
    with pytest.raises(TypeError, match="uint8"):
        images_to_model(torch.zeros(1, 3, 4, 4, dtype=torch.int64), "cpu")
    out = images_to_model(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), torch.device("cpu"))
    assert out.dtype == torch.float32 and bool((out == 1).all())


def test_every_dataset_serves_uint8_images(tmp_path):
    """4x fewer bytes through workers, pinned memory and the host-to-device copy."""
    import datasets

    solid(tmp_path / "faces" / "a.png", (9, 9, 9), size=(20, 12))
    solid(tmp_path / "classes" / "x" / "a.png", (9, 9, 9))
    write_shapes_parquet(tmp_path / "sp", num_images=2, img_size=16, seed=1)
    write_shapes_folder(tmp_path / "sf", num_images=2, img_size=16, seed=1)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (10, 14), (1, 2, 3))], "caption": ["x"]},
                               features=features).save_to_disk(str(tmp_path / "cc"))
    built = [build_dataset("celebahq", tmp_path / "faces", 8), build_dataset("imagenet", tmp_path / "classes", 8),
             build_dataset("shapes", None, 8, shapes_num_images=2), build_dataset("shapes", tmp_path / "sp", 8),
             build_dataset("shapes", tmp_path / "sf", 8), build_dataset("conceptual_captions", tmp_path / "cc", 8),
             build_dataset("celebahq", tmp_path / "faces", 8, crop="random_resized", random_flip=True)]
    for dataset in built:
        image = dataset[0]["image"]
        assert type(image) is torch.Tensor and image.dtype == torch.uint8, type(dataset).__name__
        assert image.shape == (3, 8, 8) and image.is_contiguous()


def test_transform_arguments_are_checked():
    with pytest.raises(UserError, match="crop must be one of"):
        build_image_transform(32, crop="squash")
    with pytest.raises(UserError, match="random_resized_crop_scale"):
        build_image_transform(32, crop="random_resized", random_resized_crop_scale=(0.0, 1.0))


# ------------------------------------------------------------------------------------------------
# prep_cc.py output
# ------------------------------------------------------------------------------------------------


def test_captioned_arrow_dataset_reads_images_captions_and_token_arrays(tmp_path):
    import datasets

    images = [Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (10, 20), (0, 0, 255))]
    emb = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    data = {
        "image": images,
        "caption": ["a red thing", "a blue thing"],
        "input_ids": [[49406, 320, 49407, 49407], [49406, 1746, 49407, 49407]],
        "attention_mask": [[1, 1, 1, 0], [1, 1, 1, 0]],
        "text_embeddings": emb.tolist(),
    }
    features = datasets.Features({
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "text_embeddings": datasets.Array2D((4, 3), "float32"),
    })
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "cc"))
    ds = CaptionedArrowDataset(tmp_path / "cc", build_image_transform(8))
    assert len(ds) == 2
    sample = ds[1]
    assert sample["caption"] == "a blue thing"
    assert sample["image"].shape == (3, 8, 8)
    assert torch.allclose(center_pixel(sample), expected_pixel((0, 0, 255)))
    assert sample["input_ids"].dtype == torch.int64 and sample["input_ids"].tolist() == [49406, 1746, 49407, 49407]
    assert sample["attention_mask"].dtype == torch.int64 and sample["attention_mask"].tolist() == [1, 1, 1, 0]
    assert sample["text_embeddings"].dtype == torch.float32
    assert torch.equal(sample["text_embeddings"], torch.from_numpy(emb[1]))
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=Collate())))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert batch["text_embeddings"].shape == (2, 4, 3)
    # Embeddings stored with their padding (older prep_cc outputs): the stored mask marks the real tokens.
    assert batch["text_embeddings_mask"].tolist() == [[True, True, True, False]] * 2
    assert batch["caption"] == ["a red thing", "a blue thing"]

    # without the optional columns: image and caption only; a DatasetDict is read by split
    plain = datasets.Dataset.from_dict({"image": images, "caption": ["x", "y"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string")}))
    datasets.DatasetDict({"train": plain, "val": plain.select([1])}).save_to_disk(str(tmp_path / "dd"))
    val = CaptionedArrowDataset(tmp_path / "dd", build_image_transform(8), split="val")
    assert len(val) == 1 and set(val[0]) == {"image", "caption"} and val[0]["caption"] == "y"
    with pytest.raises(UserError, match="no split 'test'"):
        CaptionedArrowDataset(tmp_path / "dd", split="test")


def _prep_cc_layout(path, stored_dtype, rows, summary_dtype=None):
    """A prep_cc.py-style dataset: trimmed (L_i, D) embeddings in a dynamic Array2D column."""
    import datasets

    arrow = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[stored_dtype]
    data = {
        "image": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(len(rows))],
        "caption": [f"caption {i}" for i in range(len(rows))],
        "input_ids": [[7] * len(r) + [0] * (6 - len(r)) for r in rows],
        "attention_mask": [[1] * len(r) + [0] * (6 - len(r)) for r in rows],
        "text_embeddings": [r.view(torch.int16).numpy().view(np.uint16) if stored_dtype == "bfloat16"
                            else r.numpy() for r in rows],
    }
    features = datasets.Features({
        "image": datasets.Image(), "caption": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32"), length=6),
        "attention_mask": datasets.List(datasets.Value("int8"), length=6),
        "text_embeddings": datasets.Array2D(shape=(None, 3), dtype=arrow),
    })
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(path))
    summary = {"hf_clip_model_name": "tiny", "text_embeddings": {"stored_dtype": summary_dtype or stored_dtype}}
    (path / "prep_cc_summary.json").write_text(json.dumps(summary))
    return path


@pytest.mark.parametrize("stored_dtype", ["float32", "float16", "bfloat16"])
def test_captioned_arrow_dataset_serves_trimmed_embeddings_in_the_stored_dtype(tmp_path, stored_dtype):
    dtype = getattr(torch, stored_dtype)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 3, generator=generator).to(dtype) for n in (2, 5, 3)]  # (L_i, D), real tokens only
    ds = CaptionedArrowDataset(_prep_cc_layout(tmp_path / "cc", stored_dtype, rows))
    assert ds.text_embeddings_dtype == dtype and ds.hidden_size == 3
    for i, row in enumerate(rows):
        sample = ds[i]
        # Exactly the stored values, in the stored dtype: no float32 upcast, bfloat16 viewed back from its bits.
        assert sample["text_embeddings"].dtype == dtype and torch.equal(sample["text_embeddings"], row)
        assert sample["attention_mask"].tolist() == [1] * len(row) + [0] * (6 - len(row))
        assert sample["input_ids"].dtype == torch.int64 and sample["image"].dtype == torch.uint8
    batch = Collate()([ds[i] for i in range(3)])
    assert batch["text_embeddings"].shape == (3, 5, 3) and batch["text_embeddings"].dtype == dtype
    assert batch["text_embeddings_mask"].sum(dim=1).tolist() == [2, 5, 3]
    assert torch.equal(batch["text_embeddings"][0, :2], rows[0]) and not batch["text_embeddings"][0, 2:].any()


def test_captioned_arrow_dataset_checks_the_summary_dtype(tmp_path):
    rows = [torch.zeros(2, 3, dtype=torch.float16)]
    _prep_cc_layout(tmp_path / "cc", "float16", rows, summary_dtype="bfloat16")
    with pytest.raises(UserError, match="stored as bfloat16, but the column holds float16"):
        CaptionedArrowDataset(tmp_path / "cc")


def test_captioned_arrow_dataset_path_errors(tmp_path):
    with pytest.raises(UserError, match="not a dataset saved by prep_cc.py"):
        CaptionedArrowDataset(tmp_path / "nowhere")
    write_shapes_parquet(tmp_path / "raw", num_images=2, img_size=16, seed=0)
    with pytest.raises(UserError, match="run prep_cc.py on it first"):
        CaptionedArrowDataset(tmp_path / "raw")


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------


def test_shapes_parquet_dataset_reads_successful_rows(tmp_path):
    write_shapes_parquet(tmp_path, num_images=7, img_size=16, seed=4, shard_size=3, row_group_size=2)
    # an img2dataset shard also holds failed rows (no image): they are skipped
    failed = {name: [None] for name in IMG2DATASET_PARQUET_SCHEMA.names}
    failed.update(caption=["lost"], url=["http://x"], key=["000030"], status=["failed_to_download"],
                  error_message=["timeout"])
    pq.write_table(pa.Table.from_pydict(failed, IMG2DATASET_PARQUET_SCHEMA), tmp_path / "00003.parquet")
    ds = ShapesParquetDataset(tmp_path)
    specs = sample_specs(7, seed=4)
    assert len(ds) == 7
    for i in [0, 4, 3, 6, 1]:  # out of order: crosses row groups and shards
        sample = ds[i]
        assert sample["caption"] == specs[i].caption
        reference = floats(ToUint8Tensor()(render_shape(specs[i], 16)))
        assert (floats(sample["image"]) - reference).abs().mean() < 0.04  # JPEG quality 95, 4:4:4
    # DataLoader workers get their own (empty) row-group cache
    captions = [c for batch in DataLoader(ds, batch_size=3, num_workers=2) for c in batch["caption"]]
    assert captions == [s.caption for s in specs]
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match=r"no \*\.parquet shards"):
        ShapesParquetDataset(tmp_path / "none")
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "none" / "00000.parquet")
    with pytest.raises(UserError, match="not an img2dataset parquet shard with captions"):
        ShapesParquetDataset(tmp_path / "none")


def test_shapes_on_the_fly_equal_the_rendered_images():
    ds = ShapesDataset(num_images=5, img_size=24, seed=7)
    specs = sample_specs(5, seed=7)
    assert len(ds) == 5
    for i in range(5):
        sample = ds[i]
        assert sample["caption"] == specs[i].caption
        assert torch.equal(sample["image"], ToUint8Tensor()(render_shape(specs[i], 24)))
    assert torch.equal(ds[-1]["image"], ds[4]["image"])
    with pytest.raises(IndexError):
        ds[5]


# ------------------------------------------------------------------------------------------------
# registry and split
# ------------------------------------------------------------------------------------------------


def test_registry_names_conditioning_and_errors(tmp_path):
    assert DATASET_NAMES == ("celebahq", "ffhq", "celeba", "imagenet", "conceptual_captions", "shapes")
    assert [dataset_conditioning(n) for n in DATASET_NAMES] == ["none", "none", "none", "class", "text", "text"]
    with pytest.raises(UserError, match="unknown dataset 'lsun'.*celebahq, ffhq, celeba, imagenet, "
                                        "conceptual_captions, shapes"):
        build_dataset("lsun", tmp_path, 16)
    with pytest.raises(UserError, match="unknown dataset"):
        dataset_conditioning("cifar")
    with pytest.raises(UserError, match="'celebahq' needs a path"):
        build_dataset("celebahq", None, 16)
    with pytest.raises(UserError, match=f"dataset path {tmp_path / 'nope'} does not exist"):
        build_dataset("imagenet", tmp_path / "nope", 16)


def test_build_dataset_picks_the_right_reader(tmp_path):
    solid(tmp_path / "celeba" / "train" / "1.png", (1, 1, 1), size=(20, 30))
    solid(tmp_path / "celeba" / "val" / "2.png", (2, 2, 2), size=(30, 20))
    train = build_dataset("celebahq", tmp_path / "celeba", 16)
    val = build_dataset("celebahq", tmp_path / "celeba", 16, split="val")
    assert isinstance(train, ImageFolderDataset) and train.relpath(0) == "1.png" and val.relpath(0) == "2.png"
    assert train[0]["image"].shape == (3, 16, 16)
    flat = build_dataset("ffhq", tmp_path / "celeba" / "train", 16)
    assert len(flat) == 1
    with pytest.raises(UserError, match="no 'val' subfolder"):
        build_dataset("ffhq", tmp_path / "celeba" / "train", 16, split="val")

    solid(tmp_path / "imagenet" / "train" / "n01" / "a.png", (0, 0, 0))
    solid(tmp_path / "imagenet" / "train" / "n02" / "b.png", (0, 0, 0))
    inet = build_dataset("imagenet", tmp_path / "imagenet", 16)
    assert isinstance(inet, ClassFolderDataset) and inet.classes == ["n01", "n02"]

    otf = build_dataset("shapes", None, 16, shapes_num_images=3, shapes_seed=1)
    assert isinstance(otf, ShapesDataset) and len(otf) == 3 and otf[0]["image"].shape == (3, 16, 16)
    write_shapes_parquet(tmp_path / "sp", num_images=3, img_size=16, seed=1)
    assert isinstance(build_dataset("shapes", tmp_path / "sp", 16), ShapesParquetDataset)
    write_shapes_folder(tmp_path / "sf", num_images=3, img_size=16, seed=1)
    folder = build_dataset("shapes", tmp_path / "sf", 16)
    assert isinstance(folder, ImageFolderDataset) and folder[2]["caption"] == otf[2]["caption"]
    assert torch.equal(folder[2]["image"], otf[2]["image"])  # PNG is lossless


def test_split_holdout_is_deterministic_and_disjoint():
    ds = ShapesDataset(num_images=50, img_size=8, seed=0)
    train, hold = split_holdout(ds, 10, seed=3)
    train2, hold2 = split_holdout(ds, 10, seed=3)
    assert hold.indices == hold2.indices and train.indices == train2.indices
    assert len(hold) == 10 and len(train) == 40
    assert sorted(hold.indices + train.indices) == list(range(50))
    assert hold.indices == sorted(hold.indices) and hold.indices != list(range(10))
    assert split_holdout(ds, 10, seed=4)[1].indices != hold.indices
    assert hold[0]["caption"] == ds[hold.indices[0]]["caption"]
    with pytest.raises(UserError, match="num_holdout"):
        split_holdout(ds, 50, seed=0)
