"""evaluate_ldm.py: FID / KID / CLIP score of generated images, rFID / PSNR / SSIM / LPIPS of a VAE.

The scores come from torchmetrics; these tests check that we feed it right by recomputing each
number with the reference formula on the same features (pytorch-fid's Frechet distance with
scipy's sqrtm, KID's unbiased cubic-kernel MMD, CLIP score as 100 * max(cos, 0)), and that the
script's three inputs agree: images generated in process, the same images written by
inference_ldm.py and read back, and their prompts from the PNG text. Weights are offline stand-ins
built here: random Inception-v3 weights (generate_data.py inception) and a tiny CLIPModel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg

import evaluate_ldm
import inference_ldm
from conftest import OFFLINE_ENV, REPO_ROOT
from modules.autoencoder import VAEConfig, build_autoencoder
from modules.cli import run_main
from modules.errors import UserError
from modules.image_metrics import psnr
from modules.scores import InceptionScores, write_random_inception
from modules.vae_io import save_vae_export
from tiny_exports import IMG, tiny_clip, tiny_export

N = 8  # images per side: Inception at 299 px costs ~0.15 s an image on a CPU core
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    clip = tiny_clip(root / "clip", vision_image_size=IMG)  # the scorer's; the export has a text-only one
    torch.manual_seed(0)
    vae_cfg = VAEConfig(img_size=IMG, vae_channels_per_block=[8, 16], norm_num_groups=4, latent_channels=4,
                        residual_layers_per_block=1, attention_layers=0)
    return {"root": root, "clip": clip, "inception": write_random_inception(root / "inception.pth", calibration_images=16),
            "ldm": tiny_export(root / "text.safetensors", "text", tiny_clip(root / "text_clip")),
            "vae": save_vae_export(build_autoencoder(vae_cfg), vae_cfg, root / "vae.safetensors")}


def _common(assets) -> list:
    return ["--reference_dataset", "shapes", "--num_images", str(N), "--inception_weights", str(assets["inception"]),
            "--kid_subset_size", str(N), "--batch_size", "4"]


def _features(inception_path, images: torch.Tensor) -> np.ndarray:
    scores = InceptionScores(inception_path)
    return scores.features(images).double().numpy()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3 (Binkowski et al. 2018), all images in one subset."""
    d, m = a.shape[1], a.shape[0]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_generated_scores_match_the_reference_formulas_and_the_png_route(assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "scores.json"
    result = evaluate_ldm.main(["--ldm", str(assets["ldm"]), *_common(assets), "--prompts_file", str(prompts),
                                "--clip_model", str(assets["clip"]), "--sampler", "ddim", "--num_inference_steps", "3",
                                "--guidance_scale", "2.0", "--seed", "5", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["images"] == result["real_images"] == result["fake_images"] == N
    assert result["generation"] == {"sampler": "ddim", "num_inference_steps": 3, "guidance_scale": 2.0,
                                    "seconds_per_image": pytest.approx(result["generation"]["seconds_per_image"])}

    # The same images through inference_ldm.py (seed 5 + i, PNG-rounded as evaluate rounds) ...
    folder = tmp_path / "pngs"
    inference_ldm.main(["--path_to_weights", str(assets["ldm"]), "--prompt", PROMPT, "--num_images", str(N),
                        "--seed", "5", "--sampler", "ddim", "--num_inference_steps", "3", "--guidance_scale", "2.0",
                        "--output", str(folder)])
    from_pngs = evaluate_ldm.main(["--images", str(folder), *_common(assets), "--clip_model", str(assets["clip"])])
    # ... give the same scores, the prompt read back from each PNG.
    for key in ("fid", "kid", "clip_score"):
        assert from_pngs[key] == pytest.approx(result[key], rel=1e-5), key

    # Reference formulas on the same features.
    fake, _ = evaluate_ldm.generated_from_folder(str(folder))
    args = evaluate_ldm.parse_args(["--images", str(folder), *_common(assets)])
    real = torch.stack([s["image"] for s in evaluate_ldm.reference_images(args, IMG)])
    a, b = _features(assets["inception"], real), _features(assets["inception"], fake)
    assert result["fid"] == pytest.approx(_frechet(a, b), rel=1e-3)
    assert result["kid"] == pytest.approx(_kid(a, b), rel=1e-3, abs=1e-6)

    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(assets["clip"]), CLIPProcessor.from_pretrained(assets["clip"])
    inputs = processor(text=[PROMPT] * N, images=list(fake), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt)).clamp(min=0).mean().item()
    assert result["clip_score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_vae_scores_are_the_reconstructions_psnr_ssim_and_rfid(assets, tmp_path):
    result = evaluate_ldm.main(["--vae", str(assets["vae"]), *_common(assets)])
    assert result["images"] == N and set(result) >= {"psnr", "ssim", "rfid", "rkid", "rkid_std"}
    # PSNR recomputed from the reconstructions.
    from modules.image_datasets import images_to_model
    from modules.vae_io import load_vae

    vae, config, _ = load_vae(assets["vae"])
    args = evaluate_ldm.parse_args(["--vae", str(assets["vae"]), *_common(assets)])
    images = images_to_model(torch.stack([s["image"] for s in evaluate_ldm.reference_images(args, IMG)]), "cpu")
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).mode()).clamp(-1, 1)
    assert result["psnr"] == pytest.approx(psnr(images, recon, 2.0).mean().item(), rel=1e-5)
    assert result["rfid"] > 0 and -1 < result["ssim"] < 1


def test_reference_features_cache_serves_the_vae_and_ldm_runs_and_gives_the_same_scores(assets, tmp_path, monkeypatch):
    cache, n = tmp_path / "ref.pt", N // 2
    vae_argv = ["--vae", str(assets["vae"]), *_common(assets), "--num_images", str(n), "--kid_subset_size", str(n),
                "--metrics", "rfid"]
    first = evaluate_ldm.main([*vae_argv, "--reference_features", str(cache)])
    saved = torch.load(cache, weights_only=True)
    assert saved["features"].shape == (n, 2048) and saved["key"]["images"] == n
    assert np.allclose(saved["features"].numpy(), _features(assets["inception"], torch.stack(
        [s["image"] for s in evaluate_ldm.reference_images(evaluate_ldm.parse_args(vae_argv), IMG)])), atol=1e-4)
    # Read back, Inception sees only the reconstructions (not the references) and the scores are the same.
    calls = []
    original = InceptionScores.update
    monkeypatch.setattr(InceptionScores, "update", lambda self, images, real: (calls.append(real), original(self, images, real)))
    again = evaluate_ldm.main([*vae_argv, "--reference_features", str(cache)])
    assert True not in calls and len(calls) > 0
    assert again["rfid"] == pytest.approx(first["rfid"], rel=1e-6) and first["rfid"] > 0
    assert again["rkid"] == pytest.approx(first["rkid"], rel=1e-6, abs=1e-9)
    # The LDM run on the same reference reads the same file.
    calls.clear()
    evaluate_ldm.main(["--ldm", str(assets["ldm"]), *_common(assets), "--num_images", str(n), "--kid_subset_size",
                       str(n), "--metrics", "fid", "--sampler", "ddim", "--num_inference_steps", "2",
                       "--reference_features", str(cache)])
    assert True not in calls
    # Another reference (other shapes seed): computed again and the file replaced.
    calls.clear()
    evaluate_ldm.main([*vae_argv, "--shapes_seed", "7", "--reference_features", str(cache)])
    assert calls.count(True) > 0 and torch.load(cache, weights_only=True)["key"]["shapes_seed"] == 7
    # A file the cache did not write is never overwritten.
    foreign = tmp_path / "notes.pt"
    foreign.write_text("mine")
    with pytest.raises(UserError, match="notes.pt: not a reference-features file"):
        evaluate_ldm.main([*vae_argv, "--reference_features", str(foreign)])
    assert foreign.read_text() == "mine"


def _run(*argv, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "evaluate_ldm.py", *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_offline_without_inception_weights_a_launched_script_says_where_to_get_them(assets, tmp_path):
    # Offline, nothing in the torch hub cache: the script as a user launches it.
    line = _one_line_error(_run("--vae", str(assets["vae"]), "--reference_dataset", "shapes", "--num_images", "4",
                                env_extra={"TORCH_HOME": str(tmp_path / "torch_home")}))
    assert "no Inception weights at" in line and "--inception_weights FILE" in line and "offline" in line


def test_bad_inputs_are_one_line_errors(assets, tmp_path, capsys):
    text_only = tiny_clip(tmp_path / "text_only_clip")
    base = ["--reference_dataset", "shapes", "--num_images", "4"]
    cases = [
        (["--vae", str(assets["vae"]), *base, "--inception_weights", str(tmp_path / "none.pth")],
         "none.pth: file not found"),
        (["--vae", str(assets["vae"]), *base, "--inception_weights", str(assets["vae"])],
         "not torch-fidelity Inception-v3 weights"),
        (["--ldm", str(assets["ldm"]), *base, "--metrics", "clip", "--clip_model", str(text_only)],
         "cannot load a CLIP model for the CLIP score"),
        (["--ldm", str(assets["ldm"]), *base, "--metrics", "clip"],  # the hub default, offline
         "--clip_model openai/clip-vit-large-patch14: cannot load a CLIP model"),
        (["--ldm", str(assets["ldm"]), *base, "--metrics", "fid,psnr"], "expected a comma-separated subset"),
        (["--vae", str(assets["vae"]), *base, "--metrics", "lpips"], "--metrics lpips needs --lpips"),
        (["--images", str(tmp_path), *base], "PNG(s)"),
        (["--ldm", str(tmp_path / "missing.safetensors"), *base], "missing.safetensors: file not found"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            run_main(evaluate_ldm.main, argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert exc.value.code == 2 and len(errors) == 1 and "Traceback" not in err, (argv, err)
        assert expected in errors[0], argv
