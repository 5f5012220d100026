"""The latent diffusion UNet: shapes, masking, checkpointing, class CFG, and equality with diffusers."""
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_timestep_embedding

import modules.unet as unet_module
from modules.diffusers_interop import diffusers_to_our_unet_state, our_unet_state_to_diffusers
from modules.unet import TimestepEmbedder, UNet, UNetConfig

TEXT_DIM = 16


def tiny_config(**overrides) -> UNetConfig:
    """Two levels, 16/32 channels: the smallest SD-shaped UNet."""
    kwargs = dict(
        in_channels=4,
        out_channels=4,
        down_block_types=["AttnDown", "Down"],
        up_block_types=["Up", "AttnUp"],
        unet_channels_per_block=[16, 32],
        unet_residual_layers_per_block=1,
        num_attention_heads=2,
        time_embed_start_dim=16,
        time_embed_proj_dim=64,
        text_embed_dim=TEXT_DIM,
        groupnorm_groups=8,
        num_classes=5,
        class_embed_dim=8,
    )
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: the zero-initialised output layers would otherwise hide the
    attention and ResNet branches from every test."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * 0.2
        p.copy_(noise + 1.0 if re.search(r"norm\w*\.weight$", name) else noise)
    return model


def inputs(batch=2, size=8, length=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=gen)
    t = torch.tensor([3, 780][:batch])
    context = torch.randn(batch, length, TEXT_DIM, generator=gen)
    return x, t, context


# ------------------------------------------------------------------------------------------
# shapes and conditioning modes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
def test_output_shapes_text_class_unconditional(size):
    x = torch.randn(2, 4, *size)
    t = torch.tensor([1, 999])
    text = UNet(tiny_config(text_conditioning=True, out_channels=3))
    assert text(x, t, torch.randn(2, 5, TEXT_DIM)).shape == (2, 3, *size)
    klass = UNet(tiny_config(class_conditioning=True))
    assert klass(x, t, class_labels=torch.tensor([0, 4])).shape == (2, 4, *size)
    uncond = UNet(tiny_config(mid_block_type="None"))
    assert uncond(x, t.float()).shape == (2, 4, *size)
    assert uncond(x, torch.tensor(7)).shape == (2, 4, *size)  # one timestep for the batch
    # Unconditional attention levels keep self-attention only.
    assert all(block.attn2 is None for block in uncond.modules() if isinstance(block, unet_module.BasicTransformerBlock))


def test_fresh_unet_predicts_zero_and_conditioning_is_enforced():
    model = UNet(tiny_config(text_conditioning=True))
    x, t, context = inputs()
    assert torch.count_nonzero(model(x, t, context)) == 0  # zero-initialised output conv
    with pytest.raises(ValueError, match="needs a context"):
        model(x, t)
    with pytest.raises(ValueError, match="not class-conditional"):
        model(x, t, context, class_labels=torch.tensor([0, 1]))


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown block type 'CrossAttnDown'"):
        tiny_config(down_block_types=["CrossAttnDown", "Down"])
    with pytest.raises(ValueError, match="one entry per level"):
        tiny_config(up_block_types=["Up"])
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny_config(num_attention_heads=3)
    with pytest.raises(ValueError, match="text_conditioning needs"):
        tiny_config(text_conditioning=True, down_block_types=["Down", "Down"], up_block_types=["Up", "Up"],
                    mid_block_type="Mid")


def test_channels_last_and_bfloat16_autocast_agree_with_float32():
    model = randomize(UNet(tiny_config(text_conditioning=True))).eval()
    x, t, context = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    with torch.no_grad():
        reference = model(x, t, context, mask)
        model.to(memory_format=torch.channels_last)
        fast = model(x.contiguous(memory_format=torch.channels_last), t, context, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, context, mask)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert low.dtype == torch.bfloat16
    # bfloat16 keeps ~3 significant digits; the masked padding must stay masked (no -inf/NaN).
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


