"""Autoencoders, quantizer and shared layers, checked against diffusers and closed forms.

Tiny sizes throughout: every test runs in well under a second on a CPU.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.downsampling import Downsample2D as DiffusersDownsample2D
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D as DiffusersResnetBlock2D
from diffusers.models.upsampling import Upsample2D as DiffusersUpsample2D

from modules.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    VQModel,
    build_autoencoder,
    export_diffusers_vae,
    load_diffusers_vae,
    load_vae_state_dict_strict,
)
from modules.config import from_dict
from modules.discriminator import NLayerDiscriminator
from modules.errors import UserError
from modules.layers import (TRANSPOSED_UPSAMPLE_MIN_PIXELS, Downsample, ResBlock, SelfAttention2d, Upsample,
                            nearest_upsample_conv_taps, timestep_embedding, zero_module)
from modules.quantizer import VectorQuantizer
from modules.vae_io import load_vae, save_vae_export

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine OpenMP
    thread hand-offs cost 50x the arithmetic. Restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb_(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its default init, so norms/biases are exercised too."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def small_config(**overrides) -> VAEConfig:
    base = dict(img_size=16, vae_channels_per_block=[8, 16], residual_layers_per_block=1, norm_num_groups=4,
                latent_channels=3, codebook_size=16, vq_embed_dim=3)
    base.update(overrides)
    return VAEConfig(**base)


# ------------------------------------------------------------------------------------- layers
def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (32, 33):
        for flip in (True, False):
            for shift in (0.0, 1.0):
                ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
                ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
                assert ours.shape == (4, dim)
                torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_layers_load_diffusers_weights_and_match():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    temb = torch.randn(2, 12)

    ref = DiffusersResnetBlock2D(in_channels=16, out_channels=24, temb_channels=12, groups=4, eps=1e-6)
    ours = ResBlock(16, 24, temb_channels=12, num_groups=4)
    perturb_(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.testing.assert_close(ours(x, temb), ref(x, temb), rtol=0, atol=1e-5)

    for padding, asymmetric in ((0, True), (1, False)):
        ref = DiffusersDownsample2D(16, use_conv=True, padding=padding, name="op")
        ours = Downsample(16, asymmetric_padding=asymmetric)
        ours.load_state_dict(ref.state_dict(), strict=True)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
        assert ours(x).shape == (2, 16, 4, 4)

    ref = DiffusersUpsample2D(16, use_conv=True)
    ours = Upsample(16)
    ours.load_state_dict(ref.state_dict(), strict=True)
    # 8x8 input: ours runs as the equivalent transposed convolution (same products, summed in
    # another order), so the two agree to float rounding of 144-term sums, not bit for bit.
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)

    ref = DiffusersAttention(16, heads=2, dim_head=8, norm_num_groups=4, eps=1e-6, residual_connection=True,
                             bias=True, _from_deprecated_attn_block=True)
    ours = SelfAttention2d(16, num_heads=2, num_groups=4)
    perturb_(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
    # head_dim is the other way to say the same thing
    assert SelfAttention2d(16, head_dim=8, num_groups=4).num_heads == 2


@pytest.mark.parametrize("kernel,factor", [(3, 2), (4, 2), (5, 2), (3, 3), (2, 2)])
def test_upsample_as_transposed_convolution_equals_interpolate_then_conv(kernel, factor):
    # Large enough inputs take the transposed-convolution path; output and all gradients must be
    # those of the literal nearest-upsample + convolution (also for even kernels' uneven padding).
    torch.manual_seed(0)
    up = Upsample(5, 6, kernel_size=kernel, factor=factor)
    perturb_(up, scale=0.2)
    x = torch.randn(2, 5, 9, 8, requires_grad=True)
    assert up.transposed_taps is not None and 9 * 8 >= TRANSPOSED_UPSAMPLE_MIN_PIXELS
    expected = F.interpolate(x, scale_factor=float(factor), mode="nearest")
    if up.pad is not None:
        expected = F.pad(expected, up.pad)
    expected = up.conv(expected)
    got = up(x)
    assert got.shape == (2, 6, 9 * factor, 8 * factor)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    params = [x, up.conv.weight, up.conv.bias]
    for a, b in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # A forced output size other than factor x input (the UNet's odd skips) takes the literal path.
    odd = up(x, output_size=(9 * factor - 1, 8 * factor - 1))
    assert odd.shape == (2, 6, 9 * factor - 1, 8 * factor - 1)


def test_upsample_transposed_conv_choice_same_results_and_when_it_applies(monkeypatch):
    # "auto": the transposed form on CPU tensors of >= TRANSPOSED_UPSAMPLE_MIN_PIXELS pixels only;
    # True: always; False: never. All three give the same output and gradients.
    torch.manual_seed(0)
    choices = ("auto", True, False)
    ups = {choice: Upsample(5, 6, transposed_conv=choice) for choice in choices}
    perturb_(ups[False], scale=0.2)
    for choice in ("auto", True):
        ups[choice].load_state_dict(ups[False].state_dict())
    assert ups[False].transposed_taps is None
    transposed_calls = []
    real_transposed = F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: transposed_calls.append(1) or real_transposed(*a, **k))
    for h, w in ((9, 8), (4, 4)):  # 72 and 16 input pixels, either side of the threshold
        x = torch.randn(2, 5, h, w)
        results, took_transposed = {}, {}
        for choice in choices:
            transposed_calls.clear()
            xi = x.clone().requires_grad_(True)
            out = ups[choice](xi)
            params = [xi, ups[choice].conv.weight, ups[choice].conv.bias]
            results[choice] = (out, torch.autograd.grad(out, params, torch.ones_like(out) + out.detach()))
            took_transposed[choice] = bool(transposed_calls)
        big = h * w >= TRANSPOSED_UPSAMPLE_MIN_PIXELS
        assert took_transposed == {"auto": big, True: True, False: False}
        for choice in ("auto", True):
            torch.testing.assert_close(results[choice][0], results[False][0], rtol=1e-5, atol=1e-5)
            for a, b in zip(results[choice][1], results[False][1]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # "auto" on any other device runs diffusers' form: decided from x.device (meta: shapes only).
    transposed_calls.clear()
    meta = Upsample(5, 6).to("meta")
    assert meta(torch.empty(2, 5, 9, 8, device="meta")).shape == (2, 6, 18, 16)
    assert not transposed_calls
    with pytest.raises(ValueError, match="transposed_conv"):
        Upsample(5, transposed_conv="yes")


def test_upsample_transposed_taps_for_kernel_3_factor_2():
    taps, padding, output_padding = nearest_upsample_conv_taps(3, 2, 1)
    # Output row 2m uses x[m-1] with w0 and x[m] with w1 + w2; row 2m + 1 uses x[m] with w0 + w1
    # and x[m+1] with w2. Transposed taps 3, 1 (even rows) and 2, 0 (odd rows).
    assert taps.tolist() == [[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert (padding, output_padding) == (1, 0)


@pytest.mark.parametrize("kernel,factor", [(3, 2), (4, 2), (5, 2), (3, 3), (2, 2)])
def test_resampling_kernel_and_factor(kernel, factor):
    x = torch.randn(1, 4, 12, 12)
    for asymmetric in (True, False):
        if not asymmetric and kernel % 2 == 0 and (kernel - factor) % 2 == 1:
            continue
        assert Downsample(4, 6, asymmetric_padding=asymmetric, kernel_size=kernel, factor=factor)(x).shape == (
            1, 6, 12 // factor, 12 // factor)
    assert Upsample(4, 6, kernel_size=kernel, factor=factor)(x).shape == (1, 6, 12 * factor, 12 * factor)


def test_zero_module_and_resblock_identity_when_residual_zeroed():
    block = ResBlock(8, num_groups=4)
    zero_module(block.conv2)
    assert all(torch.count_nonzero(p) == 0 for p in block.conv2.parameters())
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x), x)


# ------------------------------------------------------------------------ diffusers VAE parity
DIFFUSERS_CONFIGS = {
    # Stable Diffusion's 4-level layout at tiny widths
    "sd_4_level": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=32,
                       latent_channels=4, sample_size=16, scaling_factor=0.3),
    # 2 levels, no mid attention, no quant_conv, a different group count and latent width
    "two_level": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=3,
                      sample_size=16, mid_block_add_attention=False, use_quant_conv=False, scaling_factor=0.5),
}


def make_diffusers_vae(name: str) -> DiffusersAutoencoderKL:
    kw = dict(DIFFUSERS_CONFIGS[name])
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    ref = DiffusersAutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                                 **kw).eval()
    perturb_(ref)
    return ref


def assert_same_vae(ours: AutoencoderKL, ref: DiffusersAutoencoderKL, size: int, latent_channels: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, post_ref.mean, rtol=0, atol=TOL)
        torch.testing.assert_close(post.mode(), post_ref.mode(), rtol=0, atol=TOL)
        torch.testing.assert_close(post.logvar, post_ref.logvar, rtol=0, atol=TOL)
        torch.testing.assert_close(post.kl(), post_ref.kl(), rtol=1e-5, atol=TOL)
        s_ref = post_ref.sample(generator=torch.Generator().manual_seed(7))
        s = post.sample(generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(s, s_ref, rtol=0, atol=TOL)
        z = torch.randn(2, latent_channels, size // 2 ** (len(ours.config.vae_channels_per_block) - 1), size // 2 ** (
            len(ours.config.vae_channels_per_block) - 1))
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=TOL)
        recon, _ = ours(x, sample_posterior=False)
        torch.testing.assert_close(recon, ref(x).sample, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_load_diffusers_vae_matches_diffusers(name, tmp_path):
    ref = make_diffusers_vae(name)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_diffusers_vae(tmp_path / "vae")
    kw = DIFFUSERS_CONFIGS[name]
    assert isinstance(ours, AutoencoderKL) and not ours.training
    assert ours.scaling_factor == kw["scaling_factor"]
    assert ours.config.vae_channels_per_block == list(kw["block_out_channels"])
    assert ours.config.attention_layers == (1 if kw.get("mid_block_add_attention", True) else 0)
    assert (ours.quant_conv is None) == (not kw.get("use_quant_conv", True))
    assert_same_vae(ours, ref, kw["sample_size"], kw["latent_channels"])


def test_load_diffusers_vae_from_pipeline_folder_and_legacy_attention_names(tmp_path):
    ref = make_diffusers_vae("sd_4_level")
    ref.save_pretrained(tmp_path / "pipe" / "vae")
    # rewrite the weights with the pre-refactor attention names (query/key/value/proj_attn)
    from safetensors.torch import load_file, save_file
    f = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in load_file(str(f)).items()}
    assert any(".query." in k for k in legacy)
    save_file(legacy, str(f))
    ours = load_diffusers_vae(tmp_path / "pipe")
    assert_same_vae(ours, ref, 16, 4)


def test_export_diffusers_vae_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = VAEConfig(img_size=16, vae_channels_per_block=[16, 32, 32], residual_layers_per_block=1,
                    norm_num_groups=8, latent_channels=4, pre_decoder_latent_proj=False)
    ours = AutoencoderKL(cfg).eval()
    perturb_(ours)
    export_diffusers_vae(ours, tmp_path / "export", scaling_factor=0.7)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["scaling_factor"] == 0.7 and config["use_post_quant_conv"] is False
    ref = DiffusersAutoencoderKL.from_pretrained(tmp_path / "export").eval()
    assert_same_vae(ours, ref, 16, 4)
    back = load_diffusers_vae(tmp_path / "export")
    assert back.scaling_factor == 0.7 and back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_export_rejects_what_diffusers_cannot_express(tmp_path):
    with pytest.raises(UserError, match="vae_up_down_kernel_size"):
        export_diffusers_vae(AutoencoderKL(small_config(vae_up_down_kernel_size=5)), tmp_path / "a")
    with pytest.raises(UserError, match="KL autoencoders"):
        export_diffusers_vae(VQModel(small_config(quantize=True)), tmp_path / "b")


def test_load_diffusers_vae_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_diffusers_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_diffusers_vae(tmp_path / "empty")
    ref = make_diffusers_vae("two_level")
    ref.save_pretrained(tmp_path / "vae")
    cfg_file = tmp_path / "vae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="down_block_types"):
        load_diffusers_vae(tmp_path / "vae")
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * 2
    cfg["_class_name"] = "VQModel"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="_class_name"):
        load_diffusers_vae(tmp_path / "vae")
    cfg["_class_name"] = "AutoencoderKL"
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights file"):
        load_diffusers_vae(tmp_path / "vae")


# ------------------------------------------------------------------------------ KL posterior
def test_diagonal_gaussian_kl_sample_and_clamp():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 2, 2)
    params[0, 4, 0, 0] = -100.0  # clamped to logvar_min
    post = DiagonalGaussian(params, logvar_min=-30.0, logvar_max=20.0)
    assert post.logvar.min() == -30.0
    mean, logvar = params[:, :4], params[:, 4:].clamp(-30.0, 20.0)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=[1, 2, 3])
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl(), expected, rtol=1e-5, atol=1e-5)
    # KL to another Gaussian, and to itself (0)
    other = DiagonalGaussian(torch.randn(3, 8, 2, 2))
    q2 = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(post.kl(other), torch.distributions.kl_divergence(q, q2).sum(dim=[1, 2, 3]),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(other.kl(other), torch.zeros(3), rtol=0, atol=1e-5)
    # nll is the Gaussian negative log density
    z = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(post.nll(z), -q.log_prob(z).sum(dim=[1, 2, 3]), rtol=1e-5, atol=1e-3)
    # sample = mean + std * eps with eps from the given generator
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(3)), mean + post.std * eps)
    assert torch.equal(post.mode(), mean)


def test_autoencoder_kl_from_config_shapes_and_gan_weight():
    cfg = small_config(img_size=18, vae_up_down_factor=3, vae_up_down_kernel_size=4, attention_layers=2,
                       attention_residual_connections=False)
    model = build_autoencoder(cfg)
    assert isinstance(model, AutoencoderKL)
    assert len(model.encoder.mid_block.attentions) == 2 and len(model.decoder.mid_block.resnets) == 3
    assert len(model.decoder.up_blocks[0].resnets) == cfg.residual_layers_per_block + 1
    x = torch.randn(2, 3, 18, 18)
    recon, post = model(x, generator=torch.Generator().manual_seed(0))
    assert post.mean.shape == (2, 3, 6, 6) and recon.shape == x.shape
    assert model.last_decoder_layer_weight is model.decoder.conv_out.weight
    # the sample path really depends on the generator, the mode path does not
    recon_b, _ = model(x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(recon, recon_b)
    torch.testing.assert_close(model(x, sample_posterior=False)[0], model.decode(post.mode()))


def test_vae_config_validation_names_the_key():
    with pytest.raises(UserError, match="vae.vae_channels_per_block"):
        VAEConfig(vae_channels_per_block=[24, 48], norm_num_groups=32)
    with pytest.raises(UserError, match="vae.img_size"):
        VAEConfig(img_size=20, vae_channels_per_block=[32, 32, 32, 32])
    with pytest.raises(UserError, match="vae.vae_up_down_kernel_size"):
        small_config(vae_up_down_kernel_size=1)
    with pytest.raises(UserError, match="vae.upsample_transposed_conv"):
        small_config(upsample_transposed_conv="always")
    # From YAML: "auto", true and false; anything else names the key.
    for value in ("auto", True, False):
        assert from_dict(VAEConfig, {"upsample_transposed_conv": value}).upsample_transposed_conv == value
    with pytest.raises(UserError, match="upsample_transposed_conv"):
        from_dict(VAEConfig, {"upsample_transposed_conv": 1}, prefix="vae.")


# ---------------------------------------------------------------------------------- quantizer
def make_quantizer(**kw) -> VectorQuantizer:
    q = VectorQuantizer(codebook_size=4, embed_dim=2, **kw)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    return q


def latents_near(codes: list[int], book: torch.Tensor, noise: float = 0.1) -> torch.Tensor:
    """(1, 2, 1, len(codes)) latents, each a small perturbation of the given code."""
    z = book[codes] + noise * torch.randn(len(codes), 2)
    return z.t().reshape(1, 2, 1, len(codes)).clone()


def test_vq_straight_through_and_nearest_codes():
    torch.manual_seed(0)
    q = make_quantizer().eval()
    book = q.embedding.weight.detach().clone()
    z_e = latents_near([0, 3, 1, 1, 2], book).requires_grad_(True)
    z_q, _, _ = q(z_e)
    expected = book[[0, 3, 1, 1, 2]].t().reshape(1, 2, 1, 5)
    assert torch.equal(z_q.detach(), expected)
    assert torch.equal(q.code_indices(z_e), torch.tensor([[[0, 3, 1, 1, 2]]]))
    torch.testing.assert_close(q.get_codebook_entry(torch.tensor([[[0, 3, 1, 1, 2]]])), expected)
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    assert torch.equal(z_e.grad, w)  # dL/dz_e == dL/dz_q


def test_vq_loss_puts_beta_on_the_commitment_term():
    torch.manual_seed(0)
    beta = 0.25
    q = make_quantizer(beta=beta).eval()
    book = q.embedding.weight.detach().clone()
    codes = [0, 0, 2, 3]
    z_e = latents_near(codes, book, noise=0.3).requires_grad_(True)
    _, loss, logs = q(z_e)
    loss.backward()
    z = z_e.detach().reshape(2, 4).t()  # (N, D)
    e = book[codes]
    n_el = z.numel()
    # commitment: d/dz [beta * mean((z - sg e)^2)] = beta * 2 (z - e) / (N D)
    torch.testing.assert_close(z_e.grad.reshape(2, 4).t(), beta * 2 * (z - e) / n_el)
    # codebook: d/de_k [mean((e - sg z)^2)] = sum_{i -> k} 2 (e_k - z_i) / (N D), no beta
    expected = torch.zeros_like(book)
    expected.index_add_(0, torch.tensor(codes), 2 * (e - z) / n_el)
    torch.testing.assert_close(q.embedding.weight.grad, expected)
    torch.testing.assert_close(logs["vq_codebook_loss"], ((e - z) ** 2).mean())
    torch.testing.assert_close(loss.detach(), (1 + beta) * ((e - z) ** 2).mean())


def test_vq_perplexity_and_usage_window():
    torch.manual_seed(0)
    q = make_quantizer(usage_window=2).train()
    book = q.embedding.weight.detach().clone()
    _, _, logs = q(latents_near([0, 1, 0, 1], book))
    torch.testing.assert_close(logs["vq_perplexity"], torch.tensor(2.0))  # two codes used equally
    torch.testing.assert_close(logs["vq_window_usage"], torch.tensor(0.5))
    _, _, logs = q(latents_near([2, 3, 2, 3], book))
    torch.testing.assert_close(logs["vq_window_perplexity"], torch.tensor(4.0))  # window: all four equally
    torch.testing.assert_close(logs["vq_window_usage"], torch.tensor(1.0))
    _, _, logs = q(latents_near([2, 2, 2, 2], book))  # step 1 leaves the 2-step window
    torch.testing.assert_close(logs["vq_perplexity"], torch.tensor(1.0))
    counts = torch.tensor([0.0, 0.0, 6.0, 2.0])
    p = counts / counts.sum()
    expected = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    torch.testing.assert_close(logs["vq_window_perplexity"], expected)
    torch.testing.assert_close(logs["vq_window_usage"], torch.tensor(0.5))
    # eval mode does not record
    q.eval()
    history = q.usage_history.clone()
    q(latents_near([0, 1, 2, 3], book))
    assert torch.equal(q.usage_history, history)


def test_vq_dead_code_restart_is_deterministic_and_uses_hooks():
    def run(seed: int, hooks: bool):
        torch.manual_seed(seed)
        q = make_quantizer(dead_code_restart_steps=2).train()
        calls = {"reduce": 0, "broadcast": 0}
        if hooks:
            def reduce(t):
                calls["reduce"] += 1
                return t  # one process: the sum is itself
            def broadcast(t):
                calls["broadcast"] += 1
                return t + 10.0  # stands in for rank 0's (different) samples
            q.set_distributed_hooks(all_reduce_sum=reduce, broadcast_from_main=broadcast)
        book = q.embedding.weight.detach().clone()
        for _ in range(2):  # only code 0 is used: codes 1-3 die after 2 steps
            _, _, logs = q(latents_near([0, 0, 0], book))
            assert logs["vq_restarted_codes"] == 0
        assert q.steps_since_used.tolist() == [0, 2, 2, 2]
        z_e = latents_near([0, 0, 0, 0, 0], book, noise=0.5)
        _, _, logs = q(z_e)
        return q, z_e, logs, calls, book

    q, z_e, logs, calls, book = run(0, hooks=False)
    assert logs["vq_restarted_codes"] == 3
    assert torch.equal(q.embedding.weight[0], book[0])  # the live code is untouched
    rows = z_e.reshape(2, 5).t()
    for k in (1, 2, 3):  # each restarted code is one of this batch's encoder outputs
        assert any(torch.equal(q.embedding.weight[k].detach(), r) for r in rows)
    assert q.steps_since_used.max() <= 1  # restarted codes start counting afresh
    q_again, *_ = run(0, hooks=False)
    assert torch.equal(q.embedding.weight, q_again.embedding.weight)  # same seed, same restart

    q_h, z_h, logs_h, calls, _ = run(0, hooks=True)
    assert calls == {"reduce": 3, "broadcast": 3}  # candidates every step: no host sync to learn if any code died
    torch.testing.assert_close(q_h.embedding.weight[1:], q.embedding.weight[1:] + 10.0)


# ------------------------------------------------------------------------------------ VQ model
def test_vq_model_encode_decode_and_gradients():
    torch.manual_seed(0)
    cfg = small_config(quantize=True, latent_channels=4, vq_embed_dim=3, post_encoder_latent_proj=False)
    model = build_autoencoder(cfg)
    assert isinstance(model, VQModel) and model.quant_conv is not None  # 4 -> 3 needs the projection
    x = torch.randn(2, 3, 16, 16)
    recon, vq_loss, logs = model(x)
    assert recon.shape == x.shape and vq_loss.dim() == 0 and "vq_perplexity" in logs
    (recon.square().mean() + vq_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        z_e = model.encode(x)
        assert z_e.shape == (2, 3, 8, 8)
        torch.testing.assert_close(model.decode(z_e), model(x)[0])
        assert not torch.allclose(model.decode(z_e, force_not_quantize=True), model.decode(z_e))
    assert model.last_decoder_layer_weight is model.decoder.conv_out.weight


# ------------------------------------------------------------------------------ strict loading
def test_strict_loading_names_mismatched_tensors():
    cfg = small_config()
    model = AutoencoderKL(cfg)
    state = AutoencoderKL(cfg).state_dict()
    load_vae_state_dict_strict(model, state, "ok.safetensors")
    assert torch.equal(model.encoder.conv_in.weight, state["encoder.conv_in.weight"])

    wider = AutoencoderKL(small_config(vae_channels_per_block=[8, 24])).state_dict()
    with pytest.raises(UserError, match=r"w\.safetensors.*shape mismatch.*encoder\.down_blocks\.1\.resnets\.0"):
        load_vae_state_dict_strict(model, wider, "w.safetensors")
    broken = dict(state)
    broken.pop("decoder.conv_out.bias")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing 1: decoder\.conv_out\.bias.*unexpected 1: extra\.weight"):
        load_vae_state_dict_strict(model, broken, "b.safetensors")
    with pytest.raises(UserError, match="'module.'"):
        load_vae_state_dict_strict(model, {f"module.{k}": v for k, v in state.items()}, "ddp.safetensors")


def test_strict_loading_detects_vq_kl_confusion():
    kl = AutoencoderKL(small_config())
    vq_state = VQModel(small_config(quantize=True)).state_dict()
    with pytest.raises(UserError, match=r"vq\.safetensors: these are VQ-VAE weights.*quantize: false"):
        load_vae_state_dict_strict(kl, vq_state, "vq.safetensors")
    # VQ weights without the codebook keys: the non-square quant_conv still gives them away
    vq_other = VQModel(small_config(quantize=True, vq_embed_dim=2)).state_dict()
    no_codebook = {k: v for k, v in vq_other.items() if not k.startswith("quantize.")}
    with pytest.raises(UserError, match="non-square quant_conv"):
        load_vae_state_dict_strict(kl, no_codebook, "vq2.safetensors")
    with pytest.raises(UserError, match="KL-VAE weights.*quantize: true"):
        load_vae_state_dict_strict(VQModel(small_config(quantize=True)), kl.state_dict(), "kl.safetensors")


# ---------------------------------------------------------------------- gradient checkpointing
CHECKPOINTED_LAYERS = (ResBlock, SelfAttention2d, Downsample, Upsample)


def count_layer_calls(model: torch.nn.Module) -> list:
    """A list that grows by one per forward of any encoder/decoder layer. Forward *pre*-hooks: a
    recomputation stops once backward has what it needs (torch's early stop), before the post-hooks."""
    calls: list = []
    for module in model.modules():
        if isinstance(module, CHECKPOINTED_LAYERS):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def vae_step(model, x: torch.Tensor, seed: int):
    """One stage-1-like step: recon + regulariser, the gradient w.r.t. the last decoder layer that
    the adaptive GAN weight takes (retain_graph), then backward. Returns (recon, that gradient, grads)."""
    torch.manual_seed(seed)
    if isinstance(model, VQModel):
        recon, reg, _ = model(x)
    else:
        recon, posterior = model(x, generator=torch.Generator().manual_seed(seed))
        reg = posterior.kl().mean()
    loss = recon.square().mean() + 1e-3 * reg
    (last_grad,) = torch.autograd.grad(loss, model.last_decoder_layer_weight, retain_graph=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return recon.detach(), last_grad, grads


def assert_same_step(got, expected, atol: float, rtol: float) -> None:
    torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], expected[1], atol=atol, rtol=rtol)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=atol, rtol=rtol, msg=name)
    assert any(g.abs().max() > 0 for g in expected[2].values())


