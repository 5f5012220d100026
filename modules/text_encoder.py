"""The text encoder of a text-conditional latent diffusion model: captions -> (B, L, D) + mask.

Stable Diffusion 1.x (Rombach et al. 2022, sec. 3.3) conditions its UNet on the last hidden
states of the frozen CLIP ViT-L/14 text transformer (Radford et al. 2021): 77 tokens of width 768
that the UNet's cross-attention layers attend to. :class:`TextEncoder` wraps a Hugging Face
``CLIPTokenizer`` + ``CLIPTextModel`` loaded by hub name (``openai/clip-vit-large-patch14``) or
from a local folder, frozen (the default) or trainable, and returns the hidden states together
with the boolean padding mask, so padded positions can be masked out of cross-attention. A
trained encoder can recompute its layers' activations in backward (``gradient_checkpointing``)
to fit larger batches.

Tokenization lives in :class:`CaptionTokenizer`, a small picklable object (one tokenizer call
per batch) that DataLoader workers can run too: ``TextEncoder.caption_tokenizer``.

Offline (tests, CI, the demo) :func:`build_tiny_clip` writes a folder with a real
``CLIPTokenizer`` (a byte-level BPE vocabulary learned from the captions, see
:mod:`modules.clip_vocab`) and a small random-init ``CLIPTextModel``; ``TextEncoder(folder)``
then loads it through exactly the code path used for the real model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from modules.clip_vocab import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, learn_bpe
from modules.errors import UserError

__all__ = ["CaptionTokenizer", "TextEncoder", "TokenizedCaptions", "build_tiny_clip"]


class TokenizedCaptions(NamedTuple):
    """Token ids and padding mask of a batch of captions.

    input_ids: (B, L) long, ``<|startoftext|> words <|endoftext|>`` then padding to L = max_length.
    attention_mask: (B, L) long, 1 on real tokens (start and end tokens included), 0 on padding.
    num_truncated: how many captions were longer than L tokens and lost their tail.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_truncated: int


def encoder_source(name: str) -> str:
    """A text encoder's identity as recorded and compared: a hub name as given, a local folder as its
    absolute path (``prep_cc.py`` records it; stage 2 checks its own model against it from any directory)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


class CaptionTokenizer:
    """Captions -> fixed-length (B, L) token ids and mask, with ONE tokenizer call per batch.

    The Hugging Face tokenizer runs once, without truncation or padding; truncation and padding
    are then done here, exactly as ``tokenizer(..., padding="max_length", truncation=True,
    max_length=L)`` does them for CLIP: a caption longer than L keeps its start token, its first
    L - 2 word pieces and its end token, and is counted; shorter ones are padded with the pad
    token (``<|endoftext|>`` for CLIP) and mask 0. Picklable (it holds only the tokenizer and L),
    so DataLoader workers can tokenize, e.g. in :class:`modules.batching.Collate`.

    Args:
        tokenizer: a Hugging Face tokenizer that wraps each caption in start and end tokens (CLIP's).
        max_length: L, the token length (77 for CLIP).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, captions: Sequence[str]) -> TokenizedCaptions:
        """B captions -> ``TokenizedCaptions`` (input_ids (B, L) int64, attention_mask (B, L) int64, num_truncated)."""
        captions = list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str")
        length = self.max_length
        input_ids = np.full((len(captions), length), self.tokenizer.pad_token_id, dtype=np.int64)
        lengths = np.zeros(len(captions), dtype=np.int64)
        num_truncated = 0
        if captions:
            pieces = self.tokenizer(captions, truncation=False, padding=False, verbose=False)["input_ids"]
            for row, ids in enumerate(pieces):
                if len(ids) > length:
                    num_truncated += 1
                    ids = ids[: length - 1] + ids[-1:]  # start token + first L - 2 pieces + end token
                input_ids[row, : len(ids)] = ids
                lengths[row] = len(ids)
        attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)  # (B, L)
        return TokenizedCaptions(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), num_truncated)

    def fingerprint(self) -> str:
        """A hash of everything that decides the ids: the tokenizer's full definition (or its
        vocabulary) and L. Tokens cached with another tokenizer are never reused."""
        digest = hashlib.blake2b(digest_size=16)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        digest.update(f"{type(self.tokenizer).__name__}:{self.max_length}:{self.tokenizer.pad_token_id}:".encode())
        digest.update(definition.encode("utf-8"))
        return digest.hexdigest()


