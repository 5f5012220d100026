"""prep_cc.py on real img2dataset output, on the shapes shards, on bad rows and on bad inputs.

The real pipeline: images (PNG/JPEG, square and not, grey and RGB) plus a text file named .jpg
are served on 127.0.0.1; a URL list (with a URL that 404s, the non-image and an empty caption)
goes through the real ``img2dataset --output_format parquet`` CLI; the tutorial's prep_cc
command line then runs on its output with a local tiny CLIP. Counts are asserted exactly, and
tokens and embeddings against transformers' CLIPTokenizer / CLIPTextModel directly.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from modules.cli import run_main
from modules.shapes import (COLOR_NAMES, IMG2DATASET_PARQUET_SCHEMA, SHAPE_NAMES, encode_jpeg, encode_png,
                            render_shape, sample_specs, write_shapes_parquet)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
IMG2DATASET = str(Path(sys.executable).parent / "img2dataset")
OFFLINE_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
    "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false", "no_proxy": "127.0.0.1,localhost",
    "NO_PROXY": "127.0.0.1,localhost", "PYTHONPATH": str(REPO),
}
for _proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    OFFLINE_ENV.pop(_proxy, None)

LONG_CAPTION = "a grey picture with a caption far too long " + "word " * 90  # > 77 tokens
# (file served, caption, expected decoded size or None when img2dataset or prep_cc drops the row)
SERVED_ROWS = [
    ("wide.png", "a wide red banner", (48, 20)),
    ("tall.jpg", "a tall green tower", (18, 40)),
    ("square.jpg", "a blue square", (24, 24)),
    ("grey.png", LONG_CAPTION, (30, 22)),
    ("missing.jpg", "a picture that is gone", None),  # 404
    ("notimage.jpg", "a text file", None),  # img2dataset cannot decode it: failed_to_resize
    ("square.jpg", "   ", None),  # downloads fine, dropped by prep_cc: empty caption
]
COLORS = {"wide.png": (220, 40, 40), "tall.jpg": (40, 180, 60), "square.jpg": (40, 80, 220), "grey.png": (128, 128, 128)}
EXPECTED_REAL = {"shards": 2, "rows read": 7, "kept": 4, "dropped": 3,
                 "dropped (status failed_to_download)": 1, "dropped (status failed_to_resize)": 1,
                 "dropped (missing image bytes)": 0, "dropped (empty caption)": 1,
                 "dropped (undecodable image)": 0, "captions truncated": 1,
                 "captions with invalid UTF-8 (bytes replaced by U+FFFD)": 0, "incomplete shards skipped": 0}


def parse_summary(stdout: str) -> dict[str, int]:
    """The ``name: number`` lines after ``prep_cc summary``."""
    lines = stdout.split("prep_cc summary\n", 1)[1].splitlines()
    return {m.group(1): int(m.group(2)) for m in (re.fullmatch(r"\s*(.+?): (\d+)", ln) for ln in lines) if m}


def prep_argv(raw: Path, out: Path, clip: Path, cache: Path, *extra: str) -> list[str]:
    """The tutorial's prep_cc flags with a local tiny CLIP, 2 workers and float32."""
    return ["--path_to_data_root", str(raw), "--path_to_save", str(out), "--hf_clip_model_name", str(clip),
            "--hf_cache_dir", str(cache), "--cpu_batch_size", "512", "--gpu_batch_size", "256",
            "--num_cpu_workers", "2", "--dtype", "float32", *extra]


def run_prep_cc(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "prep_cc.py"), *argv], cwd=REPO, env=OFFLINE_ENV,
                          capture_output=True, text=True, timeout=300)


