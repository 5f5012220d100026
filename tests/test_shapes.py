"""The built-in ``shapes`` dataset: seeded specs, exact geometry and palette, the img2dataset
parquet layout (checked against img2dataset's own Downloader + ParquetSampleWriter run on the
same images), the plain folder layout, and reading color/shape/background back from pixels."""
import hashlib
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from modules.errors import UserError
from modules.shapes import (
    COLOR_NAMES,
    IMG2DATASET_PARQUET_SCHEMA,
    PALETTE,
    SHAPE_NAMES,
    ShapeSpec,
    caption_accuracy,
    describe_image,
    dominant_colors,
    encode_jpeg,
    img2dataset_key,
    parse_caption,
    render_shape,
    sample_spec,
    sample_specs,
    shape_box,
    write_shapes_folder,
    write_shapes_parquet,
)

TIMING_KEYS = {"duration", "start_time", "end_time"}


def shape_mask(img: Image.Image, spec: ShapeSpec) -> np.ndarray:
    """(H, W) bool: pixels that are not exactly the background color."""
    arr = np.asarray(img).astype(int)
    return np.any(arr != np.array(PALETTE[spec.background]), axis=-1)


# ------------------------------------------------------------------------------------------------
# specs
# ------------------------------------------------------------------------------------------------


def test_specs_are_seeded_prefix_stable_and_within_ranges():
    specs = sample_specs(600, seed=3)
    assert specs == sample_specs(600, seed=3)
    assert sample_specs(10, seed=3) == specs[:10]  # image i depends on (seed, i) only
    assert sample_spec(3, 123) == specs[123]
    assert sample_specs(10, seed=4) != specs[:10]
    assert all(0.3 <= s.size <= 0.6 for s in specs)
    assert all(0 <= s.x and s.x + s.size <= 1 and 0 <= s.y and s.y + s.size <= 1 for s in specs)
    assert all(s.color != s.background for s in specs)
    # every shape, color and background shows up, in roughly uniform proportions
    shapes = np.array([SHAPE_NAMES.index(s.shape) for s in specs])
    colors = np.array([COLOR_NAMES.index(s.color) for s in specs])
    backgrounds = np.array([COLOR_NAMES.index(s.background) for s in specs])
    assert np.all(np.abs(np.bincount(shapes, minlength=3) / 600 - 1 / 3) < 0.07)
    assert np.all(np.abs(np.bincount(colors, minlength=8) / 600 - 1 / 8) < 0.05)
    assert np.all(np.abs(np.bincount(backgrounds, minlength=8) / 600 - 1 / 8) < 0.05)
    sizes = np.array([s.size for s in specs])
    assert sizes.min() < 0.32 and sizes.max() > 0.58


def test_caption_format_and_parse():
    spec = ShapeSpec("triangle", "red", "blue", 0.4, 0.1, 0.2)
    assert spec.caption == "a red triangle on a blue background"
    assert parse_caption(spec.caption) == ("red", "triangle", "blue")
    assert parse_caption("a orange circle on a purple background") == ("orange", "circle", "purple")
    for bad in ["a pink circle on a blue background", "a red hexagon on a blue background", "red circle"]:
        with pytest.raises(UserError, match="not a shapes caption"):
            parse_caption(bad)


def test_bad_seed_is_a_user_error():
    with pytest.raises(UserError, match="seed"):
        sample_spec(-1, 0)


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def test_triangle_points_up_with_a_horizontal_base():
    spec = ShapeSpec("triangle", "red", "blue", 0.5, 0.25, 0.25)
    img = render_shape(spec, 64)
    mask = shape_mask(img, spec)
    rows = np.nonzero(mask.any(axis=1))[0]
    assert rows[0] == 16 and rows[-1] == 47  # box 16..47 (0.25 * 64, 0.5 * 64)
    widths = mask[16:48].sum(axis=1)
    assert np.all(np.diff(widths) >= 0)  # widens downwards: apex on top
    assert widths[0] <= 2 and widths[-1] == 32  # a point on top, the full base at the bottom
    # the apex is centred over the base
    apex_cols = np.nonzero(mask[16])[0]
    assert abs(apex_cols.mean() - 31.5) <= 0.5
    # the base row is the shape color all along (but its anti-aliased corners): a horizontal edge
    assert np.all(np.asarray(img)[47, 18:46] == np.array(PALETTE["red"]))
    assert np.all(np.asarray(img)[48, 16:48] == np.array(PALETTE["blue"]))


