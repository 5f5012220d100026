"""Turn img2dataset parquet shards (Conceptual Captions) into a Hugging Face dataset on disk.

Usage (the tutorial's command; ``--pre_encode_text``, ``--overwrite`` and ``--device`` are extra):

    python prep_cc.py --path_to_data_root <RAW> --path_to_save <OUT> \\
      --hf_clip_model_name openai/clip-vit-large-patch14 --hf_cache_dir <CACHE> \\
      --cpu_batch_size 512 --gpu_batch_size 256 --num_cpu_workers 32 --dtype bfloat16

``<RAW>`` is what ``img2dataset --output_format parquet`` wrote (searched recursively for
``*.parquet``): columns ``caption``, ``url``, ``key``, ``status``, ``error_message``, ``width``,
``height``, ``original_width``, ``original_height``, ``exif``, ``sha256`` and the image bytes under
``jpg`` (or ``png`` / ``webp``, img2dataset's ``--encode_format``).

Each row is judged on its own, so one bad row never costs its neighbours. In this order, a row is
dropped when its ``status`` is not ``"success"`` (counted per status), when it has no image bytes,
when its caption is empty or only whitespace, or when its bytes do not decode to an RGB image
(PIL, fully loaded). Kept rows keep their original encoded bytes in a ``datasets.Image`` column,
at their original size and aspect ratio (cropping is the trainer's job), in input order (shards
sorted by path, rows in file order). A caption whose bytes are not valid UTF-8 (web captions in
Latin-1 or cp1252, stored by a tool that did not check) keeps its row: each invalid byte becomes
U+FFFD and such captions are counted in the summary; emoji and any other valid UTF-8 pass
unchanged.

Shards of an interrupted img2dataset run are refused, with one line naming the shard: img2dataset
writes ``NNNNN_stats.json`` beside ``NNNNN.parquet`` when it has finished that shard, so a shard
without one, in a folder where other shards have theirs, was still being written when the run
stopped; and the shard being written at a kill is truncated (no parquet footer), like any
unreadable file, which is never a crash. Re-running the same img2dataset command finishes them
(its default ``--incremental_mode incremental`` redoes every shard without a stats file).
``--skip_incomplete_shards`` leaves such shards out instead, with a warning each, and counts them
in the summary. Refusing is the default because leaving a shard out would silently cost up to a
shard of data (10,000 rows by default) whose rows may well be complete, and the user can choose.
A folder without any stats file (parquet written by another tool, or the first shard of a run
killed before it finished one) is not checked for them.

Captions are tokenized with the CLIP tokenizer of ``--hf_clip_model_name`` (hub name or local
folder, :class:`modules.text_encoder.TextEncoder`): ``input_ids`` / ``attention_mask`` of
``tokenizer.model_max_length`` (77) tokens, longer captions truncated and counted. With
``--pre_encode_text`` the CLIP text transformer's last hidden states, the conditioning of Stable
Diffusion (Rombach et al. 2022, sec. 3.3), are computed in ``--gpu_batch_size`` batches in
``--dtype`` on ``--device`` (the GPU when there is one) and stored as ``text_embeddings``:

- trimmed to each caption's L_i real tokens (start and end tokens included), (L_i, D) in a
  ``datasets.Array2D(shape=(None, D))`` column (variable first dimension, memory-mapped, read
  with numpy without Python lists). The padding rows are not worth storing: the UNet masks them
  out of cross-attention, and CLIP's causal attention makes the real tokens' states independent
  of them. ``attention_mask.sum()`` is L_i;
- in ``--dtype``: float32 and float16 as such; bfloat16 as its raw bits in uint16 (Arrow has no
  bfloat16), recorded as ``stored_dtype: "bfloat16"`` in ``prep_cc_summary.json``;
  :class:`modules.image_datasets.CaptionedArrowDataset` views them back as ``torch.bfloat16``.

For CLIP ViT-L/14 (D = 768) that is 2 * 768 * L_i bytes per caption in 16 bits instead of the
4 * 768 * 77 = 236,544 of untrimmed float32 (docs/RESULTS.md has the figures for CC3M).

Streaming: shards are read ``--cpu_batch_size`` rows at a time (``ParquetFile.iter_batches``);
``--num_cpu_workers`` processes decode one batch while the main process tokenizes, encodes and
writes the previous one. Rows go to an Arrow file in a staging folder next to ``<OUT>``, which
``datasets.Dataset.save_to_disk`` then turns into the final dataset (so the disk briefly holds the
kept images twice); ``<OUT>`` only appears, complete, at the end. Columns: ``image``, ``caption``,
``input_ids``, ``attention_mask``, [``text_embeddings``], ``key``, ``url``, ``width``, ``height``
(the decoded size). ``<OUT>/prep_cc_summary.json`` records the counts printed at the end, the
text encoder used (``hf_clip_model_name``) and the embeddings' dtype, token count and bytes of
values per caption. An existing ``<OUT>`` is an error unless ``--overwrite`` is given.
"""
from __future__ import annotations

