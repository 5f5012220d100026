"""modules/batching.py: one collate for every dataset: uint8 images, labels, captions tokenized
once per batch in the workers, stored tokens, variable-length 16-bit text embeddings padded with
a mask; picklable through spawned DataLoader workers."""
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from modules.batching import Collate, bucket_length, pad_text_embeddings
from modules.text_encoder import CaptionTokenizer, TextEncoder, build_tiny_clip

CAPTIONS = ["a red circle on a blue background", "a green square", ""]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CaptionTokenizer:
    clip = build_tiny_clip(tmp_path_factory.mktemp("clip"), CAPTIONS, hidden_size=8, layers=1, heads=2,
                           max_position_embeddings=12)
    return TextEncoder(clip).caption_tokenizer


def image_sample(i: int, caption: str = "a red circle") -> dict:
    return {"image": torch.full((3, 4, 4), i, dtype=torch.uint8), "caption": caption, "label": i}


def test_images_labels_and_captions():
    batch = Collate()([image_sample(i) for i in range(3)])
    assert set(batch) == {"image", "caption", "label"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 4, 4)
    assert batch["image"][:, 0, 0, 0].tolist() == [0, 1, 2]
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 2]
    assert batch["caption"] == ["a red circle"] * 3


def test_latent_moments_are_stacked():
    samples = [{"latent_mean": torch.full((4, 2, 2), float(i)), "latent_std": torch.ones(4, 2, 2)} for i in range(2)]
    batch = Collate()(samples)
    assert batch["latent_mean"].shape == batch["latent_std"].shape == (2, 4, 2, 2)
    assert batch["latent_mean"][:, 0, 0, 0].tolist() == [0.0, 1.0]


def test_captions_are_tokenized_once_per_batch(tokenizer):
    calls = []
    inner = tokenizer.tokenizer

    class Counting:
        def __getattr__(self, name):
            return getattr(inner, name)

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return inner(*args, **kwargs)

    counting = CaptionTokenizer(Counting(), tokenizer.max_length)
    long = " ".join(["red"] * 30)
    batch = Collate(counting)([image_sample(i, c) for i, c in enumerate(CAPTIONS + [long])])
    assert len(calls) == 1
    expected = tokenizer(CAPTIONS + [long])
    assert batch["input_ids"].dtype == torch.int64 and torch.equal(batch["input_ids"], expected.input_ids)
    assert batch["attention_mask"].dtype == torch.bool
    assert torch.equal(batch["attention_mask"], expected.attention_mask.bool())
    assert batch["num_truncated"] == 1 and batch["input_ids"].shape == (4, 12)
    # Without a tokenizer the captions stay text.
    assert "input_ids" not in Collate()([image_sample(0)])


def test_stored_tokens_are_stacked_not_retokenized(tokenizer):
    samples = [{"caption": "a red circle", "input_ids": torch.arange(12, dtype=torch.int32) + i,
                "attention_mask": torch.tensor([1] * 3 + [0] * 9, dtype=torch.int8)} for i in range(2)]
    batch = Collate(tokenizer)(samples)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"][1, 0].item() == 1
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].sum().item() == 6
    assert "num_truncated" not in batch  # nothing was tokenized


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_variable_length_text_embeddings_are_padded_with_a_mask(dtype):
    rows = [torch.randn(n, 5).to(dtype) for n in (3, 7, 1)]
    batch = Collate()([{"caption": str(i), "text_embeddings": r} for i, r in enumerate(rows)])
    padded, mask = batch["text_embeddings"], batch["text_embeddings_mask"]
    assert padded.shape == (3, 7, 5) and padded.dtype == dtype  # 16-bit stays 16-bit
    assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == [3, 7, 1]
    for row, (r, m) in enumerate(zip(rows, mask)):
        assert torch.equal(padded[row, : len(r)], r) and not padded[row, len(r):].any()
        assert m[: len(r)].all() and not m[len(r):].any()
    with pytest.raises(ValueError, match="text_embeddings must all be"):
        pad_text_embeddings([torch.zeros(2, 5), torch.zeros(2, 4)])