class TextEncoder(nn.Module):
    """A Hugging Face CLIP text model and its tokenizer, frozen or trainable.

    Args:
        name_or_path: hub name (``openai/clip-vit-large-patch14``) or a local folder holding
            ``save_pretrained`` output of both a ``CLIPTokenizer`` and a ``CLIPTextModel``.
        cache_dir: Hugging Face cache folder (None: the library default).
        local_files_only: never touch the network; only the folder or the cache.
        trainable: False (default): ``eval()``, ``requires_grad_(False)``, forward under no_grad,
            as the frozen text encoder of Stable Diffusion. True: gradients flow into it.
        dtype: parameter dtype (bfloat16 halves the memory of a frozen encoder).
        gradient_checkpointing: with ``trainable``, run every transformer layer under non-reentrant
            activation checkpointing (Hugging Face's own, per ``CLIPEncoderLayer``): its activations
            are recomputed in backward instead of stored; it acts in training mode only. A frozen
            encoder runs under no_grad and stores nothing, so there it changes nothing.

    Attributes: ``tokenizer``, ``model``, ``hidden_size`` (D), ``max_length`` (L, 77 for CLIP),
    ``caption_tokenizer`` (a picklable :class:`CaptionTokenizer` of the two, for DataLoader workers),
    ``gradient_checkpointing`` (whether it is on: asked for and trainable).
    """

    def __init__(
        self,
        name_or_path: Union[str, Path],
        cache_dir: Optional[Union[str, Path]] = None,
        local_files_only: bool = False,
        trainable: bool = False,
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        name = str(name_or_path)
        cache = None if cache_dir is None else str(cache_dir)
        looks_local = Path(name).exists() or name.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(name).expanduser().is_dir():
            raise UserError(f"text encoder folder {name!r} does not exist")
        if looks_local:
            name = str(Path(name).expanduser())
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(name, cache_dir=cache, local_files_only=local_files_only)
            self.model = CLIPTextModel.from_pretrained(
                name, cache_dir=cache, local_files_only=local_files_only, dtype=dtype
            )
        except (OSError, ValueError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if looks_local:
                raise UserError(
                    f"text encoder folder {name!r} does not hold a CLIP tokenizer and text model ({detail})"
                ) from None
            where = f"the Hugging Face cache {cache}" if cache else "the default Hugging Face cache"
            raise UserError(
                f"text encoder {name!r} is not in {where} and there is no network to download it "
                f"(or local_files_only is set): download it once with a network, or pass a local model folder "
                f"such as one written by build_tiny_clip ({detail})"
            ) from None
        self.model.to(dtype)
        self.trainable = trainable
        self.hidden_size: int = self.model.config.hidden_size
        self.max_length: int = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        self.caption_tokenizer = CaptionTokenizer(self.tokenizer, self.max_length)
        self.model.requires_grad_(trainable)
        self.gradient_checkpointing = gradient_checkpointing and trainable
        if self.gradient_checkpointing:
            _enable_checkpointing(self.model)
        self.train(trainable)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Like ``nn.Module.train``, but a frozen encoder stays in eval mode (no dropout) always."""
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    # ------------------------------------------------------------------------------------
    # captions -> tokens -> hidden states
    # ------------------------------------------------------------------------------------

    def tokenize(self, captions: Sequence[str]) -> TokenizedCaptions:
        """Tokenize captions to fixed-length (B, L) ids and mask, counting the truncated ones
        (:class:`CaptionTokenizer`: one tokenizer call).

        Padding is to ``max_length`` (with ``<|endoftext|>``, as CLIP pads); longer captions are
        truncated to their first L - 2 word pieces, keeping the start and end tokens.
        """
        return self.caption_tokenizer(captions)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states of the text transformer.

        Args:
            input_ids: (B, L) token ids; attention_mask: (B, L) 1/0 or bool (None: all real tokens).
        Returns:
            hidden_states (B, L, D) in the encoder's dtype, mask (B, L) bool (True = real token).
            CLIP's attention is causal, so the states of real tokens do not depend on the padding.
        """
        device = self.model.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            # The mask is not passed: the causal mask alone gives the real tokens the same states
            # (padding comes after them), and transformers would read the padding mask on the host
            # (to see if it can be dropped) at every call, a device sync in every training step.
            hidden = self.model(input_ids=input_ids).last_hidden_state  # (B, L, D)
        return hidden, attention_mask.bool()

    def forward(self, captions_or_ids: Union[Sequence[str], torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``encode(tokenize(captions))`` for a list of B captions, or ``encode(input_ids, attention_mask)``
        for token ids (B, L) tokenized earlier (in DataLoader workers) -> ((B, L, D), (B, L) bool).

        Training calls it with ids through the DDP wrapper, so a trained encoder's gradients are synced.
        """
        if isinstance(captions_or_ids, torch.Tensor):
            return self.encode(captions_or_ids, attention_mask)
        tokens = self.tokenize(captions_or_ids)
        return self.encode(tokens.input_ids, tokens.attention_mask)

    def null_condition(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt ``""`` repeated B times: the unconditional input of classifier-free
        guidance (Ho & Salimans 2022), as Stable Diffusion uses it. Returns ((B, L, D), (B, L))."""
        hidden, mask = self.forward([""])  # (1, L, D), (1, L)
        return hidden.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    def pre_encoded(
        self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pass through hidden states computed earlier (``prep_cc.py --hf_clip_model_name``).

        Checks that they come from an encoder of this width and length, and returns them in
        the same form as :meth:`encode`: ((B, L, D) on the encoder's device, (B, L) bool mask).
        """
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise UserError(
                f"pre-encoded text has shape {tuple(hidden_states.shape)}; expected (B, L, {self.hidden_size}) "
                f"from the text encoder {self.model.config.name_or_path!r}: re-encode the dataset with that model"
            )
        if hidden_states.shape[1] > self.max_length:
            raise UserError(
                f"pre-encoded text has {hidden_states.shape[1]} tokens; the text encoder allows at most {self.max_length}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool)
        if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
            raise UserError(
                f"pre-encoded text mask has shape {tuple(attention_mask.shape)}; expected {tuple(hidden_states.shape[:2])}"
            )
        device = self.model.device
        return hidden_states.to(device), attention_mask.to(device).bool()


def _enable_checkpointing(model: CLIPTextModel) -> None:
    """Non-reentrant activation checkpointing of every transformer layer of a Hugging Face model:
    ``activation_checkpointing_enable`` where transformers has it (it deprecates the older
    ``gradient_checkpointing_enable`` alias), else ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------------------
# A tiny CLIP text model, built offline
# ----------------------------------------------------------------------------------------

def build_tiny_clip(
    save_dir: Union[str, Path],
    captions_or_words: Sequence[str],
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_position_embeddings: int = 77,
    intermediate_size: Optional[int] = None,
    seed: int = 0,
    vision_image_size: Optional[int] = None,
) -> Path:
    """Write a small, random-init CLIP text model with a real tokenizer into ``save_dir``.

    The tokenizer is a genuine ``transformers.CLIPTokenizer`` over a byte-level BPE vocabulary
    learned from ``captions_or_words`` (:func:`modules.clip_vocab.learn_bpe`): every word of them
    is one token; other text still tokenizes byte by byte. The folder holds ``vocab.json``,
    ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` and
    ``model.safetensors``, the same files as a hub CLIP, so ``TextEncoder(save_dir)`` loads it by
    the same code path. Same inputs and seed -> byte-identical files; the global RNG is untouched.

    Args:
        hidden_size / layers / heads / intermediate_size (default 4 * hidden_size):
            the transformer's width, depth, heads and MLP width.
        max_position_embeddings: the token length L (77 as CLIP).
        vision_image_size: also a vision tower of that input size (patches of size / 4, same width
            and depth) and a ``CLIPImageProcessor``: a whole ``CLIPModel`` + ``CLIPProcessor`` folder,
            as the CLIP score needs (``TextEncoder`` still reads its text tower).
    Returns:
        ``save_dir`` as a Path.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    bpe = learn_bpe(captions_or_words)
    tokenizer = CLIPTokenizer(vocab=bpe.vocab, merges=list(bpe.merges), model_max_length=max_position_embeddings)

    # Every learned word must come back as exactly one token, or the vocabulary is wrong.
    for word in bpe.words:
        token = word + END_OF_WORD
        ids = tokenizer.backend_tokenizer.model.tokenize(word)
        if len(ids) != 1 or ids[0].value != token:
            raise RuntimeError(f"BPE vocabulary does not round-trip the word {word!r}: {[t.value for t in ids]}")

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_position_embeddings,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if vision_image_size is None:
            model = CLIPTextModel(config)
        else:
            from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

            vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=config.intermediate_size,
                                      num_hidden_layers=layers, num_attention_heads=heads, projection_dim=hidden_size,
                                      image_size=vision_image_size, patch_size=max(1, vision_image_size // 4))
            model = CLIPModel(CLIPConfig(text_config=config.to_dict(), vision_config=vision.to_dict(),
                                         projection_dim=hidden_size))
            CLIPImageProcessor(size={"shortest_edge": vision_image_size},
                               crop_size={"height": vision_image_size, "width": vision_image_size}).save_pretrained(save_dir)

    tokenizer.save_pretrained(save_dir)
    model.save_pretrained(save_dir)
    # The two classic CLIP vocabulary files, as openai/clip-vit-large-patch14 ships them.
    (save_dir / "vocab.json").write_text(json.dumps(bpe.vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in bpe.merges)
    (save_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    return save_dir

