"""A byte-level BPE vocabulary in the CLIP format, learned from a handful of captions.

CLIP's tokenizer (Radford et al. 2021) is the GPT-2 byte-level BPE (Sennrich et al. 2016,
"Neural Machine Translation of Rare Words with Subword Units"; Radford et al. 2019) with an
end-of-word suffix ``</w>``: text is NFC-normalised, whitespace-collapsed and lower-cased, split
into words (letters runs, single digits, punctuation runs, English contractions), each word's
UTF-8 bytes are mapped to printable unicode symbols, and learned merges join the symbols back
into sub-words. The vocabulary file lists, in order, the 256 byte symbols, the same 256 with
``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.

Offline, the toolkit cannot download ``openai/clip-vit-large-patch14``'s 49,408-entry vocabulary,
so :func:`learn_bpe` learns a small one of the same format from the words of the captions it will
see: the classic greedy BPE training loop, run until every word is a single token. Any other
text still tokenizes (every byte has a symbol), just into more pieces.

The normaliser and pre-tokeniser are not re-implemented here: they are taken from a real
``transformers.CLIPTokenizer`` so the words learned are exactly the words that tokenizer sees.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

from transformers import CLIPTokenizer

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "END_OF_WORD", "BpeVocab", "bytes_to_unicode", "clip_words", "learn_bpe"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def bytes_to_unicode() -> Dict[int, str]:
    """The GPT-2/CLIP map from each byte value (0..255) to a printable unicode character.

    Printable latin-1 bytes map to themselves; the other 68 (control characters, space, ...) map
    to code points 256, 257, ... in byte order, so no symbol is whitespace or a control character.
    Dict order is the vocabulary order CLIP uses: printable bytes first, then the remapped ones.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def clip_words(texts: Iterable[str]) -> collections.Counter:
    """Count the pre-tokenised words of ``texts`` as CLIP's tokenizer splits them.

    Returns a Counter of words written in the byte-unicode alphabet of :func:`bytes_to_unicode`
    (``"café"`` becomes ``"cafÃ©"``), i.e. the strings the BPE model sees.
    """
    backend = CLIPTokenizer().backend_tokenizer  # normaliser + pre-tokeniser only; its vocab is unused
    counts: collections.Counter = collections.Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text)
        counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


@dataclass(frozen=True)
class BpeVocab:
    """A learned vocabulary: ``vocab`` maps token -> id (CLIP order), ``merges`` in rank order."""

    vocab: Dict[str, int]
    merges: List[Tuple[str, str]]
    words: List[str]  # the byte-unicode words it was learned from, each one token (plus </w>)


def _merge_word(symbols: Tuple[str, ...], pair: Tuple[str, str]) -> Tuple[str, ...]:
    """Join every left-to-right, non-overlapping occurrence of ``pair`` in ``symbols``."""
    out: List[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_bpe(texts: Sequence[str]) -> BpeVocab:
    """Learn byte-level BPE merges until every word of ``texts`` is one ``word</w>`` token.

    The greedy loop of Sennrich et al. 2016 (Algorithm 1): count adjacent symbol pairs over all
    words (weighted by word frequency), merge the most frequent pair everywhere, repeat. Ties go
    to the lexicographically smallest pair, so the result depends only on the texts. Because each
    merge is applied to every word when it is learned, encoding a training word with the merges in
    rank order replays exactly this segmentation and ends in the single word token.

    Cost is O(number of merges x total word length): meant for the few hundred distinct words of
    test and demo captions, not for a web-scale corpus.
    """
    counts = clip_words(texts)
    byte_symbols = list(bytes_to_unicode().values())
    # Each word as symbols, the last carrying the end-of-word suffix (CLIP's BPE end_of_word_suffix).
    segmentations: Dict[str, Tuple[str, ...]] = {
        word: tuple(word[:-1]) + (word[-1] + END_OF_WORD,) for word in sorted(counts)
    }
    merges: List[Tuple[str, str]] = []
    while True:
        pair_counts: collections.Counter = collections.Counter()
        for word, symbols in segmentations.items():
            for pair in zip(symbols[:-1], symbols[1:]):
                pair_counts[pair] += counts[word]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        segmentations = {word: _merge_word(symbols, best) for word, symbols in segmentations.items()}

    vocab: Dict[str, int] = {}
    for token in byte_symbols + [s + END_OF_WORD for s in byte_symbols]:
        vocab[token] = len(vocab)
    for left, right in merges:
        # Two merge paths can produce the same string ("ab"+"c", "a"+"bc"); it keeps one id.
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return BpeVocab(vocab=vocab, merges=merges, words=sorted(counts))