def test_unknown_keys_and_mismatched_samples():
    batch = Collate()([{"x": torch.ones(2), "y": torch.ones(i + 1), "z": i, "w": "s"} for i in range(2)])
    assert batch["x"].shape == (2, 2)  # tensors of one shape: stacked
    assert isinstance(batch["y"], list) and [t.shape[0] for t in batch["y"]] == [1, 2]
    assert batch["z"] == [0, 1] and batch["w"] == ["s", "s"]
    with pytest.raises(KeyError, match="different keys"):
        Collate()([{"image": torch.zeros(1)}, {"caption": "x"}])
    with pytest.raises(ValueError, match="empty"):
        Collate()([])


class CaptionedImages(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((3, 2, 2), index, dtype=torch.uint8), "caption": CAPTIONS[index % 3],
                "label": index, "text_embeddings": torch.ones(index + 1, 4, dtype=torch.bfloat16)}


def test_collate_pickles_through_spawned_workers(tokenizer):
    collate = Collate(tokenizer)
    assert pickle.loads(pickle.dumps(collate)).tokenizer.max_length == tokenizer.max_length
    # spawn pickles the collate (and its tokenizer) into each of the 2 workers.
    loader = DataLoader(CaptionedImages(), batch_size=3, num_workers=2, collate_fn=collate,
                        multiprocessing_context="spawn")
    batches = list(loader)
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert batches[1]["image"].dtype == torch.uint8 and batches[1]["image"][:, 0, 0, 0].tolist() == [3, 4, 5]
    assert torch.equal(batches[0]["input_ids"], tokenizer(CAPTIONS).input_ids)
    assert batches[1]["text_embeddings"].shape == (3, 6, 4) and batches[1]["text_embeddings"].dtype == torch.bfloat16
    assert batches[1]["text_embeddings_mask"].sum(dim=1).tolist() == [4, 5, 6]


def test_bucket_lengths_are_powers_of_two_from_8_up_to_the_encoders_length():
    assert [bucket_length(n, 77) for n in (1, 2, 8, 9, 16, 17, 33, 64, 65, 77)] == [8, 8, 8, 16, 16, 32, 64, 64, 77, 77]
    assert len({bucket_length(n, 77) for n in range(1, 78)}) == 5
    assert bucket_length(5, 6) == 6 and bucket_length(13, 12) == 13  # capped, never shorter than the caption


def test_training_batches_are_cut_to_their_length_bucket(tokenizer):
    """With context_length, token ids and masks are cut to the bucket of the batch's longest caption
    (every real token kept, the same ids as the full-length batch), and pre-encoded text is padded
    or cut to its bucket; without it (the latent cache) the full length stays."""
    samples = [{"caption": c} for c in CAPTIONS[1:]]  # 5 and 2 tokens
    full = Collate(tokenizer)(samples)
    cut = Collate(tokenizer, context_length=tokenizer.max_length)(samples)
    longest = int(full["attention_mask"].sum(dim=1).max())
    assert full["input_ids"].shape[1] == 12 and cut["input_ids"].shape[1] == bucket_length(longest, 12) == 8
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :8]) and torch.equal(cut["attention_mask"],
                                                                                     full["attention_mask"][:, :8])
    assert cut["attention_mask"].sum() == full["attention_mask"].sum()
    assert cut["input_ids"].is_contiguous()
    longer = Collate(tokenizer, context_length=tokenizer.max_length)([{"caption": c} for c in CAPTIONS])
    assert longer["input_ids"].shape[1] == 12  # a 9-token caption: bucket 16, capped at the encoder's 12

    embedded = [{"text_embeddings": torch.randn(n, 4).half()} for n in (3, 9)]
    padded = Collate(context_length=77)(embedded)
    assert padded["text_embeddings"].shape == (2, 16, 4) and padded["text_embeddings"].dtype == torch.float16
    assert padded["text_embeddings_mask"].sum(dim=1).tolist() == [3, 9]
    assert torch.equal(padded["text_embeddings"][1, :9], embedded[1]["text_embeddings"])
    assert not padded["text_embeddings"][:, 9:].any()
    assert Collate()(embedded)["text_embeddings"].shape == (2, 9, 4)