# ------------------------------------------------------------------------------------------
# text padding mask
# ------------------------------------------------------------------------------------------

def test_padded_text_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    model = randomize(UNet(tiny_config(text_conditioning=True))).eval()
    x, t, _ = inputs()
    real = torch.randn(2, 4, TEXT_DIM)  # 4 real tokens per caption
    outs = []
    for pad, seed in [(0, 0), (3, 1), (9, 2)]:  # different amounts of different garbage
        garbage = torch.randn(2, pad, TEXT_DIM, generator=torch.Generator().manual_seed(seed)) * 10
        context = torch.cat([real, garbage], dim=1)
        mask = torch.arange(4 + pad)[None, :].expand(2, -1) < 4
        with torch.no_grad():
            outs.append(model(x, t, context, mask))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=0)
    # The same garbage without the mask does change the output: the check above is not vacuous.
    with torch.no_grad():
        unmasked = model(x, t, torch.cat([real, torch.randn(2, 3, TEXT_DIM) * 10], dim=1))
    assert (unmasked - outs[0]).abs().max() > 1e-2


def test_rows_with_different_lengths_are_masked_independently():
    torch.manual_seed(0)
    model = randomize(UNet(tiny_config(text_conditioning=True))).eval()
    x, t, context = inputs(length=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        batched = model(x, t, context, mask)
        first = model(x[:1], t[:1], context[:1, :3])  # caption 0 alone, without its padding
        second = model(x[1:], t[1:], context[1:])
    torch.testing.assert_close(batched[:1], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1:], second, atol=1e-5, rtol=0)


def test_trim_padding_cuts_only_the_columns_no_row_uses():
    context = torch.randn(3, 6, TEXT_DIM)
    holes = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    trimmed, mask = unet_module.trim_padding(context, holes)
    assert torch.equal(trimmed, context[:, :4]) and torch.equal(mask, holes[:, :4])
    trimmed, mask = unet_module.trim_padding(context, torch.tensor([[1, 1, 0, 0, 0, 0]] * 3, dtype=torch.bool))
    assert torch.equal(trimmed, context[:, :2]) and mask is None  # nothing left to mask
    empty_row = holes.clone()
    empty_row[1] = False  # attends uniformly over all 6 positions: must not be trimmed
    trimmed, mask = unet_module.trim_padding(context, empty_row)
    assert trimmed is context and torch.equal(mask, empty_row)
    assert unet_module.trim_padding(context, None) == (context, None)
    with pytest.raises(ValueError, match="context_mask must be"):
        unet_module.trim_padding(context, holes[:, :5])


