"""The text encoder: a tiny CLIP built offline, loaded like the real one, frozen or trainable;
its caption tokenizer (one tokenizer call per batch, picklable for DataLoader workers)."""
import hashlib
import pickle

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, CLIPTokenizer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from modules.clip_vocab import bytes_to_unicode, clip_words, learn_bpe
from modules.errors import UserError
from modules.text_encoder import CaptionTokenizer, TextEncoder, TokenizedCaptions, build_tiny_clip

CAPTIONS = [
    "a red circle on a blue background",
    "a green triangle on a white background",
    "A Purple SQUARE on an orange background.",
    "abab bab aaa: 42 café's",  # overlapping pairs, digits, punctuation, non-ASCII, a contraction
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), CAPTIONS, hidden_size=32, layers=2, heads=2)


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return TextEncoder(clip_dir, local_files_only=True)


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120"  # GPT-2's "Ġ"
    assert not any(ch.isspace() for ch in table.values())


def test_tiny_clip_folder_holds_a_real_clip_tokenizer(clip_dir, encoder):
    names = {p.name for p in clip_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "config.json",
            "model.safetensors"} <= names
    assert isinstance(encoder.tokenizer, CLIPTokenizer)
    assert isinstance(AutoTokenizer.from_pretrained(clip_dir), CLIPTokenizer)
    # The classic files alone are enough too (the tokenizer.json-free layout of older repos).
    slow_dir = clip_dir.parent / "vocab_only"
    slow_dir.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (slow_dir / name).write_bytes((clip_dir / name).read_bytes())
    from_files = CLIPTokenizer.from_pretrained(slow_dir)
    assert from_files("a red circle")["input_ids"] == encoder.tokenizer("a red circle")["input_ids"]
    config = encoder.model.config
    tok = encoder.tokenizer
    assert config.vocab_size == len(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == ["<|startoftext|>", "<|endoftext|>"]
    assert encoder.max_length == 77 and encoder.hidden_size == 32


def test_every_caption_word_is_one_token(encoder):
    tok = encoder.tokenizer
    words = clip_words(CAPTIONS)
    assert {"red", "background", "abab", "bab", "aaa", "4", "2", "'s", ":", "."} <= set(words)
    assert "caf\u00c3\u00a9" in words  # "café" in the byte-unicode alphabet
    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    for word in words:
        text = bytes(to_byte[ch] for ch in word).decode("utf-8")
        pieces = tok.tokenize(text)
        assert pieces == [word + "</w>"], (text, pieces)
    ids = tok("a purple square on an orange background")["input_ids"]
    assert len(ids) == 2 + 7  # start + 7 words + end
    assert tok.decode(ids, skip_special_tokens=True) == "a purple square on an orange background"
    # Unseen text still tokenizes, byte by byte, without unknown tokens.
    unseen = tok.tokenize("zebra")
    assert "".join(unseen) == "zebra</w>" and len(unseen) > 1


def test_learn_bpe_is_deterministic_and_clip_ordered():
    first, second = learn_bpe(CAPTIONS), learn_bpe(list(CAPTIONS))
    assert first == second
    vocab = first.vocab
    assert list(vocab)[:256] == list(bytes_to_unicode().values())
    assert list(vocab)[256] == list(bytes_to_unicode().values())[0] + "</w>"
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_build_is_deterministic_given_the_seed(tmp_path):
    def digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    state = torch.random.get_rng_state()
    a = build_tiny_clip(tmp_path / "a", CAPTIONS, seed=7)
    b = build_tiny_clip(tmp_path / "b", CAPTIONS, seed=7)
    c = build_tiny_clip(tmp_path / "c", CAPTIONS, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert digest(a) == digest(b) != digest(c)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (a / name).read_bytes() == (c / name).read_bytes()


def test_tokenize_pads_truncates_and_counts(encoder):
    long_caption = " ".join(["red"] * 100)
    tokens = encoder.tokenize(["a red circle", long_caption, ""])
    tok = encoder.tokenizer
    assert tokens.input_ids.shape == (3, 77) and tokens.attention_mask.shape == (3, 77)
    assert tokens.num_truncated == 1
    assert tokens.attention_mask.sum(dim=1).tolist() == [5, 77, 2]
    assert tokens.input_ids[1, -1].item() == tok.eos_token_id  # truncation keeps the end token
    assert tokens.input_ids[0, 4].item() == tok.eos_token_id
    assert (tokens.input_ids[0, 5:] == tok.pad_token_id).all()
    assert encoder.tokenize(["a red circle"]).num_truncated == 0


def two_call_reference(tokenizer, captions, max_length):
    """The tokenization this replaced: an untruncated call to count, a padded, truncated one for the ids."""
    full = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], sum(n > max_length for n in full)


@pytest.mark.parametrize("max_length", [77, 16, 5])
def test_caption_tokenizer_equals_the_two_call_tokenization(encoder, max_length):
    words = lambda n: " ".join(["red"] * n)  # "red" is one token
    captions = [
        "a red circle",  # short
        "",  # empty: start and end tokens only
        words(max_length - 2),  # exactly L tokens with start and end
        words(max_length - 1),  # one too many: truncated
        words(100),  # long
        "abab bab aaa: 42 café's",  # several pieces per word
        words(max_length - 3) + " zebra",  # truncated in the middle of a byte-level word
    ]
    tokens = CaptionTokenizer(encoder.tokenizer, max_length)(captions)
    ids, mask, truncated = two_call_reference(encoder.tokenizer, captions, max_length)
    assert isinstance(tokens, TokenizedCaptions)
    assert tokens.input_ids.dtype == ids.dtype == torch.int64 and torch.equal(tokens.input_ids, ids)
    assert tokens.attention_mask.dtype == mask.dtype and torch.equal(tokens.attention_mask, mask)
    assert tokens.num_truncated == truncated >= 3
    assert tokens.input_ids.shape == (len(captions), max_length)


def test_caption_tokenizer_calls_the_tokenizer_once_per_batch(encoder):
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return self.inner(*args, **kwargs)

    tokenizer = CaptionTokenizer(Counting(encoder.tokenizer), encoder.max_length)
    tokens = tokenizer(["a red circle", " ".join(["red"] * 100), ""])
    assert len(calls) == 1 and tokens.num_truncated == 1
    assert calls[0].get("truncation") is False and calls[0].get("padding") is False
    # TextEncoder.tokenize goes through its caption tokenizer.
    encoder.caption_tokenizer.tokenizer = Counting(encoder.tokenizer)
    try:
        calls.clear()
        encoder.tokenize(["a red circle", "a blue square"])
        assert len(calls) == 1
    finally:
        encoder.caption_tokenizer.tokenizer = encoder.tokenizer
    assert tokenizer([]).input_ids.shape == (0, encoder.max_length)
    with pytest.raises(TypeError, match="list of str"):
        tokenizer(["a", 3])


class _CaptionsOnly(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return " ".join(["red"] * (index * 20))


def test_caption_tokenizer_pickles_and_runs_in_workers(encoder):
    tokenizer = encoder.caption_tokenizer
    again = pickle.loads(pickle.dumps(tokenizer))
    assert again.max_length == tokenizer.max_length and again.fingerprint() == tokenizer.fingerprint()
    captions = [_CaptionsOnly()[i] for i in range(6)]
    assert torch.equal(again(captions).input_ids, tokenizer(captions).input_ids)
    # (tests/test_batching.py runs it in spawned workers, where it is really pickled, through Collate)
    loader = DataLoader(_CaptionsOnly(), batch_size=3, num_workers=2, collate_fn=tokenizer)
    batches = list(loader)
    assert [b.num_truncated for b in batches] == [0, 2]
    assert torch.equal(torch.cat([b.input_ids for b in batches]), tokenizer(captions).input_ids)


def test_caption_tokenizer_fingerprint_follows_vocabulary_and_length(encoder, tmp_path):
    other = TextEncoder(build_tiny_clip(tmp_path / "other", ["a zebra"], hidden_size=32, layers=1, heads=2))
    fingerprint = encoder.caption_tokenizer.fingerprint()
    assert fingerprint == CaptionTokenizer(encoder.tokenizer, 77).fingerprint()
    assert fingerprint != CaptionTokenizer(encoder.tokenizer, 16).fingerprint()
    assert fingerprint != other.caption_tokenizer.fingerprint()


def test_encode_shapes_mask_and_padding_independence(encoder):
    hidden, mask = encoder(["a red circle", "a green triangle on a white background"])
    assert hidden.shape == (2, 77, 32) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [5, 9]
    # Causal attention: the real tokens of a caption do not depend on the padding or the batch.
    alone, _ = encoder(["a red circle"])
    torch.testing.assert_close(hidden[0, :5], alone[0, :5], atol=1e-5, rtol=1e-5)
    # encode() leaves the padding mask out (no host read of it in transformers); the real tokens'
    # states equal the model's own with the mask, on the last layer's output for every caption.
    tokens = encoder.tokenize(["a red circle", "a green triangle on a white background"])
    with torch.no_grad():
        masked = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long()).last_hidden_state
    for row, n in enumerate([5, 9]):
        torch.testing.assert_close(hidden[row, :n], masked[row, :n], atol=1e-5, rtol=1e-5)
    null, null_mask = encoder.null_condition(3)
    assert null.shape == (3, 77, 32) and null_mask.sum(dim=1).tolist() == [2, 2, 2]
    torch.testing.assert_close(null[0], encoder([""])[0][0])


def test_frozen_encoder_has_no_gradients_and_does_not_change(clip_dir):
    encoder = TextEncoder(clip_dir, local_files_only=True)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # stays in eval mode
    probe = torch.nn.Linear(32, 1)
    optimizer = torch.optim.SGD(list(probe.parameters()) + list(encoder.parameters()), lr=1.0)
    hidden, _ = encoder(["a red circle on a blue background"])
    assert hidden.grad_fn is None
    probe(hidden).sum().backward()
    optimizer.step()
    assert all(p.grad is None for p in encoder.parameters())
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_trainable_encoder_gets_gradients_and_bfloat16_cast(clip_dir):
    trainable = TextEncoder(clip_dir, local_files_only=True, trainable=True)
    hidden, _ = trainable(["a red circle"])
    hidden.sum().backward()
    grads = [p.grad for p in trainable.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    half = TextEncoder(clip_dir, local_files_only=True, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half(["a red circle"])[0].dtype == torch.bfloat16


def test_pre_encoded_hidden_states_pass_through(encoder):
    hidden, mask = encoder(["a red circle"])
    got_hidden, got_mask = encoder.pre_encoded(hidden, mask.long())
    assert torch.equal(got_hidden, hidden) and got_mask.dtype == torch.bool and torch.equal(got_mask, mask)
    with pytest.raises(UserError, match=r"expected \(B, L, 32\)"):
        encoder.pre_encoded(torch.zeros(1, 77, 768))
    with pytest.raises(UserError, match="mask has shape"):
        encoder.pre_encoded(hidden, torch.ones(1, 10))


def test_missing_model_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"'openai/clip-vit-large-patch14' is not in the Hugging Face cache .*no network"):
        TextEncoder("openai/clip-vit-large-patch14", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(UserError, match="does not exist"):
        TextEncoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="does not hold a CLIP"):
        TextEncoder(tmp_path / "empty")


def test_gradient_checkpointing_of_a_trained_encoder_recomputes_with_same_results(clip_dir):
    plain = TextEncoder(clip_dir, local_files_only=True, trainable=True)
    ckpt = TextEncoder(clip_dir, local_files_only=True, trainable=True, gradient_checkpointing=True)
    assert ckpt.gradient_checkpointing and not plain.gradient_checkpointing
    layer_calls = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        layers = [m for m in model.model.modules() if isinstance(m, CLIPEncoderLayer)]
        assert len(layers) == 2
        # A pre-hook of the layer's first sub-module: the layer's own hooks stay outside the checkpoint in
        # newer transformers, and the recomputation stops once it has what backward needs (early stop).
        for layer in layers:
            layer.layer_norm1.register_forward_pre_hook(
                lambda *_, name=name: layer_calls.update({name: layer_calls.get(name, 0) + 1}))
    results = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        hidden, _ = model(["a red circle on a blue background", "a green triangle"])
        (hidden.square().mean()).backward()
        results[name] = (hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    # Recomputed: each of the 2 layers runs again in backward.
    assert layer_calls == {"plain": 2, "ckpt": 4}
    torch.testing.assert_close(results["ckpt"][0], results["plain"][0], atol=1e-6, rtol=1e-6)
    for name, grad in results["plain"][1].items():
        torch.testing.assert_close(results["ckpt"][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # Only in training mode: an eval-mode forward with grad runs each layer once.
    layer_calls.clear()
    ckpt.eval()
    ckpt(["a red circle"])[0].sum().backward()
    assert layer_calls == {"ckpt": 2}
    # A frozen encoder has nothing to checkpoint: the flag stays off.
    frozen = TextEncoder(clip_dir, local_files_only=True, gradient_checkpointing=True)
    assert not frozen.gradient_checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in frozen.model.modules())
