"""Batches of dataset samples: one picklable collate function for every dataset and the latent cache.

The datasets (:mod:`modules.image_datasets`, :class:`modules.latent_cache.CachedLatentDataset`)
return one dict per sample; :class:`Collate` turns B of them into one dict of batched tensors:

- ``"image"``: uint8 (B, 3, H, W), converted on the device by
  :func:`modules.image_datasets.images_to_model`;
- ``"latent_mean"``, ``"latent_std"``: (B, C, h, w);
- ``"label"``: int64 (B,);
- ``"caption"``: list of B str;
- ``"input_ids"`` int64 (B, L) and ``"attention_mask"`` bool (B, L): stacked when the samples
  carry them (``prep_cc.py`` output, the latent cache); otherwise, when the collate has a
  :class:`modules.text_encoder.CaptionTokenizer`, made from the captions by ONE tokenizer call
  per batch, in the DataLoader worker, with ``"num_truncated"`` (int) added;
- ``"text_embeddings"``: pre-encoded text, one (L_i, D) tensor per caption (its real tokens, see
  ``prep_cc.py``), right-padded with zeros to (B, L_max, D) in its own dtype (16-bit stays
  16-bit), with ``"text_embeddings_mask"`` bool (B, L_max), True on real tokens. (Samples whose
  embeddings still hold all L rows next to an L-long ``attention_mask``, as older ``prep_cc.py``
  outputs, take that mask instead.) The UNet's cross-attention masks the padding, and CLIP's
  causal attention makes the real tokens' states independent of it (Radford et al. 2021);
- any other key: stacked when every value is a tensor of one shape, else a list.

Text length buckets. Given ``context_length`` (the text encoder's L, 77 for CLIP), the text of a
training batch is cut (or padded) to :func:`bucket_length` of its longest caption: the next
power of two from 8 up, at most L (8, 16, 32, 64, 77 for CLIP). Captions are mostly much shorter
than 77 tokens (CC3M: ~15), and every cross-attention projects and attends to this length only;
the cut happens here, on the CPU in the worker, so the step never reads a mask back from the
device to find the length (a host sync), and a compiled UNet sees at most 5 lengths (a compile
each) rather than one per batch.

Every sample of a batch must have the same keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import default_collate

if TYPE_CHECKING:  # transformers is a heavy import; the tokenizer object brings its own
    from modules.text_encoder import CaptionTokenizer

__all__ = ["Collate", "SHORTEST_CONTEXT_BUCKET", "bucket_length", "pad_text_embeddings"]

SHORTEST_CONTEXT_BUCKET = 8  # text lengths of training batches: 8, 16, 32, 64, ... or the encoder's L


def bucket_length(longest: int, limit: int) -> int:
    """The length bucket of a batch whose longest caption has ``longest`` tokens: the next power of
    two from 8 up, at most ``limit`` (never below ``longest``). 77-token CLIP gives 5 buckets."""
    bucket = SHORTEST_CONTEXT_BUCKET
    while bucket < longest:
        bucket *= 2
    return max(longest, min(bucket, limit))


def last_real_position(mask: torch.Tensor) -> int:
    """1 + the last position that is a real token in some row of ``mask`` (B, L) (a CPU tensor)."""
    columns = mask.bool().any(dim=0).nonzero()
    return int(columns[-1]) + 1 if len(columns) else 0



def pad_text_embeddings(embeddings: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """B tensors (L_i, D) -> zero-padded (B, L_max, D) in their dtype and a bool mask (B, L_max).

    ``masks`` (optional, one (L_i,) per tensor): the real tokens of embeddings that were stored
    with their padding; without it the first L_i rows of each are real.
    """
    if not embeddings:
        raise ValueError("no text embeddings to pad")
    first = embeddings[0]
    for e in embeddings:
        if e.ndim != 2 or e.shape[1] != first.shape[1] or e.dtype != first.dtype:
            raise ValueError(f"text_embeddings must all be (L_i, {first.shape[-1]}) {first.dtype}; got "
                             f"{[(tuple(x.shape), x.dtype) for x in embeddings]}")
    longest = max(e.shape[0] for e in embeddings)
    padded = first.new_zeros((len(embeddings), longest, first.shape[1]))  # (B, L_max, D)
    mask = torch.zeros((len(embeddings), longest), dtype=torch.bool)  # (B, L_max)
    for row, e in enumerate(embeddings):
        padded[row, : e.shape[0]] = e
        if masks is not None:
            mask[row, : e.shape[0]] = masks[row].bool()
        else:
            mask[row, : e.shape[0]] = True
    return padded, mask


def _stack_or_list(values: List[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values) and len({(tuple(v.shape), v.dtype) for v in values}) == 1:
        return default_collate(values)  # in a worker: straight into shared memory, no extra copy
    return list(values)


class Collate:
    """``collate_fn`` for a DataLoader: list of B sample dicts -> one batch dict (see the module docstring).

    Args:
        tokenizer: tokenizes the captions of samples that carry no ``input_ids`` (one call per
            batch, in the worker). None: captions stay text only.
        context_length: the text encoder's L: cut the batch's text to its length bucket (see the
            module docstring). None: keep the stored / tokenized length (the latent cache stores
            every caption at one length).
    Picklable, so it works with any number of workers and any start method.
    """

    def __init__(self, tokenizer: Optional[CaptionTokenizer] = None, context_length: Optional[int] = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            raise ValueError("Collate got an empty list of samples")
        keys = list(samples[0])
        for sample in samples[1:]:
            if set(sample) != set(keys):
                raise KeyError(f"samples of one batch have different keys: {sorted(keys)} and {sorted(sample)}")
        batch: Dict[str, Any] = {}
        for key in keys:
            values = [sample[key] for sample in samples]
            if key == "caption":
                batch[key] = [str(v) for v in values]
            elif key == "label":
                batch[key] = torch.as_tensor([int(v) for v in values], dtype=torch.long)  # (B,)
            elif key == "input_ids":
                batch[key] = torch.stack([torch.as_tensor(v) for v in values]).long()  # (B, L)
            elif key == "attention_mask":
                batch[key] = torch.stack([torch.as_tensor(v) for v in values]).bool()  # (B, L)
            elif key == "text_embeddings":
                # Embeddings stored with their padding (L_i == the mask's L) take the stored mask.
                masks = [s.get("attention_mask") for s in samples]
                full = all(m is not None and len(m) == e.shape[0] for m, e in zip(masks, values))
                padded, mask = pad_text_embeddings(values, [torch.as_tensor(m) for m in masks] if full else None)
                batch[key], batch["text_embeddings_mask"] = padded, mask
            else:
                batch[key] = _stack_or_list(values)
        if self.tokenizer is not None and "caption" in batch and "input_ids" not in batch:
            tokens = self.tokenizer(batch["caption"])
            batch["input_ids"] = tokens.input_ids  # (B, L) int64
            batch["attention_mask"] = tokens.attention_mask.bool()  # (B, L)
            batch["num_truncated"] = tokens.num_truncated
        if self.context_length is not None:
            self._cut_to_bucket(batch)
        return batch

    def _cut_to_bucket(self, batch: Dict[str, Any]) -> None:
        """Cut token ids / masks and pad or cut pre-encoded text to the batch's length bucket."""
        if "attention_mask" in batch:
            mask = batch["attention_mask"]  # (B, L)
            length = bucket_length(last_real_position(mask), min(self.context_length, mask.shape[1]))
            batch["attention_mask"] = mask[:, :length].contiguous()
            if "input_ids" in batch:
                batch["input_ids"] = batch["input_ids"][:, :length].contiguous()
        if "text_embeddings" in batch:
            hidden, mask = batch["text_embeddings"], batch["text_embeddings_mask"]  # (B, L, D), (B, L)
            length = bucket_length(last_real_position(mask), self.context_length)
            if length <= hidden.shape[1]:
                hidden, mask = hidden[:, :length], mask[:, :length]
            else:
                extra = length - hidden.shape[1]
                hidden = torch.cat([hidden, hidden.new_zeros((hidden.shape[0], extra, hidden.shape[2]))], dim=1)
                mask = torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], dim=1)
            batch["text_embeddings"], batch["text_embeddings_mask"] = hidden.contiguous(), mask.contiguous()