# Only light imports at the top: the decoding workers are spawned processes that import this
# file, and torch / transformers / datasets would cost each of them seconds. The heavy ones are
# imported inside main(), after the cheap input checks.
import argparse
import io
import json
import logging
import multiprocessing
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from modules.cli import run_main, setup_logging
from modules.errors import OneLineArgumentParser, UserError
from modules.paths import check_writable_folder

IMAGE_COLUMNS: Tuple[str, ...] = ("jpg", "png", "webp")  # img2dataset's --encode_format values
REQUIRED_COLUMNS: Tuple[str, ...] = ("caption", "status")
OPTIONAL_COLUMNS: Tuple[str, ...] = ("key", "url")  # carried over for provenance, null when absent
DTYPES: Tuple[str, ...] = ("float32", "float16", "bfloat16")
# The Arrow type holding text embeddings of each --dtype: Arrow has no bfloat16, so its bits go in uint16.
ARROW_DTYPES: Dict[str, str] = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
SUMMARY_FILE = "prep_cc_summary.json"
SAVED_DATASET_FILES: Tuple[str, ...] = ("state.json", "dataset_info.json", "dataset_dict.json")
logger = logging.getLogger("ldm")

# Drop reasons besides "status <value>", in the order the checks run.
MISSING_IMAGE = "missing image bytes"
EMPTY_CAPTION = "empty caption"
UNDECODABLE = "undecodable image"
FIXED_REASONS: Tuple[str, ...] = (MISSING_IMAGE, EMPTY_CAPTION, UNDECODABLE)

