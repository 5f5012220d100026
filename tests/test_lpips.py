"""modules.lpips against the `lpips` package (numbers), plus weight loading, modes and the ranking head."""
from __future__ import annotations

import urllib.error
import warnings

import lpips as lpips_pkg
import pytest
import torch
import torchvision

import modules.lpips as ours_lpips
from modules.errors import UserError
from modules.lpips import LPIPS, RankingHead, lpips_package_weights_path, ranking_loss, two_afc_score

BACKBONES = ["vgg", "alex", "squeeze"]


def package_lpips(backbone: str, spatial: bool = False) -> torch.nn.Module:
    """The package's metric on a random trunk (no download) with its shipped v0.1 linear weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` inside lpips
        return lpips_pkg.LPIPS(net=backbone, pnet_rand=True, pretrained=True, spatial=spatial, verbose=False).eval()


@pytest.fixture(scope="module", params=BACKBONES)
def pair(request):
    """(package model, our model with the package's state dict loaded) for one backbone."""
    torch.manual_seed(0)
    reference = package_lpips(request.param)
    ours = LPIPS(request.param, pretrained_backbone=False)
    ours.load_lpips_package_state_dict(reference.state_dict())
    return reference, ours.eval()


def image_pair(batch: int = 3, size: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    x1 = (x0 + 0.5 * torch.randn(batch, 3, size, size, generator=generator)).clamp(-1, 1)
    return x0, x1


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty TORCH_HOME and a torch.hub whose downloads fail like a machine without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


# ---- parity with the package --------------------------------------------------------------------
def test_distances_match_package(pair):
    reference, ours = pair
    x0, x1 = image_pair()
    with torch.no_grad():
        expected = reference(x0, x1).flatten()
        got = ours(x0, x1)
    assert got.shape == (3,)
    assert expected.min() > 1e-3  # a real, non-zero distance is compared
    assert (got - expected).abs().max() < 1e-5


def test_spatial_maps_match_package(pair):
    reference, ours = pair
    x0, x1 = image_pair(batch=2, size=48, seed=1)
    reference.spatial, ours.spatial = True, True
    try:
        with torch.no_grad():
            expected, got = reference(x0, x1), ours(x0, x1)
    finally:
        reference.spatial, ours.spatial = False, False
    assert got.shape == expected.shape == (2, 1, 48, 48)
    assert (got - expected).abs().max() < 1e-5


def test_identical_images_have_zero_distance(pair):
    _, ours = pair
    x0, _ = image_pair(batch=2, size=32)
    with torch.no_grad():
        assert ours(x0, x0).abs().max() < 1e-7


def test_memory_format_does_not_change_distances():
    torch.manual_seed(0)
    a = LPIPS("squeeze", pretrained_backbone=False, channels_last=True).eval()
    b = LPIPS("squeeze", pretrained_backbone=False, channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x0, x1 = image_pair()
    with torch.no_grad():
        assert (a(x0, x1) - b(x0, x1)).abs().max() < 1e-6


def test_baseline_without_heads_matches_package():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips_pkg.LPIPS(net="squeeze", lpips=False, pnet_rand=True, verbose=False).eval()
    ours = LPIPS("squeeze", pretrained_backbone=False, linear_heads=False).eval()
    ours.load_lpips_package_state_dict(reference.state_dict())
    x0, x1 = image_pair()
    with torch.no_grad():
        assert (ours(x0, x1) - reference(x0, x1).flatten()).abs().max() < 1e-5


def test_wrong_backbone_state_dict_is_user_error():
    alex = package_lpips("alex")
    ours = LPIPS("squeeze", pretrained_backbone=False)
    with pytest.raises(UserError, match="squeeze"):
        ours.load_lpips_package_state_dict(alex.state_dict())


# ---- the package's shipped linear weights -------------------------------------------------------
def test_load_shipped_linear_weights():
    ours = LPIPS("squeeze", pretrained_backbone=False)
    ours.load_lpips_package_linear_weights()
    shipped = torch.load(lpips_package_weights_path("squeeze"), map_location="cpu", weights_only=True)
    assert len(ours.heads) == 7
    for k, head in enumerate(ours.heads):
        assert torch.equal(head.conv.weight, shipped[f"lin{k}.model.1.weight"])


def test_shipped_weights_without_package_is_user_error(monkeypatch):
    real_find_spec = ours_lpips.importlib.util.find_spec
    monkeypatch.setattr(
        ours_lpips.importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real_find_spec(name, *a)
    )
    ours = LPIPS("squeeze", pretrained_backbone=False)
    with pytest.raises(UserError, match="`lpips` package is not installed"):
        ours.load_lpips_package_linear_weights()


# ---- pretrained trunk from the torch hub cache ---------------------------------------------------
def test_missing_pretrained_weights_offline_is_user_error(offline_hub):
    expected = offline_hub / "vgg16-397923af.pth"
    with pytest.raises(UserError) as info:
        LPIPS("vgg", pretrained_backbone=True)
    message = str(info.value)
    assert str(expected) in message and "could not be downloaded" in message
    assert "--no-pretrained_backbone" in message and "\n" not in message


def test_pretrained_weights_load_from_hub_cache(offline_hub):
    torch.manual_seed(123)
    source = torchvision.models.squeezenet1_1()
    offline_hub.mkdir(parents=True)
    torch.save(source.state_dict(), offline_hub / "squeezenet1_1-b8a52dc0.pth")
    torch.manual_seed(999)  # a different random init, which must be overwritten
    model = LPIPS("squeeze", pretrained_backbone=True)
    trunk = model.trunk.features.state_dict()
    assert len(trunk) > 0
    for key, value in trunk.items():
        assert torch.equal(value, source.features.state_dict()[key]), key


def test_corrupt_cached_weights_are_user_error(offline_hub):
    offline_hub.mkdir(parents=True)
    path = offline_hub / "squeezenet1_1-b8a52dc0.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        LPIPS("squeeze", pretrained_backbone=True)


def test_unknown_backbone_is_user_error():
    with pytest.raises(UserError, match="resnet"):
        LPIPS("resnet", pretrained_backbone=False)


# ---- modes, gradients, clamping -----------------------------------------------------------------
def test_frozen_trunk_mode():
    model = LPIPS("squeeze", pretrained_backbone=False)
    trainable = list(model.trainable_parameters())
    assert [p.shape for p in trainable] == [h.conv.weight.shape for h in model.heads]
    assert not any(p.requires_grad for p in model.trunk.parameters())
    model.train()
    assert model.heads.training and not model.trunk.training
    # Gradients still reach the images (needed when LPIPS is a training loss of the VAE).
    x0, x1 = image_pair(batch=2, size=32)
    x1.requires_grad_(True)
    model.eval()(x0, x1).sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.trunk.parameters())


def test_one_sided_gradient_runs_the_other_image_without_graph():
    # As a training loss only the reconstruction needs a gradient: the target then goes through
    # the trunk separately under no_grad, and distances and gradients equal the batched call's.
    torch.manual_seed(0)
    model = LPIPS("squeeze", pretrained_backbone=False).eval()
    calls = []
    model.trunk.register_forward_hook(lambda m, inputs, out: calls.append((inputs[0].shape[0], torch.is_grad_enabled())))
    x0, x1 = image_pair(batch=2, size=32)
    both = [x0.clone().requires_grad_(True), x1.clone().requires_grad_(True)]
    expected = model(*both)
    expected_grads = torch.autograd.grad(expected.sum(), both)
    assert calls == [(4, True)]  # both need a gradient: one batched call
    for side in (0, 1):
        calls.clear()
        inputs = [x0.clone(), x1.clone()]
        inputs[side].requires_grad_(True)
        got = model(*inputs)
        assert calls == [(2, False), (2, True)]  # the image without a graph first, under no_grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        grad = torch.autograd.grad(got.sum(), inputs[side])[0]
        torch.testing.assert_close(grad, expected_grads[side], rtol=1e-4, atol=1e-7)
    calls.clear()
    with torch.no_grad():
        model(x0, x1)
    assert calls == [(4, False)]  # evaluation keeps the single batched call


def test_tune_mode_trains_trunk():
    model = LPIPS("squeeze", pretrained_backbone=False, train_backbone=True)
    trainable = list(model.trainable_parameters())
    assert len(trainable) == len(model.heads) + len(list(model.trunk.parameters()))
    model.train()
    assert model.trunk.training
    x0, x1 = image_pair(batch=2, size=32)
    model(x0, x1).sum().backward()
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = LPIPS("squeeze", pretrained_backbone=False, use_dropout=True)
    x0, x1 = image_pair(batch=2, size=32)
    model.train()
    assert not torch.equal(model(x0, x1), model(x0, x1))
    model.eval()
    assert torch.equal(model(x0, x1), model(x0, x1))


def test_clamp_linear_weights():
    torch.manual_seed(0)
    model = LPIPS("squeeze", pretrained_backbone=False)
    trunk_before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    for head in model.heads:
        torch.nn.init.normal_(head.conv.weight)
    before = [h.conv.weight.clone() for h in model.heads]
    model.clamp_linear_weights_()
    for head, old in zip(model.heads, before):
        assert (head.conv.weight >= 0).all()
        assert torch.equal(head.conv.weight, old.clamp(min=0))
    # SqueezeNet's own 1x1 convolutions are not clamped.
    for key, value in model.trunk.state_dict().items():
        assert torch.equal(value, trunk_before[key])


# ---- config round trip ----------------------------------------------------------------------------
def test_config_round_trip():
    torch.manual_seed(0)
    model = LPIPS("squeeze", pretrained_backbone=False, use_dropout=False, dropout_p=0.3).eval()
    config = model.config()
    assert config["backbone"] == "squeeze" and config["use_dropout"] is False and config["dropout_p"] == 0.3
    rebuilt = LPIPS.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config() == config
    x0, x1 = image_pair(batch=2, size=32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x0, x1), model(x0, x1))


def test_from_config_rejects_unknown_key_and_wrong_type():
    with pytest.raises(UserError, match="allowed"):
        LPIPS.from_config({"backbone": "squeeze", "depth": 3})
    with pytest.raises(UserError, match="use_dropout"):
        LPIPS.from_config({"backbone": "squeeze", "use_dropout": "yes"})


def test_from_config_does_not_need_pretrained_weights(offline_hub):
    config = {"backbone": "squeeze", "pretrained_backbone": True}
    model = LPIPS.from_config(config)  # no cache, no network: the trunk comes from the checkpoint
    assert model.config()["pretrained_backbone"] is True
    with pytest.raises(UserError, match="not found"):
        LPIPS.from_config(config, load_pretrained_backbone=True)


# ---- ranking head -------------------------------------------------------------------------------
def test_ranking_head_matches_package_bce_ranking_loss():
    torch.manual_seed(0)
    package_loss = lpips_pkg.BCERankingLoss(chn_mid=32)
    head = RankingHead(middle_channels=32)
    head.load_state_dict(package_loss.net.state_dict())
    d0, d1 = torch.rand(6) * 0.5, torch.rand(6) * 0.5
    judge = torch.tensor([0.0, 0.5, 1.0, 0.2, 0.8, 1.0])
    expected_loss = package_loss(d0.view(6, 1, 1, 1), d1.view(6, 1, 1, 1), (judge * 2 - 1).view(6, 1, 1, 1))
    loss, logs = ranking_loss(head, d0, d1, judge)
    assert head(d0, d1).shape == (6,)
    assert torch.allclose(head(d0, d1), package_loss.logit.flatten(), atol=1e-6)
    assert abs(loss.item() - expected_loss.item()) < 1e-6
    assert set(logs) == {"loss", "accuracy"} and logs["loss"] == loss.item()
    assert logs["accuracy"] == two_afc_score(d0, d1, judge).mean().item()


def test_two_afc_score_values():
    d0 = torch.tensor([1.0, 1.0, 2.0, 1.0])
    d1 = torch.tensor([2.0, 0.5, 1.0, 1.0])
    judge = torch.tensor([0.2, 0.2, 1.0, 0.9])
    # metric picks p0 (scores 1 - judge), p1 (judge), p1 (judge), tie (0.5)
    assert torch.allclose(two_afc_score(d0, d1, judge), torch.tensor([0.8, 0.2, 1.0, 0.5]))


def test_ranking_head_learns_toy_judgements():
    torch.manual_seed(0)
    d0, d1 = torch.rand(256), torch.rand(256)
    judge = torch.sigmoid((d0 - d1) / 0.1)  # humans prefer the closer image
    head = RankingHead()
    optimizer = torch.optim.Adam(head.parameters(), lr=2e-2)
    first, _ = ranking_loss(head, d0, d1, judge)
    for _ in range(60):
        loss, _ = ranking_loss(head, d0, d1, judge)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # BCE against soft targets bottoms out at their entropy; the head must get close to it.
    entropy = torch.nn.functional.binary_cross_entropy(judge, judge).item()
    assert loss.item() < first.item() - 0.1
    assert loss.item() - entropy < 0.05
    assert ((head(d0, d1) > 0.5) == (d1 < d0)).float().mean() > 0.95