@pytest.mark.parametrize("rows", [[[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], [[1, 1, 1, 0, 0, 0]] * 2])
def test_trimmed_forward_and_gradients_equal_the_fully_masked_ones(rows):
    """The speed-up changes nothing: the UNet on the trimmed context (a shorter length, or no mask
    at all when every kept position is real) equals the UNet attending to all 6 positions under the
    mask, outputs and every parameter gradient."""
    torch.manual_seed(0)
    model = randomize(UNet(tiny_config(text_conditioning=True)))
    x, t, context = inputs(length=6)
    mask = torch.tensor(rows, dtype=torch.bool)

    def run(context, mask):
        model.zero_grad()
        out = model(x, t, context, mask)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    trimmed = unet_module.trim_padding(context, mask)
    assert trimmed[0].shape[1] == 3
    out_trimmed, grads_trimmed = run(*trimmed)
    out_full, grads_full = run(context, mask)
    torch.testing.assert_close(out_trimmed, out_full, atol=1e-5, rtol=0)
    assert grads_trimmed.keys() == grads_full.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_trimmed[name], grads_full[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------
# gradient checkpointing
# ------------------------------------------------------------------------------------------

def test_gradient_checkpointing_same_output_and_gradients(monkeypatch):
    config = tiny_config(text_conditioning=True, dropout=0.1)  # dropout: recomputation must replay the masks
    plain = randomize(UNet(config)).train()
    ckpt = UNet(tiny_config(text_conditioning=True, dropout=0.1, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real_checkpoint = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    x, t, context = inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        out = model(x, t, context, mask)
        (out.square().mean()).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    # Down: (ResBlock + transformer) + ResBlock; middle: 2 ResBlocks + transformer;
    # up: 2 ResBlocks, then 2 x (ResBlock + transformer). Every one checkpointed.
    assert len(calls) == (2 + 1) + 3 + (2 + 4)
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().max() > 0 for g in results[0][1].values())
    # No checkpointing in eval mode or without grad.
    calls.clear()
    with torch.no_grad():
        ckpt(x, t, context, mask)
    assert not calls


# ------------------------------------------------------------------------------------------
# class conditioning
# ------------------------------------------------------------------------------------------

def test_class_null_label_is_an_extra_learned_class():
    model = randomize(UNet(tiny_config(class_conditioning=True))).eval()
    assert model.null_class_label == 5
    x, t, _ = inputs()
    with torch.no_grad():
        null = model(x, t, class_labels=torch.tensor([5, 5]))
        real = model(x, t, class_labels=torch.tensor([2, 2]))
        other = model(x, t, class_labels=torch.tensor([2, 5]))
    assert (null - real).abs().max() > 1e-3
    torch.testing.assert_close(other[0], real[0])  # per-sample conditioning
    torch.testing.assert_close(other[1], null[1])
    with pytest.raises(IndexError):
        model(x, t, class_labels=torch.tensor([6, 0]))  # beyond the null class


# ------------------------------------------------------------------------------------------
# numerics against diffusers
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flip,shift", [(True, 0.0), (False, 1.0)])
def test_timestep_embedder_matches_diffusers(flip, shift):
    t = torch.tensor([0, 1, 17, 500, 999])
    ours = TimestepEmbedder(32, 64, flip_sin_to_cos=flip, freq_shift=shift)
    proj = Timesteps(32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    mlp = TimestepEmbedding(32, 64)
    mlp.load_state_dict(ours.state_dict())  # same names: linear_1, linear_2
    torch.testing.assert_close(
        unet_module.timestep_embedding(t, 32, flip_sin_to_cos=flip, downscale_freq_shift=shift),
        get_timestep_embedding(t, 32, flip_sin_to_cos=flip, downscale_freq_shift=shift),
        atol=1e-6, rtol=0,
    )
    torch.testing.assert_close(ours(t), mlp(proj(t)), atol=1e-5, rtol=1e-5)


def test_same_architecture_and_numerics_as_diffusers_unet():
    """Our text UNet is SD's UNet2DConditionModel (linear projections): weights map 1:1 and the
    outputs agree, padding mask included."""
    config = tiny_config(
        text_conditioning=True,
        down_block_types=["AttnDown", "AttnDown", "Down"],
        up_block_types=["Up", "AttnUp", "AttnUp"],
        unet_channels_per_block=[16, 32, 32],
        unet_residual_layers_per_block=2,
        norm_eps=1e-6,
    )
    ours = UNet(config).eval()
    theirs = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=TEXT_DIM,
        attention_head_dim=2, norm_num_groups=8, norm_eps=1e-6, use_linear_projection=True,
    ).eval()
    randomize(theirs, seed=3)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    ours.load_state_dict(diffusers_to_our_unet_state(theirs.state_dict()), strict=True)  # every key maps, none left over
    x, t, context = inputs(size=8, length=7)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7], dtype=torch.bool)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        got = ours(x, t, context, mask)
    # LayerNorm eps is 1e-5 in diffusers and norm_eps (1e-6) here: the only numeric difference.
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # And back: our names map onto diffusers' exactly, split projections included.
    back = our_unet_state_to_diffusers(ours.state_dict())
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