# What PIL raises on bytes that are not (whole) images: garbage or truncated data (OSError, incl.
# UnidentifiedImageError), malformed chunks (SyntaxError, ValueError), early end (EOFError),
# absurd sizes (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path_to_data_root", required=True,
                        help="folder of img2dataset --output_format parquet shards (searched recursively)")
    parser.add_argument("--path_to_save", required=True, help="output folder (datasets.save_to_disk)")
    parser.add_argument("--hf_clip_model_name", default="openai/clip-vit-large-patch14",
                        help="CLIP text model + tokenizer: Hugging Face hub name or local folder")
    parser.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache folder (default: the library's)")
    parser.add_argument("--cpu_batch_size", type=int, default=512,
                        help="rows read, decoded and written per step")
    parser.add_argument("--gpu_batch_size", type=int, default=256,
                        help="captions per text-encoder forward pass (--pre_encode_text)")
    parser.add_argument("--num_cpu_workers", type=int, default=os.cpu_count() or 1,
                        help="image-decoding processes (0: decode in the main process)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="text-encoder dtype for --pre_encode_text, and the dtype its states are stored in")
    parser.add_argument("--pre_encode_text", action="store_true",
                        help="also store the text encoder's last hidden states as text_embeddings")
    parser.add_argument("--device", default=None,
                        help="device for --pre_encode_text (default: cuda when available, else cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --path_to_save (a dataset saved earlier, or an empty folder)")
    parser.add_argument("--skip_incomplete_shards", action="store_true",
                        help="leave out (with a warning, counted) the shards of an interrupted img2dataset run: "
                             "truncated ones, and ones without their NNNNN_stats.json (default: an error)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Input: shards, their columns, their rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One parquet shard: its path, row count and the column holding the image bytes."""

    path: Path
    num_rows: int
    image_column: str
    optional_columns: Tuple[str, ...]


def find_shards(root: Path) -> List[Path]:
    """Every ``*.parquet`` file under ``root`` (recursive, sorted, hidden files and folders left
    out, e.g. macOS ``._x.parquet`` resource forks)."""
    if not root.is_dir():
        raise UserError(f"--path_to_data_root {root} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in filenames
                     if name.endswith(".parquet") and not name.startswith("."))
    if not found:
        raise UserError(f"no *.parquet files under --path_to_data_root {root} (searched recursively); "
                        "expected the output of img2dataset --output_format parquet")
    return sorted(found)


class IncompleteShard(UserError):
    """A shard an interrupted img2dataset run left behind (truncated, or without its stats file):
    ``path``, ``reason`` (what is wrong with it), and a message that says how to go on."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}; re-run the same img2dataset command to finish it, or pass "
                         "--skip_incomplete_shards to leave such shards out")
        self.path, self.reason = path, reason


def stats_file(shard: Path) -> Path:
    """The ``NNNNN_stats.json`` img2dataset writes beside ``NNNNN.parquet`` once the shard is done."""
    return shard.with_name(f"{shard.stem}_stats.json")


def unfinished_shards(shards: Sequence[Path]) -> List[Path]:
    """The shards without their stats file in a folder where other shards have theirs: img2dataset
    wrote that folder and was stopped before it finished them."""
    folders_with_stats = {p.parent for p in shards if stats_file(p).is_file()}
    return [p for p in shards if p.parent in folders_with_stats and not stats_file(p).is_file()]


def inspect_shard(path: Path) -> Shard:
    """Read a shard's footer and check that it has img2dataset's caption, status and image columns.

    An unreadable file (a truncated shard has no footer) is an :class:`IncompleteShard`."""
    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise IncompleteShard(path, f"is not a readable parquet file ({str(err).splitlines()[0]}): truncated, like "
                                    "the shard an interrupted img2dataset run was writing, or not parquet at all"
                              ) from None
    names = meta.schema_arrow.names
    for column in REQUIRED_COLUMNS:
        if column not in names:
            hint = " (run img2dataset with --caption_col)" if column == "caption" else ""
            raise UserError(f"{path} has no {column!r} column{hint}; it has {names}, "
                            f"expected img2dataset --output_format parquet columns")
    caption_type = meta.schema_arrow.field("caption").type
    if not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type)):
        raise UserError(f"{path}: the 'caption' column holds {caption_type}, expected strings")
    image_columns = [c for c in IMAGE_COLUMNS if c in names]
    if not image_columns:
        raise UserError(f"{path} has no image column (one of {list(IMAGE_COLUMNS)}); it has {names}")
    return Shard(path, meta.metadata.num_rows, image_columns[0], tuple(c for c in OPTIONAL_COLUMNS if c in names))


def usable_shards(paths: Sequence[Path], skip_incomplete: bool) -> Tuple[List[Shard], List[Path]]:
    """(shards to read, shards left out). An incomplete shard (:func:`unfinished_shards`, or
    unreadable) is an error, or with ``skip_incomplete`` left out with a warning; other bad shards
    (missing columns) are errors either way."""
    unfinished = set(unfinished_shards(paths))
    shards: List[Shard] = []
    skipped: List[Path] = []
    for path in paths:
        try:
            if path in unfinished:
                raise IncompleteShard(path, f"has no {stats_file(path).name} beside it while other shards in "
                                            f"{path.parent} have theirs: img2dataset writes it when a shard is "
                                            "finished, so an interrupted run left this one")
            shards.append(inspect_shard(path))
        except IncompleteShard as err:
            if not skip_incomplete:
                raise
            logger.warning("--skip_incomplete_shards: leaving out %s, which %s", path, err.reason)
            skipped.append(path)
    if not shards:
        raise UserError(f"all {len(paths)} shards under the data root are incomplete (see the warnings above); "
                        "nothing to convert")
    return shards, skipped


@dataclass
class Chunk:
    """Up to --cpu_batch_size rows of one shard that passed the cheap checks (status, bytes,
    caption); ``images`` still have to be decoded. ``rows_read`` counts every row of the batch."""

    shard_index: int
    last_of_shard: bool
    rows_read: int
    images: List[bytes] = field(default_factory=list)
    captions: List[str] = field(default_factory=list)
    keys: List[Optional[str]] = field(default_factory=list)
    urls: List[Optional[str]] = field(default_factory=list)


@dataclass
class Stats:
    """What happened to every row read, for the summary."""

    shards: int = 0
    rows_read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    captions_truncated: int = 0
    captions_invalid_utf8: int = 0  # rows read whose caption bytes were not UTF-8 (invalid bytes -> U+FFFD)
    shards_skipped: List[str] = field(default_factory=list)  # --skip_incomplete_shards

    def dropped_by_reason(self) -> Dict[str, int]:
        """Non-success statuses (sorted) then the fixed reasons, which are always listed."""
        statuses = sorted(r for r in self.dropped if r not in FIXED_REASONS)
        return {**{r: self.dropped[r] for r in statuses}, **{r: self.dropped[r] for r in FIXED_REASONS}}

    def as_dict(self) -> Dict[str, Any]:
        return {"shards": self.shards, "rows_read": self.rows_read, "kept": self.kept,
                "dropped": sum(self.dropped.values()), "dropped_by_reason": self.dropped_by_reason(),
                "captions_truncated": self.captions_truncated, "captions_invalid_utf8": self.captions_invalid_utf8,
                "shards_skipped": list(self.shards_skipped)}

    def summary_lines(self) -> List[str]:
        lines = ["prep_cc summary", f"shards: {self.shards}", f"rows read: {self.rows_read}",
                 f"kept: {self.kept}", f"dropped: {sum(self.dropped.values())}"]
        lines += [f"  dropped ({reason}): {count}" for reason, count in self.dropped_by_reason().items()]
        lines.append(f"captions truncated: {self.captions_truncated}")
        lines.append(f"captions with invalid UTF-8 (bytes replaced by U+FFFD): {self.captions_invalid_utf8}")
        lines.append(f"incomplete shards skipped: {len(self.shards_skipped)}")
        return lines


def _status_reason(status: Optional[str]) -> str:
    return f"status {status if status is not None else '<null>'}"


def decode_captions(column: "pa.Array") -> Tuple[List[Optional[str]], int]:
    """The captions of an Arrow string column as Python strings, and how many were not valid UTF-8.

    Arrow does not check the bytes of a string column read from parquet, so a writer that did not
    either leaves bytes that are not UTF-8; those captions are decoded with each invalid byte
    replaced by U+FFFD instead of failing the whole batch."""
    try:
        return column.to_pylist(), 0
    except UnicodeDecodeError:
        pass
    raw = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
    captions: List[Optional[str]] = []
    invalid = 0
    for data in raw.to_pylist():
        if data is None:
            captions.append(None)
            continue
        try:
            captions.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            captions.append(data.decode("utf-8", errors="replace"))
            invalid += 1
    return captions, invalid


def read_chunks(shards: Sequence[Shard], batch_size: int, stats: Stats) -> Iterator[Chunk]:
    """Stream the shards ``batch_size`` rows at a time and apply the checks that need no decoding.

    Only the needed columns are read, one record batch at a time, so memory stays at a batch
    whatever the shard size. Rows failing a check are counted in ``stats.dropped``.
    """
    for shard_index, shard in enumerate(shards):
        columns = list(REQUIRED_COLUMNS) + [shard.image_column] + list(shard.optional_columns)
        rows_done = 0
        try:
            batches = pq.ParquetFile(shard.path).iter_batches(batch_size=batch_size, columns=columns)
            for batch in batches:
                data = {name: batch.column(name).to_pylist() for name in batch.schema.names if name != "caption"}
                data["caption"], invalid = decode_captions(batch.column("caption"))
                stats.captions_invalid_utf8 += invalid
                chunk = Chunk(shard_index, False, batch.num_rows)
                for i in range(batch.num_rows):
                    status, data_bytes, caption = data["status"][i], data[shard.image_column][i], data["caption"][i]
                    if status != "success":
                        stats.dropped[_status_reason(status)] += 1
                    elif not data_bytes:
                        stats.dropped[MISSING_IMAGE] += 1
                    elif caption is None or not caption.strip():
                        stats.dropped[EMPTY_CAPTION] += 1
                    else:
                        chunk.images.append(data_bytes)
                        chunk.captions.append(caption)
                        chunk.keys.append(data["key"][i] if "key" in data else None)
                        chunk.urls.append(data["url"][i] if "url" in data else None)
                rows_done += batch.num_rows
                chunk.last_of_shard = rows_done == shard.num_rows
                yield chunk
        except pa.ArrowException as err:
            raise UserError(f"{shard.path}: cannot read rows ({str(err).splitlines()[0]})") from None
        if shard.num_rows == 0:  # an empty shard yields no batch but is still a shard read
            yield Chunk(shard_index, True, 0)


# ---------------------------------------------------------------------------------------------
# Decoding (in worker processes)
# ---------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) if ``data`` decodes completely to an RGB image, else None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")  # forces the full decode (a header alone proves little)
            return rgb.size
    except _DECODE_ERRORS:
        return None


class _Ready:
    """An already computed result with the ``.get()`` of a pool's AsyncResult."""

    def __init__(self, value: List[Optional[Tuple[int, int]]]) -> None:
        self.value = value

    def get(self) -> List[Optional[Tuple[int, int]]]:
        return self.value


def decode_ahead(chunks: Iterator[Chunk], pool: Optional[Any], num_workers: int
                 ) -> Iterator[Tuple[Chunk, List[Optional[Tuple[int, int]]]]]:
    """Yield (chunk, sizes) with chunk k+1 decoding in ``pool`` while the caller handles chunk k."""
    pending = None
    for chunk in chunks:
        if pool is None:
            job: Any = _Ready([decode_image(b) for b in chunk.images])
        else:
            chunksize = max(1, len(chunk.images) // (4 * num_workers))
            job = pool.map_async(decode_image, chunk.images, chunksize)
        if pending is not None:
            yield pending[0], pending[1].get()
        pending = (chunk, job)
    if pending is not None:
        yield pending[0], pending[1].get()


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def check_output_path(path: Path, data_root: Path, overwrite: bool) -> None:
    """Refuse to replace anything silently, or anything that is not an earlier output."""
    resolved, root = path.resolve(), data_root.resolve()
    if resolved == root or resolved in root.parents:
        raise UserError(f"--path_to_save {path} is --path_to_data_root or holds it; choose another folder")
    if not path.exists():
        return
    if not overwrite:
        raise UserError(f"--path_to_save {path} already exists; pass --overwrite to replace it, "
                        "or choose another folder")
    is_empty_dir = path.is_dir() and not any(path.iterdir())
    is_saved = path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES)
    if not (is_empty_dir or is_saved):
        raise UserError(f"--path_to_save {path} exists and is not a dataset saved by prep_cc.py "
                        "(no state.json / dataset_info.json): refusing to delete it even with --overwrite")


def resolve_device(device: Optional[str]) -> "torch.device":
    """The --device for --pre_encode_text: the given one (checked), else cuda when available, else cpu."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but torch sees no CUDA GPU")
    return resolved


def build_features(max_length: int, hidden_size: Optional[int], embedding_dtype: Optional[str]) -> Any:
    """The output schema; ``text_embeddings`` (L_i, hidden_size) of ``embedding_dtype`` (one of
    :data:`DTYPES`, bfloat16 as uint16 bits) only when ``hidden_size`` is given."""
    import datasets

    columns: Dict[str, Any] = {
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32"), length=max_length),  # CLIP's vocab < 2**31
        "attention_mask": datasets.List(datasets.Value("int8"), length=max_length),
    }
    if hidden_size is not None:
        columns["text_embeddings"] = datasets.Array2D(shape=(None, hidden_size),
                                                      dtype=ARROW_DTYPES[embedding_dtype or "float32"])
    columns.update({"key": datasets.Value("string"), "url": datasets.Value("string"),
                    "width": datasets.Value("int32"), "height": datasets.Value("int32")})
    return datasets.Features(columns)


def stored_text_rows(hidden: "torch.Tensor", lengths: Sequence[int]) -> List[Any]:
    """(B, L, D) hidden states -> B numpy arrays (L_i, D) of the real tokens, as stored: float32 and
    float16 as they are, bfloat16 as its raw bits (uint16)."""
    import numpy as np
    import torch

    hidden = hidden.detach().cpu()
    rows = []
    for states, length in zip(hidden, lengths):
        states = states[: int(length)].contiguous()  # (L_i, D)
        if states.dtype == torch.bfloat16:
            rows.append(states.view(torch.int16).numpy().view(np.uint16))
        else:
            rows.append(states.numpy())
    return rows


def build_batch(chunk: Chunk, sizes: Sequence[Optional[Tuple[int, int]]], keep: Sequence[int], encoder: Any,
                pre_encode: bool, gpu_batch_size: int) -> Tuple[Dict[str, Any], int]:
    """The output columns of the decodable rows ``keep`` of ``chunk`` -> (batch, captions truncated).

    ``encoder`` is a :class:`modules.text_encoder.TextEncoder`: its tokenizer gives (B, L) ids and
    mask (one tokenizer call); with ``pre_encode`` its last hidden states (B, L, D) are computed
    ``gpu_batch_size`` captions at a time on its device, in its dtype, and kept as B arrays
    (L_i, D) of the real tokens (:func:`stored_text_rows`).
    """
    import torch

    captions = [chunk.captions[i] for i in keep]
    tokens = encoder.tokenize(captions)
    batch: Dict[str, Any] = {
        "image": [{"bytes": chunk.images[i], "path": None} for i in keep],  # the original encoded bytes
        "caption": captions,
        "input_ids": tokens.input_ids.to(torch.int32).numpy(),  # (B, L)
        "attention_mask": tokens.attention_mask.to(torch.int8).numpy(),  # (B, L)
    }
    if pre_encode:
        lengths = tokens.attention_mask.sum(dim=1).tolist()  # L_i: real tokens, a prefix of each row
        rows: List[Any] = []
        with torch.inference_mode():
            for start in range(0, len(captions), gpu_batch_size):
                stop = start + gpu_batch_size
                hidden, _ = encoder.encode(tokens.input_ids[start:stop], tokens.attention_mask[start:stop])
                rows.extend(stored_text_rows(hidden, lengths[start:stop]))  # b arrays (L_i, D)
        batch["text_embeddings"] = rows
    batch.update({"key": [chunk.keys[i] for i in keep], "url": [chunk.urls[i] for i in keep],
                  "width": [sizes[i][0] for i in keep], "height": [sizes[i][1] for i in keep]})
    return batch, tokens.num_truncated


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the conversion; returns the summary (as written to ``prep_cc_summary.json``)."""
    args = parse_args(argv)

    # ---- cheap checks first: they fail in a fraction of a second, before torch is imported ----
    for name in ("cpu_batch_size", "gpu_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_cpu_workers < 0:
        raise UserError(f"--num_cpu_workers must be >= 0, got {args.num_cpu_workers}")
    setup_logging(True)
    data_root, out_path = Path(args.path_to_data_root), Path(args.path_to_save)
    shard_paths = find_shards(data_root)
    check_output_path(out_path, data_root, args.overwrite)
    # Where the staging folder and the output go (out_path itself is replaced only when complete).
    check_writable_folder(out_path.parent if out_path.exists() else out_path, "--path_to_save")
    shards, skipped = usable_shards(shard_paths, args.skip_incomplete_shards)

    # ---- text encoder ----
    import datasets
    import torch
    import transformers
    from datasets.arrow_writer import ArrowWriter

    from modules.text_encoder import TextEncoder, encoder_source

    transformers.utils.logging.disable_progress_bar()  # a bar per weight file is noise on one model

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    device = resolve_device(args.device) if args.pre_encode_text else torch.device("cpu")
    encoder = TextEncoder(args.hf_clip_model_name, cache_dir=args.hf_cache_dir, trainable=False,
                          dtype=dtype if args.pre_encode_text else torch.float32)
    if args.pre_encode_text:
        encoder.to(device)
    max_length = encoder.max_length
    features = build_features(max_length, encoder.hidden_size if args.pre_encode_text else None, args.dtype)
    print(f"prep_cc: {len(shards)} shards under {data_root}; tokenizer {args.hf_clip_model_name} ({max_length} tokens)"
          + (f"; pre-encoding text on {device} in {args.dtype}" if args.pre_encode_text else ""), flush=True)

    # ---- stream: read -> decode (workers) -> tokenize / encode -> Arrow file ----
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.parent / f".{out_path.name}.prep_cc-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    stats = Stats(shards=len(shards), shards_skipped=[str(p) for p in skipped])
    shard_kept = 0
    text_tokens = 0  # real tokens of the kept captions: the rows of text_embeddings
    pool = None
    try:
        if args.num_cpu_workers > 0:
            # spawn, not fork: the parent holds torch's thread pools, which forked children can
            # deadlock on; the workers only need PIL.
            pool = multiprocessing.get_context("spawn").Pool(args.num_cpu_workers)
        writer = ArrowWriter(features=features, path=str(staging / "rows.arrow"))
        for chunk, sizes in decode_ahead(read_chunks(shards, args.cpu_batch_size, stats), pool, args.num_cpu_workers):
            stats.rows_read += chunk.rows_read
            keep = [i for i, size in enumerate(sizes) if size is not None]
            stats.dropped[UNDECODABLE] += len(sizes) - len(keep)
            if keep:
                batch, num_truncated = build_batch(chunk, sizes, keep, encoder, args.pre_encode_text,
                                                   args.gpu_batch_size)
                writer.write_batch(batch)
                text_tokens += int(batch["attention_mask"].sum())
                stats.captions_truncated += num_truncated
                stats.kept += len(keep)
                shard_kept += len(keep)
            if chunk.last_of_shard:
                shard = shards[chunk.shard_index]
                print(f"[{chunk.shard_index + 1}/{len(shards)}] {shard.path}: {shard.num_rows} rows, "
                      f"{shard_kept} kept", flush=True)
                shard_kept = 0
        writer.finalize()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None

        text_summary = None
        if args.pre_encode_text:
            bytes_per_value = {"float32": 4, "float16": 2, "bfloat16": 2}[args.dtype]
            text_summary = {
                "hidden_size": encoder.hidden_size, "encoder_dtype": args.dtype, "stored_dtype": args.dtype,
                "arrow_dtype": ARROW_DTYPES[args.dtype], "layout": "real tokens only: (L_i, hidden_size) per caption",
                "num_tokens": text_tokens, "mean_tokens_per_caption": text_tokens / max(stats.kept, 1),
                "bytes_per_caption": bytes_per_value * encoder.hidden_size * text_tokens / max(stats.kept, 1),
            }
        summary = {**stats.as_dict(), "hf_clip_model_name": encoder_source(args.hf_clip_model_name), "max_length": max_length,
                   "text_embeddings": text_summary}
        print("\n".join(stats.summary_lines()), flush=True)
        if stats.kept == 0:
            raise UserError(f"none of the {stats.rows_read} rows under {data_root} was kept (see the summary "
                            f"above); nothing saved to {out_path}")

        # ---- save: staging Arrow file -> save_to_disk -> move into place ----
        rows = datasets.Dataset.from_file(str(staging / "rows.arrow"))
        final_staging = staging / "dataset"
        rows.save_to_disk(str(final_staging))
        del rows  # release the memory map of the staging file before it is deleted
        (final_staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if out_path.exists():  # check_output_path allowed it: --overwrite of an earlier output
            shutil.rmtree(out_path)
        final_staging.rename(out_path)
        print(f"saved {stats.kept} rows to {out_path}", flush=True)
        return summary
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