def load_rows(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny CLIP, and img2dataset's real output from a local HTTP server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from modules.text_encoder import build_tiny_clip

    words = [caption for _, caption, _ in SERVED_ROWS] + list(COLOR_NAMES) + list(SHAPE_NAMES) + ["on", "background"]
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip", words, hidden_size=32, layers=2, heads=2)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def img2dataset_raw(tmp_path_factory) -> Path:
    """Serve the images, run ``img2dataset --output_format parquet`` on the URL list, return its folder."""
    root = tmp_path_factory.mktemp("img2dataset")
    site = root / "site"
    site.mkdir()
    for name, size in (("wide.png", (48, 20)), ("tall.jpg", (18, 40)), ("square.jpg", (24, 24))):
        Image.new("RGB", size, COLORS[name]).save(site / name)
    Image.new("L", (30, 22), 128).save(site / "grey.png")
    (site / "notimage.jpg").write_text("this is text, not a JPEG\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        pq.write_table(pa.table({"url": [base + name for name, _, _ in SERVED_ROWS],
                                 "caption": [caption for _, caption, _ in SERVED_ROWS]}), root / "urls.parquet")
        raw = root / "raw"
        cmd = [IMG2DATASET, "--url_list", str(root / "urls.parquet"), "--input_format", "parquet",
               "--url_col", "url", "--caption_col", "caption", "--output_format", "parquet",
               "--output_folder", str(raw), "--image_size", "64", "--resize_mode", "no",
               "--processes_count", "1", "--thread_count", "4", "--number_sample_per_shard", "4",
               "--timeout", "10", "--enable_wandb", "False"]
        result = subprocess.run(cmd, cwd=root, env=OFFLINE_ENV, capture_output=True, text=True, timeout=240)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stdout + result.stderr
    return raw


@pytest.fixture(scope="module")
def tutorial_output(img2dataset_raw, tiny_clip, tmp_path_factory):
    """The tutorial's prep_cc command line (subprocess) on img2dataset's output."""
    out = tmp_path_factory.mktemp("prep") / "cc_dataset"
    result = run_prep_cc(prep_argv(img2dataset_raw, out, tiny_clip, tmp_path_factory.mktemp("hf_cache")))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


# ---------------------------------------------------------------------------------------------
# (a) the real pipeline
# ---------------------------------------------------------------------------------------------


def test_img2dataset_wrote_what_prep_cc_expects(img2dataset_raw):
    shards = sorted(img2dataset_raw.glob("*.parquet"))
    assert [p.name for p in shards] == ["00000.parquet", "00001.parquet"]
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    assert table.schema.names == IMG2DATASET_PARQUET_SCHEMA.names
    statuses = sorted(table.column("status").to_pylist())
    assert statuses == ["failed_to_download", "failed_to_resize"] + ["success"] * 5


def test_tutorial_command_line_counts(tutorial_output, img2dataset_raw):
    out, result = tutorial_output
    assert parse_summary(result.stdout) == EXPECTED_REAL
    summary = json.loads((out / "prep_cc_summary.json").read_text())
    assert summary["kept"] == 4 and summary["rows_read"] == 7 and summary["captions_truncated"] == 1
    assert summary["dropped_by_reason"] == {"status failed_to_download": 1, "status failed_to_resize": 1,
                                            "missing image bytes": 0, "empty caption": 1, "undecodable image": 0}
    # The dropped-by-status counts are img2dataset's own.
    stats = [json.loads(p.read_text()) for p in sorted(img2dataset_raw.glob("*_stats.json"))]
    assert sum(s["failed_to_download"] for s in stats) == 1 and sum(s["failed_to_resize"] for s in stats) == 1
    rows = load_rows(out)
    assert len(rows) == 4
    assert "text_embeddings" not in rows.column_names
    assert not any(p.name.startswith(".cc_dataset") for p in out.parent.iterdir())  # staging removed