def test_geometry_fully_inside_size_and_fill_ratio():
    expected_fill = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    size, supersample = 64, 4
    for spec in sample_specs(60, seed=11):
        img = render_shape(spec, size, supersample)
        assert img.size == (size, size) and img.mode == "RGB"
        mask = shape_mask(img, spec)
        rows, cols = np.nonzero(mask)
        # the box drawn on the supersampled canvas, in output pixels
        left, top, right, bottom = (v / supersample for v in shape_box(spec, size * supersample))
        assert 0 <= left and right <= size and 0 <= top and bottom <= size
        assert rows.min() >= math.floor(top) and rows.max() < math.ceil(bottom)
        assert cols.min() >= math.floor(left) and cols.max() < math.ceil(right)
        extent = right - left
        assert extent == bottom - top
        assert abs(extent - spec.size * size) <= 0.25 and 0.3 * size - 0.25 <= extent <= 0.6 * size + 0.25
        # the base / diameter / side spans the whole box
        assert math.ceil(extent) <= cols.max() - cols.min() + 1 <= math.ceil(extent) + 1
        # area (anti-aliased edge pixels counted by their coverage) matches the shape's formula
        arr = np.asarray(img).astype(float)
        bg, fg = np.array(PALETTE[spec.background], float), np.array(PALETTE[spec.color], float)
        coverage = ((arr - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        assert coverage.sum() / extent**2 == pytest.approx(expected_fill[spec.shape], abs=0.03)


def test_unsupersampled_render_is_exactly_the_integer_box():
    for spec in sample_specs(20, seed=2):
        img = render_shape(spec, 40, supersample=1)
        left, top, right, bottom = shape_box(spec, 40)
        rows, cols = np.nonzero(shape_mask(img, spec))
        assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (top, bottom, left, right)
        colors = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
        assert colors == {PALETTE[spec.color], PALETTE[spec.background]}  # no anti-aliasing at all


def test_palette_is_exact_inside_the_shape_and_in_the_background():
    for spec in sample_specs(40, seed=5):
        img = np.asarray(render_shape(spec, 48, supersample=4))
        left, top, right, bottom = (v // 4 for v in shape_box(spec, 48 * 4))
        cx = (left + right) // 2
        # the centroid of an up-pointing triangle is 2/3 of the way down; a circle's and square's is the centre
        cy = top + (2 * (bottom - top)) // 3 if spec.shape == "triangle" else (top + bottom) // 2
        assert tuple(img[cy, cx]) == PALETTE[spec.color]
        # the image corner farthest from the shape is background
        corner = (0 if bottom > 48 - top else 47, 0 if right > 48 - left else 47)
        assert tuple(img[corner]) == PALETTE[spec.background]
        # anti-aliasing only touches edge pixels: the two palette colors cover most of the image
        exact = np.all(img == PALETTE[spec.color], -1) | np.all(img == PALETTE[spec.background], -1)
        assert exact.mean() > 0.85


# ------------------------------------------------------------------------------------------------
# reading color / shape / background back
# ------------------------------------------------------------------------------------------------


def test_describe_image_recovers_the_caption_from_pixels():
    specs = sample_specs(120, seed=21)
    for size in (32, 64):
        images = [render_shape(s, size) for s in specs]
        assert caption_accuracy(images, [s.caption for s in specs]) == {
            "color": 1.0, "shape": 1.0, "background": 1.0, "all": 1.0}
    jpegs = [Image.open(io.BytesIO(encode_jpeg(render_shape(s, 32)))) for s in specs]
    assert caption_accuracy(jpegs, [s.caption for s in specs])["all"] == 1.0
    # tensors in [-1, 1] and uint8 arrays read the same
    img = render_shape(specs[0], 32)
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    assert describe_image(tensor) == describe_image(np.asarray(img)) == parse_caption(specs[0].caption)
    assert dominant_colors(img) == (specs[0].color, specs[0].background)


def test_describe_image_tolerates_noise_and_reports_missing_shapes():
    rng = np.random.default_rng(0)
    specs = sample_specs(60, seed=8)
    noisy = [np.clip(np.asarray(render_shape(s, 32)) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
             for s in specs]
    accuracy = caption_accuracy(noisy, [s.caption for s in specs])
    assert accuracy["color"] == 1.0 and accuracy["background"] == 1.0 and accuracy["shape"] >= 0.9
    plain = Image.new("RGB", (32, 32), PALETTE["green"])
    assert dominant_colors(plain) == (None, "green")
    assert describe_image(plain) == (None, None, "green")
    gray = Image.new("RGB", (32, 32), (128, 128, 128))  # far from every palette color
    assert describe_image(gray) == (None, None, None)
    # a swapped caption scores zero on the swapped parts
    spec = specs[0]
    wrong = f"a {spec.background} {spec.shape} on a {spec.color} background"
    assert caption_accuracy([render_shape(spec, 32)], [wrong]) == {"color": 0.0, "shape": 1.0, "background": 0.0,
                                                                    "all": 0.0}


# ------------------------------------------------------------------------------------------------
# img2dataset parquet layout
# ------------------------------------------------------------------------------------------------


def test_parquet_layout_content_and_determinism(tmp_path):
    a = write_shapes_parquet(tmp_path / "a", num_images=7, img_size=32, seed=1, shard_size=3, row_group_size=2)
    b = write_shapes_parquet(tmp_path / "b", num_images=7, img_size=32, seed=1, shard_size=3, row_group_size=2)
    c = write_shapes_parquet(tmp_path / "c", num_images=7, img_size=32, seed=2, shard_size=3, row_group_size=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json",
                     "00002.parquet", "00002_stats.json"]
    assert [p.name for p in a] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    # same seed, same bytes; another seed, other images
    assert all(pa_.read_bytes() == pb.read_bytes() for pa_, pb in zip(a, b))
    assert all(pa_.read_bytes() != pc.read_bytes() for pa_, pc in zip(a, c))
    for shard_id in range(3):
        sa = json.loads((tmp_path / "a" / f"{shard_id:05d}_stats.json").read_text())
        sb = json.loads((tmp_path / "b" / f"{shard_id:05d}_stats.json").read_text())
        assert {k: v for k, v in sa.items() if k not in TIMING_KEYS} == {k: v for k, v in sb.items()
                                                                          if k not in TIMING_KEYS}
        count = 3 if shard_id < 2 else 1
        assert sa["count"] == sa["successes"] == count and sa["status_dict"] == {"success": count}
        assert sa["duration"] == pytest.approx(sa["end_time"] - sa["start_time"])

    specs = sample_specs(7, seed=1)
    for shard_id, shard in enumerate(a):
        meta = pq.ParquetFile(shard)
        assert meta.schema_arrow == IMG2DATASET_PARQUET_SCHEMA
        assert [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)] == (
            [2, 1] if shard_id < 2 else [1])
        for i, row in enumerate(meta.read().to_pylist()):
            index = 3 * shard_id + i
            assert row["key"] == f"{10 * shard_id + i:06d}"  # ceil(log10(3)) + 5 digits, as img2dataset
            assert row["caption"] == specs[index].caption
            assert row["url"] == f"shapes://1/{index}"
            assert row["status"] == "success" and row["error_message"] is None
            assert row["width"] == row["height"] == row["original_width"] == row["original_height"] == 32
            assert row["exif"] == "{}"
            assert row["sha256"] == hashlib.sha256(row["jpg"]).hexdigest()
            decoded = np.asarray(Image.open(io.BytesIO(row["jpg"])).convert("RGB")).astype(int)
            assert decoded.shape == (32, 32, 3)
            assert np.abs(decoded - np.asarray(render_shape(specs[index], 32)).astype(int)).mean() < 2.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # img2dataset's own imports
def test_keys_follow_img2dataset_compute_key():
    from img2dataset.downloader import compute_key

    for shard_size in (1, 3, 10, 10000, 12345):
        oom = math.ceil(math.log10(shard_size))
        for shard_id, index in [(0, 0), (2, shard_size - 1), (17, 0)]:
            assert img2dataset_key(index, shard_id, shard_size, 5) == compute_key(index, shard_id, oom, 5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # img2dataset's own imports
def test_parquet_matches_what_img2dataset_writes_for_the_same_images(tmp_path):
    """Run img2dataset's own Downloader + ParquetSampleWriter (the code behind --output_format
    parquet) on our images served as file:// URLs, and compare everything but the url and the
    re-encoded bytes."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    ours = tmp_path / "ours"
    write_shapes_parquet(ours, num_images=5, img_size=32, seed=0, shard_size=4)
    rows = pq.read_table(ours / "00001.parquet").to_pylist() + pq.read_table(ours / "00000.parquet").to_pylist()
    rows.sort(key=lambda r: r["key"])
    # img2dataset's input shard: the caption and url columns its Reader hands the Downloader
    urls = []
    for i, row in enumerate(rows):
        path = tmp_path / "src" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(row["jpg"])
        urls.append(path.as_uri())
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for shard_id, (lo, hi) in enumerate([(0, 4), (4, 5)]):
        table = pa.table({"caption": [r["caption"] for r in rows[lo:hi]], "url": urls[lo:hi]})
        feather = tmp_path / f"{shard_id}.feather"
        with pa.OSFile(str(feather), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        downloader = Downloader(
            sample_writer_class=ParquetSampleWriter, resizer=Resizer(32, "border", False), thread_count=1,
            save_caption=True, extract_exif=True, output_folder=str(theirs), column_list=["caption", "url"],
            timeout=10, number_sample_per_shard=4, oom_shard_count=5, compute_hash="sha256", verify_hash_type=None,
            encode_format="jpg", retries=0, user_agent_token=None, disallowed_header_directives=None)
        downloader.download_shard((shard_id, str(feather)))

    assert sorted(p.name for p in theirs.iterdir()) == sorted(p.name for p in ours.iterdir())
    for shard in ("00000", "00001"):
        mine, ref = pq.ParquetFile(ours / f"{shard}.parquet"), pq.ParquetFile(theirs / f"{shard}.parquet")
        assert mine.schema_arrow == ref.schema_arrow
        ignore = {"url", "jpg"}  # their url is file://, their bytes re-encoded by OpenCV
        mine_rows = sorted(({k: v for k, v in r.items() if k not in ignore} for r in mine.read().to_pylist()),
                           key=lambda r: r["key"])
        ref_rows = sorted(({k: v for k, v in r.items() if k not in ignore} for r in ref.read().to_pylist()),
                          key=lambda r: r["key"])
        assert mine_rows == ref_rows  # keys, captions, status, sizes, exif and sha256 of the same bytes
        mine_stats = json.loads((ours / f"{shard}_stats.json").read_text())
        ref_stats = json.loads((theirs / f"{shard}_stats.json").read_text())
        assert list(mine_stats) == list(ref_stats)
        assert {k: v for k, v in mine_stats.items() if k not in TIMING_KEYS} == {
            k: v for k, v in ref_stats.items() if k not in TIMING_KEYS}


def test_writers_refuse_to_mix_with_an_earlier_run(tmp_path):
    write_shapes_parquet(tmp_path, num_images=5, img_size=16, seed=0, shard_size=2)
    with pytest.raises(UserError, match="earlier run"):
        write_shapes_parquet(tmp_path, num_images=2, img_size=16, seed=0, shard_size=2)
    write_shapes_parquet(tmp_path, num_images=2, img_size=16, seed=0, shard_size=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000_stats.json"]  # no stale shards
    with pytest.raises(UserError, match="num_images"):
        write_shapes_parquet(tmp_path / "x", num_images=0, img_size=16, seed=0)


# ------------------------------------------------------------------------------------------------
# plain folder layout
# ------------------------------------------------------------------------------------------------


def test_folder_writer_is_lossless_and_deterministic(tmp_path):
    paths = write_shapes_folder(tmp_path / "a", num_images=4, img_size=24, seed=9)
    write_shapes_folder(tmp_path / "b", num_images=4, img_size=24, seed=9)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [f"0000{i}.png" for i in range(4)] + [f"0000{i}.txt" for i in range(4)])
    for i, (path, spec) in enumerate(zip(paths, sample_specs(4, seed=9))):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
        assert path.with_suffix(".txt").read_text() == spec.caption
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(render_shape(spec, 24)))
    with pytest.raises(UserError, match="earlier run"):
        write_shapes_folder(tmp_path / "a", num_images=4, img_size=24, seed=9)