@pytest.mark.parametrize("quantize", [False, True])
def test_gradient_checkpointing_same_outputs_and_gradients_and_recomputes(quantize):
    config = dict(quantize=quantize, dropout=0.1)  # dropout: the recomputation must replay the masks
    torch.manual_seed(0)
    plain = build_autoencoder(small_config(**config)).train()
    perturb_(plain)
    ckpt = build_autoencoder(small_config(**config, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.encoder.gradient_checkpointing and ckpt.decoder.gradient_checkpointing
    num_layers = sum(isinstance(m, CHECKPOINTED_LAYERS) for m in plain.modules())
    # encoder levels (ResBlock + Downsample, ResBlock), 2 mid blocks (2 ResBlocks + attention), decoder levels
    assert num_layers == (1 + 1 + 1) + 3 + 3 + (2 + 1 + 2)
    calls_plain, calls_ckpt = count_layer_calls(plain), count_layer_calls(ckpt)
    quantizer_calls = []
    ckpt_quantize = getattr(ckpt, "quantize", None)
    if ckpt_quantize is not None:
        ckpt_quantize.register_forward_pre_hook(lambda *_: quantizer_calls.append(1))

    x = torch.randn(2, 3, 16, 16)
    expected, got = vae_step(plain, x, seed=5), vae_step(ckpt, x, seed=5)
    assert_same_step(got, expected, atol=1e-6, rtol=1e-5)
    # Every layer ran once more, in backward; the stateful quantizer (usage counts) only once.
    assert len(calls_plain) == num_layers and len(calls_ckpt) == 2 * num_layers
    if quantize:
        assert quantizer_calls == [1]
        for name, buffer in plain.quantize.named_buffers():
            assert torch.equal(getattr(ckpt.quantize, name), buffer), name

    # Checkpointed, the forward keeps only the layers' inputs for backward: far fewer saved bytes.
    def saved_bytes(model) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vae_step(model, x, seed=5)
        return total

    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)

    # Not in eval mode, nor without grad: one forward per layer.
    calls_ckpt.clear()
    with torch.no_grad():
        ckpt(x)
    ckpt.eval()
    vae_step(ckpt, x, seed=5)
    assert len(calls_ckpt) == 2 * num_layers


def test_vae_export_round_trips_checkpointing_and_upsample_choice(tmp_path):
    config = small_config(gradient_checkpointing=True, upsample_transposed_conv=False)
    model = build_autoencoder(config)
    upsamplers = [m for m in model.modules() if isinstance(m, Upsample)]
    assert upsamplers and all(up.transposed_conv is False and up.transposed_taps is None for up in upsamplers)
    path = save_vae_export(model, config, tmp_path / "vae.safetensors")
    loaded, loaded_config, _ = load_vae(path)
    assert loaded_config == config
    assert loaded_config.gradient_checkpointing is True and loaded_config.upsample_transposed_conv is False
    assert loaded.encoder.gradient_checkpointing and loaded.decoder.gradient_checkpointing
    assert all(m.transposed_conv is False for m in loaded.modules() if isinstance(m, Upsample))
    # Exports written before these keys existed load with the defaults.
    old = {k: v for k, v in vars(config).items() if k not in ("gradient_checkpointing", "upsample_transposed_conv")}
    defaults = from_dict(VAEConfig, old)
    assert defaults.gradient_checkpointing is False and defaults.upsample_transposed_conv == "auto"


# ------------------------------------------------------------------------------ channels_last
def non_channels_last_outputs(modules) -> list:
    """Hooks recording every 4-D module output that is not in channels_last memory format."""
    found: list = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[1] > 1 and output.shape[-2:].numel() > 1:
            if not output.is_contiguous(memory_format=torch.channels_last):
                found.append(type(module).__name__)

    for module in modules:
        module.register_forward_hook(hook)
    return found


@pytest.mark.parametrize("quantize", [False, True])
def test_vae_channels_last_same_results_without_copies_back(quantize):
    # The trainer's channels_last: model.to(memory_format=channels_last), channels_last images.
    torch.manual_seed(0)
    dense = build_autoencoder(small_config(quantize=quantize)).train()
    perturb_(dense)
    nhwc = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    assert nhwc.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # Every encoder/decoder activation stays channels_last (no silent copy back to NCHW).
    # The transposed-convolution Upsample (CPU) and the plain one are both covered: 8x8 -> 16x16
    # takes the transposed form, and a config with upsample_transposed_conv false the plain one.
    copies = non_channels_last_outputs(list(nhwc.encoder.modules()) + list(nhwc.decoder.modules()))
    x = torch.randn(2, 3, 16, 16)
    expected = vae_step(dense, x, seed=3)
    got = vae_step(nhwc, x.contiguous(memory_format=torch.channels_last), seed=3)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert copies == []
    assert_same_step(got, expected, atol=1e-5, rtol=1e-4)

    plain_up = build_autoencoder(small_config(quantize=quantize, upsample_transposed_conv=False))
    plain_up.load_state_dict(dense.state_dict())
    plain_up = plain_up.train().to(memory_format=torch.channels_last)
    copies = non_channels_last_outputs(plain_up.decoder.modules())
    got_plain = vae_step(plain_up, x.contiguous(memory_format=torch.channels_last), seed=3)
    assert copies == []
    assert_same_step(got_plain, expected, atol=1e-5, rtol=1e-4)


def test_discriminator_channels_last_same_results():
    torch.manual_seed(0)
    dense = NLayerDiscriminator(in_channels=3, start_channels=8, depth=3).train()
    nhwc = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    copies = non_channels_last_outputs(nhwc.modules())
    x = torch.randn(4, 3, 64, 64)
    results = []
    for model, images in ((dense, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
        logits = model(images)  # (4, 1, 6, 6)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
    assert copies == []
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for i in (1, 2):  # gradients, then BatchNorm running statistics
        for name, value in results[0][i].items():
            torch.testing.assert_close(results[1][i][name], value, atol=1e-5, rtol=1e-4, msg=name)