def test_tutorial_output_images_and_tokens(tutorial_output, tiny_clip):
    from transformers import CLIPTokenizer

    out, _ = tutorial_output
    rows = load_rows(out)
    expected = {name: (caption, size) for name, caption, size in SERVED_ROWS if size is not None}
    seen = set()
    for row in rows:
        name = row["url"].rsplit("/", 1)[1]
        caption, size = expected[name]
        seen.add(name)
        assert row["caption"] == caption
        # Non-square images keep their size (img2dataset --resize_mode no; no cropping here).
        assert row["image"].size == size == (row["width"], row["height"])
        # The bytes belong to this row: the color of the served image, up to JPEG re-encoding.
        pixels = np.asarray(row["image"].convert("RGB"), dtype=np.float64)
        assert np.abs(pixels - np.array(COLORS[name])).mean() < 4.0
    assert seen == set(expected)

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_clip))
    captions = list(rows["caption"])
    reference = tokenizer(captions, padding="max_length", truncation=True, max_length=77)
    ids, mask = np.array(list(rows["input_ids"])), np.array(list(rows["attention_mask"]))
    assert ids.shape == mask.shape == (4, 77)
    np.testing.assert_array_equal(ids, np.array(reference["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(reference["attention_mask"]))
    # Each learned word is one token: start + words + end; the long caption fills all 77.
    lengths = {c: int(m.sum()) for c, m in zip(captions, mask)}
    assert lengths["a wide red banner"] == 6 and lengths["a blue square"] == 5 and lengths[LONG_CAPTION] == 77
    long_ids = ids[captions.index(LONG_CAPTION)]
    assert long_ids[0] == tokenizer.bos_token_id and long_ids[-1] == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def encoded_output(img2dataset_raw, tiny_clip, tmp_path_factory):
    """The same with --pre_encode_text, in-process, with chunks smaller than a shard (shards of 4
    and 3 rows -> chunks of 3, 1, 3) and several encoder batches per chunk."""
    import prep_cc

    tmp = tmp_path_factory.mktemp("encoded")
    argv = prep_argv(img2dataset_raw, tmp / "cc_encoded", tiny_clip, tmp / "cache", "--pre_encode_text", "--device", "cpu")
    argv[argv.index("--cpu_batch_size") + 1] = "3"
    argv[argv.index("--gpu_batch_size") + 1] = "2"
    return tmp / "cc_encoded", prep_cc.main(argv)


def test_pre_encode_text_matches_clip_last_hidden_state(encoded_output, tiny_clip, tutorial_output):
    """Same rows as the tutorial run, plus the tiny CLIP's last hidden states of the real tokens."""
    import datasets
    from transformers import CLIPTextModel

    out, summary = encoded_output
    assert summary["kept"] == 4
    text = summary["text_embeddings"]
    assert (text["stored_dtype"], text["arrow_dtype"], text["hidden_size"]) == ("float32", "float32", 32)

    rows, reference_rows = load_rows(out), load_rows(tutorial_output[0])
    assert list(rows["caption"]) == list(reference_rows["caption"])
    assert list(rows["input_ids"]) == list(reference_rows["input_ids"])
    # Trimmed: one (L_i, D) array per caption, L_i its real tokens, in a dynamic-length Array2D column.
    assert rows.features["text_embeddings"] == datasets.Array2D(shape=(None, 32), dtype="float32")
    lengths = [int(sum(m)) for m in rows["attention_mask"]]
    assert text["num_tokens"] == sum(lengths) and text["mean_tokens_per_caption"] == sum(lengths) / 4
    assert text["bytes_per_caption"] == 4 * 32 * sum(lengths) / 4
    model = CLIPTextModel.from_pretrained(str(tiny_clip)).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(list(rows["input_ids"])).long(),
                         attention_mask=torch.tensor(list(rows["attention_mask"])).long()).last_hidden_state

    # The stage-2 reader serves them as (L_i, D) tensors next to the uint8 image.
    from modules.image_datasets import CaptionedArrowDataset

    dataset = CaptionedArrowDataset(out)
    for i, length in enumerate(lengths):
        sample = dataset[i]
        assert sample["text_embeddings"].shape == (length, 32) and sample["text_embeddings"].dtype == torch.float32
        torch.testing.assert_close(sample["text_embeddings"], expected[i, :length], atol=1e-5, rtol=1e-5)
        assert sample["input_ids"].dtype == torch.int64 and sample["image"].dtype == torch.uint8
    assert lengths[[c for c in rows["caption"]].index(LONG_CAPTION)] == 77


def test_stage2_trains_on_the_result(encoded_output, tiny_clip, tmp_path):
    """The tutorial's stage-2 command line, shrunk by --set only, trains 2 steps on the pre-encoded
    prep_cc output (unet.pre_encoded_text: true makes it insist on the text_embeddings column)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            sample_size=16)
    vae.save_pretrained(tmp_path / "tiny_vae")
    work, gens = tmp_path / "work_dir" / "diffusion_cc", tmp_path / "gens"
    shrink = {
        "unet.unet_channels_per_block": "[32,64]", "unet.down_block_types": "[AttnDown,Down]",
        "unet.up_block_types": "[Up,AttnUp]", "unet.groupnorm_groups": "8", "unet.num_attention_heads": "2",
        "unet.time_embed_start_dim": "32", "unet.time_embed_proj_dim": "64", "unet.text_embed_dim": "32",
        "unet.text_conditioning_hf_model": str(tiny_clip), "unet.pre_encoded_text": "true",
        "scaling_constants.conceptual_captions": "0.5",
        "training_args.img_size": "16", "training_args.per_gpu_batch_size": "2",
        "training_args.total_training_iterations": "2", "training_args.num_workers": "0",
        "training_args.mixed_precision": "no", "training_args.lr_warmup_steps": "1",
        "training_args.checkpoint_iterations": "2", "training_args.val_generation_freq": "2",
        "training_args.num_inference_steps": "2", "training_args.num_samples_per_condition": "1",
        "training_args.logging_steps": "1",
    }
    cmd = [PYTHON, str(REPO / "stage2_diffusion_trainer.py"), "--experiment_name", "DiffusionTrainer",
           "--wandb_run_name", "diffusion_cc", "--working_directory", str(work),
           "--training_config", "configs/stage2_diffusion_train.yaml", "--model_config", "configs/ldm.yaml",
           "--path_to_vae_backbone", str(tmp_path / "tiny_vae"), "--dataset", "conceptual_captions",
           "--path_to_dataset", str(encoded_output[0]), "--path_to_save_gens", str(gens)]
    for key, value in shrink.items():
        cmd += ["--set", f"{key}={value}"]
    result = subprocess.run(cmd, cwd=REPO, env=OFFLINE_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = [json.loads(line) for line in (work / "DiffusionTrainer" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    assert (work / "DiffusionTrainer" / "checkpoint_2").is_dir() and (work / "model.safetensors").is_file()
    assert (gens / "step_2.png").is_file()


# ---------------------------------------------------------------------------------------------
# (b) shapes: write_shapes_parquet -> prep_cc
# ---------------------------------------------------------------------------------------------


def test_shapes_parquet_all_kept_in_order(tmp_path, tiny_clip):
    import prep_cc

    raw = tmp_path / "raw"
    written = write_shapes_parquet(raw / "nested" / "deeper", num_images=11, img_size=16, seed=3, shard_size=4)
    assert len(written) == 3
    out = tmp_path / "shapes_prepped"
    # In-process decoding (0 workers), batches that do not divide the shards, bfloat16 encoding.
    summary = prep_cc.main(["--path_to_data_root", str(raw), "--path_to_save", str(out),
                            "--hf_clip_model_name", str(tiny_clip), "--cpu_batch_size", "3",
                            "--num_cpu_workers", "0", "--dtype", "bfloat16", "--pre_encode_text", "--device", "cpu"])
    assert (summary["shards"], summary["rows_read"], summary["kept"], summary["dropped"]) == (3, 11, 11, 0)
    assert summary["captions_truncated"] == 0
    rows = load_rows(out)
    assert list(rows["caption"]) == [spec.caption for spec in sample_specs(11, seed=3)]
    # The stored bytes are the shard's bytes, untouched.
    shard_bytes = [b for p in written for b in pq.read_table(p).column("jpg").to_pylist()]
    import datasets

    stored = rows.cast_column("image", datasets.Image(decode=False))["image"]
    assert [s["bytes"] for s in stored] == shard_bytes
    # bfloat16 states are stored in 16 bits: their raw bits in uint16 (Arrow has no bfloat16), trimmed.
    assert rows.features["text_embeddings"] == datasets.Array2D(shape=(None, 32), dtype="uint16")
    assert summary["text_embeddings"]["stored_dtype"] == "bfloat16"
    assert json.loads((out / "prep_cc_summary.json").read_text())["text_embeddings"]["stored_dtype"] == "bfloat16"
    from transformers import CLIPTextModel

    from modules.image_datasets import CaptionedArrowDataset

    with torch.no_grad():
        reference = CLIPTextModel.from_pretrained(str(tiny_clip)).eval()(
            input_ids=torch.tensor(list(rows["input_ids"])).long(),
            attention_mask=torch.tensor(list(rows["attention_mask"])).long()).last_hidden_state
    dataset = CaptionedArrowDataset(out)
    lengths = [int(sum(m)) for m in rows["attention_mask"]]
    served = [dataset[i]["text_embeddings"] for i in range(11)]
    assert all(e.dtype == torch.bfloat16 and e.shape == (n, 32) for e, n in zip(served, lengths))
    error = torch.cat([(e.float() - reference[i, :n]).abs() for i, (e, n) in enumerate(zip(served, lengths))])
    assert error.max() < 0.1 and error.mean() < 0.01  # bfloat16 keeps 8 bits of mantissa
    # 2 bytes per value, real tokens only: the Arrow column holds nothing else.
    column = rows.data.column("text_embeddings")
    values = sum(len(chunk.storage.flatten().flatten()) for chunk in column.chunks)
    assert values == 32 * sum(lengths) and summary["text_embeddings"]["bytes_per_caption"] == 2 * 32 * sum(lengths) / 11


def test_float16_text_embeddings_are_stored_as_float16(tmp_path, tiny_clip):
    import prep_cc
    from modules.image_datasets import CaptionedArrowDataset

    write_shapes_parquet(tmp_path / "raw", num_images=3, img_size=16, seed=5)
    summary = prep_cc.main(["--path_to_data_root", str(tmp_path / "raw"), "--path_to_save", str(tmp_path / "out"),
                            "--hf_clip_model_name", str(tiny_clip), "--num_cpu_workers", "0", "--dtype", "float16",
                            "--pre_encode_text", "--device", "cpu"])
    assert (summary["text_embeddings"]["stored_dtype"], summary["text_embeddings"]["arrow_dtype"]) == ("float16",) * 2
    dataset = CaptionedArrowDataset(tmp_path / "out")
    sample = dataset[0]
    assert sample["text_embeddings"].dtype == torch.float16
    assert sample["text_embeddings"].shape == (int(sample["attention_mask"].sum()), 32)


# ---------------------------------------------------------------------------------------------
# Bad rows: each one dropped for its own reason, its neighbours kept
# ---------------------------------------------------------------------------------------------


def _shard_row(caption, data, status="success", index=0):
    return {"caption": caption, "url": f"http://example.invalid/{index}.jpg", "key": f"{index:09d}",
            "status": status, "error_message": None if status == "success" else "boom",
            "width": 16, "height": 16, "original_width": 16, "original_height": 16, "exif": "{}",
            "sha256": hashlib.sha256(data).hexdigest() if data else None, "jpg": data}


def test_bad_rows_never_drop_their_neighbours(tmp_path, tiny_clip, capsys):
    import prep_cc

    good = encode_jpeg(render_shape(sample_specs(1, seed=0)[0], 16))
    wide = io.BytesIO()
    Image.new("P", (20, 12), 3).save(wide, format="PNG")  # palette PNG stored under "jpg": still an image
    cases = [
        ("a red circle", good, "success"),                # kept
        ("a green square", b"GIF89a but not really", "success"),  # undecodable
        ("a blue triangle", good[: len(good) // 2], "success"),   # truncated JPEG: undecodable
        ("a red square", None, "success"),                 # missing image bytes
        ("a red square", b"", "success"),                  # missing image bytes
        (None, good, "success"),                           # empty caption (null)
        (" \t ", good, "success"),                         # empty caption (whitespace)
        ("a red circle", None, "failed_to_download"),      # status
        ("a red circle", good, None),                      # status null
        ("a wide purple image", wide.getvalue(), "success"),  # kept, 20 x 12
        ("a white circle", encode_png(render_shape(sample_specs(2, seed=1)[1], 16)), "success"),  # kept
    ]
    rows = [_shard_row(caption, data, status, i) for i, (caption, data, status) in enumerate(cases)]
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, IMG2DATASET_PARQUET_SCHEMA), raw / "00000.parquet", row_group_size=4)
    out = tmp_path / "out"
    summary = prep_cc.main(prep_argv(raw, out, tiny_clip, tmp_path / "cache", "--cpu_batch_size", "4"))
    assert summary["dropped_by_reason"] == {"status <null>": 1, "status failed_to_download": 1,
                                            "missing image bytes": 2, "empty caption": 2, "undecodable image": 2}
    assert (summary["rows_read"], summary["kept"], summary["dropped"]) == (11, 3, 8)
    assert parse_summary(capsys.readouterr().out)["kept"] == 3
    kept = load_rows(out)
    assert list(kept["key"]) == ["000000000", "000000009", "000000010"]
    assert [(w, h) for w, h in zip(list(kept["width"]), list(kept["height"]))] == [(16, 16), (20, 12), (16, 16)]


# ---------------------------------------------------------------------------------------------
# (c) bad inputs: exit code 2, one line on stderr naming the culprit, no traceback
# ---------------------------------------------------------------------------------------------


def _write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _bad_input(kind: str, tmp: Path) -> tuple[list[str], str]:
    """(extra argv, text the error line must contain) for each bad input."""
    raw, out = tmp / "raw", tmp / "out"
    raw.mkdir()
    good = {"caption": ["a red circle"], "status": ["success"], "jpg": [b"x"]}
    if kind == "empty_root":
        return [str(raw), str(out)], str(raw)
    if kind == "missing_root":
        return [str(tmp / "nowhere"), str(out)], str(tmp / "nowhere")
    if kind == "no_caption_column":
        bad = _write_parquet(raw / "sub" / "00003.parquet", {"url": ["u"], "status": ["success"], "jpg": [b"x"]})
        _write_parquet(raw / "00000.parquet", good)
        return [str(raw), str(out)], f"{bad} has no 'caption' column"
    if kind == "no_image_column":
        bad = _write_parquet(raw / "00000.parquet", {"caption": ["c"], "status": ["success"], "tif": [b"x"]})
        return [str(raw), str(out)], f"{bad} has no image column"
    if kind == "not_parquet":
        (raw / "00000.parquet").write_text("not parquet")
        return [str(raw), str(out)], f"{raw / '00000.parquet'} is not a readable parquet file"
    if kind == "save_exists":
        _write_parquet(raw / "00000.parquet", good)
        out.mkdir()
        return [str(raw), str(out)], f"--path_to_save {out} already exists; pass --overwrite"
    if kind == "overwrite_foreign_folder":
        _write_parquet(raw / "00000.parquet", good)
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
        return [str(raw), str(out), "--overwrite"], f"--path_to_save {out} exists and is not a dataset"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty_root", "missing_root", "no_caption_column", "no_image_column",
                                  "not_parquet", "save_exists", "overwrite_foreign_folder"])
def test_bad_inputs_exit_2_with_one_line(kind, tmp_path):
    (root, out, *extra), needle = _bad_input(kind, tmp_path)
    result = run_prep_cc(["--path_to_data_root", root, "--path_to_save", out, "--num_cpu_workers", "1", *extra])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0]
    if kind == "overwrite_foreign_folder":
        assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def _run_main_in_process(argv: list[str], capsys) -> str:
    import prep_cc

    with pytest.raises(SystemExit) as exit_info:
        run_main(prep_cc.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_text_encoder_not_found_offline(tmp_path, capsys):
    write_shapes_parquet(tmp_path / "raw", num_images=2, img_size=16, seed=0)
    base = ["--path_to_data_root", str(tmp_path / "raw"), "--path_to_save", str(tmp_path / "out"),
            "--hf_cache_dir", str(tmp_path / "empty_cache"), "--num_cpu_workers", "0"]
    line = _run_main_in_process(base, capsys)  # default name, empty cache, offline
    assert "'openai/clip-vit-large-patch14'" in line and "no network" in line and str(tmp_path / "empty_cache") in line
    line = _run_main_in_process(base + ["--hf_clip_model_name", str(tmp_path / "no_such_clip")], capsys)
    assert str(tmp_path / "no_such_clip") in line
    assert not (tmp_path / "out").exists()


def test_nothing_kept_is_an_error_and_overwrite_replaces(tmp_path, tiny_clip, capsys):
    import prep_cc

    raw = tmp_path / "raw"
    write_shapes_parquet(raw, num_images=3, img_size=16, seed=0)
    out = tmp_path / "out"
    argv = prep_argv(raw, out, tiny_clip, tmp_path / "cache")
    argv[argv.index("--num_cpu_workers") + 1] = "0"
    assert prep_cc.main(argv)["kept"] == 3
    capsys.readouterr()
    # Same output path again: refused, then replaced with --overwrite by a smaller run.
    assert "already exists" in _run_main_in_process(argv, capsys)
    (raw / "00000.parquet").unlink()
    write_shapes_parquet(raw, num_images=2, img_size=16, seed=1, overwrite=True)
    assert prep_cc.main(argv + ["--overwrite"])["kept"] == 2
    assert len(load_rows(out)) == 2
    capsys.readouterr()
    # A data root where every row failed to download: the summary, then a one-line error, nothing saved.
    failed = [_shard_row("a red circle", None, "failed_to_download", i) for i in range(3)]
    pq.write_table(pa.Table.from_pylist(failed, IMG2DATASET_PARQUET_SCHEMA), raw / "00000.parquet")
    empty_out = tmp_path / "empty_out"
    argv[argv.index("--path_to_save") + 1] = str(empty_out)
    line = _run_main_in_process(argv, capsys)
    assert "none of the 3 rows" in line and not empty_out.exists()
    assert not any(p.name.startswith(".empty_out") for p in tmp_path.iterdir())
